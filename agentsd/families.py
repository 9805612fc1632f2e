"""The DiT families agentsd patches through :mod:`agentsd.dit`: each adapter holds only what differs.

An adapter is an attention processor that does what the family's own processor does up to its attention
call (its projections, ``norm_q``/``norm_k``, its rotary embedding), hands the queries, keys and values to
:func:`agentsd.dit.agent_attention` with the layout of the call, then applies the family's output
projections. Wherever the phase leaves the block alone (or a call carries inputs the adapter does not
handle: a mask, IP-Adapter states) it calls the processor it replaced.

- Flux.1 (``FluxTransformer2DModel`` and its ControlNet): double-stream blocks attend over ``[T; X]`` built
  from two streams, single-stream blocks get ``[T; X]`` already joined; RoPE over both.
- Wan 2.x (``WanTransformer3DModel``): self-attention (``attn1``) over the video tokens of an f×h×w patch
  grid; the cross-attention to the text is left alone.
- Qwen-Image (``QwenImageTransformer2DModel``): double-stream blocks over ``[T; X]`` with RoPE on both and a
  mask of the prompts' padding, read by every softmax over the keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers import transformer_flux, transformer_qwenimage, transformer_wan

from .dit import Layout, Pooled, Window, agent_attention, dst_positions, num_windows, random_offsets, tome_groups
from .parallel import Shard, ShardedGroups, ShardedPooled, local_partition, sharded_agent_attention
from .schedule import Phase, min_tokens_on, phase_at

__all__ = ["DiTState", "FluxAgentProcessor", "QwenAgentProcessor", "WanAgentProcessor", "check_dit_phase"]


def window(phase: Phase) -> Window:
    return Window(phase.st, phase.sy, phase.sx)


def check_dit_phase(phase: Phase) -> None:
    """A DiT runs the lean path (``tokens="all"``), its groups taking every src token of a window."""
    if not phase.merges:
        return
    if phase.tokens != "all":
        raise ValueError(
            f"{phase}: on Flux and Wan every token keeps its query (tokens='all'); merging tokens before the "
            "projections (tokens='merged') is for UNets and SD 3"
        )
    full = 1 - 1 / (phase.st * phase.sy * phase.sx)
    fraction = phase.agent_ratio if phase.agent_ratio is not None else (phase.ratio or None)
    if fraction is not None and fraction < full - 1e-9:
        raise ValueError(
            f"{phase}: on Flux and Wan a ToMe group takes every src token of its window (one group per "
            f"{phase.st}x{phase.sy}x{phase.sx} window): agent_ratio or ratio must be >= {full:.4f}"
        )


class DiTState:
    """Per-model state of a patched DiT: written once per transformer call (eagerly, outside any compiled graph),
    read by every adapter."""

    def __init__(
        self,
        bands: tuple[tuple[Phase, ...], ...],
        *,
        seed: int,
        use_rand: bool = True,
        k_scale2: float = 0.3,
        k_shortcut: float = 0.075,
        attn_precision: str | None = None,
    ):
        if attn_precision not in (None, "fp32"):
            raise ValueError(f"attn_precision must be None or 'fp32', got {attn_precision!r}")
        self.bands, self.seed, self.use_rand = bands, seed, use_rand
        self.k_scale2, self.k_shortcut, self.upcast = k_scale2, k_shortcut, attn_precision == "fp32"
        self.grids: tuple[tuple[int, int, int], ...] | None = None
        self.image_tokens = 0  # the grids' tokens, counted once per new layout
        self.shard: Shard | None = None  # this rank's part of a context-parallel call (set per call), or None
        self.warned_near = False  # said once that a context-parallel call runs without the near field
        self.phases: tuple[Phase, ...] | None = None
        self.far_phases: tuple[Phase, ...] | None = None  # the same without the near field (where shards cut it)
        self.own_phases: tuple[Phase, ...] | None = None  # the same with the near field over the own window only
        self.warned_reach = False  # said once that a context-parallel call narrows a near field to the own window
        self.progress: float | None = None
        # this call's dst positions of each merged window, and its ToMe groups (made by the first block that needs
        # them), by (window, shifted)
        self.dst: dict[tuple[Window, bool], torch.Tensor] = {}
        self.groups: dict[tuple[Window, bool], object] = {}
        self.calls = 0

    @property
    def local_tokens(self) -> int:
        """The grids' tokens an attention call sees: all of them, or this rank's share under context parallelism."""
        return self.image_tokens if self.shard is None else self.shard.count

    @property
    def phase(self) -> Phase | None:
        return None if self.phases is None else self.phases[0]

    def begin_call(self, grids, p: float, batch: int, device=None) -> None:
        """Record the patch grids and pick every band's phase at sampling progress ``p``; draw the dst tokens of
        the merged phases (at random for even batches, when ``use_rand``)."""
        if self.grids != grids:
            self.grids = grids
            self.image_tokens = 0 if grids is None else sum(f * h * w for f, h, w in grids)
        phases = tuple(phase_at(band, p) for band in self.bands)
        if self.phases != phases:
            self.phases = phases
            self.far_phases = tuple(
                dataclasses.replace(ph, near=False, near_reach=0) if ph.near_join else ph for ph in phases
            )
            self.own_phases = tuple(dataclasses.replace(ph, near_reach=0) for ph in phases)
        self.progress = p
        self.groups = {}
        self.dst = {}
        for phase in phases:
            if phase.merges and phase.agents == "merged" and grids is not None:
                win = window(phase)
                if (win, False) not in self.dst:
                    offsets = None
                    if self.use_rand and batch % 2 == 0:
                        offsets = random_offsets(grids, win, self.seed, self.calls, device=device)
                    self.dst[(win, False)] = dst_positions(grids, win, offsets, device=device)
                    if phase.shift:  # the shifted blocks' windows, the same draw in each
                        self.dst[(win, True)] = dst_positions(grids, win, offsets, device=device, shift=True)
        self.calls += 1

    def end_call(self) -> None:
        self.groups = {}


class _PassThrough:
    """An attribute of an adapter that is its wrapped processor's (``original``'s), read and written through."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, processor, owner=None):
        return self if processor is None else getattr(processor.original, self.name, None)

    def __set__(self, processor, value) -> None:
        setattr(processor.original, self.name, value)


class _AgentProcessor:
    """What every adapter shares: the phase check, the agents or merged keys, the fallback."""

    def __init__(self, original, state: DiTState, band: int, shifted: bool = False):
        self.original, self.state, self.band = original, state, band
        self.shifted = shifted  # a block whose windows shift where the phase says so (every other patched block)
        self.block_input: torch.Tensor | None = None

    def begin_block(self, block_input: torch.Tensor) -> None:
        shard = self.state.shard
        if shard is not None and block_input.shape[1] == self.state.image_tokens != shard.count:
            # a block whose input diffusers splits after this hook sees it (Wan's first): the rank's chunk
            block_input = block_input.narrow(1, shard.start, shard.count)
        self.block_input = block_input

    # diffusers sets these on every attention processor (enable_parallelism, set_attention_backend): they belong to
    # the processor agentsd wraps, which runs wherever agentsd does not act, so they pass through to it
    _parallel_config = _PassThrough()
    _attention_backend = _PassThrough()

    def _phase(self, image_tokens: torch.Tensor) -> Phase | None:
        """This call's phase when it changes this block, else ``None``; ``image_tokens``: any tensor of the call."""
        state = self.state
        if state.phases is None or state.grids is None:
            return None
        phase = state.phases[self.band]
        if not phase.merges:
            return None
        n = state.image_tokens
        compiling = torch.compiler.is_compiling()
        if n < min_tokens_on(phase, image_tokens.device.type, image_tokens.dtype, compiling):
            return None
        groups = num_windows(state.grids, window(phase))
        if (2 * groups if phase.makes_agents else groups) >= n:
            # agents as many as half the tokens (agents' two softmaxes cost what plain attention does), or merged
            # keys as many as the tokens: plain attention is what runs
            return None
        if state.shard is not None and phase.near_reach:
            # the neighbouring windows' keys lie on another rank at every shard's edge: the own window's near field
            if not state.warned_reach:
                state.warned_reach = True
                warnings.warn(
                    f"{phase}: a near field that reaches past the query's own window does not shard (its "
                    "neighbours' keys would cross the ranks); these calls read the own window exactly "
                    "(near_reach=0), the image no longer the one-process image",
                    stacklevel=2,
                )
            phase = state.own_phases[self.band]
        if state.shard is not None and phase.near_join and self._near_here(phase, image_tokens.device) is None:
            if not state.warned_near:
                state.warned_near = True
                warnings.warn(
                    f"{phase}: its near-field windows cross the ranks' shards (say, with shift=True, or shards that "
                    "do not end on a window's border); these calls run it without the near field (sharded agent "
                    "attention as fast, the image no longer the one-process image)",
                    stacklevel=2,
                )
            return state.far_phases[self.band]
        return phase

    def _near_here(self, phase: Phase, device):
        """The near field's windows on this rank (:func:`agentsd.parallel.local_partition`), or ``None``."""
        shift = phase.shift and self.shifted
        return local_partition(self.state.grids, window(phase), self.state.shard, device, shift, phase.near_reach)

    def _on_grid(self, hidden_states: torch.Tensor, metric: torch.Tensor | None) -> bool:
        """The call's tokens and the block's input (the matching metric) are the grids' image tokens, no more."""
        image = self.state.local_tokens
        return hidden_states.shape[1] == image and metric is not None and metric.shape[1] == image

    def _attend(self, query, key, value, layout: Layout, phase: Phase, metric, text_mask=None) -> torch.Tensor:
        state, shard = self.state, self.state.shard
        win, shift = window(phase), phase.shift and self.shifted
        if phase.agents == "pooled":
            groups = (
                Pooled(state.grids, win, query.device, shift)
                if shard is None
                else ShardedPooled(state.grids, win, shard, query.device, shift)
            )
        else:
            groups = state.groups.get((win, shift))
            if groups is None:
                dst = state.dst[(win, shift)]
                groups = tome_groups(metric, dst) if shard is None else ShardedGroups(metric, dst, shard)
                state.groups[(win, shift)] = groups
        agents = phase.makes_agents
        settings = dict(
            agents=groups if agents else None,
            keys_of=None if agents else groups,
            k_scale2=state.k_scale2,
            k_shortcut=state.k_shortcut,
            upcast=state.upcast,
            text_mask=text_mask,
            proportional=phase.proportional,
            near_join=phase.near_join or "correct",
        )
        if shard is None:
            near = win if phase.near_join else None
            return agent_attention(
                query, key, value, layout, **settings, near=near, shift=shift, near_reach=phase.near_reach
            )
        near = self._near_here(phase, query.device) if phase.near_join else None  # this rank's windows
        return sharded_agent_attention(query, key, value, layout, shard, **settings, near=near)


class FluxAgentProcessor(_AgentProcessor):
    """Replaces the attention processor of a Flux double- or single-stream block."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        ip_hidden_states=None,
    ):
        metric, self.block_input = self.block_input, None
        phase = None if attention_mask is not None or ip_hidden_states is not None else self._phase(hidden_states)
        image = self.state.local_tokens
        joint = encoder_hidden_states is not None
        if phase is not None:
            text = encoder_hidden_states.shape[1] if joint else hidden_states.shape[1] - image
            if (joint and hidden_states.shape[1] != image) or text < 0 or metric is None or metric.shape[1] != image:
                phase = None
        if phase is None:
            extra = {} if ip_hidden_states is None else {"ip_hidden_states": ip_hidden_states}
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **extra)
        query, key, value, text_query, text_key, text_value = transformer_flux._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if joint:
            text_query, text_key, text_value = (
                t.unflatten(-1, (-1, attn.head_dim)) for t in (text_query, text_key, text_value)
            )
            text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        layout = Layout(text, True, self.state.grids)
        out = self._attend(query, key, value, layout, phase, metric).flatten(2, 3).to(query.dtype)
        if not joint:
            return out
        image_out, text_out = layout.split(out)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


def _wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: each pair of channels ``(x₀, x₁)`` rotated by the angle of its pair."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).type_as(x)


class WanAgentProcessor(_AgentProcessor):
    """Replaces the self-attention (``attn1``) processor of a Wan block."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb=None,
    ):
        metric, self.block_input = self.block_input, None
        phase = None
        if encoder_hidden_states is None and attention_mask is None and attn.add_k_proj is None:
            phase = self._phase(hidden_states)
        if phase is not None and not self._on_grid(hidden_states, metric):
            phase = None
        if phase is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = transformer_wan._get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rotary(query, *rotary_emb), _wan_rotary(key, *rotary_emb)
        out = self._attend(query, key, value, Layout(0, True, self.state.grids), phase, metric)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class QwenAgentProcessor(_AgentProcessor):
    """Replaces the attention processor of a Qwen-Image block (joint attention, text first)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
    ):
        metric, self.block_input = self.block_input, None
        phase = None
        if encoder_hidden_states is not None and attention_mask is None:
            phase = self._phase(hidden_states)
        if phase is not None and not self._on_grid(hidden_states, metric):
            phase = None
        if phase is None:
            return self.original(
                attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask, image_rotary_emb
            )
        head_dim = attn.inner_dim // attn.heads
        image_qkv = (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
        text_qkv = (
            attn.add_q_proj(encoder_hidden_states),
            attn.add_k_proj(encoder_hidden_states),
            attn.add_v_proj(encoder_hidden_states),
        )
        query, key, value = (t.unflatten(-1, (-1, head_dim)) for t in image_qkv)
        text_query, text_key, text_value = (t.unflatten(-1, (-1, head_dim)) for t in text_qkv)
        query = query if attn.norm_q is None else attn.norm_q(query)
        key = key if attn.norm_k is None else attn.norm_k(key)
        text_query = text_query if attn.norm_added_q is None else attn.norm_added_q(text_query)
        text_key = text_key if attn.norm_added_k is None else attn.norm_added_k(text_key)
        if image_rotary_emb is not None:
            rotate = functools.partial(transformer_qwenimage.apply_rotary_emb_qwen, use_real=False)
            image_freqs, text_freqs = image_rotary_emb
            query, key = rotate(query, image_freqs), rotate(key, image_freqs)
            text_query, text_key = rotate(text_query, text_freqs), rotate(text_key, text_freqs)
        text = encoder_hidden_states.shape[1]
        layout = Layout(text, True, self.state.grids)
        out = self._attend(
            torch.cat([text_query, query], dim=1),
            torch.cat([text_key, key], dim=1),
            torch.cat([text_value, value], dim=1),
            layout,
            phase,
            metric,
            text_mask=encoder_hidden_states_mask,
        )
        image_out, text_out = layout.split(out.flatten(2, 3).to(query.dtype))
        image_out = attn.to_out[0](image_out.contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(text_out.contiguous())


def flow_progress(sigma: float, shift: float, stretch: float = 1.0) -> float:
    """Sampling progress of a flow-matching model called at noise level ``sigma`` under a time shift ``shift``:
    ``1 - σ₀`` with ``σ₀`` the unshifted level (``σ = shift·σ₀ / (1 + (shift - 1)·σ₀)``), after undoing a
    scheduler's stretch to its terminal level (``1 - σ`` divided by ``stretch``, :func:`terminal_stretch`). The
    pipelines space the unshifted levels evenly over the steps, so this is the fraction of the steps done: "the first
    40%" means the first 40% of the steps on every family, whatever the image size shifts. Rounded to 1e-4, so that a
    step that lies on a phase's end in exact arithmetic (step 20 of 50 at 0.4) is not pushed before it by float
    rounding."""
    sigma = min(max(float(sigma), 0.0), 1.0)
    if stretch != 1.0:
        sigma = 1.0 - stretch * (1.0 - sigma)
    return round(1.0 - sigma / (shift - (shift - 1.0) * sigma), 4)


def terminal_stretch(config, shift: float, steps: int | None) -> float:
    """The factor by which a flow-matching scheduler with ``shift_terminal`` (Qwen-Image's) shrinks ``1 - σ`` so that
    its last level lands on ``shift_terminal``: ``(1 - σ_last) / (1 - shift_terminal)``, ``σ_last`` the shifted level
    of the last of ``steps`` evenly spaced unshifted levels from 1 to ``1/steps`` (what the pipelines pass). 1.0
    where the scheduler does not stretch."""
    get = (lambda name, default: default) if config is None else None
    if get is None:
        get = config.get if hasattr(config, "get") else lambda name, default: getattr(config, name, default)
    terminal = get("shift_terminal", None)
    if not terminal or not steps:
        return 1.0
    last = 1.0 / steps
    last = shift * last / (1.0 + (shift - 1.0) * last)
    return (1.0 - last) / (1.0 - terminal)


def scheduler_shift(config, image_tokens: int) -> float:
    """The time shift a flow-matching scheduler applies at ``image_tokens`` latent tokens (1.0 for none)."""
    if config is None:
        return 1.0
    get = config.get if hasattr(config, "get") else functools.partial(getattr, config)
    if get("use_dynamic_shifting", False):
        base_len, max_len = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
        base, top = get("base_shift", 0.5), get("max_shift", 1.15)
        mu = image_tokens * (top - base) / (max_len - base_len) + base - (top - base) / (max_len - base_len) * base_len
        return mu if get("time_shift_type", "exponential") == "linear" else math.exp(mu)
    for name in ("flow_shift", "shift"):
        value = get(name, None)
        if value is not None:
            return float(value)
    return 1.0
