"""DESIGN.md §12 on the DiT core: proportional attention, the near field and shifted windows, equal to the float64
reference."""

import dataclasses
import math

import pytest
import torch
from reference_dit import reference_flux, reference_wan
from test_dit import _forward, flux_inputs, phases, tiny_flux, tiny_wan, wan_inputs

import agentsd
from agentsd.dit import Layout, Pooled, Window, agent_attention, sdpa_lse

OPTIONS = {
    "proportional": dict(proportional=True),
    "near": dict(near=True),  # the near field joined as a correction of the broadcast
    "near-softmax": dict(near="softmax"),  # DESIGN §12.2's one softmax
    "both": dict(proportional=True, near=True),
    "both-softmax": dict(proportional=True, near="softmax"),
    "shift": dict(shift=True),
    "all": dict(proportional=True, near=True, shift=True),
    # the near field over the 3x3 windows around the query's own (fewer on a grid of fewer)
    "reach": dict(proportional=True, near=True, near_reach=1),
    "reach-softmax": dict(near="softmax", near_reach=1),
    "reach-all": dict(proportional=True, near=True, shift=True, near_reach=1),
}


def _with(schedule, options):
    return tuple(dataclasses.replace(phase, **options) for phase in schedule)


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize(
    "batch,grids,agents",
    [(1, [(8, 12)], "pooled"), (2, [(6, 10)], "merged"), (2, [(8, 8), (4, 6)], "pooled"), (1, [(8, 8)], "merged")],
)
@pytest.mark.parametrize("t", [0.9, 0.3], ids=["agent-phase", "late-phase"])
def test_flux_options_equal_the_reference(option, batch, grids, agents, t):
    """Text first; windows that tile the grid and ones that leave a ragged border; two grids of other windows."""
    model = tiny_flux()
    schedule = _with(phases(agents, (1, 4, 4), (1, 2, 2)), OPTIONS[option])
    blocks = [1, 3]  # a double-stream block and a single-stream one
    ref = reference_flux(model, schedule, blocks, seed=7)
    agentsd.apply(model, schedule, blocks=blocks, seed=7)
    kwargs = flux_inputs(batch, grids, t)
    out = _forward(model, kwargs)
    torch.testing.assert_close(out.double(), ref(**kwargs), atol=1e-5, rtol=1e-5)
    plain = tiny_flux()
    agentsd.apply(plain, phases(agents, (1, 4, 4), (1, 2, 2)), blocks=blocks, seed=7)
    change = (out - _forward(plain, kwargs)).abs().max()
    if option == "proportional" and agents == "pooled" and t > 0.6:
        assert change < 1e-6  # pooled agents of equal windows: the bias is the same on every agent
    else:
        assert change > 1e-4  # the option acted


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("batch,frames,h,w,agents", [(2, 4, 4, 8, "pooled"), (1, 5, 5, 6, "merged")])
@pytest.mark.parametrize("t", [900, 300], ids=["agent-phase", "late-phase"])
def test_wan_options_equal_the_reference(option, batch, frames, h, w, agents, t):
    """Image only, 3-D windows, frame counts and grids the windows leave ragged."""
    model = tiny_wan()
    schedule = _with(phases(agents, (2, 2, 2), (1, 2, 2)), OPTIONS[option])
    ref = reference_wan(model, schedule, [0, 2], seed=3)
    agentsd.apply(model, schedule, blocks=[0, 2], seed=3)
    kwargs = wan_inputs(batch, frames, h, w, t)
    torch.testing.assert_close(_forward(model, kwargs).double(), ref(**kwargs), atol=1e-5, rtol=1e-5)


def test_equal_groups_without_text_cancel_the_bias():
    """Pooled keys of equal windows, image only: log|g| is the same on every key and leaves the softmax alone."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 48, 2, 8, generator=g) for _ in range(3))
    layout = Layout(0, True, ((1, 6, 8),))
    pooled = Pooled(layout.grids, Window(1, 2, 2))
    plain = agent_attention(q, k, v, layout, keys_of=pooled)
    biased = agent_attention(q, k, v, layout, keys_of=pooled, proportional=True)
    torch.testing.assert_close(biased, plain, atol=1e-6, rtol=1e-6)
    with_text = Layout(4, True, ((1, 6, 8),))
    q2, k2, v2 = (torch.cat([torch.randn(2, 4, 2, 8, generator=g), t], 1) for t in (q, k, v))
    assert (
        agent_attention(q2, k2, v2, with_text, keys_of=pooled, proportional=True)
        - agent_attention(q2, k2, v2, with_text, keys_of=pooled)
    ).abs().max() > 1e-3  # against text keys it does not cancel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sdpa_lse_is_softmax_attention_and_its_log_sum_exp(dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g).to(dtype) for _ in range(3))
    bias = torch.randn(2, 1, 1, 10, generator=g).to(dtype)
    out, lse = sdpa_lse(q, k, v, bias, 0.4)
    logits = q.double() @ k.double().transpose(-1, -2) * 0.4 + bias.double()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(lse.double(), logits.logsumexp(-1), atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), logits.softmax(-1) @ v.double(), atol=tol, rtol=tol)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.dtype == dtype


@pytest.mark.parametrize("agents", ["pooled", "merged"])
def test_near_field_in_half_precision_stays_close_to_float32(agents):
    """The near field merges three softmaxes by their log-sum-exp and takes one out: in bf16 it must stay as close
    to its float32 result as the plain agent phase does to its own."""
    model = tiny_flux()
    schedule = phases(agents, (1, 4, 4), (1, 2, 2))
    errors = {}
    for near in (False, True, "reach"):
        outs = {}
        options = dict(near=bool(near), proportional=bool(near), near_reach=int(near == "reach"))
        for dtype in (torch.float32, torch.bfloat16):
            m = tiny_flux().to(dtype)
            agentsd.apply(m, _with(schedule, options), blocks=[1, 2, 3], seed=1)
            kwargs = flux_inputs(2, [(8, 12)], 0.9)
            kwargs = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in kwargs.items()}
            outs[dtype] = _forward(m, kwargs).float()
        errors[near] = (outs[torch.bfloat16] - outs[torch.float32]).abs().max().item()
    del model
    for near in (True, "reach"):
        assert math.isfinite(errors[near]) and errors[near] < 3 * errors[False] + 1e-2, errors


def test_phase_options_are_checked():
    with pytest.raises(ValueError, match="needs tokens='all'"):
        agentsd.Phase(ratio=0.5, near=True)
    with pytest.raises(TypeError, match="Phase.proportional must be a bool"):
        agentsd.Phase(ratio=0.5, tokens="all", proportional=1)
    with pytest.raises(ValueError, match="Phase.near must be False, True, 'correct' or 'softmax'"):
        agentsd.Phase(ratio=0.5, tokens="all", near=1)
    assert agentsd.Phase(ratio=0.5, tokens="all", near=True).near_join == "correct"
    with pytest.raises(ValueError, match="it needs near=True"):
        agentsd.Phase(ratio=0.5, tokens="all", near_reach=1)
    with pytest.raises(ValueError, match="near_reach must be >= 0"):
        agentsd.Phase(ratio=0.5, tokens="all", near=True, near_reach=-1)
    with pytest.raises(TypeError, match="near_reach must be an int"):
        agentsd.Phase(ratio=0.5, tokens="all", near=True, near_reach=True)


@pytest.mark.parametrize("text", [0, 5])
def test_a_reach_over_the_whole_grid_is_plain_attention(text):
    """Where the neighbourhood holds every window, no summary stands for anything: the late phase, and without text
    the agents' one-softmax join (with text, image queries read the text through the agents only), are softmax
    attention over every key, written here as the formula; one window less, they are not."""
    g = torch.Generator().manual_seed(4)
    grid = (1, 8, 12)  # 2 x 3 windows of 4x4: reach 1 reads all of them, reach 0 one
    q, k, v = (torch.randn(2, text + 96, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    layout = Layout(text, True, (grid,))
    logits = torch.einsum("bshd,bthd->bhst", q, k) * 8**-0.5
    exact = torch.einsum("bhst,bthd->bshd", logits.softmax(-1), v)
    win = Window(1, 4, 4)
    metric = torch.randn(2, 96, 8, generator=g, dtype=torch.float64)
    from agentsd.dit import dst_positions, tome_groups

    merged = tome_groups(metric, dst_positions(layout.grids, win))
    cases = [dict(keys_of=merged, near=win)]
    if not text:
        cases.append(dict(agents=Pooled(layout.grids, win), near=win, near_join="softmax"))
    for kwargs in cases:
        out = agent_attention(q, k, v, layout, proportional=True, near_reach=1, **kwargs)
        image = slice(text, None)  # the text queries read every key exactly in either phase
        torch.testing.assert_close(out[:, image], exact[:, image], atol=1e-6, rtol=1e-6)  # sizes: float32
        assert (agent_attention(q, k, v, layout, proportional=True, **kwargs) - exact).abs().max() > 1e-3
    with pytest.raises(ValueError, match="near_reach widens a near field"):
        agent_attention(q, k, v, layout, keys_of=merged, near_reach=1)


@pytest.mark.parametrize("family,reach", [("flux", 0), ("wan", 0), ("flux", 1)])
def test_options_compile_without_graph_breaks(family, reach):
    from conftest import compile_graphs
    from torch._dynamo.utils import counters

    model = tiny_flux() if family == "flux" else tiny_wan()
    window = (1, 4, 4) if family == "flux" else (2, 2, 2)
    options = dict(proportional=True, near=True, shift=not reach, near_reach=reach)
    schedule = _with(phases("merged", window, (1, 2, 2)), options)
    agentsd.apply(model, schedule, blocks=[0, 2], seed=0)
    calls = [flux_inputs(2, [(6, 10)], t) for t in (0.9, 0.3)] if family == "flux" else None
    calls = calls or [wan_inputs(2, 5, 4, 6, t) for t in (900, 300)]
    eager = [_forward(model, kwargs) for kwargs in calls]
    agentsd.remove(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = compile_graphs(model)  # compiled, then patched (as a pipeline's users do): the same dst draws again
    agentsd.apply(compiled, schedule, blocks=[0, 2], seed=0)
    for kwargs, expected in zip(calls, eager):
        torch.testing.assert_close(_forward(compiled, kwargs), expected, atol=1e-5, rtol=1e-5)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def test_near_and_shift_are_refused_where_they_are_not_built():
    from conftest import tiny_unet
    from test_sd3 import tiny_sd3

    for option in ("near", "shift"):
        phase = agentsd.Phase(ratio=0.75, tokens="all", **{option: True})
        with pytest.raises(ValueError, match=f"{option}=True is for Flux, Wan and Qwen-Image"):
            agentsd.apply(tiny_unet(), [phase])
        with pytest.raises(ValueError, match="not yet on SD 3"):
            agentsd.apply(tiny_sd3("sd3"), [phase], blocks=[1])


@pytest.mark.parametrize("near", [True, "softmax"])
@pytest.mark.parametrize("agents", ["pooled", "merged"])
@pytest.mark.parametrize("t", [0.9, 0.3], ids=["agent-phase", "late-phase"])
def test_qwen_with_a_padded_prompt_equals_the_reference(near, agents, t):
    """The padding mask in every softmax over keys: the merged keys' proportional mask, the agents' gather."""
    from reference_dit import reference_qwen
    from test_qwen import qwen_inputs, tiny_qwen

    model = tiny_qwen()
    schedule = _with(phases(agents, (1, 4, 4), (1, 2, 2)), dict(proportional=True, near=near, shift=True))
    ref = reference_qwen(model, schedule, [1, 2], seed=5)
    agentsd.apply(model, schedule, blocks=[1, 2], seed=5)
    kwargs = qwen_inputs(2, [(6, 10)], t, masked=True)
    torch.testing.assert_close(_forward(model, kwargs).double(), ref(**kwargs), atol=1e-5, rtol=1e-5)
