"""agentsd beside diffusers' context parallelism, checked with CPU processes over gloo (DESIGN.md §13).

Agent attention does not act under context parallelism yet: in either order (``apply`` then ``enable_parallelism``,
or the other way) the transformer must run diffusers' own context-parallel attention, equal to one process's vanilla
output, and say once why agentsd stands aside; ``remove`` leaves plain context parallelism, and
``set_attention_backend`` reaches the processors agentsd wraps. Each test spawns its ranks on a free port and is
bounded in time; no process outlives it.
"""

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.multiprocess

TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world: int, *args) -> None:
    """``fn(rank, world, *args)`` in ``world`` spawned processes joined in one gloo group; fails on an error or on
    ``TIMEOUT_S``, and kills what is left."""
    port = _free_port()
    context = mp.start_processes(
        _rank_main, args=(fn, world, port, *args), nprocs=world, join=False, start_method="spawn"
    )
    try:
        for _ in range(TIMEOUT_S):
            if context.join(timeout=1):
                return
        raise TimeoutError(f"{world} ranks still running after {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _rank_main(rank, fn, world, port, *args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # diffusers places rank r on device r % device_count, 0 on a CPU-only torch: one CPU "device" per rank (a CPU gap)
    torch.accelerator.device_count = lambda: 1
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _model_and_inputs(family):
    from test_dit import flux_inputs, phases, tiny_flux, tiny_wan, wan_inputs

    if family == "flux":
        kwargs = flux_inputs(2, [(8, 12)], 0.9)
        g = torch.Generator().manual_seed(5)  # six text tokens: the plan splits the text across the ranks too
        kwargs.update(encoder_hidden_states=torch.randn(2, 6, 32, generator=g), txt_ids=torch.zeros(6, 3))
        return tiny_flux(), kwargs, phases("pooled", (1, 4, 4), (1, 2, 2))
    return tiny_wan(), wan_inputs(2, 4, 4, 8, 900), phases("pooled", (2, 2, 2), (1, 2, 2))


def _forward(model, kwargs):
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


def _orders(rank, world, family, order, folder):
    from diffusers import ContextParallelConfig

    import agentsd

    model, kwargs, schedule = _model_and_inputs(family)
    config = ContextParallelConfig(ulysses_degree=world)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if order == "apply-first":
            agentsd.apply(model, schedule, blocks=range(3), seed=0)
            model.enable_parallelism(config=config)
        else:
            model.enable_parallelism(config=config)
            agentsd.apply(model, schedule, blocks=range(3), seed=0)
        out = _forward(model, kwargs)
        _forward(model, kwargs)
    said = [w for w in caught if "context parallelism" in str(w.message)]
    agentsd.remove(model)
    removed = _forward(model, kwargs)
    if rank == 0:
        torch.save({"out": out, "removed": removed, "said": len(said)}, folder / "rank0.pt")


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("order", ["apply-first", "parallel-first"])
def test_either_order_runs_diffusers_context_parallelism(family, order, tmp_path):
    run_ranks(_orders, 2, family, order, tmp_path)
    result = torch.load(tmp_path / "rank0.pt")
    model, kwargs, _ = _model_and_inputs(family)
    vanilla = _forward(model, kwargs)
    torch.testing.assert_close(result["out"], vanilla, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result["removed"], vanilla, atol=1e-5, rtol=1e-5)
    assert result["said"] == 1  # once, not once per call


def test_set_attention_backend_reaches_the_wrapped_processors():
    from test_dit import phases, tiny_flux

    import agentsd

    model = tiny_flux()
    agentsd.apply(model, phases("pooled", (1, 4, 4), (1, 2, 2)), blocks=range(4))
    model.set_attention_backend("_native_math")
    for attn in (b.attn for b in [*model.transformer_blocks, *model.single_transformer_blocks]):
        assert attn.processor.original._attention_backend == "_native_math"
    agentsd.remove(model)
    assert all(b.attn.processor._attention_backend == "_native_math" for b in model.transformer_blocks)
