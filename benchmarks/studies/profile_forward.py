"""Where a UNet forward's time goes, vanilla against a method: the ops each one spends its time in.

Profiles ``--forwards`` forwards of a random-weight UNet (``bench speed``'s models and methods) with
torch.profiler, once vanilla and once with the method, and writes per-op self times side by side
with their difference: what the method saves (attention) and what it adds (matching, merging).

    python benchmarks/studies/profile_forward.py --model agentsd/demo/model --size 128 \\
        --out benchmarks/results/profile_demo128_agent.json

A preset (``--method fast``) runs the phases it has at sampling progress ``--progress`` (the UNet gets the
timestep ``(1 - p)·1000``). Beside the per-op table the ops are summed by kind (convolution, linear layers,
attention products, the rest): what is left to save once the attention is cheap.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import agentsd
from agentsd.bench import write_results
from agentsd.bench.core import machine, random_unet, unet_inputs
from agentsd.bench.speed import METHODS
from agentsd.schedule import PRESETS

# op name -> kind, for the summary by kind (self times; every other op counts as "other")
KINDS = {
    "aten::mkldnn_convolution": "convolution",
    "aten::convolution": "convolution",
    "aten::_convolution": "convolution",
    "aten::addmm": "linear",
    "aten::mm": "linear",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_scaled_dot_product_efficient_attention": "attention",
    "aten::_scaled_dot_product_flash_attention": "attention",
    "aten::_scaled_dot_product_cudnn_attention": "attention",
    "aten::bmm": "attention",
    "aten::baddbmm": "attention",
}


def profiled(unet, inputs: dict, forwards: int) -> tuple[float, dict[str, dict]]:
    """Seconds per forward and ``{op: {"count", "self_ms"}}`` over ``forwards`` forwards (after one warm-up)."""
    with torch.no_grad():
        unet(**inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(forwards):
                unet(**inputs)
            seconds = (time.perf_counter() - start) / forwards
    ops = {
        e.key: {"count": e.count / forwards, "self_ms": e.self_cpu_time_total / 1e3 / forwards}
        for e in prof.key_averages()
    }
    return seconds, ops


def compare(vanilla: dict[str, dict], method: dict[str, dict], top: int) -> list[dict]:
    """Ops by the size of their change in self time per forward (method − vanilla), largest first."""
    rows = []
    for op in vanilla.keys() | method.keys():
        a, b = vanilla.get(op, {"count": 0, "self_ms": 0.0}), method.get(op, {"count": 0, "self_ms": 0.0})
        rows.append(
            {
                "op": op,
                "vanilla_ms": a["self_ms"],
                "method_ms": b["self_ms"],
                "delta_ms": b["self_ms"] - a["self_ms"],
                "vanilla_calls": a["count"],
                "method_calls": b["count"],
            }
        )
    rows.sort(key=lambda r: abs(r["delta_ms"]), reverse=True)
    return rows[:top]


def by_kind(ops: dict[str, dict]) -> dict[str, float]:
    """Self milliseconds per forward summed by op kind (:data:`KINDS`)."""
    kinds = dict.fromkeys(("convolution", "linear", "attention", "other"), 0.0)
    for op, o in ops.items():
        kinds[KINDS.get(op, "other")] += o["self_ms"]
    return kinds


def patch(unet, method: str, latent: int):
    """Apply ``method`` (a ``bench speed`` method or an agentsd preset); returns the function that undoes it."""
    if method in METHODS:
        return METHODS[method](unet, latent * latent)
    agentsd.apply(unet, method, seed=0)
    return lambda: agentsd.remove(unet)


def table(results: dict) -> str:
    progress = f" at progress {results['progress']:g}" if results.get("progress") is not None else ""
    lines = [
        f"UNet forward ({results['model']}), {results['size']}², batch {results['batch']}, {results['device']} "
        f"({results['threads']} threads), profiled over {results['forwards']} forwards: vanilla "
        f"{results['vanilla_s'] * 1e3:.1f} ms, {results['method']}{progress} {results['method_s'] * 1e3:.1f} ms per "
        "forward (profiler on)",
        "",
        "Self time by kind of op, ms per forward:",
        "",
        "| kind | vanilla | method | change |",
        "|---|---|---|---|",
        *(
            f"| {kind} | {ms:.1f} | {results['method_kinds'][kind]:.1f} | {results['method_kinds'][kind] - ms:+.1f} |"
            for kind, ms in results.get("vanilla_kinds", {}).items()
        ),
        "",
        f"Calls per forward: vanilla {results['vanilla_calls']:.0f}, "
        f"{results['method']} {results['method_calls']:.0f}.",
        "",
        "| op | vanilla ms | method ms | change ms | vanilla calls | method calls |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["ops"]:
        lines.append(
            f"| `{r['op']}` | {r['vanilla_ms']:.2f} | {r['method_ms']:.2f} | {r['delta_ms']:+.2f} | "
            f"{r['vanilla_calls']:.0f} | {r['method_calls']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", help="sd15, sdxl, demo or a diffusers folder (its UNet config)")
    parser.add_argument("--size", type=int, default=512, help="image size (pixels, square)")
    parser.add_argument(
        "--method", default="agentsd-agent", choices=[m for m in [*METHODS, *PRESETS] if m != "vanilla"]
    )
    parser.add_argument("--progress", type=float, default=None, help="sampling progress p of the forwards (0 to 1)")
    parser.add_argument("--forwards", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--top", type=int, default=25, help="ops kept, by the size of their change")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.progress is not None and not 0.0 <= args.progress <= 1.0:
        parser.error(f"--progress must lie in [0, 1], got {args.progress}")
    device, dtype = torch.device(args.device), torch.float32
    unet, factor, name = random_unet(args.model, device, dtype)
    latent = args.size // factor
    inputs = unet_inputs(unet, args.batch, latent, device, dtype)
    if args.progress is not None:
        inputs["timestep"] = round((1.0 - args.progress) * 1000)
    vanilla_s, vanilla = profiled(unet, inputs, args.forwards)
    undo = patch(unet, args.method, latent)
    try:
        method_s, method = profiled(unet, inputs, args.forwards)
    finally:
        undo()
    results = {
        **machine(device, dtype),
        "model": name,
        "size": args.size,
        "batch": args.batch,
        "forwards": args.forwards,
        "method": args.method,
        "progress": args.progress,
        "vanilla_s": vanilla_s,
        "method_s": method_s,
        "vanilla_calls": sum(o["count"] for o in vanilla.values()),
        "method_calls": sum(o["count"] for o in method.values()),
        "vanilla_kinds": by_kind(vanilla),
        "method_kinds": by_kind(method),
        "ops": compare(vanilla, method, args.top),
    }
    write_results(args.out, results, table(results))


if __name__ == "__main__":
    main()
