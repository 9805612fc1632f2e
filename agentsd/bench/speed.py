"""Time UNet forwards: vanilla SDPA vs tomesd vs agentsd (ToMe mode, agent phase, paper schedule) vs a ceiling.

The UNet is built from its config with random weights: timing does not depend on
the weights. All methods run in one process, interleaved repeat by repeat so drift
in machine load hits them alike. Raw times go to JSON first; the markdown table and
the plot are made from the JSON.

    agentsd bench speed                                  # SD 1.5 at 512² and 1024² -> benchmarks/results/speed_cpu.json
    agentsd bench speed --sizes 512 --repeats 7          # re-measure one size; the others in the JSON stay
    agentsd bench speed --model sdxl --sizes 1024 --methods vanilla agentsd-agent ceiling
    agentsd bench speed --report                         # remake summaries, table and plot from the JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.models.attention import BasicTransformerBlock

import agentsd
from agentsd import PRESETS, Phase
from agentsd.bench import pyplot, save_figure, write_report
from agentsd.bench.core import TOME_RATIO, interleave, machine, random_unet, resume, unet_inputs
from agentsd.patch import _is_dit, auto_max_downsample
from agentsd.schedule import DIT_EDGE_BLOCKS

AGENT_PHASE = Phase(end=1.0, **{k: getattr(PRESETS["paper"][0], k) for k in ("sx", "sy", "ratio", "agent_ratio")})
TOME_PHASE = Phase(end=1.0, sx=2, sy=2, ratio=TOME_RATIO)
AGENT_SHARE = PRESETS["paper"][0].end  # fraction of sampling the paper schedule spends in the agent phase
LEAN_SHARE = PRESETS["lean"][0][0].end  # the same for the lean preset's 4x4 phase


class _ZeroAttention:
    """The ceiling: the self-attention agentsd would patch, made free (it computes nothing)."""

    def __init__(self, original, latent_tokens: int, max_downsample: int):
        self.original, self.latent_tokens, self.max_downsample = original, latent_tokens, max_downsample

    def __call__(self, attn, hidden_states, *args, **kwargs):
        if math.ceil(math.sqrt(self.latent_tokens // hidden_states.shape[1])) <= self.max_downsample:
            return torch.zeros_like(hidden_states)
        return self.original(attn, hidden_states, *args, **kwargs)


class _ZeroJointAttention:
    """The ceiling of an SD 3 transformer's patched blocks: their attention (joint and attn2) made free."""

    def __init__(self, original):
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is None:
            return torch.zeros_like(hidden_states)
        return torch.zeros_like(hidden_states), torch.zeros_like(encoder_hidden_states)


class _SoftmaxFree:
    """Runs ``original`` with its softmax attention free (``scaled_dot_product_attention`` returns zeros): what is left
    is what agent attention cannot save (the projections), so vanilla minus this is the most it can."""

    def __init__(self, original):
        self.original = original

    def __call__(self, *args, **kwargs):
        sdpa = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = lambda query, key, value, **_: torch.zeros_like(query)
        try:
            return self.original(*args, **kwargs)
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa


def _dit_attentions(unet) -> list:
    """The attentions (joint and attn2) of the blocks the sd3 preset patches."""
    count = len(unet.transformer_blocks)
    blocks = unet.transformer_blocks[DIT_EDGE_BLOCKS : count - DIT_EDGE_BLOCKS]
    return [a for b in blocks for a in (b.attn, b.attn2) if a is not None]


def _swap(attns: list, wrap) -> Callable[[], None]:
    originals = [a.processor for a in attns]
    for attn, original in zip(attns, originals):
        attn.set_processor(wrap(original))
    return lambda: [attn.set_processor(original) for attn, original in zip(attns, originals)] and None


def _ceiling(unet, latent_tokens: int) -> Callable[[], None]:
    if _is_dit(unet):
        return _swap(_dit_attentions(unet), _ZeroJointAttention)
    max_downsample = auto_max_downsample(unet)
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    originals = [b.attn1.processor for b in blocks]
    for block, original in zip(blocks, originals):
        block.attn1.set_processor(_ZeroAttention(original, latent_tokens, max_downsample))

    def undo():
        for block, original in zip(blocks, originals):
            block.attn1.set_processor(original)

    return undo


def _tomesd(unet, ratio: float) -> Callable[[], None]:
    import tomesd

    tomesd.apply_patch(unet, ratio=ratio, sx=2, sy=2, use_rand=True)
    return lambda: tomesd.remove_patch(unet)


def _agentsd(unet, phase) -> Callable[[], None]:
    agentsd.apply(unet, [phase] if isinstance(phase, Phase) else phase, seed=0)
    return lambda: agentsd.remove(unet)


def _lean_phase(k: int, **changes) -> dict[int, tuple[Phase]]:
    """Phase ``k`` of the lean preset on every level it patches, for a whole call (``changes`` to its fields)."""
    return {level: (dataclasses.replace(phases[k], end=1.0, **changes),) for level, phases in PRESETS["lean"].items()}


def _whole_call(preset: str, k: int) -> Callable:
    """Phase ``k`` of a one-level preset for a whole call."""
    return lambda unet, tokens: _agentsd(unet, (dataclasses.replace(PRESETS[preset][k], end=1.0),))


# name -> patch(unet, latent_tokens), returning the function that undoes it
METHODS: dict[str, Callable] = {
    "vanilla": lambda unet, tokens: lambda: None,
    "tomesd": lambda unet, tokens: _tomesd(unet, TOME_RATIO),
    "agentsd-tome": lambda unet, tokens: _agentsd(unet, TOME_PHASE),
    "agentsd-agent": lambda unet, tokens: _agentsd(unet, AGENT_PHASE),
    "lean-early": lambda unet, tokens: _agentsd(unet, _lean_phase(0)),
    "lean-late": lambda unet, tokens: _agentsd(unet, _lean_phase(1)),
    "pooled-early": lambda unet, tokens: _agentsd(unet, _lean_phase(0, agents="pooled", agent_ratio=None)),
    "ceiling": _ceiling,
    # an SD 3 transformer: its patched blocks' softmax attention free, projections kept (what agents can save at most)
    "ceiling-softmax": lambda unet, tokens: _swap(_dit_attentions(unet), _SoftmaxFree),
    # an SD 3 transformer: the sd3 preset's two phases, each for a whole call (on the blocks apply patches), and
    # sd3-paper's, which merges image tokens before the projections (it can save some of them too)
    "sd3-early": _whole_call("sd3", 0),
    "sd3-late": _whole_call("sd3", 1),
    "sd3-paper-early": _whole_call("sd3-paper", 0),
    "sd3-paper-late": _whole_call("sd3-paper", 1),
}
DIT_METHODS = ("vanilla", "ceiling", "ceiling-softmax", "sd3-early", "sd3-late", "sd3-paper-early", "sd3-paper-late")
# A preset over a run, weighted from its two phases timed for whole calls: name -> (early, late, early's share).
WEIGHTED = {
    "agentsd-paper": ("agentsd-agent", "agentsd-tome", AGENT_SHARE),
    "lean": ("lean-early", "lean-late", LEAN_SHARE),
    "sd3": ("sd3-early", "sd3-late", PRESETS["sd3"][0].end),
    "sd3-paper": ("sd3-paper-early", "sd3-paper-late", PRESETS["sd3-paper"][0].end),
}


def time_forward(unet, inputs: dict) -> float:
    start = time.perf_counter()
    kwargs = dict(inputs)
    if "hidden_states" in kwargs:  # an SD 3 transformer
        args = []
    else:  # positional: tomesd's hook reads the sample from the positional arguments only
        args = [kwargs.pop(name) for name in ("sample", "timestep", "encoder_hidden_states")]
    with torch.no_grad():
        unet(*args, **kwargs)
    if next(iter(inputs.values())).device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(model, sizes, methods, repeats, warmup, batch, dtype, device, out: Path, deadline=None) -> dict:
    """Measure every size (all methods interleaved) and write ``out`` after each; other sizes in ``out`` are kept.

    ``deadline`` (a ``time.monotonic()`` value): fewer repeats (at least one) where the rest would not fit, and
    sizes not started once it has passed; what was cut is printed and the repeats taken are recorded."""
    unet, vae_factor, name = random_unet(model, device, dtype)
    if _is_dit(unet):
        unsupported = [m for m in methods if m not in DIT_METHODS]
        if unsupported:
            raise ValueError(f"an SD 3 transformer times {', '.join(DIT_METHODS)}; not {', '.join(unsupported)}")
    setup = {
        **machine(device, dtype),
        "batch": batch,
        "model": name,
        "tome_ratio": TOME_RATIO,
        "agent_phase": AGENT_PHASE.__dict__,
        "paper_agent_share": AGENT_SHARE,
        "lean_early_share": LEAN_SHARE,
    }
    results = resume(out, setup)
    inputs = {}

    def once(size: int, which: str) -> tuple[float, None]:
        latent = size // vae_factor
        if inputs.get("size") != size:
            inputs.update(size=size, kwargs=unet_inputs(unet, batch, latent, device, dtype))
        return time_forward(unet, inputs["kwargs"]), None

    interleave(
        results,
        out,
        sizes,
        methods,
        enable=lambda method, size: METHODS[method](unet, (size // vae_factor) ** 2),
        once=once,
        summarize=lambda times, memory: summarize(times),
        warmup=warmup,
        repeats=repeats,
        deadline=deadline,
    )
    return results


def summarize(times: dict[str, list[float]]) -> dict:
    """Medians (and minima, robust to load spikes), speed-ups over vanilla, and the share of the
    ceiling's saving each method reaches; the two-phase presets (WEIGHTED) are weighted from their phases."""
    summary = {"times": times}
    for stat, reduce in (("median", statistics.median), ("min", min)):
        seconds = {name: reduce(ts) for name, ts in times.items()}
        for name, (early, late, share) in WEIGHTED.items():
            if early in seconds and late in seconds:
                seconds[name] = share * seconds[early] + (1 - share) * seconds[late]
        summary[stat] = seconds
        if "vanilla" in seconds:
            vanilla = seconds["vanilla"]
            summary[f"speedup_{stat}"] = {name: vanilla / t for name, t in seconds.items()}
            if "ceiling" in seconds:
                saving = vanilla - seconds["ceiling"]
                summary[f"ceiling_share_{stat}"] = {name: (vanilla - t) / saving for name, t in seconds.items()}
            if "ceiling-softmax" in seconds:
                saving = vanilla - seconds["ceiling-softmax"]
                summary[f"softmax_share_{stat}"] = {name: (vanilla - t) / saving for name, t in seconds.items()}
    return summary


def table(results: dict) -> str:
    lines = [
        f"Forward ({results['model']}), batch {results['batch']}, {results['dtype']}, {results['device']} "
        f"({results['threads']} threads)",
        "",
        "Speed-up over vanilla and share of the ceiling's saving, from the median (and the minimum) of the repeats.",
        "",
        "| size | method | median s | speed-up | share of ceiling saving | min s | speed-up (min) | share (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(value, fmt):
        return "–" if value is None else fmt.format(value)

    for size, summary in results["sizes"].items():
        for name in summary["median"]:
            cells = []
            for stat in ("median", "min"):
                cells += [
                    cell(summary[stat][name], "{:.4g}"),
                    cell(summary.get(f"speedup_{stat}", {}).get(name), "{:.2f}×"),
                    cell(summary.get(f"ceiling_share_{stat}", {}).get(name), "{:.0%}"),
                ]
            lines.append(f"| {size}² | {name} | " + " | ".join(cells) + " |")
    for size, summary in results["sizes"].items():
        if "softmax_share_median" in summary:
            shares = ", ".join(f"{n} {v:.0%}" for n, v in summary["softmax_share_median"].items() if n != "vanilla")
            lines += ["", f"{size}², share of the softmax-free ceiling's saving (projections kept), median: {shares}"]
    return "\n".join(lines)


def plot(results: dict):
    """Speed-up over vanilla (median) against image size, one line per method; ``None`` without matplotlib."""
    plt = pyplot()
    if plt is None or not results["sizes"]:
        return None
    sizes = sorted(results["sizes"], key=int)
    methods = [m for m in results["sizes"][sizes[0]].get("speedup_median", {}) if m != "vanilla"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        xs = [int(s) for s in sizes if method in results["sizes"][s].get("speedup_median", {})]
        ys = [results["sizes"][str(s)]["speedup_median"][method] for s in xs]
        ax.plot(xs, ys, marker="o", linestyle="--" if method == "ceiling" else "-", label=method)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([int(s) for s in sizes], [f"{s}²" for s in sizes])
    ax.set_xlabel("image size")
    ax.set_ylabel("speed-up over vanilla SDPA (median)")
    ax.set_title(
        f"UNet forward, {results['model']}\n{results['device']}, {results['dtype']}, batch {results['batch']}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="sd15", help="sd15, sdxl, sd35 (SD 3.5 medium), demo or a diffusers folder (its UNet config)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sizes (pixels, square)")
    parser.add_argument("--methods", nargs="+", help="default: all of the mode's methods")
    parser.add_argument("--pipeline", action="store_true", help="time whole sampling runs instead of UNet forwards")
    parser.add_argument(
        "--fresh",
        type=int,
        nargs="?",
        const=1,
        default=0,
        metavar="N",
        help="--pipeline: each method in N new processes of its own (default 1), round by round: peak memory "
        "without leftovers, as the median over the processes",
    )
    parser.add_argument("--steps", type=int, default=20, help="--pipeline: sampling steps")
    parser.add_argument("--scheduler", default="pndm", help="--pipeline: pndm, ddim, euler or dpm")
    parser.add_argument(
        "--strength", type=float, help="--pipeline: image-to-image runs (a hi-res pass) at this strength, in (0, 1]"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="JSON results (default: benchmarks/results/speed[_runs]_cpu.json)")
    parser.add_argument("--report", action="store_true", help="only remake summaries, table and plot from --out")


def check_arguments(args: argparse.Namespace) -> None:
    """Fill the mode's defaults; ``ValueError`` for values that do not fit the mode."""
    from . import runs

    methods = runs.METHODS if args.pipeline else METHODS
    if args.model == "sd35" and args.pipeline:
        raise ValueError("--model sd35 times transformer forwards (no --pipeline)")
    dit_only = set(DIT_METHODS) - {"vanilla", "ceiling"}
    forwards = DIT_METHODS if args.model == "sd35" else [m for m in METHODS if m not in dit_only]
    args.methods = args.methods or list(runs.DEFAULT_METHODS if args.pipeline else forwards)
    unknown = [m for m in args.methods if m not in methods]
    if unknown:
        mode = "--pipeline" if args.pipeline else "UNet-forward"
        raise ValueError(f"unknown {mode} method(s) {', '.join(unknown)}; choose from {', '.join(methods)}")
    if not args.pipeline and any(m not in forwards for m in args.methods):
        kind = "an SD 3 transformer" if args.model == "sd35" else "a UNet"
        raise ValueError(f"{kind} times {', '.join(forwards)}; not {', '.join(set(args.methods) - set(forwards))}")
    if getattr(args, "fresh", 0) and not args.pipeline:
        raise ValueError("--fresh goes with --pipeline (whole runs)")
    if getattr(args, "fresh", 0) < 0:
        raise ValueError(f"--fresh takes a number of processes >= 1, got {args.fresh}")
    strength = getattr(args, "strength", None)
    if strength is not None and (not args.pipeline or not 0 < strength <= 1):
        raise ValueError(f"--strength goes with --pipeline and lies in (0, 1], got {strength}")
    if args.pipeline and args.scheduler not in runs.SCHEDULERS:
        raise ValueError(f"--scheduler must be one of {', '.join(runs.SCHEDULERS)}, got {args.scheduler!r}")
    if min(args.steps, args.repeats, args.batch, *args.sizes) < 1 or args.warmup < 0:
        raise ValueError("--steps, --repeats, --batch and --sizes must be >= 1, --warmup >= 0")
    default = "speed_runs_cpu.json" if args.pipeline else "speed_cpu.json"
    args.out = args.out or Path("benchmarks/results") / default


def bench(args: argparse.Namespace) -> int:
    from . import runs

    check_arguments(args)
    if args.report:
        results = json.loads(args.out.read_text())
        pipeline = results.get("kind") == "pipeline"
        per_process = results.get("processes") == "one per method"
        for size, measured in results["sizes"].items():
            summary = (
                runs.summarize(measured["times"], measured["memory_bytes"], per_process)
                if pipeline
                else summarize(measured["times"])
            )
            kept = ("repeats", "warmup", "warmup_steps", "processes_per_method")
            results["sizes"][size] = {k: measured[k] for k in kept if k in measured} | summary
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    else:
        dtype, device = getattr(torch, args.dtype), torch.device(args.device)
        deadline = getattr(args, "deadline", None)
        pipeline = args.pipeline
        if pipeline and getattr(args, "fresh", 0):
            results = runs.fresh(args, args.out)
        elif pipeline:
            results = runs.run(
                args.model, args.sizes, args.methods, args.repeats, args.warmup, args.steps, args.scheduler,
                dtype, device, args.out, deadline, getattr(args, "strength", None),
            )  # fmt: skip
        else:
            results = run(
                args.model, args.sizes, args.methods, args.repeats, args.warmup, args.batch, dtype, device, args.out,
                deadline,
            )  # fmt: skip
    module = runs if pipeline else sys.modules[__name__]
    write_report(args.out, module.table(results), module.plot(results))
    if pipeline and results.get("processes") == "one per method":  # memory: a figure of its own
        save_figure(args.out.with_name(args.out.stem + "_memory.png"), runs.plot(results, "memory"))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return bench(parser.parse_args(argv))
