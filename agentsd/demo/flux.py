"""The DiT proving ground: a miniature Flux.1 trained here on the demo world, as a diffusers ``FluxPipeline``.

Double- and single-stream blocks with RoPE, 128² images through the demo's VAE (a 16×16 grid of 256 image tokens),
the demo's CLIP for the pooled text and a small T5 for the token states; trained by
``benchmarks/train_flux_demo.py``. Loaded by name in the CLI: ``agentsd generate --model demo-flux``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["FLUX_GUIDANCE", "FLUX_MODEL_DIR", "FLUX_STEPS", "MAX_TOKENS", "load_flux_pipeline"]

FLUX_MODEL_DIR = Path(__file__).with_name("flux_model")
FLUX_GUIDANCE = 3.0  # classifier-free guidance (the pipeline's true_cfg_scale): the model learned no distilled guidance
FLUX_STEPS = 25
MAX_TOKENS = 20  # the captions' longest tokenization: the model was trained on exactly this many text tokens
SIZE = 128


def load_flux_pipeline(
    device: str | torch.device | None = None, dtype: torch.dtype | None = None, folder: str | Path = FLUX_MODEL_DIR
):
    """The proving ground's ``FluxPipeline`` (128² images), read from the package; nothing is downloaded.

    Calling it samples at the settings it was trained and measured for (``FLUX_STEPS`` steps, classifier-free
    guidance ``FLUX_GUIDANCE`` against the empty caption, 128², ``MAX_TOKENS`` text tokens) unless told otherwise.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no Flux proving ground in {folder}: benchmarks/train_flux_demo.py makes it; it is not shipped until "
            "vanilla reads 80% of held-out captions (docs/results.md, The DiT proving ground)"
        )
    pipe = _flux_class().from_pretrained(folder, local_files_only=True, dtype=dtype or torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or "cpu")


@functools.cache
def _flux_class():
    """``FluxPipeline`` whose call defaults to the proving ground's own settings; ``guidance_scale`` is its
    classifier-free guidance (``true_cfg_scale``, against ``negative_prompt``, the empty caption by default)."""
    from diffusers import FluxPipeline

    class DemoFluxPipeline(FluxPipeline):
        def __call__(
            self,
            prompt=None,
            *,
            num_inference_steps: int = FLUX_STEPS,
            guidance_scale: float = FLUX_GUIDANCE,
            negative_prompt=None,
            height: int = SIZE,
            width: int = SIZE,
            max_sequence_length: int = MAX_TOKENS,
            **kwargs,
        ):
            if negative_prompt is None:
                negative_prompt = [""] * len(prompt) if isinstance(prompt, list) else ""
            return super().__call__(
                prompt=prompt,
                negative_prompt=negative_prompt,
                true_cfg_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                height=height,
                width=width,
                max_sequence_length=max_sequence_length,
                **kwargs,
            )

    return DemoFluxPipeline
