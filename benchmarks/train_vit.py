"""Agent attention as a trainable module: an Agent-ViT and a softmax ViT of the same size, one recipe.

The task comes from the demo world: read every object of a scene (presence, shape, colour and
size at each of the five positions) from a 128² image; accuracy is the fraction of held-out
images read exactly right (the demo evaluator's scoring). Both models are ``agentsd.nn.ViT``;
the Agent-ViT has every block's attention swapped by ``agentsd.nn.agentify``. Each run is
seeded, checkpointed and resumable (``--run`` folder: config, log, checkpoint).

    python benchmarks/train_vit.py train --attention softmax --run runs/vit-softmax
    python benchmarks/train_vit.py train --attention agent --run runs/vit-agent
    python benchmarks/train_vit.py scale --sizes 64 128 256 512 1024   # throughput and FLOPs
    python benchmarks/train_vit.py report --runs runs/vit-softmax runs/vit-agent   # JSON, table, plot
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from train_demo import Run, _attribute_loss, _cosine, _data_seed, _evaluator_targets, _steps

from agentsd.bench import pyplot, write_report
from agentsd.demo import data
from agentsd.demo.evaluator import HEADS, decode, score
from agentsd.nn import ViT, agentify

RESULTS = Path(__file__).parent / "results"
DEFAULTS = dict(
    seed=0,
    img_size=128,
    patch_size=8,  # 16 × 16 = 256 tokens
    dim=96,
    depth=6,
    heads=3,
    agent_num=16,
    batch=64,
    lr=1e-3,
    warmup=100,
    steps=900,  # each model trains in under 30 minutes on 2 cores (one thread each, both at once)
    test_n=2000,
)
_SEEDS = 5_000_000  # the generator's training stream, apart from train_demo's stages


def build(config: dict, attention: str, img_size: int | None = None) -> ViT:
    torch.manual_seed(config["seed"])
    model = ViT(
        img_size=img_size or config["img_size"],
        patch_size=config["patch_size"],
        num_classes=len(data.POSITIONS) * sum(HEADS),
        embed_dim=config["dim"],
        depth=config["depth"],
        num_heads=config["heads"],
    )
    if attention == "agent":
        agentify(model, agent_num=config["agent_num"])
    elif attention != "softmax":
        raise ValueError(f"attention must be agent or softmax, got {attention!r}")
    return model


def logits(model: ViT, images: torch.Tensor) -> torch.Tensor:
    return model(images.float() / 127.5 - 1).view(len(images), len(data.POSITIONS), -1)


def train(run: Run, attention: str) -> dict:
    c = run.config
    model = build(c, attention).train()
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=0.05)
    lr_at = _cosine(c["lr"], c["warmup"], c["steps"])
    began = time.time()
    for step, _ in _steps(run, "model", {"model": model, "opt": opt}, lambda: c["steps"], lr_at, opt):
        batch = data.sample(c["batch"], seed=_data_seed(run, _SEEDS + step), num_objects=None)
        loss = _attribute_loss(logits(model, batch.images), _evaluator_targets(batch.scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            run.log("model", step, loss=round(loss.item(), 4), lr=round(lr_at(step), 6))
    model.eval()
    test = data.sample(c["test_n"], seed=0, num_objects=None, split="test")
    with torch.no_grad():
        readings = [r for s in range(0, len(test.images), 250) for r in decode(logits(model, test.images[s : s + 250]))]
    scores = score(readings, test.scenes)
    result = {"attention": attention, "test_accuracy": scores.overall, "scores": scores.__dict__}
    run.log("done", c["steps"], **result, train_s=round(time.time() - began, 1))
    (run.folder / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _median_seconds(model, images, repeats: int) -> float:
    with torch.no_grad():
        model(images)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def scale(config: dict, sizes: list[int], repeats: int) -> dict:
    """Seconds per image (batch 1, median) and FLOPs of one forward, both models, at each input size."""
    out = {}
    for size in sizes:
        images = torch.randn(1, 3, size, size)
        row = {"tokens": (size // config["patch_size"]) ** 2}
        for attention in ("softmax", "agent"):
            model = build(config, attention).eval()  # trained at img_size; other sizes interpolate
            # The math backend spells attention out in matmuls, which the counter sees (fused kernels it may not).
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
                model(images)
            row[attention] = {"seconds": _median_seconds(model, images, repeats), "flops": counter.get_total_flops()}
            print(f"{size}² {attention}: {row[attention]['seconds']:.4f} s, {row[attention]['flops'] / 1e9:.2f} GFLOP")
        row["speedup"] = row["softmax"]["seconds"] / row["agent"]["seconds"]
        row["flop_ratio"] = row["softmax"]["flops"] / row["agent"]["flops"]
        out[str(size)] = row
    return out


def report(trained: dict, scaling: dict, config: dict, out: Path) -> dict:
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "config": config,
        "trained": trained,
        "scaling": scaling,
    }
    out.write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"ViT on the demo world, {config['img_size']}² images, patch {config['patch_size']}, dim {config['dim']}, "
             f"depth {config['depth']}, {config['heads']} heads, {config['agent_num']} agents", ""]  # fmt: skip
    if trained:
        lines += ["| attention | test accuracy (every attribute right) | train s |", "|---|---|---|"]
        lines += [f"| {k} | {v['test_accuracy']:.1%} | {v.get('train_s', '–')} |" for k, v in trained.items()]
        lines.append("")
    if scaling:
        lines += [
            "| input | tokens | softmax s/img | agent s/img | speed-up | softmax GFLOP | agent GFLOP | FLOP ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for size, row in scaling.items():
            s, a = row["softmax"], row["agent"]
            lines.append(
                f"| {size}² | {row['tokens']} | {s['seconds']:.4f} | {a['seconds']:.4f} | {row['speedup']:.2f}× | "
                f"{s['flops'] / 1e9:.2f} | {a['flops'] / 1e9:.2f} | {row['flop_ratio']:.2f}× |"
            )
    figure = None
    plt = pyplot()
    if plt is not None and scaling:
        figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        sizes = [int(s) for s in scaling]
        for attention in ("softmax", "agent"):
            axes[0].plot(sizes, [1 / scaling[str(s)][attention]["seconds"] for s in sizes], marker="o", label=attention)
            axes[1].plot(sizes, [scaling[str(s)][attention]["flops"] / 1e9 for s in sizes], marker="o", label=attention)
        for ax, label in zip(axes, ("images / s (batch 1)", "GFLOP per image")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("input side (pixels)")
            ax.set_ylabel(label)
            ax.legend(fontsize=8)
    write_report(out, "\n".join(lines), figure)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("train")
    fit.add_argument("--attention", choices=["agent", "softmax"], required=True)
    fit.add_argument("--run", type=Path, required=True)
    fit.add_argument("--threads", type=int, default=2)
    fit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config value")
    sweep = commands.add_parser("scale")
    sweep.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    sweep.add_argument("--repeats", type=int, default=3)
    sweep.add_argument("--threads", type=int, default=2)
    sweep.add_argument("--out", type=Path, default=RESULTS / "vit_scaling.json")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    summary = commands.add_parser("report")
    summary.add_argument("--runs", type=Path, nargs="*", default=[])
    summary.add_argument("--scaling", type=Path, default=RESULTS / "vit_scaling.json")
    summary.add_argument("--out", type=Path, default=RESULTS / "vit.json")
    args = parser.parse_args(argv)
    overrides = {}
    for item in getattr(args, "set", []):
        key, _, value = item.partition("=")
        if key not in DEFAULTS:
            parser.error(f"unknown setting {key!r}; choose from {', '.join(DEFAULTS)}")
        overrides[key] = json.loads(value)
    if args.command == "train":
        torch.set_num_threads(args.threads)
        run = Run(args.run, overrides, defaults=DEFAULTS)
        run.log("start", 0, config=run.config, attention=args.attention, threads=args.threads)
        train(run, args.attention)
    elif args.command == "scale":
        torch.set_num_threads(args.threads)
        config = {**DEFAULTS, **overrides}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": config, "sizes": scale(config, args.sizes, args.repeats)}) + "\n")
    else:
        trained = {}
        config = dict(DEFAULTS)
        for folder in args.runs:
            result = json.loads((folder / "result.json").read_text())
            done = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
            result["train_s"] = sum(r.get("train_s", 0) for r in done if r["stage"] == "done")
            trained[result["attention"]] = result
            config = json.loads((folder / "config.json").read_text())
        scaling = json.loads(args.scaling.read_text())["sizes"] if args.scaling.exists() else {}
        report(trained, scaling, config, args.out)


if __name__ == "__main__":
    main()
