"""Agent attention under diffusers' context parallelism: the sequence sharded across ranks, only agents crossing.

``transformer.enable_parallelism`` cuts the image (or video) tokens of every call into one contiguous chunk per
rank of its context-parallel mesh (ring × Ulysses, flattened), and Flux's text tokens too; each attention
processor then sees its rank's chunk. Agent attention needs no rank's keys but its own (DESIGN.md §13):

- agents: each rank sums its image queries into the slots of the global groups (the windows of the whole grid, or
  the ToMe groups of the dst tokens every rank sees); one all-reduce gives every rank every agent, exact where a
  shard boundary cuts a window;
- the agents and the text queries (every rank's, all-gathered) attend over the rank's keys; the partial softmaxes
  join across ranks by their log-sum-exp (an all-reduce of the maxima, then of the weighted sums);
- image queries read the agents locally;
- the late phase's merged keys and values are global groups summed the same way; every query attends over them
  and the text keys of every rank (all-gathered): the one-process grouping, exact.

Collectives are torch's functional ones, traceable by ``torch.compile``. The near field acts where its windows lie
whole on each rank (they need no other rank's keys): where a shard boundary cuts them the caller runs the phase
without it. The mesh's unequal "anything" chunks the caller leaves to diffusers' own parallel attention.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from .dit import (
    Layout,
    Pooled,
    Window,
    _heads_mean,
    _key_mask,
    _near_agents,
    _near_late,
    _Partition,
    _partition,
    num_windows,
    sdpa_lse,
)

__all__ = [
    "Shard",
    "ShardedGroups",
    "ShardedPooled",
    "local_partition",
    "shard_of",
    "sharded_agent_attention",
    "unsupported",
]


class Shard(NamedTuple):
    """A rank's part of a context-parallel call: its process group (the flattened ring × Ulysses mesh), its rank in
    it, the group's size, and where its image tokens lie among the grids' (``start``, ``count``)."""

    group: object
    rank: int
    world: int
    start: int
    count: int


def unsupported(parallel_config, image_tokens: int) -> str | None:
    """Why agentsd cannot act under ``parallel_config`` (a diffusers ``ParallelConfig``), or ``None`` if it can."""
    cp = parallel_config.context_parallel_config
    if getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False):
        return "ulysses_anything / ring_anything cut the sequence into unequal chunks, which agentsd does not follow"
    world = cp._flattened_mesh.size()
    if image_tokens % world:
        return f"{image_tokens} image tokens do not split evenly over {world} ranks"
    return None


def shard_of(parallel_config, image_tokens: int) -> Shard:
    """This rank's :class:`Shard` of ``image_tokens`` grid tokens under ``parallel_config`` (diffusers cuts them
    into equal contiguous chunks, rank by rank of the flattened mesh)."""
    mesh = parallel_config.context_parallel_config._flattened_mesh
    group, world = mesh.get_group(), mesh.size()
    rank = dist.get_rank(group)
    count = image_tokens // world
    return Shard(group, rank, world, rank * count, count)


def _wait(t: torch.Tensor) -> torch.Tensor:
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


def all_sum(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    return _wait(funcol.all_reduce(x.contiguous(), "sum", shard.group))


def all_gather(x: torch.Tensor, dim: int, shard: Shard) -> torch.Tensor:
    """Every rank's ``x`` joined along ``dim`` in rank order (equal shapes on every rank)."""
    return _wait(funcol.all_gather_single(x.contiguous(), gather_dim=dim, group=shard.group))


def join_softmaxes(out: torch.Tensor, lse: torch.Tensor, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax over every rank's keys from each rank's softmax over its own: ``out`` ``(B, H, L, D)`` and its
    log-sum-exp ``lse`` ``(B, H, L)``, the same queries on every rank. ``(out, lse)`` over every key, float32 (float64
    for float64 inputs)."""
    work = lse.dtype
    top = _wait(funcol.all_reduce(lse.contiguous(), "max", shard.group))
    weight = (lse - top).exp()[..., None]
    total = all_sum(torch.cat([out.to(work) * weight, weight], dim=-1), shard)
    return total[..., :-1] / total[..., -1:], top + total[..., -1].log()


_LOCAL: dict[tuple, tuple[_Partition, torch.Tensor] | None] = {}


def local_partition(grids, window: Window, shard: Shard, device, shift: bool = False, reach: int = 0):
    """The near field's windows among a rank's image tokens: ``(partition, ids)``, the partition's positions counted
    from the rank's first token and its windows counted from 0, ``ids`` the agents (windows of the whole grids) they
    are; ``None`` where a window lies partly on the rank (its keys would have to cross), or where the near field
    reaches beyond the own window (``reach``: its neighbours' keys would have to cross at every shard's edge). Made
    once per layout."""
    key = (grids, window, shard.start, shard.count, str(device), shift, reach)
    if key in _LOCAL:
        return _LOCAL[key]
    if reach:
        _LOCAL[key] = None
        return None
    whole_part = _partition(grids, window, "cpu", shift)
    start, end = shard.start, shard.start + shard.count
    parts, ids, first = [], [], 0
    result = None
    for positions in whole_part.parts:
        inside = (positions >= start) & (positions < end)
        whole = inside.all(dim=1)
        if bool((inside.any(dim=1) & ~whole).any()):
            break
        parts.append(positions[whole] - start)
        ids.append(torch.arange(first, first + positions.shape[0])[whole])
        first += positions.shape[0]
    else:
        ragged = whole_part.ragged[(whole_part.ragged >= start) & (whole_part.ragged < end)] - start
        order = torch.cat([*(part.flatten() for part in parts), ragged])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        ids = torch.cat(ids)
        local_of = torch.full((first,), -1, dtype=torch.long)
        local_of[ids] = torch.arange(ids.numel())
        owner = whole_part.window[start:end]
        window = torch.where(owner >= 0, local_of[owner.clamp(min=0)], -1)
        parts = tuple(p.to(device) for p in parts)
        part = _Partition(parts, ragged.to(device), inverse.to(device), window.to(device), keys=parts)
        result = (part, ids.to(device))
    _LOCAL[key] = result
    return result


class ShardedPooled:
    """:class:`~agentsd.dit.Pooled` over a rank's tokens: the mean over every window of the whole grids, each rank
    adding its tokens into the windows they lie in (a window a shard boundary cuts included)."""

    def __init__(self, grids, window: Window, shard: Shard, device=None, shift: bool = False):
        self.full, self.shard, self.n = Pooled(grids, window, device, shift), shard, num_windows(grids, window)
        owner = _partition(grids, window, device, shift).window[shard.start : shard.start + shard.count]
        self.slots = torch.where(owner >= 0, owner, self.n)  # tokens in no whole window: one spare slot, dropped

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, _, C = x.shape
        work = torch.promote_types(x.dtype, torch.float32)
        sums = x.new_zeros(B, self.n + 1, C, dtype=work).index_add_(1, self.slots, x.to(work))
        # this rank's share of each window's mean, in the model's dtype: what crosses is as wide as the tokens
        return all_sum((sums[:, : self.n] / self.full.sizes()[..., None]).to(x.dtype), self.shard)

    def sizes(self) -> torch.Tensor:
        return self.full.sizes()

    def uniform(self) -> bool:
        return self.full.uniform()


class ShardedGroups:
    """ToMe groups over a rank's tokens, as :func:`~agentsd.dit.tome_groups` makes them over all: every rank sees
    every dst token's metric (one all-reduce), matches its own tokens to the most similar, and a group's mean sums
    the members of every rank.

    Args:
        metric: ``(B, count, C)`` the rank's tokens' features.
        dst: ``(n,)`` the dst tokens' positions among all the grids' tokens.
    """

    def __init__(self, metric: torch.Tensor, dst: torch.Tensor, shard: Shard):
        self.shard, self.size = shard, dst.shape[0]
        B, count, C = metric.shape
        mine = (dst >= shard.start) & (dst < shard.start + shard.count)
        local_dst = (dst - shard.start).clamp(0, count - 1)
        dst_metric = torch.where(mine[None, :, None], metric.index_select(1, local_dst), 0.0)
        dst_metric = all_sum(dst_metric, self.shard)
        unit = dst_metric / dst_metric.norm(dim=-1, keepdim=True)
        best = (metric @ unit.transpose(1, 2)).argmax(dim=-1)
        # a dst token heads its own group
        slot_of = torch.full((shard.world * count,), -1, dtype=torch.long, device=dst.device)
        slot_of = slot_of.index_copy(0, dst, torch.arange(self.size, device=dst.device))
        led = slot_of[shard.start : shard.start + count]
        self.slots = best = torch.where(led >= 0, led, best)
        self.flat = (best + torch.arange(0, B * self.size, self.size, device=best.device)[:, None]).flatten()
        ones = torch.ones(self.flat.shape, device=best.device)
        counts = torch.zeros(B * self.size, device=best.device).index_add_(0, self.flat, ones)
        self._sizes = all_sum(counts.view(B, self.size), self.shard)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        work = torch.promote_types(x.dtype, torch.float32)
        sums = x.new_zeros(B * self.size, C, dtype=work).index_add_(0, self.flat, x.reshape(B * N, C).to(work))
        share = sums.view(B, self.size, C) / self._sizes[..., None].to(work)  # this rank's share of each group's mean
        return all_sum(share.to(x.dtype), self.shard)

    def sizes(self) -> torch.Tensor:
        return self._sizes


def sharded_agent_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: Layout,
    shard: Shard,
    *,
    agents=None,
    keys_of=None,
    scale: float | None = None,
    k_scale2: float = 0.3,
    k_shortcut: float = 0.075,
    upcast: bool = False,
    proportional: bool = False,
    text_mask: torch.Tensor | None = None,
    near: tuple[_Partition, torch.Tensor] | None = None,
    near_join: str = "correct",
) -> torch.Tensor:
    """:func:`~agentsd.dit.agent_attention` of one rank's chunk of a context-parallel call, equal to the matching
    rows of the one-process output.

    ``query``, ``key``, ``value``: ``(B, S, heads, head_dim)``, the rank's text tokens (``layout.text`` of them, an
    equal share on every rank, text first) and its ``shard.count`` image tokens; ``layout.grids`` the whole grids.
    ``agents`` / ``keys_of``: :class:`ShardedPooled` or :class:`ShardedGroups` of this call. ``text_mask``: ``(B,
    layout.text)`` the rank's text keys to attend to (Qwen-Image's padded prompts), or ``None``. ``near``: the
    near field's windows on this rank (:func:`local_partition`), joined as ``near_join`` says (``agent_attention``'s).
    """
    if (agents is None) == (keys_of is None):
        raise ValueError("sharded_agent_attention takes agents or keys_of")
    if not layout.text_first and layout.text:
        raise ValueError("sharded_agent_attention: the text must come first (Flux, Qwen-Image) or be absent (Wan)")
    dtype = query.dtype
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    local = Layout(layout.text, True, layout.grids, image_tokens=shard.count)
    q_image, q_text = local.split(query)
    k_image, k_text = local.split(key)
    v_image, v_text = local.split(value)
    if keys_of is not None:
        heads = k_image.shape[2]
        merged = _heads_mean(keys_of, torch.cat([k_image, v_image], dim=2))
        k_merged, v_merged = merged[:, :, :heads], merged[:, :, heads:]
        text_kv = all_gather(torch.cat([k_text, v_text], dim=2), 1, shard) if layout.text else None
        k_all = k_merged if text_kv is None else torch.cat([text_kv[:, :, :heads], k_merged], dim=1)
        v_all = v_merged if text_kv is None else torch.cat([text_kv[:, :, heads:], v_merged], dim=1)
        bias = keys_of.sizes().log().to(query.dtype) if proportional else None
        every_mask = None if text_mask is None else all_gather(text_mask.to(torch.int32), 1, shard)
        text_keys = k_all.shape[1] - k_merged.shape[1]
        mask = _key_mask(Layout(text_keys, True, ()), every_mask, k_merged.shape[1], bias)
        queries, keys, values = query.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2)
        if near is None:
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
            return out.transpose(1, 2).to(dtype)
        out, lse = sdpa_lse(queries, keys, values, mask, scale)
        (out_image, out_text), (lse_image, _) = local.split(out, 2), local.split(lse, 2)
        q_x, k_x, v_x = (t.transpose(1, 2) for t in (q_image, k_image, v_image))
        merged = (k_merged.transpose(1, 2), v_merged.transpose(1, 2), keys_of.sizes(), bias, keys_of.slots)
        out_image = _near_late((out_image, lse_image), q_x, k_x, v_x, merged, near[0], scale)
        return local.join(out_image.to(out_text.dtype), out_text, 2).transpose(1, 2).to(dtype)
    agent = _heads_mean(agents, q_image).transpose(1, 2)  # (B, H, n, D): every rank's queries
    n = agent.shape[2]
    text_queries = all_gather(q_text, 1, shard).transpose(1, 2) if layout.text else q_text.transpose(1, 2)
    both = torch.cat([agent, text_queries], dim=2)  # the agents and every rank's text queries, over this rank's keys
    mask = None
    if text_mask is not None:  # a float mask: -inf on this rank's padded text keys (its image keys are never masked)
        mask = _key_mask(local, text_mask, shard.count, agent.new_zeros(agent.shape[0], shard.count))
    out, lse = sdpa_lse(both, key.transpose(1, 2), value.transpose(1, 2), mask, scale)
    gathered, lse_gathered = join_softmaxes(out, lse, shard)
    gathered = gathered.to(query.dtype)
    agent_value = gathered[:, :, :n]
    out_text = gathered[:, :, n + shard.rank * layout.text : n + (shard.rank + 1) * layout.text]
    bias = None
    if proportional and (near is not None or not agents.uniform()):
        bias = agents.sizes().log().to(query.dtype)  # equal windows without a near field: it would cancel
    q_x, k_x, v_x = q_image.transpose(1, 2), k_image.transpose(1, 2), v_image.transpose(1, 2)
    if near is None:
        mask = None if bias is None else bias[:, None, None, :]
        out_image = F.scaled_dot_product_attention(q_x, agent, agent_value, attn_mask=mask, scale=scale**k_scale2)
        out_image = torch.add(out_image, v_x, alpha=k_shortcut)
    else:
        agents_of = (agent, agent_value, lse_gathered[:, :, :n], bias)
        part, ids = near
        out_image = _near_agents(q_x, k_x, v_x, agents_of, part, ids, scale, k_scale2, k_shortcut, near_join)
        out_image = out_image.to(out_text.dtype)
    return torch.cat([out_text, out_image], dim=2).transpose(1, 2).to(dtype)
