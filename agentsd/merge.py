"""Token matching and merging: pure tensor code, no diffusers.

The h×w token grid is cut into sy×sx windows. One token per window is *dst*, all
others (the ragged border too) are *src*. Each src token picks its most similar
dst; src tokens are ranked by that similarity. Merging the top-k ranked src
tokens into their dst (unweighted mean) gives ToMe's reduced set (k = r) and
AgentSD's agents (k = agent_r) from one ranking.

A merge is described by one ``(B, N)`` map from each token to its row in the
merged set: merging sums tokens into their rows and divides by the row counts,
unmerging copies each row back to every token that went into it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Matching", "Merge", "match", "merge", "merge_rows", "partition", "random_windows", "unmerge"]


class Matching(NamedTuple):
    """Index tensors of one matching, shared by every merge that uses it.

    Attributes:
        dst: ``(Nd,)`` token positions of the dst tokens.
        src_ranked: ``(B, Ns)`` token positions of the src tokens, most similar first.
        dst_of_ranked: ``(B, Ns)`` the dst slot (index into ``dst``) each ranked src chose.
    """

    dst: torch.Tensor
    src_ranked: torch.Tensor
    dst_of_ranked: torch.Tensor

    @property
    def num_src(self) -> int:
        return self.src_ranked.shape[1]


def random_windows(h: int, w: int, sx: int, sy: int, seed: int, counter: torch.Tensor) -> torch.Tensor:
    """Draw the dst offset of each window, ``(h // sy, w // sx)`` ints in ``[0, sx·sy)``, and advance ``counter``.

    A counter-based hash of ``(seed, counter, window)`` instead of a ``torch.Generator``:
    generators break ``torch.compile`` graphs, and this keeps the draws private (the
    global RNG that samples the user's noise is left alone) and reproducible.
    """
    num = (h // sy) * (w // sx)
    key = ((seed * 0x9E3779B1) & 0xFFFFFFFF) + (((counter & 0xFFFFFFFF) * 0x7FEB352D) & 0xFFFFFFFF)
    draws = _hash32(_hash32(key + torch.arange(num, device=counter.device)))
    counter.add_(1)
    return (draws % (sx * sy)).view(h // sy, w // sx)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Integer hash on ``[0, 2³²)`` in int64; every product stays below 2⁶³, so no overflow."""
    x = x & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def partition(h: int, w: int, sx: int, sy: int, windows: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Order the ``h·w`` token positions as ``[dst..., src...]``.

    Args:
        windows: dst offset ``dy·sx + dx`` inside each window, ``(h // sy, w // sx)``;
            ``None`` takes the top-left token of every window.

    Returns:
        ``(h·w,)`` long tensor; its first ``(h // sy)·(w // sx)`` entries are the dst positions.
    """
    hsy, wsx = h // sy, w // sx
    if windows is None:
        offset = torch.zeros(hsy, wsx, dtype=torch.long, device=device)
    else:
        offset = windows.to(device=device, dtype=torch.long)
    rows = torch.arange(hsy, device=offset.device)[:, None] * sy + offset // sx
    cols = torch.arange(wsx, device=offset.device)[None, :] * sx + offset % sx
    is_src = torch.ones(h * w, dtype=torch.uint8, device=offset.device)
    is_src[(rows * w + cols).flatten()] = 0
    # Stable sort keeps a fixed order inside each group and a static shape (no nonzero()).
    return torch.argsort(is_src, stable=True)


MATCH_CHUNK_ELEMENTS = 1 << 24  # similarity scores held at once, at least: 32 MiB in fp16


def match(metric: torch.Tensor, order: torch.Tensor, num_dst: int) -> Matching:
    """Rank src tokens by cosine similarity to their most similar dst token.

    The ``B × Ns × Nd`` similarities are taken a chunk of src tokens at a time, each chunk no
    larger than the metric itself (or ``MATCH_CHUNK_ELEMENTS``): at 2048² they would otherwise
    outweigh everything else a fused-attention UNet holds (O(N²) where flash attention is O(N)).

    Args:
        metric: ``(B, N, C)`` features to match on.
        order: ``(N,)`` positions ``[dst..., src...]`` from :func:`partition`.
        num_dst: how many leading entries of ``order`` are dst.
    """
    dst, src = order[:num_dst], order[num_dst:]
    norm = metric.norm(dim=-1)
    dst_unit = metric.index_select(1, dst) / norm.index_select(1, dst)[..., None]
    src_tokens = metric.index_select(1, src)
    B, num_src = src_tokens.shape[:2]
    step = max(1, max(metric.numel(), MATCH_CHUNK_ELEMENTS) // max(1, B * num_dst))
    # Dividing by the src norms after the max leaves each argmax unchanged and skips a B×Ns×C division.
    if step >= num_src:
        best, best_dst = (src_tokens @ dst_unit.transpose(1, 2)).max(dim=-1)
    else:
        chunks = [(c @ dst_unit.transpose(1, 2)).max(dim=-1) for c in src_tokens.split(step, dim=1)]
        best, best_dst = torch.cat([c.values for c in chunks], 1), torch.cat([c.indices for c in chunks], 1)
    rank = (best / norm.index_select(1, src)).argsort(dim=-1, descending=True)
    return Matching(dst, src[rank], best_dst.gather(1, rank))


def merge_rows(m: Matching, k: int) -> torch.Tensor:
    """``(B, N)`` row of each token once the top-``k`` ranked src tokens are merged into their dst.

    Rows ``0 .. Ns-k-1`` hold the unmerged src tokens in rank order, rows ``Ns-k ..`` the dst tokens.
    """
    B, num_src = m.src_ranked.shape
    unmerged = num_src - k
    device = m.src_ranked.device
    src_rows = torch.cat([unmerged + m.dst_of_ranked[:, :k], torch.arange(unmerged, device=device).expand(B, -1)], 1)
    rows = torch.empty(B, num_src + m.dst.shape[0], dtype=torch.long, device=device)
    rows.scatter_(1, m.src_ranked, src_rows)
    rows[:, m.dst] = torch.arange(unmerged, unmerged + m.dst.shape[0], device=device)
    return rows


class Merge:
    """One merge of ``(B, N)`` tokens into ``size`` rows (``rows`` from :func:`merge_rows`), its index work done once.

    A block that merges its attention, cross-attention and feed-forward inputs with one
    map pays for the flat indices and the row counts once, not once per sublayer.
    """

    def __init__(self, rows: torch.Tensor, size: int):
        B, N = rows.shape
        self.rows, self.size, self.shape = rows, size, (B, N)
        self.flat = (rows + size * torch.arange(B, device=rows.device)[:, None]).flatten()
        self._counts: dict[torch.dtype, torch.Tensor] = {}

    def _row_counts(self, x: torch.Tensor) -> torch.Tensor:
        counts = self._counts.get(x.dtype)
        if counts is None:
            B, N = self.shape
            counts = x.new_zeros(B * self.size).index_add_(0, self.flat, x.new_ones(B * N))[:, None]
            self._counts[x.dtype] = counts
        return counts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Average the tokens of ``x`` (B×N×C) that share a row: ``(B, size, C)``."""
        B, N, C = x.shape
        sums = x.new_zeros(B * self.size, C).index_add_(0, self.flat, x.reshape(B * N, C))
        return (sums / self._row_counts(x)).view(B, self.size, C)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """Give every token the row of ``x`` (B×size×C) it was merged into: ``(B, N, C)``."""
        B, size, C = x.shape
        return x.reshape(B * size, C).index_select(0, self.flat).view(B, -1, C)


def merge(x: torch.Tensor, rows: torch.Tensor, size: int) -> torch.Tensor:
    """Average the tokens of ``x`` (B×N×C) that share a row: ``(B, size, C)``."""
    return Merge(rows, size)(x)


def unmerge(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Give every token the row of ``x`` (B×size×C) it was merged into: ``(B, N, C)``."""
    return Merge(rows, x.shape[1]).unmerge(x)
