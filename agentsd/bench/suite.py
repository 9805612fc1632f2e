"""The GPU suite: one command that measures what the README quotes, on whatever card runs it.

Whole 20-step runs, fp16 on CUDA: SD 1.5 at 512², 1024², 2048²; SDXL at 1024² and 2048², and SDXL's hi-res
pass (image-to-image at 2048², strength 0.5); vanilla, the ceilings, ``paper``, ``fast``, ``lean`` (the
default), DeepCache and DeepCache + ``lean``; torch.compile (default mode and CUDA graphs) for vanilla and
``lean``; UNet forwards, then SD 3.5-medium transformer forwards (1024², 2048²), then Flux.1 (1024², 2048²) and
Wan 2.1 1.3B (480p, 81 frames) blocks at the real width in bf16 (``agentsd bench blocks``), last. The parts run in order
of what they tell (cheap, broad ones first) under a time budget (``--budget``, 8 minutes by default): a part
that would start after the budget is spent is left out, and a part under way takes fewer repeats (at least
one) rather than run over; ``suite.json`` records what ran, how long and what was left out. Each part writes
its JSON, table and plot into ``--out``; a size already measured there is skipped, so an interrupted or cut
suite resumes. A part that fails is reported and the rest still run. ``--tiny`` runs the same parts on a tiny
UNet at small sizes: the CPU check that the suite works end to end (on a CPU it compiles with the ``aot_eager``
backend: the same graphs, without inductor's code generation).

    benchmarks/gpu.sh      # = agentsd bench suite --device cuda --dtype float16 (into benchmarks/results/gpu/<card>)
    agentsd bench suite --tiny --device cpu --out /tmp/suite
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
import traceback
from pathlib import Path

import torch

from . import core, runs, speed

# Whole runs of every method a user picks from, their ceilings (top level; levels 0 and 1: what lean can patch)
RUNS = [
    "vanilla",
    "ceiling-attn1-top",
    "ceiling-attn1-levels12",
    "paper",
    "fast",
    "lean",
    "deepcache",
    "deepcache+lean",
]
BIG = ["vanilla", "ceiling-attn1-levels12", "lean", "deepcache", "deepcache+lean"]  # 2048² SDXL: the essentials
COMPILED = ["vanilla", "vanilla+compile", "lean", "lean+compile", "vanilla+compile-cg", "lean+compile-cg"]
# (model, mode, sizes, methods) in the order they run; methods None: all of the mode's (compile apart).
# "img2img" is SDXL's hi-res pass: image-to-image at strength 0.5.
PARTS = [
    ("sd15", "runs", [512, 1024], RUNS),
    ("sdxl", "runs", [1024], RUNS),
    ("sd15", "runs", [2048], RUNS),
    ("sd15", "compile", [1024], COMPILED),
    ("sdxl", "compile", [1024], COMPILED),
    ("sdxl", "runs", [2048], BIG),
    ("sdxl", "img2img", [2048], BIG),
    ("sd15", "forward", [512, 1024, 2048], None),
    ("sd35", "forward", [1024, 2048], None),  # SD 3.5 medium's transformer: vanilla, ceiling, the sd3 preset
    # Flux.1 and Wan 2.1 blocks at the real width and token count, in bf16 (as their users run them)
    # (every default method, and DESIGN §12's options on the model's preset: proportional attention, the near field;
    # flux has both, flux-bare neither: shifted windows beside them)
    ("flux", "blocks", ["1024", "2048"], ("flux+all-early", "flux+all-late")),
    ("wan", "blocks", ["480p"], ("wan+prop-late", "wan+both-early", "wan+both-late")),
]
DIT_DTYPE = "bfloat16"
IMG2IMG_STRENGTH = 0.5
# the same modes on a tiny UNet at small sizes (the CPU check): SD 1.5's parts, its 2048² runs aside; CUDA graphs
# need CUDA, so the CPU check compiles in the default mode only
TINY_PARTS = [
    (m, mode, [64, 128], [x for x in methods if not x.endswith("-cg")] if methods else None)
    for m, mode, sizes, methods in PARTS
    if m == "sd15" and sizes != [2048]
]
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/gpu/<card> (e.g. nvidia-h100-80gb-hbm3)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds the whole suite may take (default 480)")
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet at small sizes: checks the suite on CPU")


def parts(args: argparse.Namespace, tiny_folder: Path | None) -> list[argparse.Namespace]:
    """One ``bench speed`` invocation per part: the arguments it runs with, in the order they run."""
    out = []
    for model, mode, sizes, methods in TINY_PARTS if args.tiny else PARTS:
        if mode == "blocks":
            from .blocks import methods_for

            defaults = [m for m in methods_for(model) if "+" not in m]  # what `bench blocks` times by default
            out.append(
                argparse.Namespace(
                    model=model,
                    sizes=sizes,
                    methods=defaults + list(methods or ()),
                    repeats=args.repeats,
                    warmup=1,
                    dtype=DIT_DTYPE,
                    device=args.device,
                    out=args.out / f"{model}_blocks.json",
                    report=False,
                    kind="blocks",
                )  # fmt: skip
            )
            continue
        pipeline = mode != "forward"
        out.append(
            argparse.Namespace(
                model=str(tiny_folder) if args.tiny else model,
                sizes=sizes,
                methods=methods or (list(runs.DEFAULT_METHODS) if pipeline else None),
                pipeline=pipeline,
                strength=IMG2IMG_STRENGTH if mode == "img2img" else None,
                steps=2 if args.tiny else args.steps,
                scheduler="pndm",
                repeats=1 if args.tiny else args.repeats,
                warmup=1,
                batch=2,
                dtype=args.dtype,
                device=args.device,
                out=args.out / f"{'tiny' if args.tiny else model}_{mode}.json",
                report=False,
            )
        )
    return out


def card_folder(device: str) -> Path:
    """Where a card's results go by default: one folder per card, so that a run on another card measures afresh
    (a folder's measured sizes are skipped) and never mixes with what is there."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return Path("benchmarks/results/gpu") / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def bench(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = card_folder(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.budget
    log = []
    backend = runs.COMPILE_BACKEND
    if args.tiny and torch.device(args.device).type == "cpu":
        runs.COMPILE_BACKEND = "aot_eager"  # the CPU check proves the graphs; inductor's C++ code is not what it checks
    try:
        summary = _measure(args, start, deadline, log)
    finally:
        runs.COMPILE_BACKEND = backend
    print(f"suite: {summary} ({time.monotonic() - start:.0f} s)")
    return 0


def _measure(args: argparse.Namespace, start: float, deadline: float, log: list) -> str:
    with tempfile.TemporaryDirectory() as folder:
        from diffusers import UNet2DConditionModel

        UNet2DConditionModel(**TINY_UNET).save_config(Path(folder) / "tiny" / "unet")
        tiny = Path(folder) / "tiny" if args.tiny else None
        log.append(run_checks(args, tiny or Path(folder) / "tiny", deadline))
        for part in parts(args, tiny):
            log.append(run_part(part, deadline))
            summary = write_summary(args, log, time.monotonic() - start)  # after every part: a kill leaves a record
    return summary


def run_checks(args: argparse.Namespace, tiny_folder: Path, deadline: float) -> dict:
    """No host sync and torch.compile in every mode (:mod:`agentsd.bench.checks`), once per card: ``checks.json``."""
    from . import checks

    path = args.out / "checks.json"
    if path.exists():
        print("checks: already run, skipped")
        return {"part": "checks", "status": "already run"}
    if core.past(deadline, "checks"):
        return {"part": "checks", "status": "left out: time budget spent"}
    began = time.monotonic()
    try:
        results = checks.run(args.device, getattr(torch, args.dtype), tiny_folder, None if args.tiny else "sd15")
        path.write_text(json.dumps(results, indent=2) + "\n")
        status = "passed" if results["passed"] else "FAILED (see checks.json)"
    except Exception as error:  # noqa: BLE001 - the timings still run
        traceback.print_exc()
        status = f"failed: {type(error).__name__}: {error}"
    return {"part": "checks", "status": status, "seconds": round(time.monotonic() - began, 1)}


def run_part(part: argparse.Namespace, deadline: float) -> dict:
    """Measure one part unless it is already measured or the budget is spent; its entry in ``suite.json``."""
    name = f"{part.out.stem} {' '.join(f'{s}²' if isinstance(s, int) else s for s in part.sizes)}"
    measured = json.loads(part.out.read_text()) if part.out.exists() else {"sizes": {}}
    if all(str(size) in measured["sizes"] for size in part.sizes):
        print(f"{name}: already measured, skipped")
        return {"part": name, "status": "already measured"}
    if core.past(deadline, name):
        return {"part": name, "status": "left out: time budget spent"}
    began = time.monotonic()
    part.deadline = deadline
    try:
        if getattr(part, "kind", None) == "blocks":
            from . import blocks

            blocks.bench(part)
        else:
            speed.bench(part)
        measured = json.loads(part.out.read_text())["sizes"] if part.out.exists() else {}
        missing = [f"{size}²" for size in part.sizes if str(size) not in measured]
        status = f"left out {', '.join(missing)}: time budget spent" if missing else "measured"
    except Exception as error:  # noqa: BLE001 - one broken part must not cost the others
        traceback.print_exc()
        status = f"failed: {type(error).__name__}: {error}"
    return {"part": name, "status": status, "seconds": round(time.monotonic() - began, 1)}


def write_summary(args: argparse.Namespace, log: list[dict], seconds: float) -> Path:
    """``suite.json`` (what ran, how long, what was left out) and ``suite.md`` (that, then every part's table)."""
    done = {}
    for path in sorted(args.out.glob("*.json")):
        results = json.loads(path.read_text())
        if path.name != "suite.json" and results.get("sizes"):
            done[path.stem] = results
    card = next((r["gpu"] for r in done.values() if "gpu" in r), args.device)
    (args.out / "suite.json").write_text(
        json.dumps({"device": card, "budget_s": args.budget, "seconds": round(seconds, 1), "parts": log}, indent=2)
        + "\n"
    )
    lines = [f"Suite on {card}: {seconds:.0f} s (budget {args.budget:.0f} s).", ""]
    lines += [f"- {entry['part']}: {entry['status']}" for entry in log]
    from . import blocks

    def module(results):  # whole runs say so; block timings carry the model's block counts
        return runs if results.get("kind") == "pipeline" else blocks if "blocks" in results else speed

    tables = [module(results).table(results) for results in done.values()]
    summary = args.out / "suite.md"
    summary.write_text("\n".join(lines) + "\n\n" + "\n\n".join(tables) + "\n")
    return summary
