"""Odd sizes, odd batches, bounds and bad numbers: agentsd never crashes and never silently does nothing."""

import pytest
import torch
from conftest import tiny_unet, unet_inputs

import agentsd
from agentsd import Phase

AGENT = Phase(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, merge_crossattn=True, merge_mlp=True)


def run(unet, sample, context, timestep=500):
    with torch.no_grad():
        return unet(sample, timestep, context).sample


SIZES = [((8, 8), s) for s in ("paper", "tome")] + [((9, 13), "paper"), ((37, 23), "tome"), ((37, 23), "fast")]


@pytest.mark.parametrize("size, schedule", [*SIZES, ((37, 29), [AGENT]), ((200, 136), "fast")], ids=lambda v: str(v))
def test_odd_latent_sizes(size, schedule, monkeypatch):
    unet = tiny_unet("sd")
    sample, context = unet_inputs(height=size[0], width=size[1])
    merged = []
    attention = agentsd.attention.agent_attention

    def spy(attn, tokens, agents, **kwargs):
        merged.append(tokens.shape[1])
        return attention(attn, tokens, agents, **kwargs)

    monkeypatch.setattr(agentsd.attention, "agent_attention", spy)
    agentsd.apply(unet, schedule, seed=0)
    out = run(unet, sample, context, timestep=900)
    assert out.shape == sample.shape and torch.isfinite(out).all()
    fits = size[0] >= 4 and size[1] >= 4 if schedule != "tome" else size[0] >= 2 and size[1] >= 2
    if schedule == "fast":
        fits = size[0] * size[1] >= 1024  # fast leaves blocks under 1,024 tokens alone
    assert bool(merged) == fits  # merged wherever the windows fit, and nowhere else
    assert all(n < size[0] * size[1] for n in merged)


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_odd_batches(batch):
    unet = tiny_unet("sd")
    sample, context = unet_inputs(batch=batch)
    vanilla = run(unet, sample, context)
    agentsd.apply(unet, [AGENT], seed=0)  # random dst needs pairs: odd batches use fixed dst
    out = run(unet, sample, context)
    assert out.shape == vanilla.shape and not torch.equal(out, vanilla)
    assert torch.equal(run(unet, sample, context), out)


@pytest.mark.parametrize(
    "phase, exact",
    [
        (Phase(sx=2, sy=2, ratio=0.999, agent_ratio=0.999), False),
        (Phase(sx=2, sy=2, ratio=0.0, agent_ratio=0.999), True),  # r = 0: nothing merged, no agents (as published)
        (Phase(sx=2, sy=2, ratio=0.5, agent_ratio=0.0), False),
        (Phase(sx=1, sy=1, ratio=0.9, agent_ratio=0.9), True),  # every token is dst: nothing to merge
        (Phase(sx=1, sy=1, ratio=0.0, agent_ratio=0.9, tokens="all"), True),  # every token its own agent
        (Phase(sx=16, sy=16, ratio=0.99, agent_ratio=0.99, merge_crossattn=True, merge_mlp=True), False),  # 1 agent
        (Phase(sx=16, sy=16, ratio=0.0, agent_ratio=0.99, tokens="all"), False),  # one window, one agent
    ],
)
def test_ratios_at_their_bounds(phase, exact):
    """Where nothing can merge the output is vanilla's bit for bit; elsewhere it is merged, and finite."""
    unet = tiny_unet("sd")
    sample, context = unet_inputs()
    vanilla = run(unet, sample, context)
    agentsd.apply(unet, [phase], seed=0)
    out = run(unet, sample, context)
    assert torch.isfinite(out).all()
    if exact:
        assert torch.equal(out, vanilla)
    else:
        assert (out - vanilla).abs().max() > 1e-4


def test_non_finite_latents_propagate_as_vanilla():
    unet = tiny_unet("sd")
    sample, context = unet_inputs()
    sample[0, :, 3, 5] = float("nan")
    sample[1, 0, 7, 7] = float("inf")
    vanilla = run(unet, sample, context)
    agentsd.apply(unet, [AGENT], seed=0)
    out = run(unet, sample, context)  # no exception of agentsd's own
    assert out.shape == vanilla.shape
    assert torch.isnan(out).any() == torch.isnan(vanilla).any()


def test_model_without_patched_self_attention_warns():
    unet = tiny_unet("sdxl")
    with pytest.warns(UserWarning, match="changes nothing"):
        agentsd.apply(unet, "paper", max_downsample=1)
