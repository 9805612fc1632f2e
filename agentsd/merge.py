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

__all__ = [
    "Groups",
    "Matching",
    "Merge",
    "assign",
    "dst_grid",
    "match",
    "merge",
    "merge_rows",
    "random_windows",
    "unmerge",
    "window_draws",
]


class Matching(NamedTuple):
    """Index tensors of one matching, shared by every merge that uses it.

    Attributes:
        dst: ``(Nd,)`` token positions of the dst tokens.
        src_ranked: ``(B, Ns)`` token positions of the src tokens, most similar first.
        dst_of_ranked: ``(B, Ns)`` the dst slot (index into ``dst``) each ranked src chose.
        choice: ``(B, N)`` the dst slot every token chose (a dst token's own entry is not its slot).
    """

    dst: torch.Tensor
    src_ranked: torch.Tensor
    dst_of_ranked: torch.Tensor
    choice: torch.Tensor

    @property
    def num_src(self) -> int:
        return self.src_ranked.shape[1]


def random_windows(h: int, w: int, sx: int, sy: int, seed: int, counter: torch.Tensor) -> torch.Tensor:
    """Draw the dst offset of each window, ``(h // sy, w // sx)`` ints in ``[0, sx·sy)``, and advance ``counter``.

    A counter-based hash of ``(seed, counter, window)`` instead of a ``torch.Generator``:
    generators break ``torch.compile`` graphs, and this keeps the draws private (the
    global RNG that samples the user's noise is left alone) and reproducible.
    """
    draws = window_draws(h, w, sx, sy, seed, counter.view(1))[0]
    counter.add_(1)
    return draws


def window_draws(h: int, w: int, sx: int, sy: int, seed: int, counters: torch.Tensor) -> torch.Tensor:
    """The dst offsets :func:`random_windows` draws at each of ``counters`` (K,): ``(K, h // sy, w // sx)``.

    Draw ``c`` of window ``i`` is ``hash(hash(key(seed, c) + i)) mod sx·sy`` with ``key(seed, c) =
    (seed·0x9E3779B1 mod 2³²) + (c·0x7FEB352D mod 2³²)`` and the hash of :func:`_hash32`.
    """
    num = (h // sy) * (w // sx)
    key = ((seed * 0x9E3779B1) & 0xFFFFFFFF) + (((counters & 0xFFFFFFFF) * 0x7FEB352D) & 0xFFFFFFFF)
    draws = _hash32(_hash32(key[:, None] + torch.arange(num, device=counters.device)))
    return (draws % (sx * sy)).view(-1, h // sy, w // sx)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Integer hash on ``[0, 2³²)`` in int64; every product stays below 2⁶³, so no overflow."""
    x = x & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def dst_grid(h: int, w: int, sx: int, sy: int, windows: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Token positions of the dst tokens, one per window in row-major window order, without sorting.

    Args:
        windows: dst offsets ``dy·sx + dx`` inside each window, ``(..., h // sy, w // sx)``; ``None`` takes
            the top-left token of every window.

    Returns:
        ``(..., (h // sy)·(w // sx))`` long tensor.
    """
    hsy, wsx = h // sy, w // sx
    corner = torch.arange(hsy, device=device)[:, None] * (sy * w) + torch.arange(wsx, device=device) * sx
    if windows is None:
        return corner.flatten()
    offset = windows.to(device=device, dtype=torch.long)
    return (corner + (offset // sx) * w + offset % sx).flatten(-2)


MATCH_CHUNK_ELEMENTS = 1 << 24  # similarity scores held at once, at least: 32 MiB in fp16


def match(metric: torch.Tensor, dst: torch.Tensor) -> Matching:
    """Rank src tokens by cosine similarity to their most similar dst token.

    Every token is scored against the dst tokens and the dst tokens' own scores are set to -inf, so one
    descending sort ranks the src tokens and leaves the dst last: no partition of the grid is needed.
    The ``B × N × Nd`` similarities are taken a chunk of tokens at a time, each chunk no larger than
    the metric itself (or ``MATCH_CHUNK_ELEMENTS``): at 2048² they would otherwise outweigh everything
    else a fused-attention UNet holds (O(N²) where flash attention is O(N)).

    Args:
        metric: ``(B, N, C)`` features to match on.
        dst: ``(Nd,)`` token positions of the dst tokens (:func:`dst_grid`); every other token is src.
    """
    B, N, _ = metric.shape
    num_dst = dst.shape[0]
    norm = metric.norm(dim=-1)
    dst_unit = metric.index_select(1, dst) / norm.index_select(1, dst)[..., None]
    step = max(1, max(metric.numel(), MATCH_CHUNK_ELEMENTS) // max(1, B * num_dst))
    # Dividing by the token norms after the max leaves each argmax unchanged and skips a B×N×C division.
    if step >= N:
        best, choice = (metric @ dst_unit.transpose(1, 2)).max(dim=-1)
    else:
        chunks = [(c @ dst_unit.transpose(1, 2)).max(dim=-1) for c in metric.split(step, dim=1)]
        best, choice = torch.cat([c.values for c in chunks], 1), torch.cat([c.indices for c in chunks], 1)
    score = (best / norm).index_fill_(1, dst, float("-inf"))
    ranked = score.argsort(dim=-1, descending=True)[:, : N - num_dst]
    return Matching(dst, ranked, choice.gather(1, ranked), choice)


def assign(metric: torch.Tensor, dst: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
    """The dst slot of every token when every src token is merged into its most similar dst: ``(B, N)``.

    The full merge of ToMe's bipartite matching (``k`` = every src token), which needs no ranking: each
    token takes the dst of largest cosine similarity, each dst token its own slot.

    Args:
        metric: ``(B, N, C)`` features to match on.
        dst: ``(Nd,)`` token positions of the dst tokens (:func:`dst_grid`).
        slots: ``torch.arange(Nd)`` on ``dst``'s device, if the caller keeps one.
    """
    dst_tokens = metric.index_select(1, dst)
    dst_unit = dst_tokens / dst_tokens.norm(dim=-1, keepdim=True)
    B, N, _ = metric.shape
    step = max(1, max(metric.numel(), MATCH_CHUNK_ELEMENTS) // max(1, B * dst.shape[0]))
    # The token's own norm is left out: it scales a row and leaves its argmax as it is.
    if step >= N:
        best = (metric @ dst_unit.transpose(1, 2)).argmax(dim=-1)
    else:
        best = torch.cat([(c @ dst_unit.transpose(1, 2)).argmax(dim=-1) for c in metric.split(step, dim=1)], 1)
    slots = torch.arange(dst.shape[0], device=dst.device) if slots is None else slots
    return best.index_copy_(1, dst, slots.expand(B, -1))


DENSE_GROUP_ELEMENTS = 1 << 25  # largest B·Nd·N averaged by one batched matrix product instead of index_add
# On a CPU the product's B·Nd·N·C multiply-adds cost more than the two ops it saves (a CPU is not bound by launches):
# there groups sum with index_add unless this is set (`agentsd bench ops` sets it to count what a GPU runs).
DENSE_ON_CPU = False


class Groups:
    """The mean of each group of tokens that share a slot (``slots`` from :func:`assign`), its index work done once.

    ``mass``: ``(B, N)`` weight of each token in its group's mean (say, how many tokens a merged row stands for,
    so that a group of merged rows averages the tokens they hold); ``None`` weighs every token alike.

    On accelerators small merges (``B·size·N`` up to ``DENSE_GROUP_ELEMENTS``) are one batched product with a
    ``(B, size, N)`` averaging matrix, one kernel where ``index_add`` takes three; larger ones, where that matrix
    would outweigh the tokens, and every merge on a CPU (``DENSE_ON_CPU``), sum with ``index_add``.
    """

    def __init__(self, slots: torch.Tensor, size: int, mass: torch.Tensor | None = None):
        self.slots, self.size = slots, size
        B, N = self.shape = slots.shape
        launch_bound = slots.device.type != "cpu" or DENSE_ON_CPU
        self.dense = launch_bound and B * size * N <= DENSE_GROUP_ELEMENTS
        self._weights: dict[torch.dtype, torch.Tensor] = {}
        if self.dense:
            members = slots[:, None, :] == torch.arange(size, device=slots.device)[:, None]
            self._members = members if mass is None else members * mass[:, None, :].float()
        else:
            self.flat = (slots + torch.arange(0, B * size, size, device=slots.device)[:, None]).flatten()
            self._mass = torch.ones(B * N, device=slots.device) if mass is None else mass.float().flatten()
            self._sizes = torch.zeros(B * size, device=slots.device).index_add_(0, self.flat, self._mass)
            self._group_mass = self._sizes.index_select(0, self.flat)

    def sizes(self) -> torch.Tensor:
        """How many tokens each group holds (their masses' sum where given): ``(B, size)`` float32."""
        if self.dense:
            return self._members.sum(dim=-1, dtype=torch.float32)
        return self._sizes.view(self.shape[0], self.size)

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self._weights.get(dtype)
        if weight is None:
            # fp16/bf16 weights rounded once, from fp32 (torch.promote_types would be one more dispatched op)
            work = torch.float64 if dtype == torch.float64 else torch.float32
            if self.dense:
                # bool members (true division makes them float) or the members' masses
                members = self._members if work == torch.float32 else self._members.to(work)
                weight = (members / members.sum(dim=-1, keepdim=True)).to(dtype)
            else:
                weight = (self._mass.to(work) / self._group_mass.to(work)).view(*self.shape, 1).to(dtype)
            self._weights[dtype] = weight
        return weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Average the tokens of ``x`` (B×N×C) that share a slot: ``(B, size, C)``."""
        B, N, C = x.shape
        if self.dense:
            return self._weight(x.dtype) @ x
        weighted = (x * self._weight(x.dtype)).reshape(B * N, C)
        return x.new_zeros(B * self.size, C).index_add_(0, self.flat, weighted).view(B, self.size, C)


def merge_rows(m: Matching, k: int) -> torch.Tensor:
    """``(B, N)`` row of each token once the top-``k`` ranked src tokens are merged into their dst.

    Rows ``0 .. Ns-k-1`` hold the unmerged src tokens in rank order, rows ``Ns-k ..`` the dst tokens. When
    every src token merges (``k >= Ns``) the rows are the dst slots: each token's choice, each dst its own.
    """
    B, num_src = m.src_ranked.shape
    device = m.src_ranked.device
    num_dst = m.dst.shape[0]
    if k >= num_src:
        return m.choice.index_copy(1, m.dst, torch.arange(num_dst, device=device).expand(B, -1))
    unmerged = num_src - k
    src_rows = torch.cat([unmerged + m.dst_of_ranked[:, :k], torch.arange(unmerged, device=device).expand(B, -1)], 1)
    rows = torch.empty(B, num_src + num_dst, dtype=torch.long, device=device)
    rows.scatter_(1, m.src_ranked, src_rows)
    rows[:, m.dst] = torch.arange(unmerged, unmerged + num_dst, device=device)
    return rows


class Merge:
    """One merge of ``(B, N)`` tokens into ``size`` rows (``rows`` from :func:`merge_rows`), its index work done once.

    A block that merges its attention, cross-attention and feed-forward inputs with one
    map pays for the flat indices and the row counts once, not once per sublayer.
    """

    def __init__(self, rows: torch.Tensor, size: int):
        B, N = rows.shape
        self.rows, self.size, self.shape = rows, size, (B, N)
        self.flat = (rows + torch.arange(0, B * size, size, device=rows.device)[:, None]).flatten()
        self._counts: dict[torch.dtype, torch.Tensor] = {}

    def counts(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """How many tokens each row holds: ``(B, size)``, computed once per dtype."""
        counts = self._counts.get(dtype)
        if counts is None:
            B, N = self.shape
            ones = torch.ones(B * N, dtype=dtype, device=self.rows.device)
            counts = torch.zeros(B * self.size, dtype=dtype, device=self.rows.device).index_add_(0, self.flat, ones)
            counts = self._counts[dtype] = counts.view(B, self.size)
        return counts

    def sizes(self) -> torch.Tensor:
        """How many tokens each row holds: ``(B, size)`` float32 (as :meth:`Groups.sizes`)."""
        return self.counts(torch.float32)

    def coarser(self, rows: torch.Tensor, size: int) -> Groups:
        """The groups of a coarser merge of the same tokens (``rows`` into ``size``, every row of this merge inside
        one of them) as groups of this merge's rows, weighed by the tokens each holds: averaging this merge's
        output by them equals averaging the tokens by ``rows``."""
        slot_of_row = rows.new_empty(self.shape[0], self.size).scatter_(1, self.rows, rows)
        return Groups(slot_of_row, size, mass=self.counts())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Average the tokens of ``x`` (B×N×C) that share a row: ``(B, size, C)``."""
        B, N, C = x.shape
        sums = x.new_zeros(B * self.size, C).index_add_(0, self.flat, x.reshape(B * N, C))
        return (sums / self.counts(x.dtype).view(-1, 1)).view(B, self.size, C)

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
