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

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .merge import Groups, _hash32, assign

__all__ = ["Layout", "Window", "agent_attention", "dst_positions", "pool", "random_offsets", "window_of"]


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

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, text)`` parts of ``x`` along dim 1."""
        if self.text_first:
            return x[:, self.text :], x[:, : self.text]
        return x[:, : self.image], x[:, self.image :]

    def join(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return torch.cat([text, image] if self.text_first else [image, text], dim=1)


def window_of(grid: tuple[int, int, int], window: Window) -> Window:
    """The window as it applies to ``grid``: shrunk to the grid where the grid is smaller."""
    f, h, w = grid
    return Window(min(window.st, f), min(window.sy, h), min(window.sx, w))


def pool(x: torch.Tensor, grids, window: Window) -> torch.Tensor:
    """Mean of ``x`` (B×N×... image tokens) over every whole window of each grid: ``(B, n, ...)``, grid by grid,
    windows frame-major then row-major."""
    B, rest = x.shape[0], x.shape[2:]
    pooled, start = [], 0
    for grid in grids:
        f, h, w = grid
        st, sy, sx = window_of(grid, window)
        cube = x[:, start : start + f * h * w].view(B, f, h, w, *rest)
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


def dst_positions(grids, window: Window, offsets: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Token positions (among the image tokens) of one dst per window: the window's first token, or the one at
    ``offsets`` (``dt·sy·sx + dy·sx + dx``, from :func:`random_offsets`). ``(num_windows,)`` long."""
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


def _key_mask(layout: Layout, text_mask: torch.Tensor | None, image: int) -> torch.Tensor | None:
    """SDPA's boolean mask ``(B, 1, 1, keys)`` over ``image`` image keys and the layout's text keys, or ``None``."""
    if text_mask is None:
        return None
    text_mask = text_mask.to(torch.bool)
    image_mask = text_mask.new_ones(text_mask.shape[0], image)
    mask = torch.cat([text_mask, image_mask] if layout.text_first else [image_mask, text_mask], dim=1)
    return mask[:, None, None, :]


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
) -> torch.Tensor:
    """Attention of ``(B, S, heads, head_dim)`` queries, keys and values laid out as ``layout``, through agents.

    Args:
        agents: averages groups of image tokens (``(B, N, C) -> (B, n, C)``): the agents are its mean of the
            image queries (:func:`pool` or :func:`tome_groups`, bound to the grids).
        keys_of: averages groups of image tokens for the keys and values alone (the late phase: no agents).
            Neither: plain softmax attention of every query over every key.
        scale: the model's softmax scale (``head_dim^-1/2`` if ``None``).
        upcast: compute both softmax products in float32.
        text_mask: ``(B, text)`` bool, the text keys to attend to (Qwen-Image's padded prompts); ``None``: all.
            Only the softmaxes over the keys read it (the agents' gather, the text queries, the late phase).

    Returns:
        ``(B, S, heads, head_dim)`` in the input's dtype and layout.
    """
    if agents is not None and keys_of is not None:
        raise ValueError("agent_attention takes agents or keys_of, not both")
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
        k_image = _heads_mean(keys_of, k_image)
        key, value = layout.join(k_image, k_text), layout.join(_heads_mean(keys_of, v_image), v_text)
        mask = _key_mask(layout, text_mask, k_image.shape[1])
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, scale=scale
        )
        return out.transpose(1, 2).to(dtype)
    agent = _heads_mean(agents, q_image).transpose(1, 2)  # (B, H, n, D)
    keys, values = key.transpose(1, 2), value.transpose(1, 2)
    n = agent.shape[2]
    # The agents and the text queries attend over the same keys: one call for both.
    gathered = F.scaled_dot_product_attention(
        torch.cat([agent, q_text.transpose(1, 2)], dim=2),
        keys,
        values,
        attn_mask=_key_mask(layout, text_mask, layout.image),
        scale=scale,
    )
    agent_value, out_text = gathered[:, :, :n], gathered[:, :, n:]
    out_image = F.scaled_dot_product_attention(q_image.transpose(1, 2), agent, agent_value, scale=scale**k_scale2)
    v_image, _ = layout.split(values.transpose(1, 2))
    out_image = torch.add(out_image.transpose(1, 2), v_image, alpha=k_shortcut)
    return layout.join(out_image, out_text.transpose(1, 2)).to(dtype)
