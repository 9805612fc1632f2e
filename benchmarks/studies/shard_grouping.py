"""The late phase under context parallelism: what grouping within each rank's shard would cost in quality.

Under diffusers' context parallelism agentsd's late phase groups the image tokens globally (every rank sees every
dst token; the merged keys are summed across ranks): the one-process output, but its all-reduce sends as many bytes
as ring attention (``agentsd bench traffic``). The other way (DESIGN.md §13) merges within each shard: a token
may join only the dst tokens of its own rank's chunk, and the merged keys (a quarter of the tokens) are
all-gathered, a quarter of ring's bytes, no per-step exchange of features, but a grouping that changes with the
shard count. This study simulates that grouping in one process (the image tokens cut into ``R`` equal contiguous
chunks, as diffusers cuts them) on the Flux proving ground and measures what it changes: caption accuracy, PSNR
against vanilla and against the global grouping (``R = 1``), for ``R`` = 2, 4, 8.

    python benchmarks/studies/shard_grouping.py --num 100 --shards 2 4 8 \\
        --out benchmarks/results/shard_grouping_demo_flux
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from agentsd import families
from agentsd.bench import git_commit, quality
from agentsd.bench.report import shard_grouping_table
from agentsd.merge import Groups


def chunked_groups(shards: int):
    """:func:`agentsd.dit.tome_groups` with each token matched only to the dst tokens of its own chunk of the image
    tokens (``shards`` equal contiguous chunks)."""

    def groups(metric: torch.Tensor, dst: torch.Tensor) -> Groups:
        B, N, _ = metric.shape
        dst_metric = metric.index_select(1, dst)
        similar = metric @ (dst_metric / dst_metric.norm(dim=-1, keepdim=True)).transpose(1, 2)
        chunk = torch.arange(N, device=metric.device) * shards // N
        similar = similar.masked_fill(chunk[:, None] != chunk.index_select(0, dst)[None, :], -math.inf)
        best = similar.argmax(dim=-1)
        best[:, dst] = torch.arange(dst.shape[0], device=dst.device)
        return Groups(best, dst.shape[0])

    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=100)
    parser.add_argument("--shards", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/shard_grouping_demo_flux"))
    args = parser.parse_args()
    from agentsd.cli import _load

    options = argparse.Namespace(
        prompts="demo:1", num=args.num, seed=0, steps=25, guidance=3.0, force=True, methods=[], batch=4,
        evaluator=None, inception_weights=None, reference=None, clip_model=None, out=args.out,
    )  # fmt: skip
    prompts, scenes = quality.load_prompts(options.prompts, options.num, options.seed)
    pipe, _ = _load("demo-flux", "cpu", "auto")
    pipe.set_progress_bar_config(disable=True)
    batches = [list(range(s, min(s + options.batch, len(prompts)))) for s in range(0, len(prompts), options.batch)]
    exact = families.tome_groups
    names = {"none": "none", "flux": "flux", **{f"flux-shards{r}": "flux" for r in args.shards}}
    for name, method in names.items():
        shards = int(name.removeprefix("flux-shards")) if name.startswith("flux-shards") else None
        families.tome_groups = exact if shards is None else chunked_groups(shards)
        try:
            quality.generate(pipe, method, prompts, batches, args.out / "images" / name, options)
        finally:
            families.tome_groups = exact
    options.methods = list(names)
    metrics = quality.measure(options, prompts, scenes, args.out)
    images = {m: quality.load_images(args.out / "images" / m, len(prompts)) for m in names}
    for name in names:
        if name.startswith("flux-shards"):
            metrics["methods"][name]["psnr_vs_flux"] = float(quality.psnr(images[name], images["flux"]).mean())
    results = {"commit": git_commit(), "num": len(prompts), "steps": 25, "guidance": 3.0, "metrics": metrics}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shard_grouping.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "shard_grouping.md").write_text(shard_grouping_table(results) + "\n")
    print(shard_grouping_table(results))


if __name__ == "__main__":
    main()
