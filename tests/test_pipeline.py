"""End to end: a tiny StableDiffusionPipeline assembled from configs, 10 PLMS steps with the paper schedule."""

from conftest import tiny_pipeline

import agentsd


def test_paper_schedule_switches_phase_by_progress(tmp_path, monkeypatch):
    pipe = tiny_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    agentsd.apply(pipe, "paper", seed=0)
    state = agentsd.state_of(pipe.unet)
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(state.phase))
    agent_calls = []
    attention = agentsd.attention.agent_attention

    def spy(attn, tokens, agents, **kwargs):
        agent_calls.append(agents is not None)
        return attention(attn, tokens, agents, **kwargs)

    monkeypatch.setattr(agentsd.attention, "agent_attention", spy)
    image = pipe("a red circle", num_inference_steps=10, guidance_scale=7.5, height=32, width=32, output_type="np")
    assert image.images.shape == (1, 32, 32, 3)

    # PLMS calls the UNet 11 times for 10 steps (it repeats its second timestep).
    timesteps = pipe.scheduler.timesteps.tolist()
    assert timesteps == [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    agent, tome = agentsd.PRESETS["paper"]
    # p = 1 - t/1000 < 0.4 means t > 600: steps 0-3 run agents, steps 4-9 ToMe
    assert calls == [agent] * 5 + [tome] * 6
    # three top-level blocks per UNet call; agents only in the agent phase
    assert agent_calls == [True] * (3 * 5) + [False] * (3 * 6)
    agentsd.remove(pipe)
    assert agentsd.state_of(pipe.unet) is None
