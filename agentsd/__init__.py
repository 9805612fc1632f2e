"""agentsd: training-free agent attention for diffusers Stable Diffusion pipelines."""

from .patch import apply, patched, remove, state_of
from .schedule import PRESETS, Phase

__all__ = ["PRESETS", "Phase", "apply", "patched", "remove", "state_of"]
__version__ = "0.1.0"
