"""agentsd beside what diffusers users already do: fused QKV, processor swaps, default processors."""

import pytest
import torch
from conftest import compile_graphs, tiny_pipeline, tiny_sdxl_pipeline, tiny_sdxl_refiner, tiny_unet, unet_inputs
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

import agentsd
from agentsd import Phase
from agentsd.attention import AgentAttnProcessor, MergedAttnProcessor

TOL = 1e-4
SCHEDULE = {
    0: [Phase(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, merge_crossattn=True, merge_mlp=True)],
    1: [Phase(sx=2, sy=2, ratio=0.3)],
}


def run(unet, sample, context, timestep=500):
    with torch.no_grad():
        return unet(sample, timestep, context).sample


def agent_processors(unet):
    return [p for p in unet.attn_processors.values() if isinstance(p, (AgentAttnProcessor, MergedAttnProcessor))]


@pytest.fixture
def setup():
    unet = tiny_unet("sd", seed=3)
    sample, context = unet_inputs(seed=4)
    vanilla = run(unet, sample, context)
    agentsd.apply(unet, SCHEDULE, seed=0)
    merged = run(unet, sample, context)
    agentsd.remove(unet)
    return unet, sample, context, vanilla, merged


@pytest.mark.parametrize("fuse_first", [True, False])
def test_fused_qkv_projections_run_the_fused_projection(setup, fuse_first):
    unet, sample, context, vanilla, merged = setup
    if fuse_first:
        unet.fuse_qkv_projections()
        fused_vanilla = run(unet, sample, context)
        agentsd.apply(unet, SCHEDULE, seed=0)
    else:
        agentsd.apply(unet, SCHEDULE, seed=0)
        unet.fuse_qkv_projections()
    calls = []
    to_qkv = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_qkv
    to_qkv.register_forward_hook(lambda *args: calls.append(1))
    out = run(unet, sample, context)
    assert calls  # the merged tokens went through the fused projection
    assert (out - merged).abs().max() < TOL and (out - vanilla).abs().max() > 100 * TOL
    agentsd.remove(unet)
    if fuse_first:
        assert torch.equal(run(unet, sample, context), fused_vanilla)
    else:
        assert (run(unet, sample, context) - vanilla).abs().max() < TOL


@pytest.mark.parametrize(
    "swap",
    [
        lambda unet: unet.set_attn_processor(AttnProcessor()),
        lambda unet: unet.set_attention_slice(1),
        lambda unet: unet.set_default_attn_processor(),
    ],
    ids=["set_attn_processor", "set_attention_slice", "set_default_attn_processor"],
)
def test_processors_swapped_in_while_patched_become_the_fallback(setup, swap):
    unet, sample, context, vanilla, merged = setup
    agentsd.apply(unet, SCHEDULE, seed=0)
    swap(unet)  # no error of agentsd's own
    out = run(unet, sample, context)
    assert (out - merged).abs().max() < TOL  # agentsd still on, with the same result
    assert agent_processors(unet) and agentsd.state_of(unet) is not None
    fallbacks = {type(p.original) for p in agent_processors(unet)}
    assert fallbacks <= {AttnProcessor, SlicedAttnProcessor}
    agentsd.remove(unet)
    assert not agent_processors(unet)
    assert {type(p) for p in unet.attn_processors.values()} <= {AttnProcessor, SlicedAttnProcessor}
    assert (run(unet, sample, context) - vanilla).abs().max() < TOL


def test_set_default_attn_processor_raises_what_vanilla_raises(setup):
    class Custom(AttnProcessor2_0):
        pass

    unet, *_ = setup
    unet.set_attn_processor(Custom())
    with pytest.raises(ValueError) as vanilla_error:
        unet.set_default_attn_processor()
    agentsd.apply(unet, SCHEDULE, seed=0)
    with pytest.raises(ValueError) as patched_error:
        unet.set_default_attn_processor()
    assert str(patched_error.value) == str(vanilla_error.value)
    assert agent_processors(unet)  # still patched after the refusal


# The lean preset compiled in every mode: the GPU suite's checks (agentsd.bench.checks, tested in test_bench).
@pytest.mark.parametrize(
    "schedule, compile_first", [("paper", True), ("paper", False)], ids=["compile-then-apply", "apply-then-compile"]
)
def test_compiled_unet_in_a_pipeline_run(tmp_path, schedule, compile_first):
    from torch._dynamo.utils import counters

    pipe = tiny_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        generator = torch.Generator().manual_seed(0)
        return pipe("a cat", num_inference_steps=6, height=64, width=64, output_type="latent", generator=generator)

    agentsd.apply(pipe, schedule, seed=0)
    eager = generate().images
    agentsd.remove(pipe)
    unet = pipe.unet
    torch._dynamo.reset()
    counters.clear()
    if compile_first:
        pipe.unet = compile_graphs(unet)
        agentsd.apply(pipe, schedule, seed=0)
    else:
        agentsd.apply(pipe, schedule, seed=0)
        pipe.unet = compile_graphs(unet)
    compiled = generate().images  # the pipeline passes tensor timesteps
    assert not counters["graph_break"], dict(counters["graph_break"])
    phases = agentsd.schedule.resolve_schedule(schedule)
    num_phases = len(phases[0] if isinstance(phases, dict) else phases)
    assert counters["stats"]["unique_graphs"] <= num_phases  # one graph per phase
    # latents of an untrained tiny pipeline reach ~100: compare relative to their scale
    assert (compiled - eager).abs().max() < TOL * eager.abs().max()
    again = generate().images  # a second run draws other dst tokens: no new graph
    assert counters["stats"]["unique_graphs"] <= num_phases
    assert not torch.equal(again, compiled)

    # explain() on one call of the UNet, its timestep seen by the scheduler first as in the pipeline
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 7, unet.config.cross_attention_dim)
    t = pipe.scheduler.timesteps[0]
    torch._dynamo.reset()
    pipe.scheduler.scale_model_input(sample, t)
    with torch.no_grad():
        explanation = torch._dynamo.explain(unet)(sample, t, context)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        agentsd.apply(pipe, "paper", use_rand=False)  # the same dst tokens in both calls
        pipe.scheduler.scale_model_input(sample, t)
        once = pipe.unet(sample, t, context).sample
        pipe.scheduler.scale_model_input(sample, t)
        assert (once - unet(sample, t, context).sample).abs().max() < TOL  # compiled vs eager, one call
    agentsd.remove(pipe)
    pipe.unet = unet
    assert not getattr(pipe.scheduler.scale_model_input, "_agentsd", False)


def test_lora_adapters_unfused_and_fused(setup):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet, sample, context, vanilla, merged = setup
    torch.manual_seed(5)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    lora_vanilla = run(unet, sample, context)
    agentsd.apply(unet, SCHEDULE, seed=0)
    unfused = run(unet, sample, context)
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()  # what fuse_lora does: adapter weights folded into the base layers
    agentsd.apply(unet, SCHEDULE, seed=0)  # the same random dst draws as the unfused run
    fused = run(unet, sample, context)
    assert (fused - unfused).abs().max() < TOL
    assert (unfused - lora_vanilla).abs().max() > 100 * TOL and (unfused - merged).abs().max() > 100 * TOL
    agentsd.remove(unet)
    assert (run(unet, sample, context) - lora_vanilla).abs().max() < TOL


def test_from_pipe_shares_the_patched_unet(tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    for make, img2img_class in ((tiny_pipeline, StableDiffusionImg2ImgPipeline),
                                (tiny_sdxl_pipeline, StableDiffusionXLImg2ImgPipeline)):  # fmt: skip
        pipe = make(tmp_path)
        agentsd.apply(pipe, SCHEDULE, seed=0)
        img2img = img2img_class.from_pipe(pipe)  # shares the UNet: the patch applies to both
        img2img.set_progress_bar_config(disable=True)
        assert img2img.unet is pipe.unet and agentsd.state_of(img2img.unet) is not None
        image = torch.rand(1, 3, 64, 64)

        def run_img2img(image=image, img2img=img2img):
            generator = torch.Generator().manual_seed(0)
            return img2img("a cat", image=image, strength=0.6, num_inference_steps=5, output_type="latent",
                           generator=generator).images  # fmt: skip

        patched = run_img2img()
        agentsd.remove(img2img)  # removing through either pipeline unpatches the shared UNet
        assert agentsd.state_of(pipe.unet) is None and not agent_processors(pipe.unet)
        vanilla_img2img = run_img2img()
        assert (patched - vanilla_img2img).abs().max() > 100 * TOL


def test_sd2_v_prediction_768_in_half_precision():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # SD 2.x's layout in miniature: linear projections, 64-dim heads
        sample_size=96,
        block_out_channels=(64, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=32,
        norm_num_groups=16,
    ).eval()
    sample, context = unet_inputs(height=96, width=96)  # 768² images
    expected = {}
    for dtype in (torch.float32, torch.float16):
        unet.to(dtype)
        agentsd.apply(unet, "paper", use_rand=False, attn_precision="fp32")
        expected[dtype] = run(unet, sample.to(dtype), context.to(dtype), timestep=900).float()
        agentsd.remove(unet)
    half = expected[torch.float16]
    assert torch.isfinite(half).all()
    assert (half - expected[torch.float32]).abs().max() < 0.05 * expected[torch.float32].abs().max()


def ip_adapter_state_dict(unet, clip_dim=12):
    """A random IP-Adapter in the original checkpoint layout: image projection + to_k_ip/to_v_ip per cross-attention."""
    torch.manual_seed(9)
    cross = unet.config.cross_attention_dim
    layers, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        layers[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross)
        layers[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross)
        key_id += 2
    projection = {
        "proj.weight": torch.randn(4 * cross, clip_dim) * 0.3,
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    return {"image_proj": projection, "ip_adapter": layers}


def test_ip_adapter_loaded_while_patched(setup):
    import copy

    unet, sample, context, vanilla, merged = setup
    plain = copy.deepcopy(unet)
    image = {"image_embeds": [torch.randn(2, 1, 12)]}
    for model in (plain, unet):
        if model is unet:
            agentsd.apply(unet, SCHEDULE, seed=0)
        model._load_ip_adapter_weights([ip_adapter_state_dict(model)], low_cpu_mem_usage=False)  # rebuilds processors
    with torch.no_grad():
        ip_vanilla = plain(sample, 500, context, added_cond_kwargs=image).sample
        patched = unet(sample, 500, context, added_cond_kwargs=image).sample
        assert agent_processors(unet) and (patched - ip_vanilla).abs().max() > 100 * TOL
        assert (ip_vanilla - vanilla).abs().max() > 100 * TOL  # the adapter acts
        agentsd.remove(unet)
        assert torch.equal(unet(sample, 500, context, added_cond_kwargs=image).sample, ip_vanilla)


@pytest.mark.parametrize("apply_first", [True, False])
def test_model_cpu_offload(tmp_path, apply_first):
    """accelerate's offload hooks wrap each model's forward; agentsd's hooks and processors keep working.
    (Offloading to the CPU is what runs without an accelerator. Sequential offload fails here without agentsd
    too: accelerate cannot rebuild the parameters on this torch's CPU build.)"""
    offload = "enable_model_cpu_offload"
    pipe = tiny_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        generator = torch.Generator().manual_seed(0)
        return pipe("a cat", num_inference_steps=4, height=64, width=64, output_type="latent", generator=generator)

    vanilla = generate().images
    agentsd.apply(pipe, SCHEDULE, seed=0)
    merged = generate().images
    agentsd.remove(pipe)
    if not apply_first:
        getattr(pipe, offload)(device="cpu")
    agentsd.apply(pipe, SCHEDULE, seed=0)
    if apply_first:
        getattr(pipe, offload)(device="cpu")
    offloaded = generate().images
    assert (offloaded - merged).abs().max() < TOL * merged.abs().max()
    agentsd.remove(pipe)
    assert (generate().images - vanilla).abs().max() < TOL * vanilla.abs().max()


def test_x4_upscaler_layout_patches_its_self_attention():
    """The x4 upscaler's UNet: cross-attention only in attn1 of its first levels, self-attention deeper."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=7,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=(True, True, False),
        attention_head_dim=8,
        cross_attention_dim=32,
        norm_num_groups=8,
        class_embed_type=None,
        num_class_embeds=1000,  # the noise level of the low-resolution image
    ).eval()
    assert agentsd.patch.attention_levels(unet) == [4]  # level 2's down block and the mid block
    sample, context = torch.randn(2, 7, 32, 32), torch.randn(2, 7, 32)

    def run_upscaler():
        with torch.no_grad():
            return unet(sample, 500, context, class_labels=torch.tensor([20, 20])).sample

    vanilla = run_upscaler()
    agentsd.apply(unet, [Phase(sx=2, sy=2, ratio=0.5, agent_ratio=0.7)], seed=0)
    assert (run_upscaler() - vanilla).abs().max() > 100 * TOL
    agentsd.remove(unet)
    assert torch.equal(run_upscaler(), vanilla)


def test_sdxl_refiner_layout_img2img(tmp_path):
    """The SDXL refiner's own layout: four levels, self-attention only on the middle two, one text encoder
    (text_encoder_2's width), aesthetic-score conditioning (five time ids)."""
    refiner = tiny_sdxl_refiner(tmp_path)
    refiner.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64)

    def refine():
        return refiner("a cat", image=image, strength=0.6, num_inference_steps=5, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    vanilla = refine()
    agentsd.apply(refiner, "paper", seed=0)  # max_downsample="auto": the first level with self-attention
    assert agentsd.state_of(refiner.unet) is not None and agent_processors(refiner.unet)
    patched = refine()
    assert torch.isfinite(patched).all() and (patched - vanilla).abs().max() > 100 * TOL
    agentsd.remove(refiner)
    assert torch.equal(refine(), vanilla)


def test_compiled_unet_with_shared_matching():
    """share_matching keeps its per-call merges on the state: compiled calls match eager ones, call after call."""
    unet = tiny_unet("sd", seed=8)
    sample, context = unet_inputs(seed=9)
    schedule = {
        0: [Phase(sx=2, sy=2, ratio=0.5, agent_ratio=0.8, merge_crossattn=True, share_matching=True)],
        1: [Phase(sx=2, sy=2, ratio=0.5, share_matching=True)],
    }
    agentsd.apply(unet, schedule, seed=0)
    eager = [run(unet, sample, context) for _ in range(2)]
    torch._dynamo.reset()
    compiled = compile_graphs(unet)
    agentsd.apply(compiled, schedule, seed=0)
    assert not torch.equal(eager[0], eager[1])  # each call draws new dst tokens
    for expected in eager:
        assert (run(compiled, sample, context) - expected).abs().max() < TOL
