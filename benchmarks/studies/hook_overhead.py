"""What agentsd's hooks cost where nothing is merged: UNet forwards of a patched UNet whose blocks are all below
the device's ``min_tokens`` (``fast`` on a GPU at ≤ 1024² leaves every block of SD 1.5 and SDXL alone), against
the same UNet unpatched.

A small UNet with many transformer blocks at an 8×8 latent (64 tokens, below every device's threshold), so that
the forward's own work is small and the Python the patch adds (UNet and block pre-hooks, the processors' checks)
is a visible share of it. Checks first that the patched forward returns vanilla's output bit for bit (nothing
merged), then times both in turns, round by round: per round the median of ``--forwards`` forwards. JSON and a
Markdown table: the overhead per UNet call and per transformer block, as the median of the rounds' differences.

    python benchmarks/studies/hook_overhead.py --out benchmarks/results/hook_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

import agentsd
from agentsd.bench import write_results
from agentsd.bench.core import machine
from agentsd.bench.speed import time_forward
from agentsd.bench.suite import TINY_UNET

# the suite's tiny UNet, with attention on both levels and two layers per block: 11 transformer blocks
UNET = dict(
    TINY_UNET,
    sample_size=8,
    layers_per_block=2,
    block_out_channels=(32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def measure(method: str, rounds: int, forwards: int, device: torch.device, threads: int | None) -> dict:
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).to(device).eval()
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules())
    inputs = dict(
        sample=torch.randn(2, 4, 8, 8, device=device),
        timestep=torch.tensor(500, device=device),
        encoder_hidden_states=torch.randn(2, 7, 32, device=device),
    )
    with torch.no_grad():
        reference = unet(**inputs).sample
        agentsd.apply(unet, method, seed=0)
        patched = unet(**inputs).sample
        agentsd.remove(unet)
    if not torch.equal(reference, patched):
        raise SystemExit(f"{method!r} merged something at 64 tokens on {device.type}: this would not time the hooks")
    times = {"vanilla": [], method: []}
    for rnd in range(rounds + 1):  # the first round warms up
        for name in times:
            if name != "vanilla":
                agentsd.apply(unet, method, seed=0)
            seconds = statistics.median(time_forward(unet, inputs) for _ in range(forwards))
            agentsd.remove(unet)
            if rnd:
                times[name].append(seconds)
        if rnd:
            print(f"round {rnd}: " + ", ".join(f"{n} {t[-1] * 1e3:.3f} ms" for n, t in times.items()), flush=True)
    overhead = [p - v for v, p in zip(times["vanilla"], times[method])]
    return {
        "transformer_blocks": blocks,
        "times": times,
        "overhead_per_call_us": round(statistics.median(overhead) * 1e6, 1),
        "overhead_per_call_us_range": [round(min(overhead) * 1e6, 1), round(max(overhead) * 1e6, 1)],
        "overhead_per_block_us": round(statistics.median(overhead) / blocks * 1e6, 2),
    }


def table(results: dict) -> str:
    r = results["result"]
    vanilla, patched = (statistics.median(t) * 1e3 for t in r["times"].values())
    low, high = r["overhead_per_call_us_range"]
    return "\n".join(
        [
            f"Hooks without merging: a UNet of {r['transformer_blocks']} transformer blocks at 64 tokens, batch 2, "
            f"float32, {results['device']} ({results['threads']} threads); {results['rounds']} rounds of "
            f"{results['forwards']} forwards, `{results['method']}` output equal to vanilla's bit for bit",
            "",
            "| vanilla ms | patched ms | overhead per UNet call µs (range over rounds) | overhead per block µs |",
            "|---|---|---|---|",
            f"| {vanilla:.3f} | {patched:.3f} | {r['overhead_per_call_us']:.1f} ({low:.1f} to {high:.1f}) "
            f"| {r['overhead_per_block_us']:.2f} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="fast", help="a preset that merges nothing at 64 tokens (default fast)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--forwards", type=int, default=50, help="forwards per round and method (their median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: less noise)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.forwards < 1:
        parser.error("--rounds and --forwards must be at least 1")
    device = torch.device(args.device)
    result = measure(args.method, args.rounds, args.forwards, device, args.threads)
    results = {
        **machine(device, torch.float32),
        "method": args.method,
        "rounds": args.rounds,
        "forwards": args.forwards,
        "result": result,
    }
    write_results(args.out, results, table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
