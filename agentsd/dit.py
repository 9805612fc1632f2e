"""Agent attention for DiTs at the point where a model calls attention: pure torch, no diffusers.

A DiT's attention processor projects its queries, keys and values, applies its norms and rotary embedding,
then attends over ``(B, S, heads, head_dim)``. Here that last call runs through agents instead, given a
:class:`Layout` (where the text and the image or video tokens lie in the sequence, and the patch grids).
Per head, with Q_X, K_X, V_X the image tokens, Q_T the text's, K, V every token's and s the model's scale
(DESIGN.md §11):

- agents ``A``: the mean of the image queries of each group (a window of the patch grid for pooled agents,
  a ToMe group for merged ones);
- agents gather from every key: ``V_A = softmax(A Kᵀ s) V``;
- image queries read the agents: ``O_X = softmax(Q_X Aᵀ s^k_scale2) V_A + k_shortcut · V_X``;
- text queries attend exactly: ``O_T = softmax(Q_T Kᵀ s) V``;
- without agents (the lean late phase): every query over ``[K_T; mean K_X per group]``,
  ``[V_T; mean V_X per group]``.

Windows are 3-D (frames × rows × columns); an image is a grid of one frame. A window larger than its grid
in some axis shrinks to the grid there; tokens of a ragged border (a grid the windows do not tile) belong
to no pooled window, and join their most similar dst in a ToMe group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .merge import Groups, _hash32, assign

__all__ = [
    "Layout",
    "Pooled",
    "Window",
    "agent_attention",
    "dst_positions",
    "pool",
    "random_offsets",
    "sdpa_lse",
    "window_of",
]


class Window(NamedTuple):
    """An agent window on the patch grid: ``st`` frames × ``sy`` rows × ``sx`` columns."""

    st: int
    sy: int
    sx: int


class Layout(NamedTuple):
    """Where the tokens of one attention call lie.

    Attributes:
        text: number of text tokens (0 for image-only attention, as Wan's self-attention).
        text_first: the text precedes the image tokens (``[T; X]``: Flux, Qwen-Image) or follows them (SD 3).
        grids: ``(frames, rows, columns)`` of each image grid, in sequence order (Flux Kontext appends its
            reference image's grid to the latent's); tokens of a grid are frame-major, then row-major.
        image_tokens: the number of image tokens where they lie on no grid (SD 3's ToMe-merged tokens); 0: the
            grids' tokens.
    """

    text: int
    text_first: bool
    grids: tuple[tuple[int, int, int], ...]
    image_tokens: int = 0  # the image tokens' count where they lie on no grid (merged before the projections)

    @property
    def image(self) -> int:
        return self.image_tokens or sum(f * h * w for f, h, w in self.grids)

    def split(self, x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, text)`` parts of ``x`` along ``dim`` (the sequence's)."""
        if self.text_first:
            return x.narrow(dim, self.text, x.shape[dim] - self.text), x.narrow(dim, 0, self.text)
        return x.narrow(dim, 0, self.image), x.narrow(dim, self.image, x.shape[dim] - self.image)

    def join(self, image: torch.Tensor, text: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return torch.cat([text, image] if self.text_first else [image, text], dim=dim)


def window_of(grid: tuple[int, int, int], window: Window) -> Window:
    """The window as it applies to ``grid``: shrunk to the grid where the grid is smaller."""
    f, h, w = grid
    return Window(min(window.st, f), min(window.sy, h), min(window.sx, w))


def _halves(grid: tuple[int, int, int], window: Window) -> tuple[int, int, int]:
    """How far shifted windows lie from the grid's origin along each axis: half the window (as it applies)."""
    return tuple(s // 2 for s in window_of(grid, window))


def _roll(cube: torch.Tensor, grid, window: Window, shift: bool, first_dim: int) -> torch.Tensor:
    """``cube`` (a grid's tokens as frames × rows × columns from ``first_dim`` on) cyclically rolled so that the
    shifted windows start at its origin (``shift``), or as it is."""
    if not shift:
        return cube
    halves = _halves(grid, window)
    return cube.roll(tuple(-h for h in halves), dims=tuple(range(first_dim, first_dim + 3)))


def pool(x: torch.Tensor, grids, window: Window, shift: bool = False) -> torch.Tensor:
    """Mean of ``x`` (B×N×... image tokens) over every whole window of each grid: ``(B, n, ...)``, grid by grid,
    windows frame-major then row-major. ``shift``: the windows shifted by half a window along every axis, those
    that cross the grid's end wrapping around to its start (Swin's cyclic shift)."""
    B, rest = x.shape[0], x.shape[2:]
    pooled, start = [], 0
    for grid in grids:
        f, h, w = grid
        st, sy, sx = window_of(grid, window)
        cube = _roll(x[:, start : start + f * h * w].view(B, f, h, w, *rest), grid, window, shift, 1)
        cube = cube[:, : f // st * st, : h // sy * sy, : w // sx * sx]
        cube = cube.reshape(B, f // st, st, h // sy, sy, w // sx, sx, *rest)
        pooled.append(cube.mean(dim=(2, 4, 6)).reshape(B, -1, *rest))
        start += f * h * w
    return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)


def num_windows(grids, window: Window) -> int:
    total = 0
    for grid in grids:
        st, sy, sx = window_of(grid, window)
        total += (grid[0] // st) * (grid[1] // sy) * (grid[2] // sx)
    return total


def random_offsets(grids, window: Window, seed: int, draw: int, device=None) -> torch.Tensor:
    """Draw ``draw``'s dst offset of every window (``(num_windows,)`` ints in ``[0, st·sy·sx)`` of its grid):
    window ``i`` (counted over all grids) takes ``hash(hash(key + i)) mod st·sy·sx`` with ``key =
    (seed·0x9E3779B1 mod 2³²) + (draw·0x7FEB352D mod 2³²)``. No generator: nothing to break a compiled graph."""
    key = ((seed * 0x9E3779B1) & 0xFFFFFFFF) + (((draw & 0xFFFFFFFF) * 0x7FEB352D) & 0xFFFFFFFF)
    hashed = _hash32(_hash32(key + torch.arange(num_windows(grids, window), device=device)))
    sizes = torch.cat(
        [
            torch.full(((g[0] // s.st) * (g[1] // s.sy) * (g[2] // s.sx),), s.st * s.sy * s.sx, device=device)
            for g, s in ((g, window_of(g, window)) for g in grids)
        ]
    )
    return hashed % sizes


def dst_positions(
    grids, window: Window, offsets: torch.Tensor | None = None, device=None, shift: bool = False
) -> torch.Tensor:
    """Token positions (among the image tokens) of one dst per window: the window's first token, or the one at
    ``offsets`` (``dt·sy·sx + dy·sx + dx``, from :func:`random_offsets`). ``(num_windows,)`` long. ``shift``: of
    the shifted windows (:func:`pool`'s)."""
    positions = _dst_positions(grids, window, offsets, device)
    if not shift:
        return positions
    start, rolled = 0, []  # the token at each position of the rolled grids
    for grid in grids:
        f, h, w = grid
        cube = torch.arange(start, start + f * h * w, device=device).view(f, h, w)
        rolled.append(_roll(cube, grid, window, True, 0).flatten())
        start += f * h * w
    return torch.cat(rolled)[positions]


def _dst_positions(grids, window: Window, offsets: torch.Tensor | None, device) -> torch.Tensor:
    positions, start = [], 0
    for grid in grids:
        f, h, w = grid
        st, sy, sx = window_of(grid, window)
        t = torch.arange(f // st, device=device)[:, None, None] * (st * h * w)
        y = torch.arange(h // sy, device=device)[:, None] * (sy * w)
        x = torch.arange(w // sx, device=device) * sx
        positions.append((start + t + y + x).flatten())
        start += f * h * w
    corners = torch.cat(positions)
    if offsets is None:
        return corners
    # the offset's frame, row and column inside its window (each grid has its own window shape)
    shapes = torch.tensor(
        [[*window_of(g, window), g[1], g[2]] for g in grids for _ in range(num_windows((g,), window))],
        device=device,
    ).view(-1, 5)
    _, sy, sx, h, w = shapes.unbind(-1)
    offsets = offsets.to(device=device, dtype=torch.long)
    dt, rest = offsets // (sy * sx), offsets % (sy * sx)
    return corners + dt * h * w + (rest // sx) * w + rest % sx


def tome_groups(metric: torch.Tensor, dst: torch.Tensor) -> Groups:
    """ToMe groups of the image tokens: every src token merged into its most similar dst (cosine on ``metric``,
    ``(B, N, C)``), each dst heading its own group."""
    return Groups(assign(metric, dst), dst.shape[0])


def _heads_mean(groups: Callable, x: torch.Tensor) -> torch.Tensor:
    """Apply a token-averaging function to ``x`` (B×N×H×D), heads kept apart."""
    B, N, H, D = x.shape
    return groups(x.reshape(B, N, H * D)).view(B, -1, H, D)


def _key_mask(
    layout: Layout, text_mask: torch.Tensor | None, image: int, image_bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """SDPA's mask ``(B, 1, 1, keys)`` over ``image`` image keys and the layout's text keys: ``None`` (every key
    alike), boolean (``text_mask``'s keys only) or, with ``image_bias`` (``(B, image)``, added to the image keys'
    logits), float with ``-inf`` at the masked text keys."""
    if image_bias is None:
        if text_mask is None:
            return None
        text_mask = text_mask.to(torch.bool)
        image_mask = text_mask.new_ones(text_mask.shape[0], image)
        mask = torch.cat([text_mask, image_mask] if layout.text_first else [image_mask, text_mask], dim=1)
        return mask[:, None, None, :]
    B = image_bias.shape[0]
    if text_mask is None:
        text_bias = image_bias.new_zeros(B, layout.text)
    else:
        text_bias = torch.zeros_like(text_mask, dtype=image_bias.dtype).masked_fill(
            ~text_mask.to(torch.bool), -math.inf
        )
    bias = torch.cat([text_bias, image_bias] if layout.text_first else [image_bias, text_bias], dim=1)
    return bias[:, None, None, :]


class Pooled:
    """The groups of pooled agents: every whole window of each grid (tokens of a ragged border in none), shifted
    windows if ``shift`` (:func:`pool`)."""

    def __init__(self, grids, window: Window, device=None, shift: bool = False):
        self.grids, self.window, self.device, self.shift = grids, window, device, shift

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return pool(x, self.grids, self.window, self.shift)

    def sizes(self) -> torch.Tensor:
        """How many tokens each window holds: ``(1, n)`` float32."""
        counts = []
        for grid in self.grids:
            st, sy, sx = window_of(grid, self.window)
            counts.append(torch.full((num_windows((grid,), self.window),), float(st * sy * sx), device=self.device))
        return torch.cat(counts)[None]

    def uniform(self) -> bool:
        """Whether every window holds as many tokens (then a bias of their size cancels in a softmax over them)."""
        return len({math.prod(window_of(g, self.window)) for g in self.grids}) == 1


class _Partition(NamedTuple):
    """The image tokens cut into the whole windows of each grid, and the tokens in none."""

    parts: tuple[torch.Tensor, ...]  # per grid: (windows, tokens of a window) positions, windows in pool's order
    ragged: torch.Tensor  # (R,) positions of the tokens in no whole window
    inverse: torch.Tensor  # (N,) where each token lies in the parts' flattened positions followed by the ragged ones
    window: torch.Tensor  # (N,) the window of each token (counted over every grid, as pool counts them); -1: none
    # per grid: (windows, keys) positions of the keys each window's queries read exactly (its own tokens: parts, or
    # with a reach those of its neighbourhood's windows), and with a reach (windows, m) those windows (counted over
    # every grid; the "softmax" join takes their agents out)
    keys: tuple[torch.Tensor, ...] = ()
    near_windows: tuple[torch.Tensor, ...] = ()
    reach: int = 0


_PARTITIONS: dict[tuple, _Partition] = {}


def _neighbourhoods(windows: tuple[int, int, int], reach: int) -> torch.Tensor:
    """The windows each window's near field reads, for a grid of ``windows`` (frames, rows, columns) windows: the
    ``(2·reach + 1)²`` windows around it in its frame (fewer where the grid has fewer), moved inward at the grid's
    edges. ``(nf·nb·nc, m)`` long, counted from the grid's first window."""
    nf, nb, nc = windows
    spans = []
    for count in (nb, nc):
        span = min(2 * reach + 1, count)
        first = (torch.arange(count) - reach).clamp(0, count - span)
        spans.append(first[:, None] + torch.arange(span))  # (count, span)
    rows, cols = spans
    ids = torch.arange(nf)[:, None, None, None, None] * (nb * nc) + rows[None, :, None, :, None] * nc
    ids = ids + cols[None, None, :, None, :]
    return ids.reshape(nf * nb * nc, -1)


def _partition(grids, window: Window, device, shift: bool = False, reach: int = 0) -> _Partition:
    cached = _PARTITIONS.get((grids, window, str(device), shift, reach))
    if cached is not None:
        return cached
    parts, ragged, start, count = [], [], 0, 0
    keys, near_windows = [], []
    owner = torch.full((sum(f * h * w for f, h, w in grids),), -1, dtype=torch.long)
    for grid in grids:
        f, h, w = grid
        st, sy, sx = window_of(grid, window)
        cube = _roll(torch.arange(start, start + f * h * w).view(f, h, w), grid, window, shift, 0)
        inside = torch.zeros(f, h, w, dtype=torch.bool)
        inside[: f // st * st, : h // sy * sy, : w // sx * sx] = True
        whole = cube[: f // st * st, : h // sy * sy, : w // sx * sx]
        whole = whole.reshape(f // st, st, h // sy, sy, w // sx, sx).permute(0, 2, 4, 1, 3, 5)
        whole = whole.reshape(-1, st * sy * sx)
        owner[whole] = torch.arange(count, count + whole.shape[0])[:, None]
        parts.append(whole)
        if reach:
            around = _neighbourhoods((f // st, h // sy, w // sx), reach)
            keys.append(whole[around.flatten()].view(whole.shape[0], -1))
            near_windows.append(around + count)
        else:
            keys.append(whole)
        ragged.append(cube[~inside])
        start, count = start + f * h * w, count + whole.shape[0]
    ragged = torch.cat(ragged)
    order = torch.cat([*(part.flatten() for part in parts), ragged])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    result = _Partition(
        tuple(part.to(device) for part in parts),
        ragged.to(device),
        inverse.to(device),
        owner.to(device),
        tuple(k.to(device) for k in keys),
        tuple(m.to(device) for m in near_windows),
        reach,
    )
    _PARTITIONS[(grids, window, str(device), shift, reach)] = result
    return result


def sdpa_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``(B, H, L, D)`` tensors with its log-sum-exp: ``(out, lse)``, ``lse`` ``(B, H, L)`` in
    float32 (float64 for float64 inputs). Fused kernels on CPU and CUDA (nothing ``L × S`` materialised); ``mask``:
    a float bias broadcast to ``(B, H, L, S)`` or ``None``."""
    if query.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, attn_mask=mask, scale=scale
        )
    if query.device.type == "cuda":
        bias = None
        if mask is not None:
            B, H, L, S = *query.shape[:3], key.shape[2]
            bias = mask.to(query.dtype)
            if S % 16:  # the kernel reads the bias in rows aligned to 16 elements
                bias = F.pad(bias, (0, 16 - S % 16))[..., :S]
            bias = bias.expand(B, H, L, S)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, scale=scale)[
            :2
        ]
        return out, lse[..., : query.shape[2]]
    logits = (query @ key.transpose(-1, -2)).float() * scale  # other devices: the plain formula
    if mask is not None:
        logits = logits + mask
    lse = logits.logsumexp(dim=-1)
    return ((logits - lse[..., None]).exp().to(value.dtype) @ value), lse


def _cut_windows(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The tokens of ``t`` (``(B, H, N, D)``) at ``positions`` (``(windows, size)``) as a batch of windows:
    ``(B·windows, H, size, D)``."""
    B, H, _, D = t.shape
    windows, size = positions.shape
    return t.index_select(2, positions.flatten()).view(B, H, windows, size, D).transpose(1, 2).reshape(-1, H, size, D)


def _windowed(q, k, v, part: _Partition, scale: float, bias: torch.Tensor | None = None, keys=None, agents=None):
    """Every image query over the keys its window reads exactly (``part.keys``: its own window's, or its
    neighbourhood's; a token in no whole window: over its own key): ``(out, lse)`` as :func:`sdpa_lse`'s, in the
    tokens' order. ``q``, ``k``, ``v``: ``(B, H, N, D)``; ``bias``: ``(B, N)`` float added to each key's logit, or
    ``None``. ``keys``: per grid, the positions in ``k`` each window's queries read instead (a token in no whole
    window then reads none: its ``lse`` is ``-inf``). ``agents``: ``(B, H, n, D)``, one per whole window (in
    ``part``'s order): each also reads its window's keys, in the same call (the keys cut once), and the result is
    ``((out, lse), (agents' out, agents' lse))``."""
    B, H, _, D = q.shape
    outs, lses, agent_outs, agent_lses, start = [], [], [], [], 0
    for positions, window_keys in zip(part.parts, part.keys if keys is None else keys):
        windows, size = positions.shape
        if windows == 0:
            continue
        read = window_keys.shape[1]
        mask = None if bias is None else bias.index_select(1, window_keys.flatten()).view(B * windows, 1, 1, read)
        cut_k, cut_v = _cut_windows(k, window_keys), _cut_windows(v, window_keys)
        cut_q = _cut_windows(q, positions)
        if agents is not None:  # the window's agent as one more query
            mine = agents[:, :, start : start + windows].transpose(1, 2).reshape(-1, H, 1, D)
            cut_q = torch.cat([cut_q, mine.to(cut_q.dtype)], dim=2)
        out, lse = sdpa_lse(cut_q, cut_k, cut_v, mask, scale)
        if agents is not None:
            agent_outs.append(out[:, :, size].view(B, windows, H, D).transpose(1, 2))
            agent_lses.append(lse[:, :, size].view(B, windows, H).transpose(1, 2))
            out, lse = out[:, :, :size], lse[:, :, :size]
        outs.append(out.reshape(B, windows, H, size, D).transpose(1, 2).reshape(B, H, windows * size, D))
        lses.append(lse.reshape(B, windows, H, size).transpose(1, 2).reshape(B, H, windows * size))
        start += windows
    if part.ragged.numel():
        work = torch.promote_types(q.dtype, torch.float32)
        if keys is not None:
            lses.append(q.new_full((B, H, part.ragged.numel()), -math.inf, dtype=work))
            outs.append(v.new_zeros(B, H, part.ragged.numel(), D))
        else:
            qr, kr = q.index_select(2, part.ragged), k.index_select(2, part.ragged)
            lse = (qr.to(work) * kr.to(work)).sum(-1) * scale
            lses.append(lse if bias is None else lse + bias.index_select(1, part.ragged)[:, None])
            outs.append(v.index_select(2, part.ragged))
    out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    result = (out.index_select(2, part.inverse), lse.index_select(2, part.inverse))
    if agents is None:
        return result
    return result, (torch.cat(agent_outs, dim=2), torch.cat(agent_lses, dim=2))


def _combine(far, near, dup=None) -> torch.Tensor:
    """Merge softmaxes over disjoint sets of keys by their log-sum-exp, in the log-sum-exp's precision (float32 at
    least): ``far`` and ``near`` added, ``dup`` (a part of ``far``'s keys) taken out. Each is ``(out (B, H, N, D),
    lse (B, H, N))``."""
    (out_far, lse_far), (out_near, lse_near) = far, near
    work = lse_far.dtype
    top = torch.maximum(lse_far, lse_near)
    w_far, w_near = (lse_far - top).exp(), (lse_near - top).exp()
    num = w_far[..., None] * out_far.to(work) + w_near[..., None] * out_near.to(work)
    if dup is not None:
        out_dup, lse_dup = dup
        w_dup = (lse_dup - top).exp()
        num = num - w_dup[..., None] * out_dup.to(work)
        w_far = (w_far - w_dup).clamp_min(0.0)
    return num / (w_far + w_near)[..., None]


def _per_token(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Row ``slots[b, i]`` of ``x`` (B×H×n×D) for every token: ``(B, H, N, D)``."""
    B, H, n, D = x.shape
    flat = (slots + torch.arange(0, B * n, n, device=slots.device)[:, None]).flatten()
    return x.transpose(1, 2).reshape(B * n, H * D).index_select(0, flat).view(B, -1, H, D).transpose(1, 2)


def agent_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: Layout,
    *,
    agents: Callable | None = None,
    keys_of: Callable | None = None,
    scale: float | None = None,
    k_scale2: float = 0.3,
    k_shortcut: float = 0.075,
    upcast: bool = False,
    text_mask: torch.Tensor | None = None,
    proportional: bool = False,
    near: Window | None = None,
    near_join: str = "correct",
    shift: bool = False,
    near_reach: int = 0,
) -> torch.Tensor:
    """Attention of ``(B, S, heads, head_dim)`` queries, keys and values laid out as ``layout``, through agents.

    Args:
        agents: averages groups of image tokens (``(B, N, C) -> (B, n, C)``): the agents are its mean of the
            image queries (:class:`Pooled` or :func:`tome_groups`, bound to the grids).
        keys_of: averages groups of image tokens for the keys and values alone (the late phase: no agents).
            Neither: plain softmax attention of every query over every key.
        scale: the model's softmax scale (``head_dim^-1/2`` if ``None``).
        upcast: compute both softmax products in float32.
        text_mask: ``(B, text)`` bool, the text keys to attend to (Qwen-Image's padded prompts); ``None``: all.
            Only the softmaxes over the keys read it (the agents' gather, the text queries, the late phase).
        proportional: an agent's or a merged key's logit gains ``log|g|``, ``|g|`` the tokens its group holds
            (``sizes()`` of ``agents`` or ``keys_of``), so that it weighs like the tokens it stands for.
        near: the near field's window: each image query's exact attention over the keys of its own window of the
            grid (its own key where it lies in no whole window) joins the summary of the rest, as ``near_join``
            says with agents, and without them in one softmax with every merged key less the shares of its
            window's tokens. The agents' windows must be these windows.
        near_join: how the near field joins the agents: ``"correct"``, the broadcast with each query's exact
            attention over its window swapped in for its agent's, weighed by the share of the agent's softmax that
            window holds; ``"softmax"``, DESIGN §12.2's one softmax over the window's exact keys and the other
            windows' agents (at ``s^k_scale2``, the own agent left out).
        shift: the near field's windows are shifted (:func:`pool`), as the agents' are.
        near_reach: the near field reads the exact keys of the ``(2·near_reach + 1)²`` windows around the query's
            own in its frame (moved inward at the grid's edges), the summary standing for the tokens outside them.

    Returns:
        ``(B, S, heads, head_dim)`` in the input's dtype and layout.
    """
    if agents is not None and keys_of is not None:
        raise ValueError("agent_attention takes agents or keys_of, not both")
    if near is not None and agents is None and keys_of is None:
        raise ValueError("agent_attention: a near field needs agents or keys_of for the far field")
    if near_reach and near is None:
        raise ValueError("agent_attention: near_reach widens a near field: it needs near")
    if near_join not in ("correct", "softmax"):
        raise ValueError(f"near_join must be 'correct' or 'softmax', got {near_join!r}")
    dtype = query.dtype
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    if agents is None and keys_of is None:  # plain softmax attention (SD 3's ToMe phase, on merged tokens)
        mask = _key_mask(layout, text_mask, layout.image)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, scale=scale
        )
        return out.transpose(1, 2).to(dtype)
    q_image, q_text = layout.split(query)
    if keys_of is not None:
        k_image, k_text = layout.split(key)
        v_image, v_text = layout.split(value)
        k_merged, v_merged = _heads_mean(keys_of, k_image), _heads_mean(keys_of, v_image)
        sizes = keys_of.sizes() if proportional or near is not None else None
        bias = sizes.log().to(query.dtype) if proportional else None
        mask = _key_mask(layout, text_mask, k_merged.shape[1], bias)
        queries = query.transpose(1, 2)
        keys = layout.join(k_merged, k_text).transpose(1, 2)
        values = layout.join(v_merged, v_text).transpose(1, 2)
        if near is None:
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
            return out.transpose(1, 2).to(dtype)
        out, lse = sdpa_lse(queries, keys, values, mask, scale)
        (out_image, out_text), (lse_image, _) = layout.split(out, 2), layout.split(lse, 2)
        part = _partition(layout.grids, near, query.device, shift, near_reach)
        q_x, k_x, v_x = (t.transpose(1, 2) for t in (q_image, k_image, v_image))
        merged = (k_merged.transpose(1, 2), v_merged.transpose(1, 2), sizes, bias, keys_of.slots)
        out_image = _near_late((out_image, lse_image), q_x, k_x, v_x, merged, part, scale)
        return layout.join(out_image.to(out_text.dtype), out_text, 2).transpose(1, 2).to(dtype)
    agent = _heads_mean(agents, q_image).transpose(1, 2)  # (B, H, n, D)
    keys, values = key.transpose(1, 2), value.transpose(1, 2)
    n = agent.shape[2]
    # The agents and the text queries attend over the same keys: one call for both.
    both = torch.cat([agent, q_text.transpose(1, 2)], dim=2)
    correct = near is not None and near_join == "correct"
    if correct:  # the agents' log-sum-exp too
        zeros = None if text_mask is None else agent.new_zeros(agent.shape[0], layout.image)
        mask = _key_mask(layout, text_mask, layout.image, zeros)
        gathered, lse_gathered = sdpa_lse(both, keys, values, mask, scale)
    else:
        mask = _key_mask(layout, text_mask, layout.image)
        gathered = F.scaled_dot_product_attention(both, keys, values, attn_mask=mask, scale=scale)
    agent_value, out_text = gathered[:, :, :n], gathered[:, :, n:]
    q_x = q_image.transpose(1, 2)
    bias = None
    if proportional and (near is not None or not getattr(agents, "uniform", lambda: False)()):
        bias = agents.sizes().log().to(query.dtype)  # equal windows without a near field: it would cancel
    mask = None if bias is None else bias[:, None, None, :]
    k_x, v_x = layout.split(keys, 2)[0], layout.split(values, 2)[0]
    if near is None:
        out_image = F.scaled_dot_product_attention(q_x, agent, agent_value, attn_mask=mask, scale=scale**k_scale2)
        out_image = torch.add(out_image, v_x, alpha=k_shortcut)
    else:
        part = _partition(layout.grids, near, query.device, shift, near_reach)
        agents_of = (agent, agent_value, lse_gathered[:, :, :n] if correct else None, bias)
        out_image = _near_agents(q_x, k_x, v_x, agents_of, part, None, scale, k_scale2, k_shortcut, near_join)
        out_image = out_image.to(out_text.dtype)
    return layout.join(out_image, out_text, 2).transpose(1, 2).to(dtype)


def _near_late(far, q_x, k_x, v_x, merged, part: _Partition, scale: float) -> torch.Tensor:
    """The late phase's near field: ``far`` (``(out, lse)`` of the image queries over the text keys and every merged
    key) joined with their exact attention over their windows' keys (``part``), each merged key less the shares of the
    window's tokens in it. ``merged``: ``(keys, values)`` ``(B, H, n, D)``, the groups' ``sizes`` ``(B, n)``, the
    logit ``bias`` they were given (or ``None``) and each query token's group (``slots``, ``(B, N)``)."""
    k_merged, v_merged, sizes, bias, slots = merged
    # each token of the query's window stood in its group's key for exp(bias)/|g| of a key: take those out
    share = -sizes.log() if bias is None else bias - sizes.log()
    share = share.gather(1, slots)
    dup = _windowed(q_x, _per_token(k_merged, slots), _per_token(v_merged, slots), part, scale, share)
    return _combine(far, _windowed(q_x, k_x, v_x, part, scale), dup)


def _near_agents(q_x, k_x, v_x, agents_of, part: _Partition, ids, scale, k_scale2, k_shortcut, join) -> torch.Tensor:
    """The agent phase's near field for image queries ``q_x`` over their windows' keys ``k_x``, ``v_x`` (``part``).
    ``agents_of``: the agents and their values ``(B, H, n, D)``, the log-sum-exp of the agents' gather ``(B, H, n)``
    (``join="correct"``) and the agents' logit bias ``(B, n)`` or ``None``. ``ids``: the agents of ``part``'s windows
    (``part.window`` counting them from 0), or ``None`` where its windows are every agent's, in order."""
    agent, agent_value, lse_agents, bias = agents_of
    mask = None if bias is None else bias[:, None, None, :]
    own = part.window.clamp(min=0)  # the own window's (none for a token in no whole window)
    if join == "correct":
        # The broadcast, then each query's own window corrected: its agent's output held the agent's exact attention
        # over the window's keys (a share rho of the agent's softmax); swap in the query's own.
        broadcast = F.scaled_dot_product_attention(q_x, agent, agent_value, attn_mask=mask, scale=scale**k_scale2)
        mine = agent if ids is None else agent.index_select(2, ids)
        (local_query, _), (local_agent, lse_local) = _windowed(q_x, k_x, v_x, part, scale, agents=mine)
        rho = (lse_local - (lse_agents if ids is None else lse_agents.index_select(2, ids))).exp()
        work = lse_local.dtype
        fix = rho.index_select(2, own)[..., None] * (local_query.to(work) - local_agent.index_select(2, own).to(work))
        inside = (part.window >= 0)[:, None]
        fix = torch.where(inside, fix, k_shortcut * v_x.to(work))  # a token in no window: AgentSD's shortcut
        return broadcast.to(work) + fix
    far = sdpa_lse(q_x, agent, agent_value, mask, scale**k_scale2)
    if part.reach:  # the agents of the query's whole neighbourhood taken out (one process: ids is None)
        wide = None if bias is None else bias.expand(q_x.shape[0], -1)
        dup = _windowed(q_x, agent, agent_value, part, scale**k_scale2, wide, keys=part.near_windows)
        return _combine(far, _windowed(q_x, k_x, v_x, part, scale), dup)
    own = own if ids is None else ids.index_select(0, own)  # the own window's agent
    work = far[1].dtype
    lse_own = (q_x.to(work) * agent.index_select(2, own).to(work)).sum(-1) * scale**k_scale2
    if bias is not None:
        lse_own = lse_own + bias.to(work).index_select(1, own)[:, None]
    lse_own = lse_own.masked_fill(part.window < 0, -math.inf)
    dup = (agent_value.index_select(2, own), lse_own)
    return _combine(far, _windowed(q_x, k_x, v_x, part, scale), dup)
