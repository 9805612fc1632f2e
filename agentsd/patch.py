"""``apply`` / ``remove`` / ``patched``: the one place that walks a model.

A patch swaps the ``attn1`` processor of every ``BasicTransformerBlock`` (of an SD 3 transformer: the
``attn`` and ``attn2`` processors of the chosen ``JointTransformerBlock``) for an
:class:`~agentsd.attention.AgentAttnProcessor` and registers two kinds of forward
pre-hooks (keyword calls work): one on the UNet that records the latent size and
picks the phases once per call, one on each block that hands its input to the
processor as the matching metric. Schedules with ``merge_crossattn`` phases also
wrap each block's ``attn2`` processor, those with ``merge_mlp`` phases hook its
feed-forward. ``remove`` puts back the very processor objects that were there and
removes the hooks.

Processors swapped in while patched (``set_attn_processor``, attention slicing,
``fuse_qkv_projections``, IP-Adapter loading) are wrapped in turn at the next UNet
call: agentsd stays on, and the new processor is what it falls back to and what
``remove`` leaves in place.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import secrets
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from . import calibration
from .attention import AgentAttnProcessor, AgentConfig, AgentState, Band, BlockMerge, MergedAttnProcessor
from .families import (
    DiTState,
    FluxAgentProcessor,
    QwenAgentProcessor,
    WanAgentProcessor,
    check_dit_phase,
    flow_progress,
    scheduler_shift,
    terminal_stretch,
)
from .joint import JointAgentProcessor
from .parallel import shard_of, unsupported
from .schedule import (
    DEFAULT,
    DIT_DEFAULT,
    DIT_EDGE_BLOCKS,
    DIT_PRESETS,
    FAMILY_DEFAULTS,
    Schedule,
    _phases,
    progress,
    resolve_schedule,
)

__all__ = ["apply", "attention_levels", "auto_max_downsample", "default_schedule", "patched", "remove", "state_of"]

_ATTR = "_agentsd_patch"


@dataclass
class _Patch:
    state: AgentState
    num_train_timesteps: int
    options: dict
    blocks: list = field(default_factory=list)  # (transformer block, its BlockMerge); of a DiT (block, its band)
    dit: bool = False  # an SD 3 transformer (or its ControlNet): joint-attention blocks banded by position
    family: str | None = None  # "flux" or "wan": blocks banded by position, attention through agentsd.dit
    scheduler: object = lambda: None  # () -> the pipeline's scheduler, whose time shift gives a flow model's progress
    patch_size: int = 1
    merge_crossattn: bool = False
    merge_mlp: bool = False
    handles: list = field(default_factory=list)
    warned_parallel: bool = False  # said once that this context parallelism leaves agentsd idle
    seed_shared: bool = False  # under context parallelism, the seed drawn by rank 0 taken by every rank


def apply(
    model,
    schedule: Schedule | None = None,
    *,
    max_downsample: int | str = "auto",
    blocks: str | Sequence[int] = "auto",
    use_rand: bool = True,
    k_scale2: float = 0.3,
    k_shortcut: float = 0.075,
    attn_precision: str | None = None,
    seed: int | None = None,
):
    """Patch a diffusers pipeline (its UNet or SD 3 transformer, and its ControlNet if any) or a bare denoiser.

    Important args:
        model: a pipeline with a ``unet`` (Stable Diffusion 1.x, 2.x, SDXL) or a ``transformer`` (SD 3 / 3.5, Flux.1,
            Wan 2.x; a ControlNet and Wan 2.2's second expert are patched too), or the denoiser itself.
        schedule: ``None`` takes the model's default: ``"lean"`` on a UNet (every token attends through ToMe-merged
            agents, a few dense ops per block, each level only where it has enough tokens to pay on its device),
            ``"sd3"``, ``"flux"`` or ``"wan"`` on those DiTs (the lean path at the point where the model attends;
            ``"flux"`` with proportional attention and the near field). Presets: ``"paper"`` (AgentSD's published
            setting: agents early, then ToMe, at every size), ``"tome"`` (ToMeSD's default), ``"fast"`` (two levels,
            cross-attention merged too, where it pays), ``"pooled"``, ``"sd3-paper"``, ``"flux-bare"`` (the Flux
            preset before them: 2x2 late windows, further from vanilla), ``"flux-merged"``; or a sequence of
            :class:`~agentsd.Phase` ordered by ``end``; or, on a UNet, ``{level: phases}`` with level 0 the
            highest-resolution level that has self-attention, 1 the next, and so on; on a DiT, ``{blocks: phases}``
            with ``blocks`` a block index or a ``range`` of them.

    Args to tinker with:
        max_downsample: (UNet) deepest level a sequence of phases patches, as a downsampling factor;
            ``"auto"`` takes the highest-resolution level that has self-attention (1 for SD 1.x/2.x,
            2 for SDXL). A ``{level: phases}`` schedule names its levels instead.
        blocks: (DiTs) the blocks a sequence of phases patches, by index in the order they run (Flux: the
            double-stream blocks, then the single-stream ones); ``"auto"`` leaves the first and last
            ``DIT_EDGE_BLOCKS`` (2) alone, the most sensitive ones; ``"all"`` patches every block.
        use_rand: pick each window's dst token at random (off for odd batch sizes).
        k_scale2: exponent of the softmax scale in the agent broadcast.
        k_shortcut: weight of the ``V`` shortcut added to the agent output.
        attn_precision: ``"fp32"`` computes both softmax products in float32 (SD 2.x in half precision).
        seed: seeds the random dst choice (drawn afresh each call); ``None`` picks a seed at random.

    Returns:
        ``model``, patched in place. Applying again replaces the previous patch.
    """
    denoisers, num_train_timesteps = _find_unets(model)
    dit = _is_dit(denoisers[0])
    family = _flow_family(denoisers[0])
    if schedule is None:
        schedule = default_schedule(model)
    calibration.load()  # thresholds `agentsd calibrate` measured on this machine, if any
    options = dict(
        schedule=schedule,
        max_downsample=max_downsample,
        blocks=blocks,
        use_rand=use_rand,
        k_scale2=k_scale2,
        k_shortcut=k_shortcut,
        attn_precision=attn_precision,
        seed=seed,
    )
    settings = dict(
        use_rand=bool(use_rand), k_scale2=float(k_scale2), k_shortcut=float(k_shortcut), attn_precision=attn_precision
    )
    if family:
        if max_downsample != "auto":
            raise ValueError(f"max_downsample is for UNets: a {family} transformer has one level; choose blocks=")
        plans = [_dit_bands(module, schedule, blocks) for module in denoisers]
        for bands, _ in plans:
            for band in bands:
                for phase in band.phases:
                    check_dit_phase(phase)
        remove(model)
        scheduler = _scheduler_ref(model)
        for module, (bands, band_of_block) in zip(denoisers, plans):
            state = DiTState(
                tuple(band.phases for band in bands),
                seed=secrets.randbits(32) if seed is None else int(seed),
                use_rand=bool(use_rand),
                k_scale2=float(k_scale2),
                k_shortcut=float(k_shortcut),
                attn_precision=attn_precision,
            )
            patch = _Patch(state, num_train_timesteps, options, dit=True, family=family, scheduler=scheduler)
            _patch_flow(module, patch, band_of_block)
        return model
    if dit:
        if max_downsample != "auto":
            raise ValueError("max_downsample is for UNets: an SD 3 transformer has one level; choose blocks= instead")
        plans = [_dit_bands(module, schedule, blocks) for module in denoisers]
        if any(phase.near or phase.shift for bands, _ in plans for band in bands for phase in band.phases):
            raise ValueError("near=True and shift=True are not yet on SD 3: Flux, Wan and Qwen-Image take them")
        configs = [AgentConfig(bands=bands, levels=(1,), **settings) for bands, _ in plans]
    else:
        if blocks != "auto":
            raise ValueError("blocks= is for SD 3 transformers; a UNet's schedule picks levels (max_downsample)")
        phases = resolve_schedule(schedule)
        for phase in (p for group in (phases.values() if isinstance(phases, dict) else [phases]) for p in group):
            for name in ("near", "shift"):
                if getattr(phase, name):
                    raise ValueError(f"{phase}: {name}=True is for Flux, Wan and Qwen-Image (not built for UNets)")
        if isinstance(phases, dict) and max_downsample != "auto":
            raise ValueError(
                "max_downsample applies to a sequence of phases; a {level: phases} schedule (such as the default, "
                f"{DEFAULT!r}) names its levels: pass schedule='paper' or your own phases to choose max_downsample"
            )
        configs = [
            AgentConfig(bands=_bands(unet, phases, max_downsample), levels=tuple(attention_levels(unet)), **settings)
            for unet in denoisers
        ]
    remove(model)
    states = []
    for k, (module, config) in enumerate(zip(denoisers, configs)):
        states.append(AgentState(config, secrets.randbits(32) if seed is None else int(seed)))
        if dit:
            patch = _Patch(states[-1], num_train_timesteps, options, dit=True, scheduler=_scheduler_ref(model))
            _patch_dit(module, patch, plans[k][1])
        else:
            _patch(module, _Patch(states[-1], num_train_timesteps, options))
    _watch_scheduler(getattr(model, "scheduler", None), states, num_train_timesteps)
    return model


def default_schedule(model) -> str:
    """The preset :func:`apply` runs on ``model`` when no schedule is given."""
    denoisers, _ = _find_unets(model)
    family = _flow_family(denoisers[0])
    return FAMILY_DEFAULTS[family] if family else DIT_DEFAULT if _is_dit(denoisers[0]) else DEFAULT


def remove(model) -> None:
    """Undo :func:`apply`: restore the original processors and drop the hooks. No-op when unpatched."""
    unets, _ = _find_unets(model)
    for unet in unets:
        patch = _inner(unet).__dict__.pop(_ATTR, None)
        if patch is None:
            continue
        for handle in patch.handles:
            handle.remove()
        _unwrap(patch)
        _inner(unet).__dict__.pop("set_default_attn_processor", None)
    scheduler = getattr(model, "scheduler", None)
    if getattr(getattr(scheduler, "scale_model_input", None), "_agentsd", False):
        del scheduler.scale_model_input


def _watch_scheduler(scheduler, states: list[AgentState], num_train_timesteps: int) -> None:
    """Pick the phases where the pipeline scales the UNet's input for a timestep, just before calling it.

    This runs outside the UNet, so a compiled UNet never sees the timestep's value read (a
    graph break); the UNet's own pre-hook then skips its reading once.
    """
    original = getattr(scheduler, "scale_model_input", None)
    if original is None:
        return

    def scale_model_input(sample, timestep=None, *args, **kwargs):
        out = original(sample, timestep, *args, **kwargs)
        if timestep is not None:
            t = timestep.reshape(-1)[0] if isinstance(timestep, torch.Tensor) else timestep
            p = progress(t, num_train_timesteps)
            for state in states:
                state.begin_call(sample.shape[-2], sample.shape[-1], p, sample.device)
                state.decided = True
        return out

    scale_model_input._agentsd = True
    scheduler.scale_model_input = scale_model_input


@contextlib.contextmanager
def patched(model, schedule: Schedule | None = None, **kwargs) -> Iterator:
    """Context manager around :func:`apply`; on exit restores the model's previous patch (or none)."""
    unets, _ = _find_unets(model)
    previous = _inner(unets[0]).__dict__.get(_ATTR)
    apply(model, schedule, **kwargs)
    try:
        yield model
    finally:
        remove(model)
        if previous is not None:
            apply(model, **previous.options)


def state_of(unet) -> AgentState | None:
    """The live state of a patched UNet (its current phase and latent size), or ``None``."""
    patch = _inner(unet).__dict__.get(_ATTR)
    return None if patch is None else patch.state


_SUPPORTED = (
    "agentsd supports UNet pipelines (Stable Diffusion 1.x, 2.x, SDXL and their img2img, inpaint and ControlNet "
    "pipelines), Stable Diffusion 3 / 3.5 pipelines (SD3Transformer2DModel, and SD3ControlNetModel with joint "
    "blocks), Flux.1 pipelines (FluxTransformer2DModel, FluxControlNetModel), Wan 2.x video pipelines "
    "(WanTransformer3DModel), Qwen-Image pipelines (QwenImageTransformer2DModel, QwenImageControlNetModel), and "
    "those denoisers bare, UNet2DConditionModel and ControlNetModel too"
)


def _find_unets(model) -> tuple[list[torch.nn.Module], int]:
    """The denoiser modules to patch (UNets, or SD 3 transformers) and the scheduler's number of training
    timesteps."""
    if isinstance(model, torch.nn.Module):
        if _is_dit(model) or _flow_family(model):
            return [model], 1000
        if not hasattr(model, "down_blocks") or not _blocks(model):
            raise TypeError(f"expected a denoiser agentsd patches, got {type(model).__name__}: " + _SUPPORTED)
        return [model], 1000
    unet = getattr(model, "unet", None)
    transformer = getattr(model, "transformer", None)
    if not isinstance(unet, torch.nn.Module) and isinstance(transformer, torch.nn.Module):
        if not (_is_dit(transformer) or _flow_family(transformer)):
            raise TypeError(
                f"{type(model).__name__} denoises with a {type(transformer).__name__}, which agentsd does not patch: "
                + _SUPPORTED
            )
        unet = transformer
    elif not isinstance(unet, torch.nn.Module):
        raise TypeError(
            f"expected a diffusers pipeline with a `unet` or a `transformer`, got {type(model).__name__}; " + _SUPPORTED
        )
    denoisers = [unet]
    second = getattr(model, "transformer_2", None)  # Wan 2.2's low-noise expert
    if isinstance(second, torch.nn.Module) and _flow_family(second):
        denoisers.append(second)
    controlnet = getattr(model, "controlnet", None)
    if controlnet is not None:
        for net in getattr(controlnet, "nets", [controlnet]):
            if _blocks(net) or _is_dit(net) or _flow_family(net):
                denoisers.append(net)
            elif hasattr(net, "transformer_blocks"):
                warnings.warn(
                    f"agentsd leaves {type(net).__name__} unaccelerated: its blocks attend without the text "
                    "(SD3SingleTransformerBlock); only joint-attention blocks are patched",
                    stacklevel=3,
                )
    scheduler = getattr(model, "scheduler", None)
    num_train_timesteps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or 1000
    return denoisers, int(num_train_timesteps)


def _is_dit(module: torch.nn.Module) -> bool:
    """An SD 3 transformer (or ControlNet) whose blocks are joint-attention ``JointTransformerBlock``."""
    blocks = getattr(module, "transformer_blocks", None)
    return blocks is not None and any(isinstance(b, JointTransformerBlock) for b in blocks)


def _dit_bands(module: torch.nn.Module, schedule, blocks) -> tuple[tuple[Band, ...], dict[int, int]]:
    """The bands of a DiT's schedule and the band of each block it patches (blocks in the order they run)."""
    count = len(_dit_blocks(module))
    if isinstance(schedule, Mapping):
        if blocks != "auto":
            raise ValueError("a {blocks: phases} schedule names its blocks: leave blocks='auto'")
        groups = list(schedule.items())
    else:
        phases = resolve_schedule(schedule)
        if isinstance(phases, dict):
            raise ValueError(
                f"{schedule!r} is a per-level UNet preset; a {type(module).__name__} takes a DiT preset "
                f"({', '.join(DIT_PRESETS)}), a sequence of Phase or {{blocks: phases}}"
            )
        if blocks == "auto":
            blocks = range(DIT_EDGE_BLOCKS, count - DIT_EDGE_BLOCKS)
        elif blocks == "all":
            blocks = range(count)
        groups = [(blocks, phases)]
    bands, of_block = [], {}
    for key, phases in groups:
        indices = [key] if isinstance(key, int) else key
        if isinstance(indices, str) or not isinstance(indices, (range, Sequence)):
            raise TypeError(f"blocks are given as an int, a range or a sequence of ints, got {key!r}")
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int) or not -count <= index < count:
                raise ValueError(f"{type(module).__name__} has blocks 0..{count - 1}, got {index!r}")
            if index % count in of_block:
                raise ValueError(f"block {index} is named twice in the schedule")
            of_block[index % count] = len(bands)
        resolved = resolve_schedule(phases) if isinstance(phases, str) else _phases(phases)
        if isinstance(resolved, dict):
            raise ValueError(f"{phases!r} is a per-level UNet preset; a block range takes phases or a DiT preset")
        bands.append(Band(0, 1, resolved))
    if not of_block:
        warnings.warn(
            f"agentsd changes nothing: no block of {type(module).__name__}'s {count} is patched "
            f"(blocks='auto' leaves the first and last {DIT_EDGE_BLOCKS} alone; pass blocks=range({count}))",
            stacklevel=3,
        )
    return tuple(bands), of_block


def _flow_family(module: torch.nn.Module) -> str | None:
    """``"flux"`` for a Flux.1 transformer or ControlNet, ``"wan"`` for a Wan 2.x transformer, ``"qwen"`` for a
    Qwen-Image transformer or ControlNet, else ``None``."""
    blocks = [*getattr(module, "transformer_blocks", []), *getattr(module, "single_transformer_blocks", [])]
    if any(isinstance(b, (FluxTransformerBlock, FluxSingleTransformerBlock)) for b in blocks):
        return "flux"
    if any(isinstance(b, QwenImageTransformerBlock) for b in blocks):
        return "qwen"
    if any(isinstance(b, WanTransformerBlock) for b in getattr(module, "blocks", [])):
        return "wan"
    return None


def _dit_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """A DiT's blocks in the order they run (Flux: the double-stream blocks, then the single-stream ones)."""
    family = _flow_family(module)
    if family == "flux":
        return [*module.transformer_blocks, *getattr(module, "single_transformer_blocks", [])]
    if family == "wan":
        return list(module.blocks)
    return list(module.transformer_blocks)


def _blocks(module: torch.nn.Module) -> list[BasicTransformerBlock]:
    return [m for m in module.modules() if isinstance(m, BasicTransformerBlock)]


def _self_attention_blocks(module: torch.nn.Module) -> list[BasicTransformerBlock]:
    """Blocks whose attn1 attends to the image itself (the x4 upscaler's are cross-attention only)."""
    return [b for b in _blocks(module) if not getattr(b, "only_cross_attention", False)]


def attention_levels(unet: torch.nn.Module) -> list[int]:
    """Downsampling factors of the UNet's levels that have self-attention, highest resolution first."""
    down = list(getattr(unet, "down_blocks", []))
    factors = {2**level for level, block in enumerate(down) if _self_attention_blocks(block)}
    mid = getattr(unet, "mid_block", None)
    if mid is not None and _self_attention_blocks(mid):
        factors.add(2 ** max(len(down) - 1, 0))
    return sorted(factors)


def auto_max_downsample(unet: torch.nn.Module) -> int:
    """Downsampling factor of the highest-resolution level with self-attention (what ``"auto"`` picks)."""
    return (attention_levels(unet) or [1])[0]


def _bands(unet: torch.nn.Module, phases, max_downsample: int | str) -> tuple[Band, ...]:
    """Which blocks follow which phases. A block's factor is ``ceil(sqrt(N0 // N))``, which for odd latent
    sizes can fall between powers of two: a band reaches from the level above (exclusive) to its own."""
    if not isinstance(phases, dict):
        if max_downsample == "auto":
            max_downsample = auto_max_downsample(unet)
        if isinstance(max_downsample, bool) or not isinstance(max_downsample, int):
            raise TypeError(f"max_downsample must be an int or 'auto', got {max_downsample!r}")
        if max_downsample < 1:
            raise ValueError(f"max_downsample must be >= 1, got {max_downsample}")
        if not any(level <= max_downsample for level in attention_levels(unet)):
            warnings.warn(
                f"agentsd changes nothing: {type(unet).__name__} has no self-attention at downsampling <= "
                f"{max_downsample} (its levels with self-attention: {attention_levels(unet)}); "
                'use max_downsample="auto"',
                stacklevel=3,
            )
        return (Band(0, max_downsample, phases),)
    levels = attention_levels(unet)
    missing = [level for level in phases if level >= len(levels)]
    if missing:
        warnings.warn(
            f"schedule levels {missing} not patched: {type(unet).__name__} has {len(levels)} level(s) with "
            "self-attention",
            stacklevel=3,
        )
    return tuple(
        Band(levels[level - 1] if level else 0, levels[level], level_phases)
        for level, level_phases in phases.items()
        if level < len(levels)
    )


def _patch(unet: torch.nn.Module, patch: _Patch) -> None:
    state = patch.state

    def unet_pre_hook(module, args, kwargs):
        _wrap(patch)
        state.shared.clear()  # matchings shared within a call (Phase.share_matching) never outlive it
        state.groups.clear()
        if state.decided:  # the scheduler saw this call's timestep (outside any compiled graph)
            state.decided = False
            return
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.reshape(-1)[0]
        p = progress(timestep, patch.num_train_timesteps)
        state.begin_call(sample.shape[-2], sample.shape[-1], p, sample.device)

    phases = [phase for band in state.config.bands for phase in band.phases]
    patch.merge_crossattn = any(phase.merge_crossattn for phase in phases)
    patch.merge_mlp = any(phase.merge_mlp for phase in phases)
    patch.blocks = [(block, BlockMerge()) for block in _blocks(unet)]
    _wrap(patch)
    # On a torch.compile wrapper the hook runs eagerly, outside the compiled graph.
    patch.handles.append(unet.register_forward_pre_hook(unet_pre_hook, with_kwargs=True))
    for block, block_merge in patch.blocks:
        patch.handles.append(block.register_forward_pre_hook(_metric_hook, with_kwargs=True))
        if patch.merge_mlp:
            patch.handles.append(block.ff.register_forward_pre_hook(block_merge.ff_pre_hook, with_kwargs=True))
            patch.handles.append(block.ff.register_forward_hook(block_merge.ff_hook, with_kwargs=True))
    inner = _inner(unet)
    inner.__dict__["set_default_attn_processor"] = functools.partial(_set_default_attn_processor, inner, patch)
    inner.__dict__[_ATTR] = patch


def _patch_dit(module: torch.nn.Module, patch: _Patch, band_of_block: dict[int, int]) -> None:
    """Patch the chosen joint-attention blocks of an SD 3 transformer (or ControlNet)."""
    state = patch.state
    patch.patch_size = int(getattr(module.config, "patch_size", 1) if hasattr(module, "config") else 1)

    def transformer_pre_hook(module, args, kwargs):
        _wrap(patch)
        state.shared.clear()
        state.groups.clear()
        sample = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[3]
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.reshape(-1)[0]
        size = patch.patch_size
        height, width = sample.shape[-2] // size, sample.shape[-1] // size
        # flow matching: the noise level with the scheduler's shift undone (as on Flux and Wan)
        scheduler = patch.scheduler()
        config = getattr(scheduler, "config", None)
        shift = scheduler_shift(config, height * width)
        stretch = terminal_stretch(config, shift, getattr(scheduler, "num_inference_steps", None))
        p = flow_progress(float(timestep) / patch.num_train_timesteps, shift, stretch)
        state.begin_call(height, width, p, sample.device)

    blocks = module.transformer_blocks
    patch.blocks = [
        (blocks[index], band)
        for index, band in sorted(band_of_block.items())
        if isinstance(blocks[index], JointTransformerBlock)
    ]
    _wrap(patch)
    patch.handles.append(module.register_forward_pre_hook(transformer_pre_hook, with_kwargs=True))
    for block, _ in patch.blocks:
        patch.handles.append(block.register_forward_pre_hook(_joint_metric_hook, with_kwargs=True))
    inner = _inner(module)
    if hasattr(inner, "set_default_attn_processor"):
        inner.__dict__["set_default_attn_processor"] = functools.partial(_set_default_attn_processor, inner, patch)
    inner.__dict__[_ATTR] = patch


_FLOW_PROCESSORS = {"flux": FluxAgentProcessor, "wan": WanAgentProcessor, "qwen": QwenAgentProcessor}


def _scheduler_ref(model):
    """``() -> scheduler`` of the pipeline given (read at every call: a scheduler swapped in later counts)."""
    if isinstance(model, torch.nn.Module):
        return lambda: None
    ref = weakref.ref(model)
    return lambda: getattr(ref(), "scheduler", None)


@functools.lru_cache(maxsize=None)
def _parameters(cls) -> tuple[str, ...]:
    return tuple(inspect.signature(cls.forward).parameters)[1:]


def _argument(module, args, kwargs, name: str):
    """The value of ``module.forward``'s argument ``name`` in a call, positional or keyword (``None`` if absent)."""
    if name in kwargs:
        return kwargs[name]
    names = _parameters(type(module))
    index = names.index(name) if name in names else len(args)
    return args[index] if index < len(args) else None


class _GridsOfIds:
    """The patch grids of Flux's image position ids ``(N, 3)``: one ``(1, rows, columns)`` grid per run of equal
    first ids (Kontext appends its reference image as a second grid), or ``None`` where the ids do not lay the
    tokens out row-major on whole grids. Read once per ids tensor: the pipelines pass the same one every step."""

    def __init__(self):
        self._ids, self._version, self._grids = None, None, None

    def __call__(self, ids: torch.Tensor):
        ids = ids[0] if ids.ndim == 3 else ids
        if ids is self._ids and ids._version == self._version:
            return self._grids
        self._ids, self._version, self._grids = ids, ids._version, _grids_of(ids.detach().to("cpu", torch.long))
        return self._grids


def _grids_of(ids: torch.Tensor):
    grids, start = [], 0
    first = ids[:, 0]
    while start < len(ids):
        other = (first[start:] != first[start]).nonzero()
        end = start + int(other[0]) if len(other) else len(ids)
        rows, cols = ids[start:end, 1], ids[start:end, 2]
        h, w = int(rows.max() - rows[0]) + 1, int(cols.max() - cols[0]) + 1
        expected_rows = rows[0] + torch.arange(h).repeat_interleave(w)
        expected_cols = cols[0] + torch.arange(w).repeat(h)
        if end - start != h * w or not (torch.equal(rows, expected_rows) and torch.equal(cols, expected_cols)):
            return None
        grids.append((1, h, w))
        start = end
    return tuple(grids)


def _grids_of_shapes(img_shapes, tokens: int):
    """The patch grids of Qwen-Image's ``img_shapes`` (per sample, the ``(frames, rows, columns)`` of each image in
    sequence order: the latent, then any reference images), or ``None`` where the samples differ or the shapes do
    not account for the ``tokens`` image tokens."""
    if not img_shapes:
        return None
    samples = [img_shapes] if isinstance(img_shapes[0], tuple) else img_shapes
    grids = tuple(tuple(int(n) for n in shape) for shape in samples[0])
    if any(tuple(tuple(int(n) for n in shape) for shape in sample) != grids for sample in samples[1:]):
        return None
    if any(len(g) != 3 for g in grids) or sum(f * h * w for f, h, w in grids) != tokens:
        return None
    return grids


def _patch_flow(module: torch.nn.Module, patch: _Patch, band_of_block: dict[int, int]) -> None:
    """Patch the chosen blocks of a Flux, Wan or Qwen-Image transformer: an adapter in each one's self-attention, a
    pre-hook on the transformer that reads the patch grid and the noise level once per call, a pre-hook on each block
    that hands its input to the adapter as the matching metric."""
    state, family = patch.state, patch.family
    grids_of_ids = _GridsOfIds()
    inner = _inner(module)

    def transformer_pre_hook(mod, args, kwargs):
        _wrap(patch)
        hidden_states = _argument(inner, args, kwargs, "hidden_states")
        timestep = _argument(inner, args, kwargs, "timestep")
        if family == "flux":
            grids = grids_of_ids(_argument(inner, args, kwargs, "img_ids"))
            sigma = float(timestep.reshape(-1).max()) if timestep is not None else 1.0  # Flux is called with t / 1000
        elif family == "qwen":
            grids = _grids_of_shapes(_argument(inner, args, kwargs, "img_shapes"), hidden_states.shape[1])
            sigma = float(timestep.reshape(-1).max()) if timestep is not None else 1.0  # called with t / 1000 too
        else:
            p_t, p_h, p_w = inner.config.patch_size
            _, _, f, h, w = hidden_states.shape
            grids = ((f // p_t, h // p_h, w // p_w),)
            sigma = float(timestep.reshape(-1).max()) / patch.num_train_timesteps  # Wan with t in [0, T]
        state.shard = None
        parallel = _context_parallel(patch)
        if parallel is not None and grids is not None:
            tokens = sum(f * h * w for f, h, w in grids)
            why = unsupported(parallel, tokens)
            if why is None:
                state.shard = shard_of(parallel, tokens)
                _share_seed(patch, state.shard, hidden_states.device)
            else:
                _warn_parallel(patch, why)
                grids = None  # every adapter falls back to the processor it wraps: diffusers' parallel attention
        latent_tokens = 0 if grids is None else grids[0][0] * grids[0][1] * grids[0][2]
        scheduler = patch.scheduler()
        config = getattr(scheduler, "config", None)
        shift = scheduler_shift(config, latent_tokens)
        stretch = terminal_stretch(config, shift, getattr(scheduler, "num_inference_steps", None))
        state.begin_call(grids, flow_progress(sigma, shift, stretch), hidden_states.shape[0], hidden_states.device)

    def transformer_hook(mod, args, kwargs, output):
        state.end_call()

    blocks = _dit_blocks(module)
    patch.blocks = [(blocks[index], band) for index, band in sorted(band_of_block.items())]
    _wrap(patch)
    patch.handles.append(module.register_forward_pre_hook(transformer_pre_hook, with_kwargs=True))
    patch.handles.append(module.register_forward_hook(transformer_hook, with_kwargs=True))
    for block, _ in patch.blocks:
        patch.handles.append(block.register_forward_pre_hook(_flow_metric_hook, with_kwargs=True))
    inner.__dict__[_ATTR] = patch


def _context_parallel(patch: _Patch):
    """The ``ParallelConfig`` of diffusers' context parallelism where it is on (``enable_parallelism``, before or
    after ``apply``), else ``None``."""
    for block, _ in patch.blocks:
        config = getattr(_flow_attention(block).processor, "_parallel_config", None)
        if config is not None and getattr(config, "context_parallel_config", None) is not None:
            return config
    return None


def _warn_parallel(patch: _Patch, why: str) -> None:
    if not patch.warned_parallel:
        patch.warned_parallel = True
        warnings.warn(
            f"agentsd does not act under this context parallelism ({why}): the transformer runs diffusers' own "
            "context-parallel attention (vanilla), as after agentsd.remove()",
            stacklevel=3,
        )


def _share_seed(patch: _Patch, shard, device) -> None:
    """Every rank must draw the same dst tokens: where ``apply`` drew its seed in each process, take rank 0's. The
    seed travels on the call's ``device`` (NCCL moves CUDA tensors only; gloo CPU ones)."""
    if patch.options["seed"] is not None or patch.seed_shared:
        return
    seed = torch.tensor([patch.state.seed], dtype=torch.long, device=device)
    torch.distributed.broadcast(seed, group=shard.group, group_src=0)
    patch.state.seed, patch.seed_shared = int(seed), True


def _flow_attention(block):
    """The self-attention of a Flux or Qwen-Image block (``attn``) or a Wan block (``attn1``)."""
    return block.attn1 if isinstance(block, WanTransformerBlock) else block.attn


def _flow_metric_hook(block, args, kwargs):
    """The block's image (or video) input is the matching metric of its attention."""
    processor = _flow_attention(block).processor
    if isinstance(processor, (FluxAgentProcessor, WanAgentProcessor, QwenAgentProcessor)):
        processor.begin_block(args[0] if args else kwargs["hidden_states"])


def _joint_attentions(block) -> list:
    return [attn for attn in (block.attn, getattr(block, "attn2", None)) if attn is not None]


def _wrap(patch: _Patch) -> None:
    """Give every patched attention an agentsd processor around whatever processor it has now."""
    if patch.family:
        kind = _FLOW_PROCESSORS[patch.family]
        for position, (block, band) in enumerate(patch.blocks):
            attn = _flow_attention(block)
            processor = attn.processor
            if not (isinstance(processor, kind) and processor.state is patch.state):
                fallback = processor.original if isinstance(processor, kind) else processor
                attn.set_processor(kind(fallback, patch.state, band, shifted=position % 2 == 1))
        return
    if patch.dit:
        for block, band in patch.blocks:
            for attn in _joint_attentions(block):
                processor = attn.processor
                if not (isinstance(processor, JointAgentProcessor) and processor.state is patch.state):
                    fallback = processor.original if isinstance(processor, JointAgentProcessor) else processor
                    attn.set_processor(JointAgentProcessor(fallback, patch.state, band=band))
        return
    for block, block_merge in patch.blocks:
        processor = block.attn1.processor
        if not (isinstance(processor, AgentAttnProcessor) and processor.state is patch.state):
            fallback = processor.original if isinstance(processor, AgentAttnProcessor) else processor
            block.attn1.set_processor(AgentAttnProcessor(fallback, patch.state, block_merge))
        attn2 = block.attn2
        if patch.merge_crossattn and attn2 is not None:
            processor = attn2.processor
            if not (isinstance(processor, MergedAttnProcessor) and processor.block_merge is block_merge):
                fallback = processor.original if isinstance(processor, MergedAttnProcessor) else processor
                attn2.set_processor(MergedAttnProcessor(fallback, block_merge))


def _unwrap(patch: _Patch) -> None:
    """Put back the processors agentsd wraps."""
    if patch.family:
        kind = _FLOW_PROCESSORS[patch.family]
        for block, _ in patch.blocks:
            attn = _flow_attention(block)
            if isinstance(attn.processor, kind):
                attn.set_processor(attn.processor.original)
        return
    if patch.dit:
        for block, _ in patch.blocks:
            for attn in _joint_attentions(block):
                if isinstance(attn.processor, JointAgentProcessor):
                    attn.set_processor(attn.processor.original)
        return
    for block, _ in patch.blocks:
        for attn, kind in ((block.attn1, AgentAttnProcessor), (block.attn2, MergedAttnProcessor)):
            if attn is not None and isinstance(attn.processor, kind):
                attn.set_processor(attn.processor.original)


def _set_default_attn_processor(unet: torch.nn.Module, patch: _Patch) -> None:
    """diffusers refuses processor classes it does not know: let it judge the ones agentsd wraps."""
    _unwrap(patch)
    try:
        type(unet).set_default_attn_processor(unet)
    finally:
        _wrap(patch)


def _inner(unet: torch.nn.Module) -> torch.nn.Module:
    """The module under a ``torch.compile`` wrapper (or the module itself)."""
    return getattr(unet, "_orig_mod", unet)


def _metric_hook(block, args, kwargs):
    processor = block.attn1.processor
    if isinstance(processor, AgentAttnProcessor):
        processor.begin_block(args[0] if args else kwargs["hidden_states"])


def _joint_metric_hook(block, args, kwargs):
    """The block's image input is the matching metric of its attention (and of SD 3.5's attn2)."""
    hidden_states = args[0] if args else kwargs["hidden_states"]
    for attn in _joint_attentions(block):
        if isinstance(attn.processor, JointAgentProcessor):
            attn.processor.begin_block(hidden_states)
