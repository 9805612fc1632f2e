"""Token matching and merging: pure tensor code, no diffusers.

The h×w token grid is cut into sy×sx windows. One token per window is *dst*, all
others (the ragged border too) are *src*. Each src token picks its most similar
dst; src tokens are ranked by that similarity. Merging the top-k ranked src
tokens into their dst (unweighted mean) gives ToMe's reduced set (k = r) and
AgentSD's agents (k = agent_r) from one ranking.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Matching", "match", "merge", "partition", "random_windows", "unmerge"]


class Matching(NamedTuple):
    """Index tensors of one matching, shared by every merge/unmerge that uses it.

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


def match(metric: torch.Tensor, order: torch.Tensor, num_dst: int) -> Matching:
    """Rank src tokens by cosine similarity to their most similar dst token.

    Args:
        metric: ``(B, N, C)`` features to match on.
        order: ``(N,)`` positions ``[dst..., src...]`` from :func:`partition`.
        num_dst: how many leading entries of ``order`` are dst.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    dst, src = order[:num_dst], order[num_dst:]
    scores = metric[:, src] @ metric[:, dst].transpose(1, 2)
    best, best_dst = scores.max(dim=-1)
    rank = best.argsort(dim=-1, descending=True)
    return Matching(dst, src[rank], best_dst.gather(1, rank))


def merge(x: torch.Tensor, m: Matching, k: int) -> torch.Tensor:
    """Merge the top-``k`` ranked src tokens of ``x`` (B×N×C) into their dst.

    Returns ``(B, N - k, C)``: the unmerged src tokens in rank order, then the dst
    tokens, each the mean of itself and the src tokens merged into it.
    """
    B, _, C = x.shape
    src = x.gather(1, m.src_ranked[..., None].expand(B, -1, C))
    dst = x[:, m.dst]
    if k > 0:
        dst = dst.scatter_reduce(1, m.dst_of_ranked[:, :k, None].expand(B, k, C), src[:, :k], reduce="mean")
    return torch.cat([src[:, k:], dst], dim=1)


def unmerge(x: torch.Tensor, m: Matching, k: int) -> torch.Tensor:
    """Inverse of :func:`merge` for outputs: every token takes the row it was merged into."""
    B, _, C = x.shape
    num_src = m.num_src
    unmerged = num_src - k
    src_rows = torch.cat(
        [unmerged + m.dst_of_ranked[:, :k], torch.arange(unmerged, device=x.device).expand(B, unmerged)], dim=1
    )
    rows = torch.empty(B, num_src + m.dst.shape[0], dtype=torch.long, device=x.device)
    rows.scatter_(1, m.src_ranked, src_rows)
    rows[:, m.dst] = torch.arange(unmerged, unmerged + m.dst.shape[0], device=x.device)
    return x.gather(1, rows[..., None].expand(B, -1, C))
