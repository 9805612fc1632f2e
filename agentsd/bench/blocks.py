"""Time DiT blocks at their real width and token count: Flux.1 and Wan 2.x, too large to run whole on a CPU.

A transformer of the published config is built with one block of each kind (random weights: timing does not
depend on them) and called at the real token count; hooks time each block. Every block of a kind is alike, so a
block's time stands for every block of its kind, and the model's time is their sum: the first and last
``DIT_EDGE_BLOCKS`` blocks run vanilla under every preset (``apply`` leaves them alone), the others the method
(embedders and the final layer, a few per cent, are left out). Methods, interleaved repeat by repeat:

- ``vanilla``; ``ceiling``: the patched attention free (projections too); ``ceiling-softmax``: only its softmax
  attention free (what agents can save at most);
- ``<preset>-early`` / ``<preset>-late``: a preset's agent phase and its late phase, each for a whole call; the
  preset over a run is weighted from them by the share of sampling each phase takes;
- ``<preset>+<option>-early`` / ``-late`` (asked for by name): the same with DESIGN §12's options on every phase
  (``prop``: proportional attention, ``near``: the near field, ``both``; ``all``: both and shifted windows), and
  ``<preset>+<option>`` over a run (``flux`` has ``both`` already, over 4x4 late windows; ``flux-bare+both`` has
  them over 2x2, ``flux+all`` adds the shift).

    agentsd bench blocks --model flux --sizes 1024 2048
    agentsd bench blocks --model wan --sizes 480p
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

import agentsd
from agentsd import PRESETS
from agentsd.bench import pyplot, write_report
from agentsd.bench.core import interleave, machine, resume
from agentsd.bench.speed import _SoftmaxFree
from agentsd.schedule import DIT_EDGE_BLOCKS

# Published configs (the diffusers configs of FLUX.1-dev and Wan 2.1 T2V 1.3B / 14B).
FLUX = dict(
    patch_size=1,
    in_channels=64,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
WAN_14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824}
MODELS = {
    # name: (family, config, blocks of each kind in the whole model, what to call it)
    "flux": ("flux", FLUX, {"double": 19, "single": 38}, "Flux.1 (d 3072, 19 double + 38 single blocks)"),
    "wan": ("wan", WAN_1_3B, {"block": 30}, "Wan 2.1 1.3B (d 1536, 30 blocks)"),
    "wan14b": ("wan", WAN_14B, {"block": 40}, "Wan 2.1 14B (d 5120, 40 blocks)"),
}
TEXT_TOKENS = 512
VIDEO_SIZES = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}  # frames, height, width in pixels
PRESETS_OF = {"flux": ("flux", "flux-bare", "flux-merged"), "wan": ("wan", "wan-fast")}


def grid(family: str, size: str) -> tuple[int, int, int]:
    """The patch grid ``(frames, rows, columns)`` at ``size``: Flux's side in pixels (16 pixels a token), Wan's
    named video size (4x temporal and 8x spatial VAE, 2x2 patches)."""
    if family == "flux":
        return 1, int(size) // 16, int(size) // 16
    frames, height, width = VIDEO_SIZES[size]
    return (frames - 1) // 4 + 1, height // 16, width // 16


def build(model: str, device, dtype):
    family, config, _, _ = MODELS[model]
    torch.manual_seed(0)
    with torch.device(device):
        if family == "flux":
            from diffusers import FluxTransformer2DModel

            net = FluxTransformer2DModel(**config, num_layers=1, num_single_layers=1)
        else:
            from diffusers import WanTransformer3DModel

            net = WanTransformer3DModel(**config, num_layers=1)
    net = net.to(device)
    return (net if dtype == torch.float32 else net.to(dtype)).eval()


def inputs(net, family: str, size: str, device, dtype) -> dict:
    f, h, w = grid(family, size)
    randn = dict(device=device, dtype=dtype)
    if family == "flux":
        from diffusers import FluxPipeline

        return dict(
            hidden_states=torch.randn(1, h * w, net.config.in_channels, **randn),
            encoder_hidden_states=torch.randn(1, TEXT_TOKENS, net.config.joint_attention_dim, **randn),
            pooled_projections=torch.randn(1, net.config.pooled_projection_dim, **randn),
            timestep=torch.full((1,), 0.5, **randn),
            guidance=torch.full((1,), 3.5, **randn),
            img_ids=FluxPipeline._prepare_latent_image_ids(1, h, w, device, dtype),
            txt_ids=torch.zeros(TEXT_TOKENS, 3, **randn),
        )
    return dict(
        hidden_states=torch.randn(1, net.config.in_channels, f, 2 * h, 2 * w, **randn),
        timestep=torch.full((1,), 500.0, **randn),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, net.config.text_dim, **randn),
    )


def blocks_of(net) -> dict[str, torch.nn.Module]:
    if hasattr(net, "single_transformer_blocks"):
        return {"double": net.transformer_blocks[0], "single": net.single_transformer_blocks[0]}
    return {"block": net.blocks[0]}


def _attentions(net):
    return [b.attn1 if hasattr(b, "attn1") else b.attn for b in blocks_of(net).values()]


class _Free:
    """The ceiling: an attention that computes nothing."""

    def __init__(self, original):
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is not None and hasattr(attn, "to_add_out"):  # Flux's double-stream attention
            return torch.zeros_like(hidden_states), torch.zeros_like(encoder_hidden_states)
        return torch.zeros_like(hidden_states)


def _swap(net, wrap):
    attns = _attentions(net)
    originals = [a.processor for a in attns]
    for attn, original in zip(attns, originals):
        attn.set_processor(wrap(original))
    return lambda: [a.set_processor(o) for a, o in zip(attns, originals)] and None


OPTIONS = {
    "prop": dict(proportional=True),
    "near": dict(near=True),
    "both": dict(proportional=True, near=True),
    # shifted windows too, timed with every block shifted (in a model every other patched block is: an upper bound)
    "all": dict(proportional=True, near=True, shift=True),
    # the near field over the 3x3 windows around each query's own
    "reach": dict(proportional=True, near=True, near_reach=1),
}


def _phase_of(preset: str, k: int, options: dict | None = None):
    """Phase ``k`` of a DiT preset for a whole call, on every block of the small transformer; ``options``: §12's."""
    return phase_method(dataclasses.replace(PRESETS[preset][k], **(options or {})))


def phase_method(phase):
    """A method that runs ``phase`` for a whole call on every block of the small transformer (studies add their own
    to :func:`methods_for`'s)."""
    phase = dataclasses.replace(phase, end=1.0)

    def enable(net):
        agentsd.apply(net, (phase,), blocks=range(len(blocks_of(net))), seed=0)
        if phase.shift:
            for attn in _attentions(net):
                attn.processor.shifted = True
        return lambda: agentsd.remove(net)

    return enable


def methods_for(model: str) -> dict:
    family = MODELS[model][0]
    methods = {
        "vanilla": lambda net: lambda: None,
        "ceiling": lambda net: _swap(net, _Free),
        "ceiling-softmax": lambda net: _swap(net, _SoftmaxFree),
    }
    for preset in PRESETS_OF[family]:
        early, late = PRESETS[preset]
        methods[f"{preset}-early"] = _phase_of(preset, 0)
        if not any(late == PRESETS[other][1] and f"{other}-late" in methods for other in PRESETS_OF[family]):
            methods[f"{preset}-late"] = _phase_of(preset, 1)
    for preset in PRESETS_OF[family]:
        for option, settings in OPTIONS.items():
            for k, phase in enumerate(("early", "late")):
                methods[f"{preset}+{option}-{phase}"] = _phase_of(preset, k, settings)
    return methods


def _late_name(model: str, preset: str) -> str:
    """The method that timed ``preset``'s late phase (presets that share it share the timing)."""
    family = MODELS[model][0]
    for other in PRESETS_OF[family]:
        if PRESETS[other][1] == PRESETS[preset][1]:
            return f"{other}-late"
    return f"{preset}-late"


def summarize(model: str, times: dict[str, dict[str, list[float]]]) -> dict:
    """Per block kind the median seconds; per method the model's seconds (edge blocks vanilla), speed-up, share of
    the ceilings' savings; each preset over a run weighted from its phases."""
    counts = MODELS[model][2]
    kinds = list(counts)
    block = {m: {k: statistics.median(ts[k]) for k in kinds} for m, ts in times.items()}

    def whole(method: str) -> float:
        # The edge blocks: the first DIT_EDGE_BLOCKS of the first kind, the last ones of the last kind.
        total = 0.0
        for i, kind in enumerate(kinds):
            edges = DIT_EDGE_BLOCKS * ((i == 0) + (i == len(kinds) - 1))
            total += edges * block["vanilla"][kind] + (counts[kind] - edges) * block[method][kind]
        return total

    model_s = {m: whole(m) for m in block}
    for preset in PRESETS_OF[MODELS[model][0]]:
        runs = {preset: (f"{preset}-early", _late_name(model, preset))}
        runs.update({f"{preset}+{o}": (f"{preset}+{o}-early", f"{preset}+{o}-late") for o in OPTIONS})
        for name, (early, late) in runs.items():
            if early in model_s and late in model_s:
                share = PRESETS[preset][0].end
                model_s[name] = share * model_s[early] + (1 - share) * model_s[late]
    vanilla = model_s["vanilla"]
    summary = {"times": times, "block_median": block, "model_s": model_s}
    summary["speedup"] = {m: vanilla / t for m, t in model_s.items()}
    for name in ("ceiling", "ceiling-softmax"):
        if name in model_s:
            # per patched block (no edges): the share of what the ceiling saves
            per_block = {m: sum(block[m][k] for k in kinds) for m in block}
            saving = per_block["vanilla"] - per_block[name]
            summary[f"share_of_{name}"] = {m: (per_block["vanilla"] - t) / saving for m, t in per_block.items()}
    return summary


def run(
    model: str, sizes: list[str], methods: list[str], repeats: int, warmup: int, dtype, device, out: Path,
    deadline: float | None = None,
) -> dict:  # fmt: skip
    family, _, counts, name = MODELS[model]
    net = build(model, device, dtype)
    table = methods_for(model)
    setup = {
        **machine(device, dtype),
        "model": name,
        "blocks": counts,
        "edge_blocks": DIT_EDGE_BLOCKS,
        "text_tokens": TEXT_TOKENS,
        "presets": {p: [ph.__dict__ for ph in PRESETS[p]] for p in PRESETS_OF[family]},
    }
    results = resume(out, setup)
    kinds = list(blocks_of(net))
    seconds: dict[str, float] = {}
    starts: dict[str, float] = {}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for kind, block in blocks_of(net).items():

        def pre(module, args, kwargs, kind=kind):
            sync()
            starts[kind] = time.perf_counter()

        def post(module, args, kwargs, output, kind=kind):
            sync()
            seconds[kind] = time.perf_counter() - starts[kind]

        block.register_forward_pre_hook(pre, with_kwargs=True)
        block.register_forward_hook(post, with_kwargs=True)
    current = {}

    def once(size, which):
        if current.get("size") != size:
            current.update(size=size, kwargs=inputs(net, family, size, device, dtype))
        with torch.no_grad():
            net(**current["kwargs"], return_dict=False)
        current["last"] = dict(seconds)
        return sum(seconds.values()), None

    per_kind: dict[str, dict[str, list[float]]] = {}

    def enable(method, size):
        undo = table[method](net)

        def done():
            undo()
            per_kind.setdefault(method, {k: [] for k in kinds})
            if current.get("timed"):
                for k in kinds:
                    per_kind[method][k].append(current["last"][k])

        return done

    def timed_once(size, which):
        current["timed"] = which != "warm-up"
        return once(size, which)

    def summary(times, memory):
        result = summarize(model, {m: per_kind[m] for m in methods})
        per_kind.clear()
        return result

    interleave(results, out, sizes, methods, enable=enable, once=timed_once, summarize=summary, warmup=warmup,
               repeats=repeats, deadline=deadline)  # fmt: skip
    return results


def table(results: dict) -> str:
    lines = [
        f"{results['model']}: blocks timed at the real width and token count, {results['dtype']}, {results['device']} "
        f"({results['threads']} thread{'' if results['threads'] == 1 else 's'}), commit {results['commit']}",
        "",
        f"Model time = the sum over its blocks (edge blocks, {results['edge_blocks']} at each end, vanilla); a preset "
        "over a run weights its phases by their share of sampling.",
        "",
        "| size | method | s per block (" + " / ".join(results["blocks"]) + ") | model s | speed-up | share of the "
        "ceiling's saving | of the softmax-free ceiling's |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, summary in results["sizes"].items():
        for method, seconds in summary["model_s"].items():
            block = summary["block_median"].get(method)
            per = " / ".join(f"{block[k]:.3g}" for k in results["blocks"]) if block else "(weighted)"
            shares = [summary.get(f"share_of_{c}", {}).get(method) for c in ("ceiling", "ceiling-softmax")]
            cells = ["–" if s is None else f"{s:.0%}" for s in shares]
            lines.append(
                f"| {size} | {method} | {per} | {seconds:.4g} | {summary['speedup'][method]:.2f}× | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def plot(results: dict):
    plt = pyplot()
    if plt is None or not results["sizes"]:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = list(results["sizes"])
    methods = [m for m in results["sizes"][sizes[0]]["speedup"] if m != "vanilla"]
    width = 0.8 / len(sizes)
    for i, size in enumerate(sizes):
        values = [results["sizes"][size]["speedup"].get(m, 0) for m in methods]
        ax.bar([j + i * width for j in range(len(methods))], values, width, label=size)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([j + width * (len(sizes) - 1) / 2 for j in range(len(methods))], methods, rotation=30, ha="right")
    ax.set_ylabel("model speed-up over vanilla (from its blocks)")
    ax.set_title(f"{results['model']}\n{results['device']}, {results['dtype']}, commit {results['commit']}", fontsize=8)
    ax.legend(fontsize=8)
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="flux", choices=sorted(MODELS))
    parser.add_argument("--sizes", nargs="+", help="Flux: image sides in pixels (1024 2048); Wan: 480p, 720p")
    parser.add_argument("--methods", nargs="+", help="default: all of the model's methods")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="JSON results (default: benchmarks/results/speed_cpu_<model>.json)")
    parser.add_argument("--report", action="store_true", help="only remake the table and plot from --out")


def bench(args: argparse.Namespace) -> int:
    family = MODELS[args.model][0]
    args.sizes = args.sizes or (["1024", "2048"] if family == "flux" else ["480p"])
    for size in args.sizes:
        if (family == "flux" and not size.isdigit()) or (family == "wan" and size not in VIDEO_SIZES):
            raise ValueError(f"{args.model} takes sizes {'in pixels' if family == 'flux' else sorted(VIDEO_SIZES)}")
    known = methods_for(args.model)
    args.methods = args.methods or [m for m in known if "+" not in m]  # §12's options by name
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; {args.model} times {', '.join(known)}")
    if "vanilla" not in args.methods:
        raise ValueError("vanilla must be timed: every figure is relative to it")
    args.out = args.out or Path("benchmarks/results") / f"speed_cpu_{args.model}.json"
    if args.report:
        results = json.loads(args.out.read_text())
        for size, measured in results["sizes"].items():
            keep = {k: measured[k] for k in ("repeats", "warmup")}
            results["sizes"][size] = keep | summarize(args.model, measured["times"])
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    else:
        results = run(
            args.model, args.sizes, args.methods, args.repeats, args.warmup, getattr(torch, args.dtype),
            torch.device(args.device), args.out, getattr(args, "deadline", None),
        )  # fmt: skip
    write_report(args.out, table(results), plot(results))
    return 0
