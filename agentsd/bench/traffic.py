"""Bytes each rank sends per attention call under context parallelism: agentsd's sharded agent attention beside
diffusers' own Ulysses and ring attention (DESIGN.md §13).

    agentsd bench traffic     # count on tiny Flux and Wan over 2 and 4 gloo processes, check the formulas against
                              # the count, then scale them to Wan 2.1 (1.3B, 14B; 480p, 720p) and Flux.1 2048²

Counted: every functional collective (``torch.ops._c10d_functional``) a rank issues inside the self-attention
modules, as the bytes a ring algorithm makes it send (an all-reduce of ``s`` bytes sends ``2 (R-1)/R · s``, an
all-gather of ``s`` bytes per rank ``(R-1) · s``, an all-to-all ``(R-1)/R · s``). diffusers' Ulysses and ring go
through the same collectives, so both sides are counted alike. The per-call formulas (:func:`per_call`,
:func:`per_step`) must give the counted bytes exactly before they are scaled to the real models.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..dit import Window, num_windows
from ..schedule import PRESETS
from . import git_commit, pyplot

OUT = Path("benchmarks/results/parallel_traffic.json")

SENT = {  # bytes a rank sends for a collective whose input on each rank is `size` bytes, over `ranks` ranks
    "all_reduce": lambda size, ranks: 2 * (ranks - 1) / ranks * size,
    "all_gather_into_tensor": lambda size, ranks: (ranks - 1) * size,
    "all_to_all_single": lambda size, ranks: (ranks - 1) / ranks * size,
    "reduce_scatter_tensor": lambda size, ranks: (ranks - 1) / ranks * size,
}

METHODS = ("ulysses", "ring", "agents", "merged-keys")  # counted on the tiny models, then scaled
MODELLED = ("merged-in-shards",)  # by formula alone: not built (docs/dits.md says why)

# The real models, one self-attention call of batch 1 (a video's or an image's tokens and its text's).
MODELS = {
    "Wan 2.1 1.3B, 480p × 81 frames": dict(family="wan", grid=(21, 30, 52), text=0, heads=12, head_dim=128, width=1536),
    "Wan 2.1 1.3B, 720p × 81 frames": dict(family="wan", grid=(21, 45, 80), text=0, heads=12, head_dim=128, width=1536),
    "Wan 2.1 14B, 480p × 81 frames": dict(family="wan", grid=(21, 30, 52), text=0, heads=40, head_dim=128, width=5120),
    "Wan 2.1 14B, 720p × 81 frames": dict(family="wan", grid=(21, 45, 80), text=0, heads=40, head_dim=128, width=5120),
    "Flux.1, 2048²": dict(family="flux", grid=(1, 128, 128), text=512, heads=24, head_dim=128, width=3072),
}

# Tiny models to count on: four heads, so that Ulysses runs on four ranks.
TINY = {
    "flux": dict(grid=(1, 8, 12), text=8, heads=4, head_dim=16, width=64),
    "wan": dict(grid=(4, 4, 8), text=0, heads=4, head_dim=12, width=48),
}
TINY_WINDOWS = {"flux": (Window(1, 4, 4), Window(1, 2, 2)), "wan": (Window(2, 2, 2), Window(1, 2, 2))}
TIMES = {"flux": (0.9, 0.3), "wan": (900, 300)}  # sampling in the agent phase, then in the late phase


def per_call(method: str, *, tokens, text, heads, head_dim, ranks, itemsize, agents=0, groups=0, batch=1) -> float:
    """Bytes one rank sends in one self-attention call of ``tokens`` image and ``text`` text tokens.

    ``ulysses``: diffusers' all-to-alls of the queries, keys, values and output (heads padded to a multiple of the
    ranks); ``ring``: its all-gather of the keys and values; ``agents``: agentsd's agent phase (each rank's share of
    the agents, every rank's text queries, the gather's maxima and weighted sums in float32); ``merged-keys``: its
    late phase (each rank's share of the merged keys and values, every rank's text keys and values)."""
    r, seq, inner = ranks, (tokens + text) / ranks, heads * head_dim
    wide = max(itemsize, 4)  # what agentsd sums in: float32 (float64 for float64)
    if method == "ulysses":
        padded = math.ceil(heads / r) * r
        return 4 * SENT["all_to_all_single"](batch * seq * padded * head_dim * itemsize, r)
    if method == "ring":
        return SENT["all_gather_into_tensor"](2 * batch * seq * inner * itemsize, r)
    texts = SENT["all_gather_into_tensor"](batch * text / r * inner * itemsize, r) if text else 0.0
    if method == "agents":
        shares = batch * agents * inner * itemsize  # each rank's share of the agents (means)
        gather = batch * heads * (agents + text) * (head_dim + 2) * wide  # maxima, then sums and weights
        return SENT["all_reduce"](shares + gather, r) + texts
    if method == "merged-keys":
        return SENT["all_reduce"](batch * groups * 2 * inner * itemsize, r) + 2 * texts
    if method == "merged-in-shards":  # each rank's own groups' merged keys and values, all-gathered
        return SENT["all_gather_into_tensor"](batch * groups / r * 2 * inner * itemsize, r) + 2 * texts
    raise ValueError(f"unknown method {method!r}")


def per_step(method: str, *, groups, width, ranks, itemsize, batch=1) -> float:
    """Bytes one rank sends once per transformer call: the ToMe groups of the merged keys (every dst token's
    features, the groups' sizes), shared by every block."""
    if method != "merged-keys":
        return 0.0
    return SENT["all_reduce"](batch * groups * width * itemsize + batch * groups * 4, ranks)


class CollectiveCounter(TorchDispatchMode):
    """The bytes this rank sends through functional collectives while ``active``, by :data:`SENT`."""

    def __init__(self, ranks: int):
        super().__init__()
        self.ranks, self.active, self.sent, self.ops = ranks, False, 0.0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, op = func._schema.name.partition("::")
        if self.active and namespace == "_c10d_functional" and op in SENT:
            tensor = args[0]
            self.sent += SENT[op](tensor.numel() * tensor.element_size(), self.ranks)
            self.ops[op] += 1
        return func(*args, **(kwargs or {}))


def _tiny(family: str):
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    torch.manual_seed(0)
    c = TINY[family]
    if family == "flux":
        return FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=c["head_dim"],
            num_attention_heads=c["heads"], joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
        ).eval()  # fmt: skip
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=c["heads"], attention_head_dim=c["head_dim"], in_channels=4,
        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()  # fmt: skip


def _inputs(family: str, t: float) -> dict:
    g = torch.Generator().manual_seed(1)
    f, h, w = TINY[family]["grid"]
    if family == "flux":
        ids = torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"), -1
        )
        return dict(
            hidden_states=torch.randn(1, h * w, 8, generator=g),
            encoder_hidden_states=torch.randn(1, TINY[family]["text"], 32, generator=g),
            pooled_projections=torch.randn(1, 16, generator=g),
            timestep=torch.full((1,), t),
            img_ids=ids.reshape(-1, 3).float(),
            txt_ids=torch.zeros(TINY[family]["text"], 3),
        )
    return dict(
        hidden_states=torch.randn(1, 4, f, 2 * h, 2 * w, generator=g),
        timestep=torch.full((1,), t),
        encoder_hidden_states=torch.randn(1, 6, 16, generator=g),
    )


def _schedule(family: str):
    from ..schedule import Phase

    early, late = TINY_WINDOWS[family]
    return (
        Phase(end=0.4, st=early.st, sy=early.sy, sx=early.sx, ratio=0.0, tokens="all", agents="pooled", min_tokens=0),
        Phase(end=1.0, st=late.st, sy=late.sy, sx=late.sx, ratio=0.75, tokens="all", min_tokens=0),
    )


def count_rank(rank: int, ranks: int, family: str, folder: Path) -> None:
    """On one rank of a gloo group: the bytes it sends per self-attention call for every method on the tiny model."""
    from diffusers import ContextParallelConfig

    from .. import apply

    counted = {}
    for method in METHODS:
        model = _tiny(family)
        config = ContextParallelConfig(**({"ring_degree": ranks} if method == "ring" else {"ulysses_degree": ranks}))
        if method in ("agents", "merged-keys"):
            apply(model, _schedule(family), blocks="all", seed=0, use_rand=False)
        model.enable_parallelism(config=config)
        counter = CollectiveCounter(ranks)
        attentions = [b.attn1 if family == "wan" else b.attn for b in _blocks(model)]
        handles = []
        for attention in attentions:
            handles.append(attention.register_forward_pre_hook(lambda *_, c=counter: setattr(c, "active", True)))
            handles.append(attention.register_forward_hook(lambda *_, c=counter: setattr(c, "active", False)))
        t = TIMES[family][1 if method == "merged-keys" else 0]
        with counter, torch.no_grad():
            model(**_inputs(family, t), return_dict=False)
        for handle in handles:
            handle.remove()
        counted[method] = {"bytes": counter.sent, "calls": len(attentions), "ops": dict(counter.ops)}
    if rank == 0:
        (folder / f"{family}_{ranks}.json").write_text(json.dumps(counted))


def _blocks(model):
    return (
        [*model.transformer_blocks, *model.single_transformer_blocks]
        if hasattr(model, "single_transformer_blocks")
        else list(model.blocks)
    )


def _sizes(config: dict, family: str, windows=None) -> dict:
    early, late = windows or (_preset_window(family, 0), _preset_window(family, 1))
    grids = (tuple(config["grid"]),)
    return dict(agents=num_windows(grids, early), groups=num_windows(grids, late))


def _preset_window(family: str, index: int) -> Window:
    phase = PRESETS[family][index]
    return Window(phase.st, phase.sy, phase.sx)


def formula(family: str, method: str, ranks: int, config: dict, itemsize: int, windows=None) -> dict:
    """The per-call and per-step bytes :func:`per_call` and :func:`per_step` give for a model ``config``."""
    sizes = _sizes(config, family, windows)
    shape = dict(tokens=math.prod(config["grid"]), text=config["text"], heads=config["heads"])
    call = per_call(method, **shape, head_dim=config["head_dim"], ranks=ranks, itemsize=itemsize, **sizes)
    step = per_step(method, groups=sizes["groups"], width=config["width"], ranks=ranks, itemsize=itemsize)
    return {"per_call": call, "per_step": step}


def spawn(fn, ranks: int, *args, timeout_s: float = 300) -> None:
    """``fn(rank, ranks, *args)`` in ``ranks`` CPU processes joined in a gloo group on a free port, diffusers' CPU
    gaps worked around (:func:`_main`); bounded in time, nothing left running."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_main, args=(fn, ranks, port, *args), nprocs=ranks, join=False, start_method="spawn")
    try:
        for _ in range(int(timeout_s)):
            if context.join(timeout=1):
                return
        raise TimeoutError(f"{ranks} ranks still running after {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _main(rank, fn, ranks, port, *args):
    import torch.distributed as dist
    from diffusers.models import attention_dispatch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    # diffusers' two CPU gaps: it places rank r on device r % device_count (0 on a CPU-only torch), and its ring asks
    # the native backend for a log-sum-exp that backend does not return: one "device" per rank, the plain formula
    torch.accelerator.device_count = lambda: 1
    attention_dispatch._native_attention_forward_op = _native_with_lse
    try:
        fn(rank, ranks, *args)
    finally:
        dist.destroy_process_group()


def _native_with_lse(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):  # fmt: skip
    """diffusers' native attention op (``(B, S, H, D)`` in and out) with the log-sum-exp ``(B, S, H)`` its ring
    reads, by the plain formula (CPU processes only: inference, no mask other than an additive one)."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    logits = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        logits = logits + attn_mask
    lse = logits.logsumexp(dim=-1)
    out = ((logits - lse[..., None]).exp() @ v).transpose(1, 2)
    return (out, lse.transpose(1, 2)) if return_lse else out


def count(family: str, ranks: int, folder: Path) -> dict:
    """Count on the tiny ``family`` model over ``ranks`` processes; each method beside what its formula gives."""
    spawn(count_rank, ranks, family, folder)
    counted = json.loads((folder / f"{family}_{ranks}.json").read_text())
    rows = {}
    for method, seen in counted.items():
        model = formula(family, method, ranks, TINY[family], 4, TINY_WINDOWS[family])
        rows[method] = {**seen, "formula": model["per_call"] * seen["calls"] + model["per_step"]}
    return rows


def scaled(ranks=(2, 4, 8, 16), itemsize: int = 2) -> dict:
    """Bytes per self-attention call and rank on the real models, by formula, bf16 (``itemsize`` 2)."""
    table = {}
    for name, config in MODELS.items():
        family = config["family"]
        table[name] = {
            "tokens": math.prod(config["grid"]), **_sizes(config, family),
            "ranks": {str(r): {m: formula(family, m, r, config, itemsize) for m in METHODS + MODELLED} for r in ranks},
        }  # fmt: skip
    return table


def table(results: dict) -> str:
    lines = [
        f"Bytes one rank sends per self-attention call (MB, bf16, batch 1), by the formulas the tiny models' counts "
        f"check; commit {results['commit']}. `agents`: agentsd's agent phase; `merged keys`: its late phase "
        "(+ once per step: the ToMe groups' features); `in shards`: the late phase grouped within each shard, "
        "modelled only (not built).",
        "",
        "| model | tokens (agents / groups) | ranks | Ulysses | ring | agents | merged keys (+ per step) | in shards |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, model in results["scaled"].items():
        for r, methods in model["ranks"].items():
            mb = {m: methods[m]["per_call"] / 1e6 for m in methods}
            step = methods["merged-keys"]["per_step"] / 1e6
            shards = "–" if "merged-in-shards" not in mb else f"{mb['merged-in-shards']:.1f}"
            lines.append(
                f"| {name} | {model['tokens']:,} ({model['agents']:,} / {model['groups']:,}) | {r} | "
                f"{mb['ulysses']:.1f} | {mb['ring']:.1f} | {mb['agents']:.1f} | {mb['merged-keys']:.1f} "
                f"(+{step:.1f}) | {shards} |"
            )
    lines += ["", "Counted on the tiny models (bytes per forward, every self-attention call; formula beside):", ""]
    lines += ["| tiny model | ranks | method | counted | formula |", "|---|---|---|---|---|"]
    for key, methods in results["counted"].items():
        family, ranks = key.split("_")
        for method, row in methods.items():
            lines.append(f"| {family} | {ranks} | {method} | {row['bytes']:,.0f} | {row['formula']:,.0f} |")
    return "\n".join(lines)


def plot(results: dict):
    plt = pyplot()
    if plt is None:
        return None
    names = list(results["scaled"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), sharey=False)
    for ax, name in zip(axes, names):
        model = results["scaled"][name]
        ranks = [int(r) for r in model["ranks"]]
        for method in (m for m in METHODS + MODELLED if m in model["ranks"][str(ranks[0])]):
            style = dict(linestyle="--") if method in MODELLED else {}
            values = [model["ranks"][str(r)][method]["per_call"] / 1e6 for r in ranks]
            ax.plot(ranks, values, marker="o", label=method + (" (modelled)" if method in MODELLED else ""), **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("ranks")
    axes[0].set_ylabel("MB sent per attention call and rank")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"context parallelism: bytes per rank (bf16), commit {results['commit']}", fontsize=8)
    fig.tight_layout()
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4], help="process counts to count on")
    parser.add_argument("--out", type=Path, default=OUT, help="JSON results; the table and plot beside it")


def bench(args: argparse.Namespace) -> int:
    import tempfile

    from tqdm.auto import tqdm

    counted = {}
    with tempfile.TemporaryDirectory() as folder:
        for family, ranks in tqdm([(f, r) for f in TINY for r in args.ranks], desc="counting"):
            counted[f"{family}_{ranks}"] = count(family, ranks, Path(folder))
    results = {"commit": git_commit(), "counted": counted, "scaled": scaled()}
    rows = [(f"{key} {m}", row) for key, methods in counted.items() for m, row in methods.items()]
    wrong = [name for name, row in rows if not math.isclose(row["bytes"], row["formula"])]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(table(results) + "\n")
    figure = plot(results)
    if figure is not None:
        figure.savefig(args.out.with_suffix(".png"), dpi=120)
    print(table(results))
    if wrong:
        print("counted bytes differ from the formula: " + ", ".join(wrong))
        return 1
    return 0
