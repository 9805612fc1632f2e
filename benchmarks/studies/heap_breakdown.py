"""Where a CPU process's resident set goes at its peak: the memory tensors hold against what glibc's heap keeps.

Runs UNet forwards of a random-weight UNet (``bench speed``'s models) at one sampling progress per phase of
the presets, each method in ``--processes`` new processes of its own, and reads glibc's heap statistics
(``mallinfo2``) with the resident set at the entry and exit of every module. Per process it records

- the peak resident set above the process's level before the forwards (what ``bench speed --pipeline`` reports),
- the peak *live* memory above that level: bytes handed out by malloc and not yet freed, in glibc's heap and in
  its separately mapped large blocks; this is what the tensors need, whatever the allocator does,
- at the resident peak, the freed bytes glibc still holds in its heap (resident unless returned to the system).

A method that needs no more live memory than vanilla but shows a higher resident peak owes the difference to
where glibc put freed blocks, not to what the method allocates. Linux with glibc ≥ 2.33 only.

    python benchmarks/studies/heap_breakdown.py --size 1024 --methods vanilla paper fast --processes 2 \\
        --out benchmarks/results/heap_sd15_1024.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import agentsd
from agentsd.bench import write_results
from agentsd.bench.core import machine, random_unet, unet_inputs
from agentsd.bench.runs import _rss, heap_settings

PROGRESS = (0.25, 0.75)  # one point in each phase of the presets (agents until 0.5, then ToMe)
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
MIB = 2**20


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]


def _mallinfo2():
    """glibc's ``mallinfo2`` as a callable, or ``None`` where this C library lacks it (musl, macOS, glibc < 2.33)."""
    try:
        function = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _Mallinfo2
    return function


def sample(mallinfo2) -> dict[str, int]:
    """Resident set, live bytes (heap in use + mapped blocks) and freed bytes kept in the heap, in bytes."""
    info = mallinfo2()
    return {"rss": _rss(), "live": info.uordblks + info.hblkhd, "free_in_heap": info.fordblks}


def measure(model: str, size: int, method: str, batch: int) -> dict:
    """One process's record: peaks above the level before the forwards, and the heap at the resident peak."""
    mallinfo2 = _mallinfo2()
    device, dtype = torch.device("cpu"), torch.float32
    unet, factor, name = random_unet(model, device, dtype)
    inputs = unet_inputs(unet, batch, size // factor, device, dtype)
    if method != "vanilla":
        agentsd.apply(unet, method, seed=0)
    samples = []

    def record(*_):
        samples.append(sample(mallinfo2))

    hooks = [m.register_forward_pre_hook(record) for m in unet.modules()]
    hooks += [m.register_forward_hook(record) for m in unet.modules()]
    start = sample(mallinfo2)
    with torch.no_grad():
        for progress in PROGRESS:
            unet(**{**inputs, "timestep": round((1.0 - progress) * 1000)})
    for hook in hooks:
        hook.remove()
    peak = max(samples, key=lambda s: s["rss"])
    return {
        "model": name,
        "samples": len(samples),
        "rss_peak_mib": (peak["rss"] - start["rss"]) / MIB,
        "live_peak_mib": (max(s["live"] for s in samples) - start["live"]) / MIB,
        "free_in_heap_at_rss_peak_mib": peak["free_in_heap"] / MIB,
        "live_at_rss_peak_mib": (peak["live"] - start["live"]) / MIB,
    }


def _child(args) -> None:
    record = measure(args.model, args.size, args.child, args.batch)
    Path(args.record).write_text(json.dumps(record))


def run_processes(args) -> dict[str, list[dict]]:
    """Each method in ``args.processes`` new processes, round by round (methods take turns)."""
    records = {method: [] for method in args.methods}
    common = ["--model", args.model, "--size", str(args.size), "--batch", str(args.batch)]
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.processes):
            for method in args.methods:
                path = Path(folder) / f"{method}-{round_}.json"
                command = [sys.executable, __file__, *common, "--child", method, "--record", str(path)]
                print(f"{method}: a new process ({round_ + 1} of {args.processes})", flush=True)
                subprocess.run(command, check=True)
                records[method].append(json.loads(path.read_text()))
    return records


def summarize(records: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Median over the processes of each quantity, per method."""
    keys = ("rss_peak_mib", "live_peak_mib", "free_in_heap_at_rss_peak_mib", "live_at_rss_peak_mib")
    return {method: {k: statistics.median(r[k] for r in rs) for k in keys} for method, rs in records.items()}


def table(results: dict) -> str:
    heap = ", ".join(f"{k}={v}" for k, v in results["heap"].items()) or "glibc defaults"
    n = results["processes"]
    per_method = f"median of {n} new processes per method" if n > 1 else "one new process per method"
    lines = [
        f"UNet forwards ({results['model']}) at progress {', '.join(map(str, PROGRESS))}, {results['size']}², batch "
        f"{results['batch']}, {results['dtype']}, {results['device']} ({results['threads']} threads), heap: {heap}; "
        f"{per_method}, MiB above the level before the forwards "
        "(freed memory kept in glibc's heap: in total)",
        "",
        "| method | peak resident | peak live (allocated, not freed) | at resident peak: live | freed, kept in heap |",
        "|---|---|---|---|---|",
    ]
    base = results["median"].get("vanilla")
    for method, m in results["median"].items():
        rss, live = (
            f"{m[key]:.0f}" + ("" if base is None or method == "vanilla" else f" ({m[key] / base[key] - 1:+.1%})")
            for key in ("rss_peak_mib", "live_peak_mib")
        )
        lines.append(
            f"| {method} | {rss} | {live} | {m['live_at_rss_peak_mib']:.0f} | {m['free_in_heap_at_rss_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", help="sd15, sdxl, demo or a diffusers folder (its UNet config)")
    parser.add_argument("--size", type=int, default=512, help="image size (pixels, square)")
    parser.add_argument("--methods", nargs="+", default=["vanilla", "paper", "fast"], help="vanilla or presets")
    parser.add_argument("--processes", type=int, default=2, help="new processes per method")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if _mallinfo2() is None:
        parser.error("needs glibc's mallinfo2 (Linux, glibc >= 2.33); this C library has none")
    if args.child:
        return _child(args)
    if args.out is None:
        parser.error("--out is required")
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    unknown = [m for m in args.methods if m != "vanilla" and m not in agentsd.PRESETS]
    if unknown:
        parser.error(f"unknown methods {unknown}: vanilla or one of the presets {sorted(agentsd.PRESETS)}")
    records = run_processes(args)
    results = {
        **machine(torch.device("cpu"), torch.float32),
        "model": records[args.methods[0]][0]["model"],
        "size": args.size,
        "batch": args.batch,
        "heap": heap_settings(),
        "processes": args.processes,
        "progress": list(PROGRESS),
        "records": records,
        "median": summarize(records),
    }
    write_results(args.out, results, table(results))


if __name__ == "__main__":
    main()
