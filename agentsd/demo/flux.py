"""The DiT proving ground: a miniature Flux.1 trained here on the demo world, as a diffusers ``FluxPipeline``.

Double- and single-stream blocks with RoPE, 128² images through the demo's VAE (a 16×16 grid of 256 image tokens),
the demo's CLIP for the pooled text and a small T5 for the token states; trained by
``benchmarks/train_flux_demo.py``. Loaded by name in the CLI: ``agentsd generate --model demo-flux``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

__all__ = ["FLUX_GUIDANCE", "FLUX_MODEL_DIR", "FLUX_STEPS", "MAX_TOKENS", "SETTINGS_FILE", "load_flux_pipeline"]

FLUX_MODEL_DIR = Path(__file__).with_name("flux_model")
FLUX_GUIDANCE = 3.0  # classifier-free guidance (the pipeline's true_cfg_scale): the model learned no distilled guidance
FLUX_STEPS = 25
MAX_TOKENS = 20  # the captions' longest tokenization: the model was trained on exactly this many text tokens
SIZE = 128  # the images' side when the folder does not say (the 256-token ground's)
SETTINGS_FILE = "agentsd_demo.json"  # in the model folder: {"size": the side of the images it was trained on}


def load_flux_pipeline(
    device: str | torch.device | None = None, dtype: torch.dtype | None = None, folder: str | Path = FLUX_MODEL_DIR
):
    """The proving ground's ``FluxPipeline``, read from the package; nothing is downloaded.

    Calling it samples at the settings it was trained and measured for (``FLUX_STEPS`` steps, classifier-free
    guidance ``FLUX_GUIDANCE`` against the empty caption, ``MAX_TOKENS`` text tokens, and the side its folder's
    ``SETTINGS_FILE`` names: 128² for the 256-token ground, 256² for the 1,024-token one) unless told otherwise;
    ``height=None`` and ``width=None`` mean that side too.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no Flux proving ground in {folder}: benchmarks/train_flux_demo.py makes it; it is not shipped until "
            "vanilla reads 80% of held-out captions (docs/results.md, The DiT proving ground)"
        )
    pipe = _flux_class().from_pretrained(folder, local_files_only=True, dtype=dtype or torch.float32)
    settings = folder / SETTINGS_FILE
    pipe.demo_size = int(json.loads(settings.read_text())["size"]) if settings.is_file() else SIZE
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or "cpu")


@functools.cache
def _flux_class():
    """``FluxPipeline`` whose call defaults to the proving ground's own settings; ``guidance_scale`` is its
    classifier-free guidance (``true_cfg_scale``, against ``negative_prompt``, the empty caption by default)."""
    from diffusers import FluxPipeline

    class DemoFluxPipeline(FluxPipeline):
        demo_size = SIZE  # load_flux_pipeline sets it from the folder

        def __call__(
            self,
            prompt=None,
            *,
            num_inference_steps: int = FLUX_STEPS,
            guidance_scale: float = FLUX_GUIDANCE,
            negative_prompt=None,
            height: int | None = None,
            width: int | None = None,
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
                height=height or self.demo_size,
                width=width or self.demo_size,
                max_sequence_length=max_sequence_length,
                **kwargs,
            )

    return DemoFluxPipeline
