import pytest
import torch
from reference import dst_positions

from agentsd.merge import Groups, assign, dst_grid, match, merge, merge_rows, random_windows, unmerge


def test_dst_grid_puts_one_dst_in_every_whole_window():
    h, w, sx, sy = 11, 9, 2, 3  # ragged rows and columns
    counter = torch.zeros((), dtype=torch.long)
    windows = random_windows(h, w, sx, sy, seed=5, counter=counter)
    assert windows.shape == (h // sy, w // sx) and counter == 1
    assert dst_grid(h, w, sx, sy, windows).tolist() == dst_positions(h, w, sx, sy, windows)
    assert dst_grid(h, w, sx, sy).tolist() == dst_positions(h, w, sx, sy, None)


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
    m = match(x, dst_grid(h, w, 2, 2))
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
    dst = dst_grid(h, w, sx, sy, torch.randint(0, sx * sy, (h // sy, w // sx), generator=gen))
    src = torch.tensor([p for p in range(h * w) if p not in set(dst.tolist())])
    m = match(metric, dst)
    for b in range(2):  # each src picks its most similar dst by cosine; ranked by that similarity, best first
        unit = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        sims = unit[src] @ unit[dst].T
        best, choice = sims.max(dim=-1)
        rank = best.argsort(descending=True)
        assert torch.equal(m.src_ranked[b], src[rank])
        assert torch.equal(m.dst_of_ranked[b], choice[rank])
        assert torch.equal(m.choice[b, src], choice)


@pytest.mark.parametrize("dense", [0, 1 << 25])
def test_full_merge_rows_are_the_dst_slots_and_equal_assign(monkeypatch, dense):
    """Every src merged (k >= Ns): no ranking, each token in its chosen dst's slot, each dst in its own; the same
    groups as :func:`assign`, and their means those of the members."""
    import agentsd.merge as merge_module

    monkeypatch.setattr(merge_module, "DENSE_GROUP_ELEMENTS", dense)  # 0: index_add; else one batched product
    monkeypatch.setattr(merge_module, "DENSE_ON_CPU", True)
    gen = torch.Generator().manual_seed(3)
    h, w, sx, sy = 7, 9, 2, 2
    x = torch.randn(2, h * w, 6, generator=gen, dtype=torch.float64)
    dst = dst_grid(h, w, sx, sy, torch.randint(0, sx * sy, (h // sy, w // sx), generator=gen))
    m = match(x, dst)
    rows = merge_rows(m, m.num_src)
    assert torch.equal(rows, assign(x, dst))
    assert torch.equal(rows[:, dst], torch.arange(len(dst)).expand(2, -1))
    unit = x / x.norm(dim=-1, keepdim=True)
    for b in range(2):
        for p in range(h * w):
            if p not in dst.tolist():
                assert rows[b, p] == (unit[b, p] @ unit[b, dst].T).argmax()
    assert Groups(rows, len(dst)).dense == (dense > 0)
    for groups in (Groups(rows, len(dst)), merge):
        means = groups(x) if groups is not merge else merge(x, rows, len(dst))
        for b in range(2):
            for slot in range(len(dst)):
                assert torch.allclose(means[b, slot], x[b, rows[b] == slot].mean(0))


@pytest.mark.parametrize("dense", [0, 1 << 25])
def test_coarser_groups_of_merged_rows_average_the_tokens(monkeypatch, dense):
    """Agents over merged tokens: a coarser merge's groups, taken over a finer merge's rows and weighed by the
    tokens each row holds, give each coarse group's plain token mean (float64, fresh random tokens)."""
    import agentsd.merge as merge_module
    from agentsd.merge import Merge

    monkeypatch.setattr(merge_module, "DENSE_GROUP_ELEMENTS", dense)
    monkeypatch.setattr(merge_module, "DENSE_ON_CPU", True)
    gen = torch.Generator().manual_seed(11)
    h, w, sx, sy, B = 9, 10, 3, 2, 3  # windows that do not tile the grid
    x = torch.randn(B, h * w, 5, generator=gen, dtype=torch.float64)
    dst = dst_grid(h, w, sx, sy, torch.randint(0, sx * sy, (h // sy, w // sx), generator=gen))
    m = match(x, dst)
    for fine, coarse in ((20, 60), (0, m.num_src), (m.num_src - 1, m.num_src)):
        tokens = Merge(merge_rows(m, fine), h * w - fine)
        coarse_rows = merge_rows(m, coarse)
        groups = tokens.coarser(coarse_rows, h * w - coarse)
        assert groups.dense == (dense > 0)
        assert torch.equal(
            tokens.counts(), torch.stack([torch.bincount(r, minlength=h * w - fine) for r in tokens.rows]).float()
        )
        agents = groups(tokens(x))
        assert agents.shape == (B, h * w - coarse, 5)
        for b in range(B):
            for slot in range(h * w - coarse):
                members = x[b, coarse_rows[b] == slot]
                assert len(members) >= 1
                torch.testing.assert_close(agents[b, slot], members.mean(0), rtol=1e-12, atol=1e-12)
