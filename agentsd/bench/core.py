"""What every timing shares: the models it builds, where it ran, and the one loop that times methods.

:func:`interleave` serves UNet forwards (:mod:`.speed`), whole runs (:mod:`.runs`) and so the GPU suite: per
size, warm-up rounds, then timed rounds in which every method runs once, in turn, so that drift in the
machine's load hits them alike; results are written after each size, and a time budget cuts repeats and sizes.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from agentsd.schedule import PRESETS

from . import git_commit

# UNet configs spelled out so the architectures are explicit (SD 1.5 equals diffusers' defaults).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# SD 3.5 medium's transformer (MMDiT-X: attn2 in its first 13 blocks, RMS q/k norms), 2.5B parameters.
SD35_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
ARCHITECTURES = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "sd35": SD35_MEDIUM}
TRANSFORMERS = {"sd35"}  # architectures that are SD 3 transformers, not UNets
_NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL", "sd35": "SD 3.5 medium"}
TEXT_TOKENS_SD3 = 77 + 256  # CLIP's and T5's prompt tokens side by side
TOME_RATIO = PRESETS["paper"][1].ratio  # the ToMe ratio every benchmark's tomesd runs at: the paper's


def model_folder(model: str) -> Path | None:
    """The diffusers folder for ``model``, ``None`` for a built-in architecture; ``ValueError`` for anything else."""
    if model in ARCHITECTURES:
        return None
    if model == "demo":
        from agentsd.demo import MODEL_DIR

        return MODEL_DIR
    if not (Path(model) / "unet" / "config.json").is_file():
        raise ValueError(
            f"--model must be one of {', '.join([*ARCHITECTURES, 'demo'])} or a diffusers folder with "
            f"unet/config.json, got {model!r}"
        )
    return Path(model)


def build_unet(model: str) -> tuple[UNet2DConditionModel, int, str]:
    """A random-weight UNet for ``model`` (sd15, sdxl, demo or a diffusers folder), its VAE factor and a name; for
    ``sd35`` the SD 3.5-medium transformer."""
    if model in TRANSFORMERS:
        from diffusers import SD3Transformer2DModel

        name = f"{_NAMES[model]} transformer architecture, random weights"
        return SD3Transformer2DModel(**ARCHITECTURES[model]), 8, name
    name = f"{_NAMES.get(model, model)} UNet architecture, random weights"
    path = model_folder(model)
    if path is None:
        return UNet2DConditionModel(**ARCHITECTURES[model]), 8, name
    vae_config = path / "vae" / "config.json"
    vae_levels = len(json.loads(vae_config.read_text())["block_out_channels"]) if vae_config.is_file() else 4
    unet = UNet2DConditionModel.from_config(json.loads((path / "unet" / "config.json").read_text()))
    return unet, 2 ** (vae_levels - 1), name


def random_unet(model: str, device, dtype) -> tuple[UNet2DConditionModel, int, str]:
    """:func:`build_unet` seeded (0) and made where it runs, in ``dtype``, in eval mode."""
    torch.manual_seed(0)
    with torch.device(device):  # random init where the model runs: seconds, not a minute, for SDXL on a GPU
        unet, vae_factor, name = build_unet(model)
    return unet.to(device=device, dtype=dtype).eval(), vae_factor, name


def unet_inputs(unet, batch: int, latent: int, device, dtype) -> dict:
    """Random keyword inputs of one UNet call (timestep 500) at a ``latent``² sample (of an SD 3 transformer: its
    hidden states, the prompt's CLIP and T5 tokens and the pooled text)."""
    config = unet.config
    if hasattr(config, "joint_attention_dim"):
        return {
            "hidden_states": torch.randn(batch, config.in_channels, latent, latent, device=device, dtype=dtype),
            "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),
            "encoder_hidden_states": torch.randn(
                batch, TEXT_TOKENS_SD3, config.joint_attention_dim, device=device, dtype=dtype
            ),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim, device=device, dtype=dtype),
        }
    inputs = {
        "sample": torch.randn(batch, config.in_channels, latent, latent, device=device, dtype=dtype),
        "timestep": 500,
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, device=device, dtype=dtype),
    }
    if config.addition_embed_type == "text_time":  # SDXL's pooled text and size conditioning
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.randn(batch, 6, device=device, dtype=dtype),
        }
    return inputs


def machine(device, dtype) -> dict:
    """Where a timing was taken, recorded beside it."""
    device = torch.device(device)
    card = {"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}
    return {
        "device": str(device),
        **card,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "commit": git_commit(),
    }


def past(deadline: float | None, what: str) -> bool:
    """True (and says so) when ``deadline`` has passed: ``what`` is then left unmeasured."""
    if deadline is None or time.monotonic() < deadline:
        return False
    print(f"{what}: not measured, the time budget is spent", flush=True)
    return True


def rounds(warmup: int, repeats: int, deadline: float | None):
    """The label of each round: the warm-up rounds, then up to ``repeats`` timed rounds: at least one timed round,
    and after each one only as many more as the last one's duration says still fit before ``deadline``."""
    for _ in range(warmup):
        yield "warm-up"
    for rep in range(repeats):
        start = time.monotonic()
        yield f"repeat {rep + 1}"
        now = time.monotonic()
        if deadline is not None and rep + 1 < repeats and now + (now - start) > deadline:
            print(f"{rep + 1} of {repeats} repeats: the time budget allows no more", flush=True)
            return


def resume(out: Path, setup: dict) -> dict:
    """The results already in ``out`` when measured under ``setup``, else a fresh start (never a mix)."""
    results = json.loads(out.read_text()) if out.exists() else {}
    if {k: v for k, v in results.items() if k != "sizes"} != json.loads(json.dumps(setup)):
        results = {}
    return {**setup, "sizes": results.get("sizes", {})}


def interleave(
    results: dict,
    out: Path,
    sizes: Iterable[int],
    methods: list[str],
    *,
    enable: Callable[[str, int], Callable[[], None]],
    once: Callable[[int, str], tuple[float, int | None]],
    summarize: Callable[[dict, dict], dict],
    warmup: int,
    repeats: int,
    deadline: float | None = None,
    record: dict | None = None,
) -> dict:
    """Time every method at every size; ``results["sizes"]`` gains one entry per size, ``out`` is written after each.

    ``enable(method, size)`` patches and returns the undo; ``once(size, which)`` times one call (``which`` is
    "warm-up" or "repeat k") and returns its seconds and the peak memory above its start (``None`` where not
    measured); ``summarize(times, memory)`` makes the size's entry, beside ``repeats``, ``warmup`` and ``record``.
    """
    for size in sizes:
        if past(deadline, f"{size}²"):
            break
        times = {method: [] for method in methods}
        memory = {method: [] for method in methods}
        for which in rounds(warmup, repeats, deadline):
            for method in methods:
                undo = enable(method, size)
                try:
                    seconds, extra = once(size, which)
                finally:
                    undo()
                if which != "warm-up":
                    times[method].append(seconds)
                    memory[method].append(extra)
                peak = "" if extra is None else f", peak +{extra / 2**20:.0f} MiB"
                print(f"{size}² {method:24s} {which}: {seconds:.4f} s{peak}", flush=True)
        entry = {"repeats": len(times[methods[0]]), "warmup": warmup, **(record or {})}
        results["sizes"][str(size)] = entry | summarize(times, memory)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results
