"""Load the shipped demo model as a diffusers ``StableDiffusionPipeline``, offline."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["GUIDANCE", "MODEL_DIR", "STEPS", "load_pipeline"]

MODEL_DIR = Path(__file__).with_name("model")
# The guidance scale the shipped model reads captions best at (benchmarks/results/demo_model.json);
# Stable Diffusion's usual 7.5 over-saturates a model this small.
GUIDANCE = 3.0
STEPS = 25  # the sampling steps its caption accuracy was measured at


def load_pipeline(
    device: str | torch.device | None = None, dtype: torch.dtype | None = None, folder: str | Path = MODEL_DIR
):
    """The demo text-to-image pipeline (128² images, 32² latents), read from the package; nothing is downloaded.

    Args:
        device: where to put it (default: CPU).
        dtype: weight dtype (default: float32).
    """
    from diffusers import StableDiffusionPipeline

    # Weights may be stored in half precision (to keep the package small): loaded in float32 unless asked.
    pipe = StableDiffusionPipeline.from_pretrained(
        folder,
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
        torch_dtype=torch.float32 if dtype is None else dtype,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or "cpu")
