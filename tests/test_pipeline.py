"""End to end: a tiny StableDiffusionPipeline assembled from configs, 10 PLMS steps with the paper schedule."""

import pytest
import torch
from conftest import tiny_pipeline

import agentsd
from agentsd.schedule import phase_at


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


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm"])
def test_phase_follows_progress_under_other_schedulers(tmp_path, name):
    """Every UNet call runs the phase of its own progress p = 1 - t/T, whatever timesteps the scheduler picks."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    schedulers = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}
    pipe = tiny_pipeline(tmp_path)
    pipe.scheduler = schedulers[name].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    agentsd.apply(pipe, "paper", seed=0)
    state = agentsd.state_of(pipe.unet)
    seen = []

    def record(module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        seen.append((float(torch.as_tensor(timestep).reshape(-1)[0]), state.phase))

    pipe.unet.register_forward_pre_hook(record, with_kwargs=True)  # after agentsd's own: the phase is picked
    pipe("a red circle", num_inference_steps=8, height=32, width=32, output_type="latent")
    assert len(seen) == 8
    for timestep, phase in seen:
        assert phase is phase_at(agentsd.PRESETS["paper"], 1 - timestep / 1000), (name, timestep)
    assert {phase for _, phase in seen} == set(agentsd.PRESETS["paper"])  # both phases ran
    agentsd.remove(pipe)


def test_controlnet_pipeline_patches_both_and_restores(tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = tiny_pipeline(tmp_path)
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32))  # VAE factor 2
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    def generate():
        generator = torch.Generator().manual_seed(0)
        return pipe("a red circle", image=image, num_inference_steps=4, output_type="latent", generator=generator)

    vanilla = generate().images
    agentsd.apply(pipe, "paper", seed=0)
    assert agentsd.state_of(pipe.unet) is not None and agentsd.state_of(pipe.controlnet) is not None
    merged = generate().images
    assert (merged - vanilla).abs().max() > 1e-3
    agentsd.remove(pipe)
    assert agentsd.state_of(pipe.controlnet) is None
    assert torch.equal(generate().images, vanilla)
