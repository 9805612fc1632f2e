"""apply / remove / patched: what gets swapped, what comes back, what is refused."""

import pytest
import torch
from conftest import tiny_unet, unet_inputs
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor

import agentsd
from agentsd import Phase
from agentsd.attention import AgentAttnProcessor

AGENT = [Phase(end=1.0, sx=4, sy=4, ratio=0.4, agent_ratio=0.95)]


def run(unet, sample, context, timestep=500):
    with torch.no_grad():
        return unet(sample, timestep, context).sample


def blocks(unet):
    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]


def hook_count(unet):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())


def test_remove_restores_processor_objects_and_outputs(unet):
    sample, context = unet_inputs()
    custom = AttnProcessor()  # a user's own processor on one block must come back too
    blocks(unet)[0].attn1.set_processor(custom)
    before = {name: proc for name, proc in unet.attn_processors.items()}
    vanilla = run(unet, sample, context)
    agentsd.apply(unet, AGENT, seed=0)
    assert all(isinstance(b.attn1.processor, AgentAttnProcessor) for b in blocks(unet))
    assert not torch.equal(run(unet, sample, context), vanilla)
    agentsd.remove(unet)
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert hook_count(unet) == 0
    assert torch.equal(run(unet, sample, context), vanilla)


def test_apply_twice_replaces_and_remove_unpatched_is_noop(unet):
    sample, context = unet_inputs()
    vanilla = run(unet, sample, context)
    agentsd.remove(unet)
    assert torch.equal(run(unet, sample, context), vanilla)
    agentsd.apply(unet, "tome", use_rand=False)
    agentsd.apply(unet, AGENT, use_rand=False)
    once = tiny_unet("sd")
    agentsd.apply(once, AGENT, use_rand=False)
    assert torch.equal(run(unet, sample, context), run(once, sample, context))
    assert hook_count(unet) == 1 + len(blocks(unet))
    agentsd.remove(unet)
    assert torch.equal(run(unet, sample, context), vanilla)


def test_patched_context_restores_previous_state(unet):
    sample, context = unet_inputs()
    vanilla = run(unet, sample, context)
    with agentsd.patched(unet, AGENT, use_rand=False) as model:
        assert model is unet
        merged = run(unet, sample, context)
    assert torch.equal(run(unet, sample, context), vanilla)
    agentsd.apply(unet, "tome", use_rand=False)
    tome = run(unet, sample, context)
    with agentsd.patched(unet, AGENT, use_rand=False):
        assert torch.equal(run(unet, sample, context), merged)
    assert torch.equal(run(unet, sample, context), tome)


def test_keyword_calls(unet):
    sample, context = unet_inputs()
    agentsd.apply(unet, AGENT, use_rand=False)
    positional = run(unet, sample, context)
    with torch.no_grad():
        keyword = unet(sample=sample, timestep=500, encoder_hidden_states=context).sample
    assert torch.equal(positional, keyword)
    assert not torch.equal(positional, run(tiny_unet("sd"), sample, context))


def test_phase_follows_timestep(unet):
    sample, context = unet_inputs()
    agentsd.apply(unet, "paper")
    state = agentsd.state_of(unet)
    for timestep, expected in [(999, 0), (601, 0), (600, 1), (1, 1), (torch.tensor(700), 0), (torch.tensor([200]), 1)]:
        run(unet, sample, context, timestep)
        assert state.phase is agentsd.PRESETS["paper"][expected]
        assert state.size == (16, 16)


def test_ratio_zero_is_vanilla(unet):
    sample, context = unet_inputs()
    vanilla = run(unet, sample, context)
    agentsd.apply(unet, [Phase(end=1.0, sx=2, sy=2, ratio=0.0, agent_ratio=0.9)])
    assert torch.equal(run(unet, sample, context), vanilla)


def test_attention_mask_falls_back(unet):
    sample, context = unet_inputs()
    block = blocks(unet)[0]
    hidden = torch.randn(2, 256, block.attn1.query_dim)
    mask = torch.zeros(2, 1, 256)
    with torch.no_grad():
        vanilla_masked, vanilla = block(hidden, attention_mask=mask), block(hidden)
        agentsd.apply(unet, AGENT, use_rand=False)
        run(unet, sample, context)  # sets latent size and phase
        assert torch.equal(block(hidden, attention_mask=mask), vanilla_masked)
        assert not torch.allclose(block(hidden), vanilla)


def test_errors(unet):
    with pytest.raises(TypeError, match="pipeline"):
        agentsd.apply(object())

    class FluxLikePipeline:  # a DiT pipeline: one clear error, nothing silently unaccelerated
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match=r"FluxLikePipeline denoises with a Linear.*supports UNet.*Stable Diffusion 3"):
        agentsd.apply(FluxLikePipeline())
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        agentsd.apply(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown schedule"):
        agentsd.apply(unet, "turbo")
    with pytest.raises(ValueError, match="increase"):
        agentsd.apply(unet, [Phase(end=0.5), Phase(end=0.5), Phase(end=1.0)])
    with pytest.raises(ValueError, match="last phase"):
        agentsd.apply(unet, [Phase(end=0.5)])
    with pytest.raises(TypeError, match="Phase"):
        agentsd.apply(unet, [{"end": 1.0}])
    with pytest.raises(ValueError, match="attn_precision"):
        agentsd.apply(unet, attn_precision="fp16")
    with pytest.raises(ValueError, match="max_downsample"):
        agentsd.apply(unet, "paper", max_downsample=0)
    with pytest.raises(TypeError, match="max_downsample"):
        agentsd.apply(unet, "paper", max_downsample="deep")
    with pytest.raises(ValueError, match="the default, 'lean'"):  # the default names its levels
        agentsd.apply(unet, max_downsample=1)
    assert hook_count(unet) == 0  # a refused apply leaves nothing behind


def test_pipeline_like_objects_patch_unet_and_controlnets():
    class Scheduler:
        class config:
            num_train_timesteps = 500

    class Multi:
        def __init__(self, nets):
            self.nets = nets

    class Pipe:
        unet = tiny_unet("sd")
        controlnet = Multi([tiny_unet("sd", seed=1), tiny_unet("sd", seed=2)])
        scheduler = Scheduler()

    pipe = Pipe()
    assert agentsd.apply(pipe, "paper") is pipe
    for net in [pipe.unet, *pipe.controlnet.nets]:
        state = agentsd.state_of(net)
        assert state is not None
        sample, context = unet_inputs()
        run(net, sample, context, timestep=250)  # p = 0.5 with T = 500: ToMe phase
        assert state.phase is agentsd.PRESETS["paper"][1]
    agentsd.remove(pipe)
    assert all(agentsd.state_of(net) is None for net in [pipe.unet, *pipe.controlnet.nets])


def test_compile_has_no_graph_break():
    unet = tiny_unet("sd")
    sample, context = unet_inputs()
    agentsd.apply(unet, "paper", use_rand=True, seed=0)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(unet)(sample, 300, context)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_whole_block_patch_restores_cross_attention_and_feed_forward(unet):
    sample, context = unet_inputs()
    before = dict(unet.attn_processors)
    vanilla = run(unet, sample, context)
    agentsd.apply(
        unet, {0: [Phase(sx=2, sy=2, ratio=0.5, merge_crossattn=True, merge_mlp=True)], 1: [Phase(ratio=0.3)]}, seed=0
    )
    assert not torch.equal(run(unet, sample, context), vanilla)
    agentsd.remove(unet)
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert hook_count(unet) == 0
    assert torch.equal(run(unet, sample, context), vanilla)


def test_per_level_schedule_checks(unet):
    with pytest.raises(ValueError, match="max_downsample"):
        agentsd.apply(unet, {0: [Phase()]}, max_downsample=2)
    with pytest.warns(UserWarning, match=r"levels \[5\] not patched"):
        agentsd.apply(unet, {0: [Phase()], 5: [Phase()]})
    assert agentsd.patch.attention_levels(unet) == [1, 2]  # top level and mid block
    assert agentsd.patch.attention_levels(tiny_unet("sdxl")) == [2, 4]
