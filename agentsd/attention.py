"""The self-attention processor: merge, agent attention through two SDPA calls, unmerge.

Knows diffusers' attention-processor signature only; the hooks that feed
:class:`AgentState` live in :mod:`agentsd.patch`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from .dit import Pooled, Window
from .merge import Groups, Merge, assign, dst_grid, match, merge_rows, random_windows, window_draws
from .schedule import Phase, min_tokens_on, phase_at

__all__ = ["AgentAttnProcessor", "AgentConfig", "AgentState", "Band", "BlockMerge", "MergedAttnProcessor"]


class Band(NamedTuple):
    """The blocks whose downsampling factor ``d`` lies in ``(low, high]`` follow ``phases``."""

    low: int
    high: int
    phases: tuple[Phase, ...]


@dataclass(frozen=True)
class AgentConfig:
    """Settings shared by every patched block of one model (see :func:`agentsd.apply`)."""

    bands: tuple[Band, ...]
    levels: tuple[int, ...] = ()  # downsampling factors of the model's levels with self-attention
    use_rand: bool = True
    k_scale2: float = 0.3
    k_shortcut: float = 0.075
    attn_precision: str | None = None

    def __post_init__(self):
        if self.attn_precision not in (None, "fp32"):
            raise ValueError(f"attn_precision must be None or 'fp32', got {self.attn_precision!r}")

    def band_of(self, downsample: int) -> int | None:
        """Index of the band a block with this downsampling factor belongs to, ``None`` if unpatched."""
        for k, band in enumerate(self.bands):
            if band.low < downsample <= band.high:
                return k
        return None


# dst draws made at once for a level matched once per call (tokens="all" or share_matching); call c takes draw
# c mod DRAW_BANK, drawn before the UNet runs
DRAW_BANK = 128


class AgentState:
    """Mutable per-model state: written by the UNet pre-hook once per call, read by every processor."""

    def __init__(self, config: AgentConfig, seed: int):
        self.config = config
        self.seed = seed
        self.draws = torch.zeros((), dtype=torch.long)  # counter of the random dst draws
        self.size: tuple[int, int] | None = None
        self.phases: tuple[Phase, ...] | None = None  # this call's phase of each band
        self.decided = False  # the next UNet call's phases are already picked (by the scheduler, eagerly)
        # this call's merges of each (h, w, band) whose phase has share_matching: (tokens, agents or None)
        self.shared: dict[tuple[int, int, int], tuple[Merge, Groups | None]] = {}
        self.calls = 0  # UNet calls begun: picks the draw of the levels matched once per call
        # dst positions of the levels matched once per call by (h, w, sx, sy), made once: (top-left, every draw)
        self._dst_banks: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # this call's dst positions by (h, w, sx, sy): (random draw or None, top-left), set before the UNet runs
        self.dst: dict[tuple[int, int, int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        # this call's groups of each tokens="all" level by (h, w, band)
        self.groups: dict[tuple[int, int, int], Groups | Merge] = {}

    def begin_call(self, height: int, width: int, p: float, device: torch.device | None = None) -> None:
        """Record the latent size and pick every band's phase at sampling progress ``p``.

        Unchanged values keep their objects: torch.compile guards on them, and a new but equal
        tuple would cost a recompilation. The dst positions of the levels matched once per call (``tokens="all"``
        or ``share_matching``) are drawn here, outside the UNet: a compiled UNet reads them as inputs.
        """
        if self.size != (height, width):
            self.size = (height, width)
        phases = tuple(phase_at(band.phases, p) for band in self.config.bands)
        if self.phases != phases:
            self.phases = phases
        self.dst = self._draw_dst(height, width, device)
        self.calls += 1

    def _draw_dst(self, height: int, width: int, device) -> dict:
        dst = {}
        for band, phase in zip(self.config.bands, self.phases):
            if phase.agents != "merged" or not (phase.tokens == "all" or phase.share_matching):
                continue
            for factor in self.config.levels:
                if not band.low < factor <= band.high:
                    continue
                h, w = math.ceil(height / factor), math.ceil(width / factor)
                if h < phase.sy or w < phase.sx:
                    continue
                key = (h, w, phase.sx, phase.sy)
                fixed, bank = self._dst_banks.get(key, (None, None))
                if fixed is None or fixed.device != torch.device(device or "cpu"):
                    fixed = dst_grid(h, w, phase.sx, phase.sy, device=device)
                    draws = window_draws(h, w, phase.sx, phase.sy, self.seed, torch.arange(DRAW_BANK, device=device))
                    bank = dst_grid(h, w, phase.sx, phase.sy, draws, device=device)
                    self._dst_banks[key] = fixed, bank
                dst[key] = (bank[self.calls % DRAW_BANK] if self.config.use_rand else None, fixed)
        return dst

    @property
    def phase(self) -> Phase | None:
        """This call's phase of the highest-resolution patched band."""
        return None if self.phases is None else self.phases[0]

    def draws_on(self, device: torch.device) -> torch.Tensor:
        """The draw counter, moved once to where the model runs: a host-to-GPU copy per block would sync the GPU."""
        if self.draws.device != device:
            self.draws = self.draws.to(device)
        return self.draws


class AgentAttnProcessor:
    """Replaces ``attn1`` of a transformer block; falls back to ``original`` wherever it does not apply.

    ``block_input`` is set by the block's pre-hook to the block input ``x`` (before
    ``norm1``), the metric for matching; each call consumes it. When the phase has
    ``merge_crossattn`` or ``merge_mlp``, the ToMe merge is left in ``block_merge`` for
    the block's cross-attention or feed-forward.
    """

    def __init__(
        self,
        original=None,
        state: AgentState | None = None,
        block_merge: BlockMerge | None = None,
        band: int | None = None,
    ):
        # diffusers rebuilds processors as ``type(processor)()`` (IP-Adapter loading): made that way, this
        # one holds diffusers' default and no state, and the next patched UNet call wraps it afresh.
        self.original = AttnProcessor2_0() if original is None else original
        self.state = state
        self.band = band  # this block's band, where blocks are banded by position (a DiT); else by resolution
        self.block_input: torch.Tensor | None = None
        self.block_merge = BlockMerge() if block_merge is None else block_merge

    def begin_block(self, block_input: torch.Tensor) -> None:
        self.block_input = block_input
        self.block_merge.set(None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        metric, self.block_input = self.block_input, None
        plan = self._plan(attn, hidden_states, metric, encoder_hidden_states, attention_mask)
        if plan is None:
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )
        h, w, band, phase, r = plan
        if phase.tokens == "all":
            out = self._all_tokens(attn, hidden_states, metric, h, w, band, phase)
        else:
            out = self._merged_tokens(attn, hidden_states, metric, h, w, band, phase, r)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _merged_tokens(self, attn, hidden_states, metric, h: int, w: int, band: int, phase: Phase, r: int):
        """``tokens="merged"`` (AgentSD's): attention of the ToMe-merged tokens (through agents), unmerged."""
        config = self.state.config
        tokens, agents = self._token_merges(hidden_states, metric, h, w, band, phase, r)
        if phase.merge_crossattn or phase.merge_mlp:
            self.block_merge.set(tokens, crossattn=phase.merge_crossattn, mlp=phase.merge_mlp)
        out = agent_attention(
            attn,
            tokens(hidden_states),
            agents,
            k_scale2=config.k_scale2,
            k_shortcut=config.k_shortcut,
            upcast=config.attn_precision == "fp32",
        )
        return tokens.unmerge(out)

    def _token_merges(self, hidden_states, metric, h: int, w: int, band: int, phase: Phase, r: int):
        """The ToMe merge of the tokens and the groups that make the agents (or ``None``), matched here or, with
        ``share_matching``, by the first block of the call that ran this band at this size."""
        key = (h, w, band)
        shared = self.state.shared.get(key) if phase.share_matching else None
        if shared is not None and shared[0].shape == hidden_states.shape[:2]:
            return shared
        merges = self._merges(hidden_states, metric, h, w, phase, r)
        if phase.share_matching:
            self.state.shared[key] = merges
        return merges

    def _all_tokens(self, attn, hidden_states, metric, h: int, w: int, band: int, phase: Phase) -> torch.Tensor:
        """``tokens="all"``: attention of every token's query, through agents (the merged or pooled queries) or
        over merged keys and values."""
        config = self.state.config
        agents, keys_of = self._all_groups(hidden_states, metric, h, w, band, phase)
        return agent_attention(
            attn,
            hidden_states,
            agents,
            keys_of=keys_of,
            k_scale2=config.k_scale2,
            k_shortcut=config.k_shortcut,
            upcast=config.attn_precision == "fp32",
            proportional=phase.proportional,
        )

    def _all_groups(self, hidden_states, metric, h: int, w: int, band: int, phase: Phase):
        """``tokens="all"``: ``(agents, None)``, a function that averages the agent groups of the projected
        queries, or ``(None, keys_of)``, one that merges the keys and values."""
        B, N, _ = hidden_states.shape
        if phase.agents == "pooled":
            return Pooled(((1, h, w),), Window(1, phase.sy, phase.sx), hidden_states.device), None
        key = (h, w, band)
        groups = self.state.groups.get(key) if phase.share_matching else None
        if groups is None or groups.shape != (B, N):
            k = int(N * (phase.ratio if phase.agent_ratio is None else phase.agent_ratio))
            groups = self._groups(metric, h, w, phase, k)
            if phase.share_matching:
                self.state.groups[key] = groups
        return (groups, None) if phase.agent_ratio is not None else (None, groups)

    def _groups(self, metric, h: int, w: int, phase: Phase, k: int):
        """The groups of tokens that merge when the top-``k`` ranked src tokens merge into their dst."""
        B, N, _ = metric.shape
        dst = self._dst(h, w, phase, B, metric.device)
        if k >= N - dst.shape[0]:  # every src token merges: no ranking needed
            return Groups(assign(metric, dst), dst.shape[0])
        # Fewer merge than there are src tokens: rank them as ToMe does.
        return Merge(merge_rows(match(metric, dst), k), N - k)

    def _dst(self, h: int, w: int, phase: Phase, batch: int, device) -> torch.Tensor:
        """This matching's dst positions: drawn at random for even batches (paired cond/uncond images), else the
        top-left token of every window. Levels matched once per call take the draw made before the UNet ran."""
        drawn, fixed = self.state.dst.get((h, w, phase.sx, phase.sy)) or (None, None)
        if not (self.state.config.use_rand and batch % 2 == 0):
            return fixed if fixed is not None else dst_grid(h, w, phase.sx, phase.sy, device=device)
        if drawn is not None:
            return drawn
        windows = random_windows(h, w, phase.sx, phase.sy, self.state.seed, self.state.draws_on(device))
        return dst_grid(h, w, phase.sx, phase.sy, windows, device=device)

    def _merges(self, hidden_states, metric, h: int, w: int, phase: Phase, r: int) -> tuple[Merge, Groups | None]:
        """Match ``metric``: the ToMe merge of the tokens and the groups that make the agents (or ``None``).

        The agents merge more of the same ranked src tokens into the same dst, so each agent's group is a union of
        merged rows: the groups average the merged tokens' projected queries, weighed by the tokens each row
        holds (``to_q`` is affine: that is the projection of the agent tokens' mean, without a second projection).
        """
        B, N, _ = hidden_states.shape
        m = match(metric, self._dst(h, w, phase, B, hidden_states.device))
        r = min(r, m.num_src)
        tokens = Merge(merge_rows(m, r), N - r)
        agents = None
        if phase.agent_ratio is not None:
            agent_r = min(int(N * phase.agent_ratio), m.num_src)
            if 2 * (N - agent_r) < N - r:
                agents = tokens.coarser(merge_rows(m, agent_r), N - agent_r)
        return tokens, agents

    def _plan(self, attn, hidden_states, metric, encoder_hidden_states, attention_mask):
        """``(h, w, band, phase, r)`` when this call merges, else ``None`` (run the original processor)."""
        state = self.state
        if (
            metric is None
            or state is None
            or state.phases is None
            or encoder_hidden_states is not None
            or attention_mask is not None
            or hidden_states.ndim != 3
            or attn.group_norm is not None
            or attn.spatial_norm is not None
        ):
            return None
        height, width = state.size
        N = hidden_states.shape[1]
        if N > height * width:
            return None
        downsample = math.ceil(math.sqrt(height * width // N))
        band = state.config.band_of(downsample) if self.band is None else self.band
        if band is None:
            return None
        h, w = math.ceil(height / downsample), math.ceil(width / downsample)
        phase = state.phases[band]
        r = int(N * phase.ratio)
        min_tokens = min_tokens_on(phase, hidden_states.device.type, hidden_states.dtype, torch.compiler.is_compiling())
        too_small = h < phase.sy or w < phase.sx or N < min_tokens
        if h * w != N or not phase.merges or too_small:
            return None
        agents = phase.makes_agents
        if phase.tokens == "all" and agents and 2 * _num_agents(h, w, phase) >= N:
            return None  # as many agents as half the tokens: plain attention, which is what runs
        return h, w, band, phase, r


def _num_agents(h: int, w: int, phase: Phase) -> int:
    """How many agents a ``tokens="all"`` phase makes on an h×w grid."""
    windows = (h // phase.sy) * (w // phase.sx)
    if phase.agents == "pooled":
        return windows
    return h * w - min(int(h * w * phase.agent_ratio), h * w - windows)


class BlockMerge:
    """The ToMe merge of one block's tokens for its cross-attention and/or feed-forward (``merge_crossattn``,
    ``merge_mlp``).

    Set by the block's attn1 processor, cleared when the block starts. Serves as the
    processor that wraps ``attn2`` (:meth:`__call__` via :class:`MergedAttnProcessor`)
    and as the pre-/post-hook pair of the feed-forward.
    """

    def __init__(self):
        self.merge: Merge | None = None  # the merge of this block's tokens, while the block runs
        self.crossattn = False  # this block's cross-attention runs on ``merge``'s tokens
        self.mlp = False  # this block's feed-forward runs on ``merge``'s tokens
        self._ff_merged = False

    def set(self, merge: Merge | None, *, crossattn: bool = False, mlp: bool = False) -> None:
        self.merge, self.crossattn, self.mlp = merge, crossattn, mlp

    def applies(self, hidden_states: torch.Tensor, sublayer: bool) -> bool:
        merge = self.merge
        return sublayer and merge is not None and hidden_states.ndim == 3 and hidden_states.shape[:2] == merge.shape

    def ff_pre_hook(self, module, args, kwargs):
        # A chunked feed-forward sees slices of the tokens: those run unmerged.
        hidden_states = args[0] if args else kwargs["hidden_states"]
        self._ff_merged = self.applies(hidden_states, self.mlp)
        if not self._ff_merged:
            return None
        merged = self.merge(hidden_states)
        return ((merged, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": merged})

    def ff_hook(self, module, args, kwargs, output):
        if not self._ff_merged:
            return None
        self._ff_merged = False
        return self.merge.unmerge(output)


class MergedAttnProcessor:
    """Wraps the ``attn2`` processor of a patched block: cross-attention on the merged tokens when there are any."""

    def __init__(self, original=None, block_merge: BlockMerge | None = None):
        self.original = AttnProcessor2_0() if original is None else original  # see AgentAttnProcessor
        self.block_merge = BlockMerge() if block_merge is None else block_merge

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        block_merge = self.block_merge
        merged = (
            block_merge.applies(hidden_states, block_merge.crossattn) and not attn.residual_connection and not kwargs
        )
        if merged:
            hidden_states = block_merge.merge(hidden_states)
        out = self.original(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )
        return block_merge.merge.unmerge(out) if merged else out


def agent_attention(
    attn,
    tokens: torch.Tensor,
    agents,
    *,
    keys_of=None,
    k_scale2: float,
    k_shortcut: float,
    upcast: bool = False,
    proportional: bool = False,
) -> torch.Tensor:
    """Self-attention of ``tokens`` through ``attn``'s projections, via agents when given.

    With agents A (projected by ``to_q``, like the queries), per head with ``s = attn.scale``:
    ``V_A = softmax(A Kᵀ s) V`` then ``O = softmax(Q Aᵀ s^k_scale2) V_A + k_shortcut · V``.
    Without agents: plain softmax attention ``softmax(Q Kᵀ s) V``.

    ``agents``: ``None``, the agent tokens ``(B, n, C)``, or a function that averages groups of tokens
    (``(B, N, C) -> (B, n, C)``). A function is applied to the projected queries: ``to_q`` is affine, so the
    projection of a mean is the mean of the projections, and no second projection runs. ``keys_of``: such a
    function applied to the keys and values alone (softmax attention of every query over merged tokens).
    ``proportional``: a merged key's or an agent's logit gains ``log|g|`` (``sizes()`` of ``keys_of`` or ``agents``:
    the tokens its group holds).
    """
    B, num_tokens, _ = tokens.shape
    query, key, value, agent, split_heads = image_heads(attn, tokens, agents, keys_of)
    heads, head_dim = query.shape[1], query.shape[-1]
    dtype = query.dtype
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
        agent = None if agent is None else agent.float()

    scale = attn.scale
    groups = agents if agent is not None else keys_of
    bias = None
    if proportional and groups is not None and not getattr(groups, "uniform", lambda: False)():
        bias = groups.sizes().log().to(query.dtype)[:, None, None, :]  # equal windows: it would cancel
    if agent is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)
    else:
        agent_value = F.scaled_dot_product_attention(agent, key, value, scale=scale)
        out = F.scaled_dot_product_attention(query, agent, agent_value, attn_mask=bias, scale=scale**k_scale2)
        out = torch.add(out, value, alpha=k_shortcut)

    out = out.to(dtype).transpose(1, 2).reshape(B, num_tokens, heads * head_dim)
    return attn.to_out[1](attn.to_out[0](out))


def image_heads(attn, tokens: torch.Tensor, agents, keys_of=None):
    """Queries, keys, values and agents of ``tokens`` per head ``(B, heads, ·, head_dim)``, after ``norm_q``/``norm_k``,
    and the function that splits heads. ``agents`` and ``keys_of`` as in :func:`agent_attention`."""
    B = tokens.shape[0]
    heads = attn.heads
    query, key, value = _project_qkv(attn, tokens)
    head_dim = key.shape[-1] // heads

    def split_heads(t):
        return t.reshape(B, -1, heads, head_dim).transpose(1, 2)

    if agents is None:
        agent = None
    elif isinstance(agents, torch.Tensor):
        agent = split_heads(attn.to_q(agents))
    else:
        agent = split_heads(agents(query))
    if keys_of is not None:
        key, value = keys_of(key), keys_of(value)
    query, key, value = split_heads(query), split_heads(key), split_heads(value)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
        agent = None if agent is None else attn.norm_q(agent)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, agent, split_heads


def _project_qkv(attn, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if getattr(attn, "fused_projections", False) and getattr(attn, "to_qkv", None) is not None:
        return attn.to_qkv(tokens).chunk(3, dim=-1)  # diffusers' fuse_qkv_projections()
    linears = (attn.to_q, attn.to_k, attn.to_v)
    # One GEMM on the stacked weights beats three; only for plain Linears, so that
    # wrapped layers (LoRA adapters, say) keep their own forward.
    if all(type(linear) is torch.nn.Linear for linear in linears) and len({lin.bias is None for lin in linears}) == 1:
        weight = torch.cat([linear.weight for linear in linears])
        bias = None if attn.to_q.bias is None else torch.cat([linear.bias for linear in linears])
        return F.linear(tokens, weight, bias).chunk(3, dim=-1)
    return attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
