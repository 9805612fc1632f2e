"""Which part of the ``fast`` preset costs quality: variants of it on the 128² proving-ground checkpoint.

Makes the first ``--n`` images of ``agentsd bench quality --prompts demo:1`` (same prompts, seeds and
batches of 25) with each variant and compares them with vanilla's images from that run (PSNR) and
with their captions (caption accuracy, the demo evaluator). Variants already in ``--out`` (same model,
count, steps and guidance) are kept, so a new variant costs only its own images; ``--redo`` measures all.
"First fast" is the preset as it was before the feed-forward merge was found to cost quality.

    python benchmarks/studies/fast_ablation.py --none runs/quality128/images/none \\
        --out benchmarks/results/quality_demo128/fast_ablation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

import agentsd
from agentsd import Phase
from agentsd.bench.quality import load_images, load_prompts, psnr
from agentsd.cli import _load
from agentsd.demo import Evaluator

AGENTS = dict(sx=4, sy=4, agent_ratio=0.95, min_tokens=None)
LEVEL_RATIOS = ((0, 0.5), (1, 0.4))  # the agent phase's ToMe ratios of the fast preset


def _variant(crossattn: bool, mlp: bool, late_ratio: float, agents_end: float = 0.5) -> dict:
    """Agents on levels 0 and 1 until ``agents_end``, then ToMe at ``late_ratio`` (0: none)."""
    merged = dict(merge_crossattn=crossattn, merge_mlp=mlp)
    agents = {level: Phase(end=agents_end, ratio=r, **merged, **AGENTS) for level, r in LEVEL_RATIOS}
    if agents_end == 1.0:
        return {level: (phase,) for level, phase in agents.items()}
    late = Phase(end=1.0, ratio=late_ratio, min_tokens=None, **merged) if late_ratio else Phase(end=1.0, ratio=0.0)
    return {level: (phase, late) for level, phase in agents.items()}


VARIANTS = {
    "fast": "fast",
    "first fast: whole block merged (cross-attention + feed-forward), late ratio 0.5": _variant(True, True, 0.5),
    "first fast without merged sublayers": _variant(False, False, 0.5),
    "first fast's agent phase (whole block merged), then none": _variant(True, True, 0.0),
    "agents only (no merged sublayers), then none": _variant(False, False, 0.0),
    "first fast, cross-attention merged only": _variant(True, False, 0.5),
    "first fast, feed-forward merged only": _variant(False, True, 0.5),
    "first fast without merged sublayers, late ratio 0.75": _variant(False, False, 0.75),
    "agents to the end, no merged sublayers": _variant(False, False, 0.0, agents_end=1.0),
    "paper": "paper",
    "fast with a matching per block (no share_matching)": {
        level: tuple(dataclasses.replace(phase, share_matching=False) for phase in phases)
        for level, phases in agentsd.PRESETS["fast"].items()
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="agentsd/demo/model")
    parser.add_argument("--none", type=Path, required=True, help="vanilla's images from agentsd bench quality")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--redo", action="store_true", help="measure every variant again (default: keep --out's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe, _ = _load(args.model, torch.device("cpu"), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts, scenes = load_prompts("demo:1", 500, 0)
    n = args.n
    reference = load_images(args.none, n)
    evaluator = Evaluator.load()
    results = {"model": args.model, "n": n, "steps": 25, "guidance": 3.0, "variants": {}}
    if args.out.exists() and not args.redo:  # keep what an earlier run measured with the same settings
        earlier = json.loads(args.out.read_text())
        if all(earlier[k] == results[k] for k in ("model", "n", "steps", "guidance")):
            results = earlier
    results["variants"]["none"] = {"caption_accuracy": evaluator.accuracy(reference, scenes[:n]).overall}
    for name, schedule in VARIANTS.items():
        if name in results["variants"]:
            print(name, results["variants"][name], "(measured before)", flush=True)
            continue
        images = []
        for start in range(0, n, 25):
            batch = list(range(start, min(start + 25, n)))
            agentsd.apply(pipe, schedule, seed=batch[0])
            out = pipe(
                [prompts[i] for i in batch],
                num_inference_steps=25,
                guidance_scale=3.0,
                generator=[torch.Generator().manual_seed(i) for i in batch],
                output_type="np",
            ).images
            agentsd.remove(pipe)
            images.append(torch.from_numpy((out * 255).round().astype(np.uint8)).permute(0, 3, 1, 2))
        images = torch.cat(images)
        results["variants"][name] = {
            "psnr_vs_none": float(psnr(images, reference).clamp(max=100).mean()),
            "caption_accuracy": evaluator.accuracy(images, scenes[:n]).overall,
        }
        print(name, results["variants"][name], flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
