"""What one matching per level and UNet call (``Phase(share_matching=True)``) saves: UNet forwards of the
``fast`` preset with and without it, in each of its phases, against vanilla.

Times forwards of a random-weight UNet (``bench speed``'s architectures) at one sampling progress per
phase of ``fast``; the three methods take turns repeat by repeat. JSON and a Markdown table.

    python benchmarks/studies/share_matching.py --size 512 --repeats 3 --out benchmarks/results/share_matching_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

import agentsd
from agentsd.bench import write_results
from agentsd.bench.core import machine, random_unet, unet_inputs
from agentsd.bench.speed import time_forward

PROGRESS = (0.25, 0.75)  # one point in each phase of fast (agents until 0.5, then ToMe)
SHARED = {
    level: tuple(dataclasses.replace(phase, share_matching=True) for phase in phases)
    for level, phases in agentsd.PRESETS["fast"].items()
}
METHODS = {"vanilla": None, "fast": "fast", "fast, shared matching": SHARED}


def measure(unet, inputs: dict, progress: float, repeats: int) -> dict[str, list[float]]:
    """Seconds of one forward per repeat for each method at ``progress`` (one warm-up forward each)."""
    inputs = {**inputs, "timestep": round((1.0 - progress) * 1000)}
    times = {name: [] for name in METHODS}
    for rep in range(repeats + 1):
        for name, schedule in METHODS.items():
            if schedule is not None:
                agentsd.apply(unet, schedule, seed=0)
            seconds = time_forward(unet, inputs)
            agentsd.remove(unet)
            if rep:  # the first round warms up
                times[name].append(seconds)
                print(f"p={progress} {name}: {seconds:.3f} s", flush=True)
    return times


def table(results: dict) -> str:
    lines = [
        f"UNet forwards ({results['model']}), {results['size']}², batch {results['batch']}, {results['dtype']}, "
        f"{results['device']} ({results['threads']} threads); median of {results['repeats']} repeats",
        "",
        "| progress | method | median s | speed-up over vanilla | change against fast |",
        "|---|---|---|---|---|",
    ]
    for progress, times in results["progress"].items():
        median = {name: statistics.median(ts) for name, ts in times.items()}
        for name, seconds in median.items():
            change = "–" if name == "vanilla" else f"{seconds / median['fast'] - 1:+.1%}"
            lines.append(f"| {progress} | {name} | {seconds:.3f} | {median['vanilla'] / seconds:.3f}× | {change} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", help="sd15, sdxl, demo or a diffusers folder (its UNet config)")
    parser.add_argument("--size", type=int, default=512, help="image size (pixels, square)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    device, dtype = torch.device(args.device), torch.float32
    unet, factor, name = random_unet(args.model, device, dtype)
    inputs = unet_inputs(unet, args.batch, args.size // factor, device, dtype)
    results = {
        **machine(device, dtype),
        "model": name,
        "size": args.size,
        "batch": args.batch,
        "repeats": args.repeats,
        "progress": {str(p): measure(unet, inputs, p, args.repeats) for p in PROGRESS},
    }
    write_results(args.out, results, table(results))


if __name__ == "__main__":
    main()
