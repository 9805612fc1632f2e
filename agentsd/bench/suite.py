"""The GPU suite: one command that measures what the README quotes, on whatever card runs it.

SD 1.5 at 512², 1024², 2048² and SDXL at 1024², UNet forwards (every method of
``bench speed``) and whole 20-step runs (every ``--pipeline`` method, torch.compile on
and off for vanilla and ``fast``), fp16 on CUDA. Each part writes its JSON, table and
plot into ``--out``; a part already measured there is skipped, so an interrupted suite
resumes. ``--tiny`` runs the same parts on a tiny UNet at small sizes: the CPU check
that the suite works end to end.

    benchmarks/gpu.sh                                # = agentsd bench suite --device cuda --dtype float16
    agentsd bench suite --tiny --device cpu --out /tmp/suite
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from . import runs, speed

# (model, sizes): the card's share of the work, ≤ 8 minutes on one H100-class GPU
PARTS = [("sd15", [512, 1024, 2048]), ("sdxl", [1024])]
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
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet at small sizes: checks the suite on CPU")


def parts(args: argparse.Namespace, tiny_folder: Path | None) -> list[argparse.Namespace]:
    """One ``bench speed`` invocation per (model, mode): the arguments it runs with."""
    todo = [("tiny", [64, 128])] if args.tiny else PARTS
    out = []
    for model, sizes in todo:
        for pipeline in (False, True):
            name = f"{model}_{'runs' if pipeline else 'forward'}"
            out.append(
                argparse.Namespace(
                    model=str(tiny_folder) if model == "tiny" else model,
                    sizes=sizes,
                    methods=list(runs.METHODS) if pipeline else list(speed.METHODS),
                    pipeline=pipeline,
                    steps=2 if args.tiny else args.steps,
                    scheduler="pndm",
                    repeats=1 if args.tiny else args.repeats,
                    warmup=1,
                    batch=2,
                    dtype=args.dtype,
                    device=args.device,
                    out=args.out / f"{name}.json",
                    report=False,
                )
            )
    return out


def bench(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        tiny = None
        if args.tiny:
            from diffusers import UNet2DConditionModel

            tiny = Path(folder) / "tiny"
            UNet2DConditionModel(**TINY_UNET).save_config(tiny / "unet")
        done = {}
        for part in parts(args, tiny):
            measured = json.loads(part.out.read_text()) if part.out.exists() else {"sizes": {}}
            if all(str(size) in measured["sizes"] for size in part.sizes):
                print(f"{part.out}: already measured, skipped")
            else:
                speed.bench(part)
            done[part.out.stem] = json.loads(part.out.read_text())
    summary = args.out / "suite.md"
    summary.write_text(
        "\n\n".join((runs if results.get("kind") == "pipeline" else speed).table(results) for results in done.values())
        + "\n"
    )
    print(f"suite: {summary}")
    return 0
