import pytest
import torch
from reference import dst_positions

from agentsd.merge import match, merge, merge_rows, partition, random_windows, unmerge


def test_partition_puts_one_dst_per_window_then_all_src():
    h, w, sx, sy = 11, 9, 2, 3  # ragged rows and columns
    counter = torch.zeros((), dtype=torch.long)
    windows = random_windows(h, w, sx, sy, seed=5, counter=counter)
    assert windows.shape == (h // sy, w // sx) and counter == 1
    order = partition(h, w, sx, sy, windows)
    num_dst = (h // sy) * (w // sx)
    assert sorted(order[:num_dst].tolist()) == sorted(dst_positions(h, w, sx, sy, windows))
    assert sorted(order.tolist()) == list(range(h * w))
    assert sorted(partition(h, w, sx, sy)[:num_dst].tolist()) == sorted(dst_positions(h, w, sx, sy, None))


def test_random_windows_are_reproducible_and_spread():
    def draw(seed, count):
        return random_windows(64, 64, 4, 4, seed, torch.tensor(count))

    assert torch.equal(draw(1, 0), draw(1, 0))
    assert not torch.equal(draw(1, 0), draw(1, 1))
    assert not torch.equal(draw(1, 0), draw(2, 0))
    counts = torch.bincount(torch.cat([draw(0, c).flatten() for c in range(40)]), minlength=16).float()
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()  # 10,240 draws


def test_merge_and_unmerge_follow_the_ranking():
    torch.manual_seed(0)
    B, h, w, C = 2, 6, 8, 5
    x = torch.randn(B, h * w, C)
    order = partition(h, w, 2, 2)
    m = match(x, order, 12)
    sims = torch.nn.functional.normalize(x, dim=-1)
    best = (sims[:, m.src_ranked[0]] @ sims[:, m.dst].transpose(1, 2)).max(-1)  # for batch 0's ranking
    assert torch.all(best.values[0, :-1] >= best.values[0, 1:])
    assert torch.equal(best.indices[0], m.dst_of_ranked[0])

    r = 10
    rows = merge_rows(m, r)
    merged = merge(x, rows, h * w - r)
    assert merged.shape == (B, h * w - r, C)
    b, slot = 1, int(m.dst_of_ranked[1, 0])
    members = [int(m.dst[slot])] + [int(p) for p, s in zip(m.src_ranked[b, :r], m.dst_of_ranked[b, :r]) if s == slot]
    assert len(members) >= 2
    dst_row = h * w - 12 - r + slot  # unmerged src rows first, then the dst rows
    assert torch.allclose(merged[b, dst_row], x[b, members].mean(0))
    unmerged = m.src_ranked[b, r:]
    assert torch.equal(merged[b, : h * w - 12 - r], x[b, unmerged])

    back = unmerge(merged, rows)
    assert back.shape == x.shape
    for p in members:  # the dst and every src merged into it share the merged row
        assert torch.equal(back[b, p], merged[b, dst_row])
    assert torch.equal(back[b, unmerged], x[b, unmerged])  # unmerged src keep their own
    identity = merge_rows(m, 0)
    assert torch.equal(unmerge(merge(x, identity, h * w), identity), x)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 30])
def test_match_in_chunks_equals_the_similarity_formula(monkeypatch, chunk):
    import agentsd.merge as merge_module

    monkeypatch.setattr(merge_module, "MATCH_CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(chunk)
    h, w, sx, sy = 6, 10, 2, 3
    metric = torch.randn(2, h * w, 5, generator=gen, dtype=torch.float64)
    order = partition(h, w, sx, sy, torch.randint(0, sx * sy, (h // sy, w // sx), generator=gen))
    num_dst = (h // sy) * (w // sx)
    m = match(metric, order, num_dst)
    for b in range(2):  # each src picks its most similar dst by cosine; ranked by that similarity, best first
        unit = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        sims = unit[order[num_dst:]] @ unit[order[:num_dst]].T
        best, choice = sims.max(dim=-1)
        rank = best.argsort(descending=True)
        assert torch.equal(m.src_ranked[b], order[num_dst:][rank])
        assert torch.equal(m.dst_of_ranked[b], choice[rank])
