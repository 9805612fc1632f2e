"""A tiny text-to-image model shipped with agentsd, its data generator and its evaluator.

``load_pipeline()`` gives a ``StableDiffusionPipeline`` (128² images) trained on
procedural scenes (:mod:`agentsd.demo.data`); ``prompts(n, seed)`` gives held-out
captions; ``Evaluator`` scores generated images against their captions and gives
features for FID. Trained by ``benchmarks/train_demo.py``.
"""

from .data import Batch, Obj, Scene, parse, prompts, render, sample, scenes, vocabulary
from .evaluator import Evaluator, Scores
from .pipeline import GUIDANCE, MODEL_DIR, STEPS, load_pipeline

__all__ = [
    "GUIDANCE",
    "MODEL_DIR",
    "STEPS",
    "Batch",
    "Evaluator",
    "Obj",
    "Scene",
    "Scores",
    "load_pipeline",
    "parse",
    "prompts",
    "render",
    "sample",
    "scenes",
    "vocabulary",
]
