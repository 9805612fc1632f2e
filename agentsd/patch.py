"""``apply`` / ``remove`` / ``patched``: the one place that walks a model.

A patch swaps the ``attn1`` processor of every ``BasicTransformerBlock`` for an
:class:`~agentsd.attention.AgentAttnProcessor` and registers two kinds of forward
pre-hooks (keyword calls work): one on the UNet that records the latent size and
picks the phase once per call, one on each block that hands its input to the
processor as the matching metric. ``remove`` puts back the very processor objects
that were there and removes the hooks.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.models.attention import BasicTransformerBlock

from .attention import AgentAttnProcessor, AgentConfig, AgentState
from .schedule import Phase, phase_at, progress, resolve_schedule

__all__ = ["apply", "auto_max_downsample", "patched", "remove", "state_of"]

_ATTR = "_agentsd_patch"


@dataclass
class _Patch:
    state: AgentState
    num_train_timesteps: int
    options: dict
    originals: list = field(default_factory=list)  # (attention module, its original processor)
    handles: list = field(default_factory=list)


def apply(
    model,
    schedule: str | Sequence[Phase] = "paper",
    *,
    max_downsample: int | str = "auto",
    use_rand: bool = True,
    k_scale2: float = 0.3,
    k_shortcut: float = 0.075,
    attn_precision: str | None = None,
    seed: int | None = None,
):
    """Patch a diffusers pipeline (its UNet, and its ControlNet if any) or a bare UNet with agent attention.

    Important args:
        model: a pipeline with a ``unet`` or a ``UNet2DConditionModel`` (also a ``ControlNetModel``).
        schedule: ``"paper"`` (agents early, then ToMe), ``"tome"`` (ToMeSD's default), or a
            sequence of :class:`~agentsd.Phase` ordered by ``end``.

    Args to tinker with:
        max_downsample: deepest level patched, as a downsampling factor; ``"auto"`` takes the
            highest-resolution level that has self-attention (1 for SD 1.x/2.x, 2 for SDXL).
        use_rand: pick each window's dst token at random (off for odd batch sizes).
        k_scale2: exponent of the softmax scale in the agent broadcast.
        k_shortcut: weight of the ``V`` shortcut added to the agent output.
        attn_precision: ``"fp32"`` computes both softmax products in float32 (SD 2.x in half precision).
        seed: seeds the random dst choice (drawn afresh each call); ``None`` picks a seed at random.

    Returns:
        ``model``, patched in place. Applying again replaces the previous patch.
    """
    unets, num_train_timesteps = _find_unets(model)
    phases = resolve_schedule(schedule)
    options = dict(
        schedule=phases,
        max_downsample=max_downsample,
        use_rand=use_rand,
        k_scale2=k_scale2,
        k_shortcut=k_shortcut,
        attn_precision=attn_precision,
        seed=seed,
    )
    configs = [
        AgentConfig(
            phases=phases,
            max_downsample=auto_max_downsample(unet) if max_downsample == "auto" else max_downsample,
            use_rand=bool(use_rand),
            k_scale2=float(k_scale2),
            k_shortcut=float(k_shortcut),
            attn_precision=attn_precision,
        )
        for unet in unets
    ]
    remove(model)
    for unet, config in zip(unets, configs):
        state = AgentState(config, secrets.randbits(32) if seed is None else int(seed))
        _patch(unet, _Patch(state, num_train_timesteps, options))
    return model


def remove(model) -> None:
    """Undo :func:`apply`: restore the original processors and drop the hooks. No-op when unpatched."""
    unets, _ = _find_unets(model)
    for unet in unets:
        patch = unet.__dict__.pop(_ATTR, None)
        if patch is None:
            continue
        for handle in patch.handles:
            handle.remove()
        for attn, original in patch.originals:
            attn.set_processor(original)


@contextlib.contextmanager
def patched(model, schedule: str | Sequence[Phase] = "paper", **kwargs) -> Iterator:
    """Context manager around :func:`apply`; on exit restores the model's previous patch (or none)."""
    unets, _ = _find_unets(model)
    previous = getattr(unets[0], _ATTR, None)
    apply(model, schedule, **kwargs)
    try:
        yield model
    finally:
        remove(model)
        if previous is not None:
            apply(model, **previous.options)


def state_of(unet) -> AgentState | None:
    """The live state of a patched UNet (its current phase and latent size), or ``None``."""
    patch = getattr(unet, _ATTR, None)
    return None if patch is None else patch.state


def _find_unets(model) -> tuple[list[torch.nn.Module], int]:
    """The denoiser modules to patch and the scheduler's number of training timesteps."""
    if isinstance(model, torch.nn.Module):
        if not hasattr(model, "down_blocks") or not _blocks(model):
            raise TypeError(
                "expected a UNet2DConditionModel (or ControlNetModel) with transformer blocks, "
                f"got {type(model).__name__}"
            )
        return [model], 1000
    unet = getattr(model, "unet", None)
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(
            f"expected a diffusers pipeline with a `unet` or a UNet2DConditionModel, got {type(model).__name__}"
        )
    unets = [unet]
    controlnet = getattr(model, "controlnet", None)
    if controlnet is not None:
        unets += [net for net in getattr(controlnet, "nets", [controlnet]) if _blocks(net)]
    scheduler = getattr(model, "scheduler", None)
    num_train_timesteps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or 1000
    return unets, int(num_train_timesteps)


def _blocks(module: torch.nn.Module) -> list[BasicTransformerBlock]:
    return [m for m in module.modules() if isinstance(m, BasicTransformerBlock)]


def auto_max_downsample(unet: torch.nn.Module) -> int:
    """Downsampling factor of the highest-resolution level with self-attention (what ``"auto"`` picks)."""
    for level, block in enumerate(getattr(unet, "down_blocks", [])):
        if _blocks(block):
            return 2**level
    return 1


def _patch(unet: torch.nn.Module, patch: _Patch) -> None:
    state = patch.state

    def unet_pre_hook(module, args, kwargs):
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.reshape(-1)[0]
        p = progress(timestep, patch.num_train_timesteps)
        state.begin_call(sample.shape[-2], sample.shape[-1], phase_at(state.config.phases, p))

    patch.handles.append(unet.register_forward_pre_hook(unet_pre_hook, with_kwargs=True))
    for block in _blocks(unet):
        processor = AgentAttnProcessor(block.attn1.processor, state)
        patch.originals.append((block.attn1, block.attn1.processor))
        block.attn1.set_processor(processor)
        patch.handles.append(block.register_forward_pre_hook(_metric_hook(processor), with_kwargs=True))
    unet.__dict__[_ATTR] = patch


def _metric_hook(processor: AgentAttnProcessor):
    def hook(module, args, kwargs):
        processor.block_input = args[0] if args else kwargs["hidden_states"]

    return hook
