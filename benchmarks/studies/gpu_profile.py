"""Where a schedule's time goes on a GPU, and how the skip rule (``Phase.min_tokens``) moves it.

Two measurements in one process, for whatever card runs it (fp16):
1. a torch.profiler trace of one whole run with a schedule applied: the ops that take the host's
   time, and the host-device synchronisations (a sync per block serialises launch and compute);
2. whole runs of vanilla and of ``fast`` with its ``min_tokens`` set to several values.

    python benchmarks/studies/gpu_profile.py --out benchmarks/results/gpu_profile.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import agentsd
from agentsd.bench.core import machine
from agentsd.bench.runs import build_pipeline, time_run
from agentsd.schedule import PRESETS


def fast_with(min_tokens: int) -> dict:
    return {
        level: [dataclasses.replace(phase, min_tokens=min_tokens) for phase in phases]
        for level, phases in PRESETS["fast"].items()
    }


def trace(pipe, size: int, steps: int, device) -> dict:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        seconds, _ = time_run(pipe, size, steps, device)
    events = prof.key_averages()
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    syncs = {e.key: e.count for e in events if "Synchronize" in e.key or "Memcpy" in e.key}
    return {
        "seconds_profiled": seconds,
        "syncs_and_copies": syncs,
        "top_self_cpu": [
            {
                "op": e.key,
                "count": e.count,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "device_ms": getattr(e, "self_device_time_total", 0) / 1e3,
            }  # fmt: skip
            for e in rows
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.float16
    results = {"setup": machine(device, dtype), "steps": args.steps, "profiles": {}, "min_tokens": {}}
    plan = [("sdxl", 1024, [1024, 4096, 16384]), ("sd15", 1024, [1024, 16384]), ("sd15", 2048, [1024, 16384, 65536])]
    for model, size, thresholds in plan:
        with tempfile.TemporaryDirectory() as folder, torch.device(device):
            pipe, _ = build_pipeline(model, "pndm", Path(folder))
        pipe = pipe.to(device=device, dtype=dtype)
        key = f"{model}_{size}"
        if model == "sdxl":
            agentsd.apply(pipe, "fast", seed=0)
            time_run(pipe, size, 4, device)  # warm-up
            results["profiles"][key + "_fast"] = trace(pipe, size, 4, device)
            agentsd.remove(pipe)
        methods = {"vanilla": None, **{f"fast min_tokens={t}": fast_with(t) for t in thresholds}}
        times = {name: [] for name in methods}
        for rep in range(1 + args.repeats):
            for name, schedule in methods.items():
                if schedule is not None:
                    agentsd.apply(pipe, schedule, seed=0)
                seconds, _ = time_run(pipe, size, 4 if rep == 0 else args.steps, device)
                if schedule is not None:
                    agentsd.remove(pipe)
                if rep:
                    times[name].append(seconds)
                print(f"{key} {name}: {seconds:.3f} s", flush=True)
        results["min_tokens"][key] = {name: {"times": ts, "min": min(ts)} for name, ts in times.items()}
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        del pipe
        torch.cuda.empty_cache()
    print(json.dumps(results["profiles"], indent=1)[:6000])


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"{time.monotonic() - started:.0f} s")
