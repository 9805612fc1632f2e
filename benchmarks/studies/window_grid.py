"""Stripes along the window grid: does a DiT preset draw its windows' borders into the image, and do shifted
windows (``Phase(shift=True)``) or the near field take them away?

Samples the Flux proving ground (``--model demo-flux``, or a run's exported folder) at one size for each method, the
same seeds and captions, and measures the *stripe index* of each method's images against vanilla's: the mean
absolute step of the difference image across the pixel rows and columns where the agent windows' borders lie
(every ``window × 8`` pixels: a token is 2×2 latent pixels of the factor-4 VAE), divided by its mean step across
every row and column. 1.0: the difference has no preference for the window grid; stripes along it read above 1.
The same index of the late phase's 2×2 windows is reported beside it. Writes ``window_grid.json`` (with the commit),
``window_grid.md`` and ``window_grid.png`` (captions × methods, and each method's difference from vanilla,
amplified).

    python benchmarks/studies/window_grid.py --size 256 --num 12 \\
        --methods none flux-bare flux-bare+shift flux-bare+near flux-bare+all \\
        --out benchmarks/results/window_grid_demo_flux

``--images FOLDER ...`` measures images ``agentsd bench quality`` made instead (each method's first ``--num`` from
``FOLDER/images/<method>/``, the first folder that has them; at the model's own size): the 1,024-token ground's
images cost 13 s each here, so its quality runs' images are reused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import agentsd
from agentsd.bench import git_commit, pyplot, quality, write_report
from agentsd.demo import data
from agentsd.schedule import PRESETS

PIXELS_PER_TOKEN = 8  # the demo VAE's factor 4 times Flux's 2×2 packing


def stripe_index(images: torch.Tensor, reference: torch.Tensor, period: int, offset: int = 0) -> float:
    """Mean absolute step of ``images - reference`` (``(N, 3, H, W)`` in [0, 1]) across the pixel rows and columns at
    ``offset + k·period`` (k ≥ 1 or where > 0), over its mean step across every row and column."""
    diff = (images.double() - reference.double()).mean(dim=1)
    steps = []
    for d in (diff, diff.transpose(1, 2)):  # columns, then rows
        step = (d[:, :, 1:] - d[:, :, :-1]).abs().mean(dim=(0, 1))  # step[x - 1]: between pixel x - 1 and x
        borders = [x - 1 for x in range(offset % period or period, d.shape[-1], period)]
        steps.append((step[borders].mean(), step.mean()))
    on_grid = sum(s for s, _ in steps) / 2
    overall = sum(m for _, m in steps) / 2
    return float(on_grid / overall) if overall > 0 else float("nan")


def sample(pipe, method: str, prompts: list[str], size: int, seed: int) -> torch.Tensor:
    kwargs = quality.apply_kwargs(method, force=True)
    if kwargs is not None:
        agentsd.apply(pipe, **kwargs, seed=0)
    images = []
    try:
        for i, prompt in enumerate(prompts):
            generator = torch.Generator().manual_seed(seed + i)
            out = pipe(prompt, height=size, width=size, generator=generator, output_type="pt").images
            images.append(out.float().cpu())
            print(f"{method}: {i + 1}/{len(prompts)}", flush=True)
    finally:
        agentsd.remove(pipe)
    return torch.cat(images)


def read(folders: list[Path], method: str, num: int) -> torch.Tensor:
    """The first ``num`` images ``agentsd bench quality`` made for ``method`` in the first of ``folders`` that holds
    them all, ``(num, 3, H, W)`` in [0, 1]."""
    for folder in folders:
        files = [folder / "images" / method / f"{i:05d}.png" for i in range(num)]
        if all(f.is_file() for f in files):
            return quality.load_images(files[0].parent, num).float() / 255
    raise SystemExit(f"no folder of {', '.join(map(str, folders))} holds {num} images of {method}")


def table(results: dict) -> str:
    lines = [
        f"Stripe index against vanilla ({results['model']}, {results['size']}², {results['num']} captions, "
        f"commit {results['commit']}): 1.0 = no preference for the window grid",
        "",
        "| method | agent windows' borders | shifted ones' | late windows' borders |",
        "|---|---|---|---|",
    ]
    for method, row in results["methods"].items():
        lines.append(
            f"| {method} | {row['agent_grid']:.2f} | {row['agent_grid_shifted']:.2f} | {row['late_grid']:.2f} |"
        )
    return "\n".join(lines)


def figure(images: dict[str, torch.Tensor], shown: int):
    plt = pyplot()
    if plt is None:
        return None
    methods = list(images)
    fig, axes = plt.subplots(2 * shown, len(methods), figsize=(1.6 * len(methods), 3.2 * shown), squeeze=False)
    vanilla = images[methods[0]]
    for col, method in enumerate(methods):
        for row in range(shown):
            image, diff = images[method][row], (images[method][row] - vanilla[row]).abs().mul(4).clamp(0, 1)
            for k, shown_image in enumerate((image, diff)):
                ax = axes[2 * row + k][col]
                ax.imshow(shown_image.permute(1, 2, 0).numpy())
                ax.set_xticks([])
                ax.set_yticks([])
        axes[0][col].set_title(method, fontsize=7)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-flux", help="demo-flux or an exported FluxPipeline folder")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--num", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["none", "flux-bare", "flux", "flux-bare+all"])
    parser.add_argument("--show", type=int, default=4, help="captions in the figure")
    parser.add_argument("--images", type=Path, nargs="+", help="bench quality output folders to read images from")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.methods[0] != "none":
        parser.error("the first method must be none (vanilla): the others are measured against it")
    if args.images:
        images = {method: read(args.images, method, args.num) for method in args.methods}
        args.size = images["none"].shape[-1]
    else:
        from agentsd.demo import load_flux_pipeline

        pipe = load_flux_pipeline() if args.model == "demo-flux" else load_flux_pipeline(folder=args.model)
        prompts = [scene.caption for scene in data.prompts(args.num, seed=args.seed)]
        images = {method: sample(pipe, method, prompts, args.size, args.seed) for method in args.methods}
    window = PRESETS["flux"][0].sx * PIXELS_PER_TOKEN
    late = PRESETS["flux"][1].sx * PIXELS_PER_TOKEN
    vanilla = images["none"]
    results = {
        "model": args.model,
        **({"images": [str(folder) for folder in args.images]} if args.images else {}),
        "size": args.size,
        "num": args.num,
        "commit": git_commit(),
        "methods": {
            method: {
                "agent_grid": stripe_index(batch, vanilla, window),
                "agent_grid_shifted": stripe_index(batch, vanilla, window, window // 2),
                "late_grid": stripe_index(batch, vanilla, late),
            }
            for method, batch in images.items()
            if method != "none"
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "window_grid.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    write_report(path, table(results), figure(images, min(args.show, args.num)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
