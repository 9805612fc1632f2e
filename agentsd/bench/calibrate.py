"""Measure, once per device, from how many tokens the lean path pays, and remember it.

Whether a level should run agent attention depends on the device: on a CPU attention's FLOPs
dominate from ~1,024 tokens, on a fast GPU every small op's launch counts and fused attention is
cheap below ~16k tokens. Rather than guess one number per device type, :func:`calibrate` times
UNet forwards on the device itself (batch 2, as guidance runs), vanilla against the lean preset
with only the highest-resolution level patched, at growing sizes, in both of the preset's phases,
and keeps the smallest token count from which the patched forward is faster at that size and every
larger one. The result is cached per device name, dtype and eager/compiled in
``$XDG_CACHE_HOME/agentsd/calibration.json`` (``~/.cache``, :mod:`agentsd.calibration`), which
``agentsd.apply`` reads.

    agentsd calibrate                       # CUDA, fp16, eager: about a minute on a recent GPU
    agentsd calibrate --compile             # the same under torch.compile (minutes: one graph per size)
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from agentsd import calibration
from agentsd.schedule import PRESETS

__all__ = ["calibrate"]

SIZES = {"cpu": (256, 384, 512), "default": (512, 768, 1024, 1536, 2048)}  # image sides; SD 1.5 latents are /8
MARGIN = 0.98  # the patched forward must take at most this share of vanilla's time


def _time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(
    device="cuda",
    dtype: torch.dtype = torch.float16,
    *,
    model: str = "sd15",
    sizes: tuple[int, ...] | None = None,
    compiled: bool = False,
    repeats: int = 5,
    save: bool = True,
) -> dict:
    """Time vanilla against the lean preset's phases (top level only) at each size; return and cache the result.

    Returns ``{"min_tokens": N, "key": ..., "sizes": {side: {"tokens", "vanilla_s", "<phase>_s", "pays"}}}``
    where ``N`` is the smallest top-level token count from which every phase pays at every larger size
    measured (one past the largest size when none does).
    """
    import agentsd

    from .core import random_unet, unet_inputs

    device = torch.device(device)
    unet, factor, name = random_unet(model, device, dtype)
    net = torch.compile(unet) if compiled else unet
    sizes = sizes or SIZES.get(device.type, SIZES["default"])
    phases = [dataclasses.replace(p, end=1.0, min_tokens=0) for p in PRESETS["lean"][0]]
    rows = {}
    for size in sorted(sizes):
        latent = size // factor
        inputs = unet_inputs(unet, 2, latent, device, dtype)

        def forward(inputs=inputs):
            with torch.no_grad():
                net(**inputs)

        row = {"tokens": latent * latent}
        for label, phase in [("vanilla", None), *((f"{p.sx}x{p.sy}", p) for p in phases)]:
            if phase is not None:
                agentsd.apply(unet, {0: [phase]}, seed=0)
            forward()  # warm-up (and compilation)
            row[f"{label}_s"] = _time(forward, repeats, device)
            agentsd.remove(unet)
        row["pays"] = all(row[f"{p.sx}x{p.sy}_s"] <= MARGIN * row["vanilla_s"] for p in phases)
        rows[str(size)] = row
        print(
            f"{size}² ({row['tokens']} tokens): vanilla {row['vanilla_s'] * 1e3:.1f} ms, "
            + ", ".join(f"{p.sx}x{p.sy} {row[f'{p.sx}x{p.sy}_s'] * 1e3:.1f} ms" for p in phases)
            + (" - pays" if row["pays"] else ""),
            flush=True,
        )
    min_tokens = 4 * rows[str(max(sizes))]["tokens"]
    for size in sorted(sizes, reverse=True):
        if not rows[str(size)]["pays"]:
            break
        min_tokens = rows[str(size)]["tokens"]
    result = {
        "key": calibration.key(device, dtype, compiled),
        "min_tokens": min_tokens,
        "model": name,
        "torch": torch.__version__,
        "margin": MARGIN,
        "sizes": rows,
    }
    if save:
        calibration.save(result)
    return result
