"""Count the ATen ops of one UNet call per preset and phase: the number of kernels a GPU launches.

On a GPU below ~16k tokens eager diffusers is bound by kernel launches, so what a merge costs
there is how many small ops it adds, not its FLOPs. This counts them on any device: the
non-view ATen ops (``TorchDispatchMode``) of one UNet call, vanilla against every preset in
each of its phases, with merging forced on at the size counted (``min_tokens=0``: the count does
not depend on the size). Ops that only allocate (``empty``) launch no kernel and are counted
apart. The count is of a warm call: what a preset builds once per size (its dst draws) is
built by a call before. Token groups are averaged as on a GPU (one batched product where it is
small, ``agentsd.merge.DENSE_ON_CPU``), whatever device counts.

    agentsd bench ops                                   # SD 1.5 at 256² -> benchmarks/results/ops_sd15.json
    agentsd bench ops --model sdxl --size 512 --presets paper lean
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import agentsd
from agentsd import PRESETS, merge
from agentsd.attention import AgentAttnProcessor
from agentsd.bench import write_results
from agentsd.bench.core import machine, random_unet, unet_inputs
from agentsd.schedule import resolve_schedule

ALLOCATIONS = {"empty.memory_format", "empty_strided.default", "new_empty.default", "new_empty_strided.default"}
DEFAULT_OUT = Path("benchmarks/results/ops_{model}.json")
# The targets: ops added per patched block, over vanilla's processor.
TARGETS = {"lean": {"agent": 6, "tome": 6}, "fast": {"agent": 15, "tome": 10}}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside it by name; views (outputs that alias an input) are left out."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[f"{func.overloadpacket.__name__}.{func._overloadname}"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        return sum(n for name, n in self.ops.items() if name not in ALLOCATIONS)


def _forced(schedule):
    """``schedule`` with every phase merging at any size (``min_tokens=0``)."""
    phases = resolve_schedule(schedule)
    if isinstance(phases, dict):
        return {level: tuple(dataclasses.replace(p, min_tokens=0) for p in ps) for level, ps in phases.items()}
    return tuple(dataclasses.replace(p, min_tokens=0) for p in phases)


def _phase_starts(phases) -> list[float]:
    """Sampling progress at the start of each distinct stretch of the schedule (all levels together)."""
    levels = phases.values() if isinstance(phases, dict) else [phases]
    ends = sorted({p.end for level in levels for p in level})
    return [0.0] + ends[:-1]


def _phase_names(phases, p: float) -> str:
    """``agent`` where some level makes agents at ``p``, else ``tome``."""
    levels = phases.values() if isinstance(phases, dict) else [phases]
    at = [next(ph for ph in level if p < ph.end) for level in levels]
    return "agent" if any(ph.makes_agents for ph in at) else "tome"


@contextlib.contextmanager
def _dense_groups():
    """Average token groups as a GPU does (the dense product where small), on any device."""
    previous, merge.DENSE_ON_CPU = merge.DENSE_ON_CPU, True
    try:
        yield
    finally:
        merge.DENSE_ON_CPU = previous


def count_call(unet, inputs: dict, timestep: float) -> tuple[OpCounter, int]:
    """The ops of one warm UNet call at ``timestep`` and how many blocks merged in it."""
    merged = []
    plan = AgentAttnProcessor._plan

    def spy(self, *args):
        out = plan(self, *args)
        merged.append(out is not None)
        return out

    with torch.no_grad(), _dense_groups():
        unet(**inputs, timestep=timestep)
        AgentAttnProcessor._plan = spy
        try:
            merged.clear()
            with OpCounter() as counter:
                unet(**inputs, timestep=timestep)
        finally:
            AgentAttnProcessor._plan = plan
    return counter, sum(merged)


def run(model: str, size: int, presets: list[str], device, dtype) -> dict:
    unet, latent_factor, _ = random_unet(model, device, dtype)
    latent = size // latent_factor
    inputs = unet_inputs(unet, 2, latent, device, dtype)
    del inputs["timestep"]
    vanilla, _ = count_call(unet, inputs, 999)
    results = {
        "setup": {"model": model, "size": size, "latent": latent, **machine(device, dtype)},
        "vanilla": {"ops": sum(vanilla.ops.values()), "kernels": vanilla.kernels},
        "presets": {},
    }
    for name in presets:
        phases = _forced(name)
        agentsd.apply(unet, phases, seed=0)
        rows = []
        for p in _phase_starts(phases):
            timestep = math.floor((1 - p) * 1000) - 1 if p > 0 else 999
            counter, blocks = count_call(unet, inputs, timestep)
            extra = counter.kernels - vanilla.kernels
            excess = {op: n - vanilla.ops.get(op, 0) for op, n in counter.ops.items() if n != vanilla.ops.get(op, 0)}
            rows.append(
                {
                    "phase": _phase_names(phases, p),
                    "progress": p,
                    "ops": sum(counter.ops.values()),
                    "kernels": counter.kernels,
                    "merged_blocks": blocks,
                    "extra_per_block": round(extra / blocks, 2) if blocks else None,
                    "target": TARGETS.get(name, {}).get(_phase_names(phases, p)),
                    "excess_by_op": dict(sorted(excess.items(), key=lambda kv: -abs(kv[1]))),
                }
            )
        agentsd.remove(unet)
        results["presets"][name] = rows
    return results


def table(results: dict) -> str:
    setup = results["setup"]
    lines = [
        f"Ops of one UNet call, {setup['model']} at {setup['size']}² (batch 2, {setup['dtype']}, {setup['device']}, "
        f"commit {setup['commit']}), merging forced on; "
        f"vanilla {results['vanilla']['kernels']} kernel ops ({results['vanilla']['ops']} with allocations).",
        "",
        "| preset | phase | from p | kernel ops | merged blocks | added per block | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in results["presets"].items():
        for row in rows:
            target = "" if row["target"] is None else f"≤ {row['target']}"
            per_block = "–" if row["extra_per_block"] is None else f"{row['extra_per_block']:+.1f}"
            lines.append(
                f"| {name} | {row['phase']} | {row['progress']:.2f} | {row['kernels']} | {row['merged_blocks']} "
                f"| {per_block} | {target} |"
            )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="sd15", help="sd15, sdxl, demo or a diffusers folder (random weights)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (the count does not depend on it)")
    unet_presets = sorted(name for name in PRESETS if not name.startswith("sd3"))  # the sd3 ones are for SD 3
    parser.add_argument("--presets", nargs="+", default=unet_presets, choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", type=Path, help="JSON to write (default benchmarks/results/ops_<model>.json)")


def bench(args: argparse.Namespace) -> int:
    results = run(args.model, args.size, args.presets, torch.device(args.device), getattr(torch, args.dtype))
    out = args.out or Path(str(DEFAULT_OUT).format(model=Path(args.model).name))
    write_results(out, results, table(results))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return bench(parser.parse_args(argv))
