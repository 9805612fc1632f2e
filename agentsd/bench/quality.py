"""Image quality per method: the same prompts and seeds for each, images saved as they are made.

For every method the images go to ``<out>/images/<method>/NNNNN.png`` (a re-run skips
the ones that exist; a video pipeline's videos as filmstrips, their frames one above the other).
Then, on the main process:

- FID and KID (± std) against a reference folder, or against vanilla's images when
  none is given; features from the demo evaluator (demo model) or from Inception
  (``--inception-weights``, needs torch-fidelity);
- same-seed PSNR and SSIM of each method's images against vanilla's;
- caption accuracy (demo prompts), CLIP score (with a local CLIP model);
- seconds per image.

Under ``accelerate launch`` the prompts are split between the processes (each makes
its share of the images; the main process then measures them all from the folder):

    accelerate launch --multi_gpu --num_processes 2 -m agentsd.cli bench quality ...

    agentsd bench quality --prompts demo --num 500 --methods none tome agent --out benchmarks/results/quality_demo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from agentsd.bench import git_commit, pyplot, write_report
from agentsd.schedule import PRESETS, Phase, resolve_schedule


def _with(preset: str, **options) -> tuple[Phase, ...]:
    """A DiT preset's phases with ``options`` set on every phase that merges."""
    return tuple(dataclasses.replace(p, **options) if p.merges else p for p in PRESETS[preset])


# method -> agentsd schedule (None: unpatched); "deepcache" methods also enable DeepCache's step caching
METHODS = {
    "none": None,
    "tome": "tome",
    "agent": "paper",
    "paper": "paper",
    "fast": "fast",
    "lean": "lean",
    "pooled": "pooled",
    "sd3": "sd3",
    "sd3-paper": "sd3-paper",
    "deepcache": None,
    "deepcache+agent": "paper",
    "deepcache+fast": "fast",
    "deepcache+lean": "lean",
    "flux": "flux",
    "flux-bare": "flux-bare",
    "flux-merged": "flux-merged",
    "wan": "wan",
    "wan-fast": "wan-fast",
    # the ablation of the Flux preset (as it stood before DESIGN §12's options: flux-bare) on the DiT proving ground:
    # agents in every block (the edges too), agents for the whole run, agents for the first 40% and nothing after (no
    # lean late phase)
    "flux-all-blocks": {"schedule": "flux-bare", "blocks": "all"},
    "flux-whole-run": {"schedule": (dataclasses.replace(PRESETS["flux-bare"][0], end=1.0),)},
    "flux-no-late": {"schedule": (PRESETS["flux-bare"][0], Phase(end=1.0, ratio=0.0))},
    # flux with one agent per 2x2 window instead of 4x4: four times the agents (64 at the proving ground's 256 tokens,
    # as many as the UNet proving ground's top level gets from lean)
    "flux-agents-2x2": {
        "schedule": (dataclasses.replace(PRESETS["flux-bare"][0], sx=2, sy=2), PRESETS["flux-bare"][1])
    },
    # flux with Agent Attention's plain broadcast (the model's softmax scale, no V shortcut) instead of AgentSD's
    # (scale^0.3, 0.075 V)
    "flux-plain-broadcast": {"schedule": "flux-bare", "k_scale2": 1.0, "k_shortcut": 0.0},
    # DESIGN §12 on the Flux presets without it: proportional attention (+prop), the near field joined as a correction
    # of the broadcast (+near), both (+both: flux as of 6b40729), shifted windows (+shift), all three (+all); the
    # near field as DESIGN §12.2's one softmax (-softmax; -softmax-s: with the agents at the model's own scale instead
    # of AgentSD's s^0.3). Results measured before flux took both options name flux-bare "flux" and these "flux+...".
    **{
        f"{preset}+{name}": {"schedule": _with(preset, **options), **extra}
        for preset in ("flux-bare", "flux-merged")
        for name, options, extra in (
            ("prop", dict(proportional=True), {}),
            ("near", dict(near=True), {}),
            ("both", dict(proportional=True, near=True), {}),
            ("shift", dict(shift=True), {}),
            ("all", dict(proportional=True, near=True, shift=True), {}),
            ("near-softmax", dict(near="softmax"), {}),
            ("both-softmax", dict(proportional=True, near="softmax"), {}),
            ("both-softmax-s", dict(proportional=True, near="softmax"), {"k_scale2": 1.0}),
        )
    },
    # flux as it was at 9a45504: its near field over the query's own window only (now over the 3x3 around it)
    "flux-own-window": {"schedule": _with("flux", near_reach=0)},
    # the UNet default's agent phase alone (lean's first 40%, then vanilla): what flux-no-late is to flux
    "lean-no-late": {
        "schedule": {level: (phases[0], Phase(end=1.0, ratio=0.0)) for level, phases in PRESETS["lean"].items()}
    },
}
DEFAULT_METHODS = ["none", "tome", "agent"]


def apply_kwargs(method: str, force: bool = False) -> dict | None:
    """``agentsd.apply``'s arguments for ``method`` (``None``: unpatched); ``force`` acts at every token count
    (``min_tokens=0``): the DiT proving ground's 256-token grid lies below every device's threshold."""
    spec = METHODS[method]
    if spec is None:
        return None
    kwargs = dict(spec) if isinstance(spec, dict) else {"schedule": spec}
    if force:
        phases = resolve_schedule(kwargs["schedule"])

        def forced(group):
            return tuple(dataclasses.replace(phase, min_tokens=0) for phase in group)

        kwargs["schedule"] = {k: forced(v) for k, v in phases.items()} if isinstance(phases, dict) else forced(phases)
    return kwargs


IMAGENET_CLASSES = Path(__file__).with_name("data") / "imagenet_classes.txt"


def imagenet_prompts() -> list[str]:
    """The published AgentSD/ToMeSD protocol: two prompts per ImageNet-1k class, in class order."""
    classes = IMAGENET_CLASSES.read_text().splitlines()
    return [f"A high quality photograph of a {name}." for name in classes for _ in range(2)]


def load_prompts(spec: str, num: int, seed: int) -> tuple[list[str], list | None]:
    """Prompts and (for demo sets) their scenes.

    ``spec``: ``demo``, ``demo:1``, ``demo:2`` (held-out demo captions with one or two objects),
    ``imagenet`` (2,000 prompts; fewer are spread evenly over the classes) or a text file (one per line).
    """
    if spec == "imagenet":
        every = imagenet_prompts()
        return [every[i * len(every) // num] if num <= len(every) else every[i % len(every)] for i in range(num)], None
    if spec == "demo" or spec.startswith("demo:"):
        from agentsd.demo import prompts

        objects = None if spec == "demo" else int(spec.split(":")[1])
        scenes = prompts(num, seed=seed, num_objects=objects)
        return [s.caption for s in scenes], scenes
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--prompts must be demo, demo:1, demo:2, imagenet or a text file, got {spec!r}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no prompts")
    return [lines[i % len(lines)] for i in range(num)], None


def generate(pipe, method: str, prompts: list[str], batches: list[list[int]], folder: Path, args) -> tuple[int, float]:
    """Make the batches whose images are not all there yet; returns (images made, seconds spent).

    Every batch is fixed by its indices alone: image ``i`` starts from seed ``seed + i`` and the
    random dst choice is seeded by the batch's first index, so an image comes out the same
    whichever process makes it and whether or not the run was resumed.
    """
    from tqdm.auto import tqdm

    import agentsd

    from ..cli import _is_video

    folder.mkdir(parents=True, exist_ok=True)
    video, frames = _is_video(pipe), getattr(args, "frames", None)
    todo = [batch for batch in batches if not all((folder / f"{i:05d}.png").exists() for i in batch)]
    made, seconds = 0, 0.0
    cache = _deepcache(pipe) if method.startswith("deepcache") and todo else None
    try:
        for batch in tqdm(todo, desc=method, disable=not todo):
            kwargs = apply_kwargs(method, getattr(args, "force", False))
            if kwargs is not None:
                agentsd.apply(pipe, **kwargs, seed=args.seed + batch[0])
            began = time.perf_counter()
            options = dict(output_type="pil", **({} if frames is None else {"num_frames": frames})) if video else {}
            size = getattr(args, "size", None)
            if size is not None:
                options.update(height=size[0], width=size[1])
            out = pipe(
                [prompts[i] for i in batch],
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=[torch.Generator().manual_seed(args.seed + i) for i in batch],
                **options,
            )
            images = [filmstrip(clip) for clip in out.frames] if video else out.images
            seconds += time.perf_counter() - began
            made += len(batch)
            for i, image in zip(batch, images):
                image.save(folder / f"{i:05d}.png")
    finally:
        agentsd.remove(pipe)
        if cache is not None:
            cache.disable()
    return made, seconds


def filmstrip(frames):
    """A video's frames (PIL images) one above the other in one image: every metric reads the whole video."""
    from PIL import Image

    width, height = frames[0].size
    strip = Image.new("RGB", (width, height * len(frames)))
    for k, frame in enumerate(frames):
        strip.paste(frame.convert("RGB"), (0, k * height))
    return strip


def _deepcache(pipe):
    from DeepCache import DeepCacheSDHelper

    from .runs import DEEPCACHE

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(**DEEPCACHE)
    helper.enable()
    return helper


def load_images(folder: Path, count: int) -> torch.Tensor:
    """``(count, 3, H, W)`` uint8 from ``00000.png`` …, or from every image in a reference folder."""
    import numpy as np
    from PIL import Image

    files = [folder / f"{i:05d}.png" for i in range(count)]
    if not files or not all(f.exists() for f in files):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 images (identical images give inf), by torchmetrics."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(a.double(), b.double(), data_range=255.0, reduction="none", dim=(1, 2, 3))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11×11 Gaussian window, σ = 1.5, on [0, 1] RGB), by torchmetrics."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(a.double() / 255, b.double() / 255, data_range=1.0, reduction="none")


def inception(weights: str):
    """Inception-v3 FID features from a local weights file (torch-fidelity's ``pt_inception`` format)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights
    )


@torch.no_grad()
def clip_score(path: str, images: torch.Tensor, prompts: list[str]) -> float:
    """CLIP score (Hessel et al. 2021): mean of 100 · max(cos(image, prompt), 0), CLIP from a local folder."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(path)
    scores = []
    for start in range(0, len(images), 64):
        inputs = processor(
            text=prompts[start : start + 64],
            images=list(images[start : start + 64].permute(0, 2, 3, 1).numpy()),
            return_tensors="pt",
            padding=True,
            truncation=True,
        )
        out = model(**inputs)  # image_embeds and text_embeds come out unit-normalised
        scores.append(100 * (out.image_embeds * out.text_embeds).sum(-1).clamp(min=0))
    return float(torch.cat(scores).mean())


def distribution_metrics(features, images: torch.Tensor, reference: torch.Tensor) -> dict:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    # Only the main process measures, from every image: no syncing with the other processes.
    fid = FrechetInceptionDistance(feature=features, sync_on_compute=False)
    subset = max(2, min(1000, len(images) // 2, len(reference) // 2))
    kid = KernelInceptionDistance(feature=features, subset_size=subset, sync_on_compute=False)
    for metric in (fid, kid):
        metric.update(reference, real=True)
        metric.update(images, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # KID draws random subsets: fix them so that reruns agree
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std), "kid_subset": subset}


def measure(args, prompts: list[str], scenes, out: Path) -> dict:
    images = {m: load_images(out / "images" / m, len(prompts)) for m in args.methods}
    evaluator = None
    if scenes is not None:
        from agentsd.demo import Evaluator

        evaluator = Evaluator.load(args.evaluator) if getattr(args, "evaluator", None) else Evaluator.load()
    features = inception(args.inception_weights) if args.inception_weights else evaluator
    reference_name = str(args.reference) if args.reference else "none" if "none" in args.methods else None
    reference = load_images(args.reference, 0) if args.reference else images.get("none")
    timing, made_at = _timing(out)
    results = {}
    for method, imgs in images.items():
        row = {"images": len(imgs), "seconds_per_image": timing.get(method)}
        if made_at.get(method):
            row["made_at"] = made_at[method]
        if "none" in images and method != "none":  # vanilla against itself is no measurement
            # in chunks of at most 2^18 pixels an image: torchmetrics' SSIM holds ~200 bytes a pixel (a chunk of 64
            # images at 256² asked for 20 GB)
            chunk = max(1, 2**18 // (imgs.shape[-1] * imgs.shape[-2]))
            pairs = [(imgs[i : i + chunk], images["none"][i : i + chunk]) for i in range(0, len(imgs), chunk)]
            row["psnr_vs_none"] = float(torch.cat([psnr(a, b) for a, b in pairs]).clamp(max=100).mean())
            row["ssim_vs_none"] = float(torch.cat([ssim(a, b) for a, b in pairs]).mean())
        if features is not None and reference is not None and (method != "none" or args.reference):
            row |= distribution_metrics(features, imgs, reference)
        if args.clip_model:
            row["clip_score"] = clip_score(args.clip_model, imgs, prompts)
        if evaluator is not None:
            scores = evaluator.accuracy(imgs, scenes)
            row["caption_accuracy"] = scores.overall
            row["attribute_accuracy"] = {
                k: getattr(scores, k) for k in ("shape", "colour", "size", "position", "count")
            }
        results[method] = row
    return {"reference": reference_name, "methods": results}


def _timing(out: Path) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Seconds per image per method, pooled over every run and process that made images, and the commits that made
    them (runs recorded before commits were: none)."""
    made, spent, commits = {}, {}, {}
    for path in (out / "timing").glob("*.json"):
        record = json.loads(path.read_text())
        if "methods" not in record:  # the first format: {method: [images, seconds]}
            record = {"commit": None, "methods": record}
        for method, (count, seconds) in record["methods"].items():
            made[method] = made.get(method, 0) + count
            spent[method] = spent.get(method, 0.0) + seconds
            if count and record["commit"]:
                commits.setdefault(method, set()).add(record["commit"])
    return {m: spent[m] / made[m] for m in made if made[m]}, {m: sorted(c) for m, c in commits.items()}


def table(results: dict) -> str:
    columns = [
        ("caption_accuracy", "caption acc.", "{:.1%}"),
        ("fid", f"FID vs {results['metrics']['reference']}", "{:.2f}"),
        ("kid", "KID", "{:.4f}"),
        ("kid_std", "± KID std", "{:.4f}"),
        ("clip_score", "CLIP score", "{:.2f}"),
        ("psnr_vs_none", "PSNR vs none (dB)", "{:.2f}"),
        ("ssim_vs_none", "SSIM vs none", "{:.3f}"),
        ("seconds_per_image", "s/image", "{:.3f}"),
    ]
    lines = [
        f"{results['model']}, {results['steps']} steps, guidance {results['guidance']}, "
        f"{results['num']} prompts ({results['prompts']}), seed {results['seed']}",
        "",
        "| method | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for method, row in results["metrics"]["methods"].items():
        cells = ["–" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict):
    """Quality against seconds per image, one panel per metric (``None`` if nothing to plot).

    Caption accuracy on a 0-100% axis with its 95% interval (binomial, over the images), FID from 0 with the
    real-vs-real floor where it was measured (``metrics["real_vs_real_fid"]``), PSNR against vanilla for the
    other methods: a difference inside the noise does not look like a cliff.
    """
    plt = pyplot()
    if plt is None:
        return None
    metrics = results["metrics"]
    rows = metrics["methods"]
    panels = [
        k for k in ("caption_accuracy", "fid", "psnr_vs_none") if any(r.get(k) is not None for r in rows.values())
    ]
    if not panels or not any(r.get("seconds_per_image") for r in rows.values()):
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), squeeze=False)
    titles = {
        "caption_accuracy": "caption accuracy (95% interval)",
        "fid": "FID",
        "psnr_vs_none": "PSNR vs vanilla (dB)",
    }
    colour = {method: f"C{k}" for k, method in enumerate(rows)}  # one colour per method in every panel
    for ax, key in zip(axes[0], panels):
        for method, row in rows.items():
            x, y = row.get("seconds_per_image"), row.get(key)
            if y is None or not x:
                continue
            error = None
            if key == "caption_accuracy":
                error = 1.96 * (y * (1 - y) / max(row["images"], 1)) ** 0.5
            ax.errorbar(x, y, yerr=error, fmt="o", capsize=3, color=colour[method], label=method)
        if key == "caption_accuracy":
            ax.set_ylim(0, 1)
        if key == "fid":
            floor = metrics.get("real_vs_real_fid")
            if floor is not None:
                ax.axhline(floor, color="grey", linestyle="--", linewidth=0.8)
                ax.annotate("real vs real", (ax.get_xlim()[0], floor), textcoords="offset points", xytext=(3, 3))
            ax.set_ylim(bottom=0)
        ax.set_xlabel("seconds per image")
        ax.set_ylabel(titles[key])
    # One legend under the panels, instead of labels that overlap where methods take about as long.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"{results['model']}, {results['num']} prompts, {results['steps']} steps", fontsize=9)
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id or local diffusers folder (default: the shipped demo model)")
    parser.add_argument(
        "--prompts", default="demo", help="demo, demo:1, demo:2 (held-out demo captions), imagenet, or a text file"
    )
    parser.add_argument("--num", type=int, default=500, help="number of prompts (files repeat their lines)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, help="default: 7.5, or the demo model's own")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i; demo prompts use it too")
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--size", help="WIDTHxHEIGHT or N, multiples of 8 (default: the model's own)")
    parser.add_argument(
        "--frames", type=int, help="video pipelines (Wan): frames per video (default: the pipeline's); each video is "
        "saved as one image, its frames one above the other, and measured whole"
    )  # fmt: skip
    parser.add_argument(
        "--force",
        action="store_true",
        help="act at every token count (min_tokens=0): the DiT proving ground's 256 tokens",
    )
    parser.add_argument("--reference", type=Path, help="folder of real images for FID/KID (default: vanilla's)")
    parser.add_argument(
        "--real-vs-real",
        type=Path,
        help="the real-vs-real FID of the reference (a JSON with 'fid', from "
        "benchmarks/eval_demo.py --real-only): the floor the table and plot show beside FID",
    )
    parser.add_argument(
        "--evaluator", type=Path, help="demo evaluator weights for caption accuracy and FID features (default: shipped)"
    )
    parser.add_argument("--inception-weights", help="local pt_inception weights file (Inception features)")
    parser.add_argument("--clip-model", help="local CLIP folder (transformers format): adds the CLIP score")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality_demo"))
    parser.add_argument(
        "--images-only",
        action="store_true",
        help="make the images (and record their time) but measure nothing: runs that share --out on other cores or "
        "machines, measured once by a last run without it",
    )


def bench(args: argparse.Namespace, load) -> int:
    """Run the benchmark; ``load(model, device, dtype)`` gives ``(pipeline, name)``."""
    from accelerate import PartialState

    prompts, scenes = load_prompts(args.prompts, args.num, args.seed)
    # CPU-only processes (accelerate launch --multi_gpu on a machine without GPUs) join a gloo group.
    state = PartialState(cpu=args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()))
    # Under accelerate each process takes its own device.
    pipe, model_name = load(args.model, state.device if args.device == "auto" else args.device, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    batches = [list(range(s, min(s + args.batch, len(prompts)))) for s in range(0, len(prompts), args.batch)]
    with state.split_between_processes(batches) as mine:
        timing = {m: generate(pipe, m, prompts, mine, args.out / "images" / m, args) for m in args.methods}
    (args.out / "timing").mkdir(parents=True, exist_ok=True)
    stamp = f"{time.time_ns()}-{state.process_index}"
    (args.out / "timing" / f"{stamp}.json").write_text(json.dumps({"commit": git_commit(), "methods": timing}))
    state.wait_for_everyone()
    if not state.is_main_process or args.images_only:
        return 0
    results = {
        "model": model_name,
        "prompts": args.prompts,
        "num": len(prompts),
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "processes": state.num_processes,
        "commit": git_commit(),
        "metrics": measure(args, prompts, scenes, args.out),
    }
    if getattr(args, "real_vs_real", None) is not None:
        results["metrics"]["real_vs_real_fid"] = json.loads(args.real_vs_real.read_text())["fid"]
    path = args.out / "quality.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    write_report(path, table(results), plot(results))
    return 0
