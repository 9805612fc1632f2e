"""agentsd under diffusers' context parallelism, checked with CPU processes over gloo (DESIGN.md §13).

Each rank holds a contiguous chunk of the sequence; agentsd's sharded agent attention must give the one-process
agentsd output (agents summed across ranks, the gather joined by its log-sum-exp, the late phase's global groups) in
either order of ``apply`` and ``enable_parallelism``, both phases, pooled and merged agents, windows a shard boundary
cuts, Ulysses, ring and a mixed mesh; ``remove`` leaves plain context parallelism. Where the shards cut the near
field's windows agentsd says so once and runs the phase without it. Each test spawns its ranks on a free port and is
bounded in time; no process outlives it.
"""

import dataclasses
import warnings

import pytest
import torch

from agentsd.bench import traffic

pytestmark = pytest.mark.multiprocess


def run_ranks(fn, world: int, *args) -> None:
    """``fn(rank, world, *args)`` in ``world`` spawned CPU processes in one gloo group on a free port, diffusers' CPU
    gaps (device_count, the ring's log-sum-exp) worked around; fails on an error or after 180 s, nothing left."""
    traffic.spawn(fn, world, *args, timeout_s=180)


TIMES = {"flux": (0.9, 0.3), "qwen": (0.9, 0.3), "wan": (900, 300)}  # the agent phase, then the late phase


def _model_and_inputs(family, t):
    from test_dit import flux_inputs, tiny_flux, tiny_wan, wan_inputs

    if family == "flux":
        kwargs = flux_inputs(2, [(8, 12)], t)
        g = torch.Generator().manual_seed(5)  # eight text tokens: the plan splits the text across the ranks too
        kwargs.update(encoder_hidden_states=torch.randn(2, 8, 32, generator=g), txt_ids=torch.zeros(8, 3))
        return tiny_flux(), kwargs
    if family == "qwen":
        from test_qwen import TEXT_DIM, tiny_qwen

        g = torch.Generator().manual_seed(1)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 3:] = 0  # the second prompt padded: its masked keys lie on both ranks' chunks of the text
        return tiny_qwen(), dict(
            hidden_states=torch.randn(2, 96, 8, generator=g),
            encoder_hidden_states=torch.randn(2, 8, TEXT_DIM, generator=g),
            encoder_hidden_states_mask=mask,
            timestep=torch.full((2,), t),
            img_shapes=[[(1, 8, 12)]] * 2,
        )
    return tiny_wan(), wan_inputs(2, 4, 4, 8, t)


OPTIONS = {  # DESIGN §12's options on top of a case's agents ("pooled+both"): the near field acts on every rank
    "": {},
    "both": dict(proportional=True, near=True),
    "near-softmax": dict(proportional=True, near="softmax"),
}


def _schedule(family, agents):
    from test_dit import phases

    agents, _, options = agents.partition("+")
    if family in ("flux", "qwen"):  # 4x4 windows on an 8x12 grid: each of 4 ranks holds two rows of them, cut in half
        schedule = phases(agents, (1, 4, 4), (1, 2, 2))
    else:
        schedule = phases(agents, (2, 2, 2), (1, 2, 2))  # two-frame windows: 4 ranks hold a frame each
    return tuple(dataclasses.replace(phase, **OPTIONS[options]) for phase in schedule)


def _forward(model, kwargs):
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


def _one_process(family, agents):
    import agentsd

    outs = []
    for t in TIMES[family]:
        model, kwargs = _model_and_inputs(family, t)
        agentsd.apply(model, _schedule(family, agents), blocks="all", seed=0)
        outs.append(_forward(model, kwargs))
    return outs


def _sharded(rank, world, family, agents, mesh, folder):
    from diffusers import ContextParallelConfig

    import agentsd

    ring, ulysses = mesh
    result = {}
    for order in ("apply-first", "parallel-first"):
        outs = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t in TIMES[family]:
                model, kwargs = _model_and_inputs(family, t)
                config = ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses)
                if order == "apply-first":
                    agentsd.apply(model, _schedule(family, agents), blocks="all", seed=0)
                    model.enable_parallelism(config=config)
                else:
                    model.enable_parallelism(config=config)
                    agentsd.apply(model, _schedule(family, agents), blocks="all", seed=0)
                outs.append(_forward(model, kwargs))
        result[order] = outs
        result[order + "-said"] = [str(w.message) for w in caught if "agentsd" in str(w.message)]
    agentsd.remove(model)
    result["removed"] = _forward(model, kwargs)
    # diffusers' own context parallelism, agentsd never applied (with a padded prompt it differs from one process)
    model, kwargs = _model_and_inputs(family, TIMES[family][1])
    model.enable_parallelism(config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses))
    result["plain"] = _forward(model, kwargs)
    if rank == 0:
        torch.save(result, folder / "rank0.pt")


@pytest.mark.parametrize(
    "family, agents, mesh",
    [
        ("flux", "pooled+both", (1, 2)),  # Ulysses; the near field's windows whole on each rank
        ("wan", "merged+near-softmax", (2, 1)),  # ring
        ("flux", "merged", (2, 2)),  # a mixed mesh, windows cut by the shards
        ("wan", "pooled", (2, 2)),
        ("qwen", "merged", (1, 2)),  # a padded prompt
    ],
)
def test_sharded_agent_attention_equals_one_process(family, agents, mesh, tmp_path):
    run_ranks(_sharded, mesh[0] * mesh[1], family, agents, mesh, tmp_path)
    result = torch.load(tmp_path / "rank0.pt")
    expected = _one_process(family, agents)
    for order in ("apply-first", "parallel-first"):
        for phase, (out, want) in enumerate(zip(result[order], expected)):
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=f"{order}, phase {phase}")
        assert result[order + "-said"] == []  # nothing left to diffusers
    model, kwargs = _model_and_inputs(family, TIMES[family][1])
    vanilla = _forward(model, kwargs)
    assert (expected[1] - vanilla).abs().max() > 1e-3  # agentsd changed the output: the check above could fail
    torch.testing.assert_close(result["removed"], result["plain"], atol=1e-5, rtol=1e-5)  # remove: plain CP again
    if family != "qwen":  # diffusers' own context parallelism is not exact with Qwen-Image's padded prompt (6e-3)
        torch.testing.assert_close(result["plain"], vanilla, atol=1e-5, rtol=1e-5)


def _near_and_seed(rank, world, folder):
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from test_dit import phases

    import agentsd

    model, kwargs = _model_and_inputs("wan", TIMES["wan"][0])
    # windows of all four frames: each of the two ranks holds half of every one
    schedule = tuple(dataclasses.replace(p, near=True) for p in phases("pooled", (4, 2, 2), (1, 2, 2)))
    agentsd.apply(model, schedule, blocks="all", seed=0)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _forward(model, kwargs)
        _forward(model, kwargs)
    # no seed given: each process draws its own, and every rank must take rank 0's before drawing dst tokens
    model, kwargs = _model_and_inputs("wan", TIMES["wan"][1])
    agentsd.apply(model, _schedule("wan", "merged"), blocks="all")
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    unseeded = _forward(model, kwargs)
    seeds = [None] * world
    dist.all_gather_object(seeds, agentsd.state_of(model).seed)
    if rank == 0:
        result = {"out": out, "said": [str(w.message) for w in caught], "unseeded": unseeded, "seeds": seeds}
        torch.save(result, folder / "rank0.pt")


def test_a_cut_near_field_says_so_and_one_seed_serves_every_rank(tmp_path):
    """Where the near field's windows cross the shards the phase runs without it (sharded agent attention, equal to one
    process of that phase) and says so once; and without a seed every rank takes rank 0's, so the sharded late phase
    equals one process at that seed."""
    from test_dit import phases

    import agentsd

    run_ranks(_near_and_seed, 2, tmp_path)
    result = torch.load(tmp_path / "rank0.pt")
    model, kwargs = _model_and_inputs("wan", TIMES["wan"][0])
    vanilla = _forward(model, kwargs)
    agentsd.apply(model, phases("pooled", (4, 2, 2), (1, 2, 2)), blocks="all", seed=0)  # near=False
    torch.testing.assert_close(result["out"], _forward(model, kwargs), atol=1e-5, rtol=1e-5)
    assert (result["out"] - vanilla).abs().max() > 1e-3  # agentsd acted
    said = [m for m in result["said"] if "near-field windows cross" in m]
    assert len(said) == 1, result["said"]  # once, not once per call
    assert result["seeds"][0] == result["seeds"][1]
    model, kwargs = _model_and_inputs("wan", TIMES["wan"][1])
    agentsd.apply(model, _schedule("wan", "merged"), blocks="all", seed=result["seeds"][0])
    torch.testing.assert_close(result["unseeded"], _forward(model, kwargs), atol=1e-5, rtol=1e-5)


def test_bytes_counted_from_the_collectives_equal_the_formulas(tmp_path):
    """``agentsd bench traffic`` scales per-call formulas to the real models: on a tiny Wan over two ranks they must
    give the bytes counted from every collective (agentsd's phases, diffusers' Ulysses and ring)."""
    rows = traffic.count("wan", 2, tmp_path)
    assert set(rows) == set(traffic.METHODS)
    for method, row in rows.items():
        assert row["bytes"] > 0 and row["bytes"] == pytest.approx(row["formula"], rel=1e-12), method
    assert rows["agents"]["bytes"] < rows["ulysses"]["bytes"] / 2  # only the agents cross


def _compiled(rank, world, folder):
    from agentsd.dit import Layout, Window
    from agentsd.parallel import ShardedPooled, local_partition, shard_of, sharded_agent_attention

    class Mesh:  # what shard_of reads of diffusers' config: the flattened mesh
        def __init__(self):
            import torch.distributed as dist

            self.group = dist.group.WORLD

        def get_group(self):
            return self.group

        def size(self):
            return world

    config = type("C", (), {"context_parallel_config": type("P", (), {"_flattened_mesh": Mesh()})()})()
    grids, text = ((1, 8, 12),), 4
    shard = shard_of(config, 96)
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(2, text + shard.count, 2, 8, generator=g) for _ in range(3))

    def attend(q, k, v):  # with the near field: its windows lie whole on each rank
        agents = ShardedPooled(grids, Window(1, 4, 4), shard, q.device)
        near = local_partition(grids, Window(1, 4, 4), shard, q.device)
        layout = Layout(text, True, grids)
        return sharded_agent_attention(q, k, v, layout, shard, agents=agents, proportional=True, near=near)

    eager = attend(q, k, v)
    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v)  # fails on a graph break
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    if rank == 0:
        (folder / "done").write_text("ok")


def test_sharded_agent_attention_compiles_without_graph_breaks(tmp_path):
    run_ranks(_compiled, 2, tmp_path)
    assert (tmp_path / "done").exists()


def test_configurations_agentsd_does_not_follow_are_named():
    from types import SimpleNamespace

    from agentsd.parallel import unsupported

    mesh = SimpleNamespace(size=lambda: 4)

    def config(**flags):
        flags = {"ulysses_anything": False, "ring_anything": False, **flags}
        return SimpleNamespace(context_parallel_config=SimpleNamespace(_flattened_mesh=mesh, **flags))

    assert unsupported(config(), 96) is None
    assert "unequal chunks" in unsupported(config(ulysses_anything=True), 96)
    assert "unequal chunks" in unsupported(config(ring_anything=True), 96)
    assert "do not split evenly over 4 ranks" in unsupported(config(), 98)


def test_a_near_field_that_reaches_past_its_window_narrows_to_it_under_context_parallelism():
    """``near_reach > 0`` reads the neighbouring windows' keys, which lie on another rank at every shard's edge: no
    rank's partition for it; a context-parallel call runs the phase with the own window's near field instead (which
    shards where the windows lie whole on each rank, as the tests above check), and says so once."""
    from agentsd.dit import Window
    from agentsd.families import DiTState, _AgentProcessor
    from agentsd.parallel import Shard, local_partition
    from agentsd.schedule import Phase

    grids = ((1, 8, 8),)
    shard = Shard(None, 0, 2, 0, 32)  # rows 0-3: the first row of 4x4 windows, whole
    assert local_partition(grids, Window(1, 4, 4), shard, "cpu") is not None
    assert local_partition(grids, Window(1, 4, 4), shard, "cpu", reach=1) is None
    phase = Phase(end=1.0, sx=4, sy=4, ratio=0.9375, tokens="all", near=True, near_reach=1)
    state = DiTState(((phase,),), seed=0)
    state.begin_call(grids, 0.5, 1)
    processor = _AgentProcessor(None, state, 0)
    assert processor._phase(torch.zeros(1)) == phase  # one process: as asked
    state.shard = shard
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert processor._phase(torch.zeros(1)) == dataclasses.replace(phase, near_reach=0)
        assert processor._phase(torch.zeros(1)) == dataclasses.replace(phase, near_reach=0)
    assert [str(w.message).count("does not shard") for w in caught] == [1]
    state.shard = Shard(None, 0, 2, 0, 24)  # rows 0-2: the windows cut, no near field at all
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert processor._phase(torch.zeros(1)) == dataclasses.replace(phase, near=False, near_reach=0)
