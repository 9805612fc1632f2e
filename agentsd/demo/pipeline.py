"""Load the shipped demo model as a diffusers ``StableDiffusionPipeline``, offline."""

from __future__ import annotations

import functools
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

    Calling it samples at the settings its quality was measured at (``STEPS`` steps, guidance ``GUIDANCE``) unless
    told otherwise: Stable Diffusion's 7.5 over-saturates a model this small.

    Args:
        device: where to put it (default: CPU).
        dtype: weight dtype (default: float32).
    """
    # Weights may be stored in half precision (to keep the package small): loaded in float32 unless asked.
    pipe = _demo_class().from_pretrained(
        folder,
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
        dtype=torch.float32 if dtype is None else dtype,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or "cpu")


@functools.cache
def _demo_class():
    """``StableDiffusionPipeline`` whose call defaults to the demo model's own steps and guidance."""
    from diffusers import StableDiffusionPipeline

    class DemoPipeline(StableDiffusionPipeline):
        @functools.wraps(StableDiffusionPipeline.__call__)
        def __call__(self, *args, num_inference_steps: int = STEPS, guidance_scale: float = GUIDANCE, **kwargs):
            return super().__call__(
                *args, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **kwargs
            )

    return DemoPipeline
