"""Time UNet forwards: vanilla SDPA vs tomesd vs agentsd (ToMe mode, agent phase, paper schedule) vs a ceiling.

The SD 1.5 UNet is built from its config with random weights: timing does not
depend on the weights. All methods run in one process, interleaved repeat by
repeat so drift in machine load hits them alike. Raw times go to JSON first; the
table is made from the JSON.

    python benchmarks/speed.py                          # 512² and 1024², writes benchmarks/results/speed_cpu.json
    python benchmarks/speed.py --sizes 512 --repeats 7  # re-measure one size; the others in the JSON stay
    python benchmarks/speed.py --sizes 256 --repeats 1 --out /tmp/quick.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

import agentsd
from agentsd import PRESETS, Phase

# SD 1.5's UNet config (identical to diffusers' defaults, spelled out so the architecture is explicit).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
TOME_RATIO = PRESETS["paper"][1].ratio
AGENT_PHASE = Phase(end=1.0, **{k: getattr(PRESETS["paper"][0], k) for k in ("sx", "sy", "ratio", "agent_ratio")})
TOME_PHASE = Phase(end=1.0, sx=2, sy=2, ratio=TOME_RATIO)
AGENT_SHARE = PRESETS["paper"][0].end  # fraction of sampling the paper schedule spends in the agent phase


class _ZeroAttention:
    """The ceiling: top-level self-attention that costs nothing (and computes nothing)."""

    def __init__(self, original, tokens: int):
        self.original, self.tokens = original, tokens

    def __call__(self, attn, hidden_states, *args, **kwargs):
        if hidden_states.shape[1] == self.tokens:
            return torch.zeros_like(hidden_states)
        return self.original(attn, hidden_states, *args, **kwargs)


def _ceiling(unet, tokens: int) -> Callable[[], None]:
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    originals = [b.attn1.processor for b in blocks]
    for block, original in zip(blocks, originals):
        block.attn1.set_processor(_ZeroAttention(original, tokens))

    def undo():
        for block, original in zip(blocks, originals):
            block.attn1.set_processor(original)

    return undo


def _tomesd(unet, ratio: float) -> Callable[[], None]:
    import tomesd

    tomesd.apply_patch(unet, ratio=ratio, sx=2, sy=2, use_rand=True)
    return lambda: tomesd.remove_patch(unet)


def _agentsd(unet, phase: Phase) -> Callable[[], None]:
    agentsd.apply(unet, [phase], seed=0)
    return lambda: agentsd.remove(unet)


# name -> (patch(unet, latent_tokens) returning an undo function)
METHODS: dict[str, Callable] = {
    "vanilla": lambda unet, tokens: lambda: None,
    "tomesd": lambda unet, tokens: _tomesd(unet, TOME_RATIO),
    "agentsd-tome": lambda unet, tokens: _agentsd(unet, TOME_PHASE),
    "agentsd-agent": lambda unet, tokens: _agentsd(unet, AGENT_PHASE),
    "ceiling": _ceiling,
}


def time_forward(unet, sample, timestep, context) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        unet(sample, timestep, context)
    if sample.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(sizes, methods, repeats, warmup, batch, dtype, device, out: Path) -> dict:
    """Measure every size (all methods interleaved) and write ``out`` after each; other sizes in ``out`` are kept."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(device=device, dtype=dtype).eval()
    setup = {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "model": "SD 1.5 UNet architecture, random weights",
        "tome_ratio": TOME_RATIO,
        "agent_phase": AGENT_PHASE.__dict__,
        "paper_agent_share": AGENT_SHARE,
    }
    results = json.loads(out.read_text()) if out.exists() else {}
    if {k: v for k, v in results.items() if k != "sizes"} != json.loads(json.dumps(setup)):
        results = {}  # measured under other settings: start afresh rather than mix
    results = {**setup, "sizes": results.get("sizes", {})}
    for size in sizes:
        latent = size // 8
        sample = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
        context = torch.randn(batch, 77, SD15_UNET["cross_attention_dim"], device=device, dtype=dtype)
        times = {name: [] for name in methods}
        for rep in range(warmup + repeats):
            for name in methods:
                undo = METHODS[name](unet, latent * latent)
                try:
                    seconds = time_forward(unet, sample, 500, context)
                finally:
                    undo()
                if rep >= warmup:
                    times[name].append(seconds)
                print(
                    f"{size}² {name:14s} {'warm-up' if rep < warmup else f'repeat {rep - warmup + 1}'}: "
                    f"{seconds:.2f} s",
                    flush=True,
                )
        results["sizes"][str(size)] = {"repeats": repeats, "warmup": warmup, **summarize(times)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def summarize(times: dict[str, list[float]]) -> dict:
    """Medians (and minima, robust to load spikes), speed-ups over vanilla, and the share of the
    ceiling's saving each method reaches; the paper schedule is weighted from its two phases."""
    summary = {"times": times}
    for stat, reduce in (("median", statistics.median), ("min", min)):
        seconds = {name: reduce(ts) for name, ts in times.items()}
        if "agentsd-agent" in seconds and "agentsd-tome" in seconds:
            seconds["agentsd-paper"] = (
                AGENT_SHARE * seconds["agentsd-agent"] + (1 - AGENT_SHARE) * seconds["agentsd-tome"]
            )
        summary[stat] = seconds
        if "vanilla" in seconds:
            vanilla = seconds["vanilla"]
            summary[f"speedup_{stat}"] = {name: vanilla / t for name, t in seconds.items()}
            if "ceiling" in seconds:
                saving = vanilla - seconds["ceiling"]
                summary[f"ceiling_share_{stat}"] = {name: (vanilla - t) / saving for name, t in seconds.items()}
    return summary


def table(results: dict) -> str:
    lines = [
        f"UNet forward, batch {results['batch']}, {results['dtype']}, {results['device']} "
        f"({results['threads']} threads)",
        "",
        "Speed-up over vanilla and share of the ceiling's saving, from the median (and the minimum) of the repeats.",
        "",
        "| size | method | median s | speed-up | share of ceiling saving | min s | speed-up (min) | share (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(value, fmt):
        return "–" if value is None else fmt.format(value)

    for size, summary in results["sizes"].items():
        for name in summary["median"]:
            cells = []
            for stat in ("median", "min"):
                cells += [
                    cell(summary[stat][name], "{:.2f}"),
                    cell(summary.get(f"speedup_{stat}", {}).get(name), "{:.2f}×"),
                    cell(summary.get(f"ceiling_share_{stat}", {}).get(name), "{:.0%}"),
                ]
            lines.append(f"| {size}² | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sizes (pixels, square)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed_cpu.json"))
    parser.add_argument("--report", action="store_true", help="only remake the summaries and table from --out")
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads(args.out.read_text())
        for size, measured in results["sizes"].items():
            results["sizes"][size] = {k: measured[k] for k in ("repeats", "warmup")} | summarize(measured["times"])
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    else:
        dtype, device = getattr(torch, args.dtype), torch.device(args.device)
        results = run(args.sizes, args.methods, args.repeats, args.warmup, args.batch, dtype, device, args.out)
    text = table(results)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
