"""A tiny text-to-image model shipped with agentsd, its data generator and its evaluator.

``load_pipeline()`` gives a ``StableDiffusionPipeline`` (128² images) trained on
procedural scenes (:mod:`agentsd.demo.data`), ``load_flux_pipeline()`` the DiT proving ground (a miniature Flux.1,
:mod:`agentsd.demo.flux`) once trained; ``prompts(n, seed)`` gives held-out
captions; ``Evaluator`` scores generated images against their captions and gives
features for FID. Trained by ``benchmarks/train_demo.py``.
"""

from .data import Batch, Obj, Scene, parse, prompts, render, sample, scenes, vocabulary
from .evaluator import Evaluator, Scores
from .flux import FLUX_GUIDANCE, FLUX_MODEL_DIR, FLUX_STEPS, load_flux_pipeline
from .pipeline import GUIDANCE, MODEL_DIR, STEPS, load_pipeline

__all__ = [
    "FLUX_GUIDANCE",
    "FLUX_MODEL_DIR",
    "FLUX_STEPS",
    "GUIDANCE",
    "MODEL_DIR",
    "STEPS",
    "Batch",
    "Evaluator",
    "Obj",
    "Scene",
    "Scores",
    "load_flux_pipeline",
    "load_pipeline",
    "parse",
    "prompts",
    "render",
    "sample",
    "scenes",
    "vocabulary",
]
