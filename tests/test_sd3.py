"""Agent attention in SD 3 / 3.5 joint attention: against the float64 reference of DESIGN.md §10, remove, pipelines,
compile, odd sizes and batches, half precision."""

import dataclasses

import pytest
import torch
from conftest import CROSS_DIM, _text_encoder_config, _tiny_vae, char_tokenizer, compile_graphs
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from reference import reference_transformer

import agentsd
from agentsd import Phase
from agentsd.joint import JointAgentProcessor

JOINT_DIM = 2 * CROSS_DIM  # the two CLIP encoders' widths side by side (T5 absent: zeros of this width)


# the tiny transformer's (and its ControlNet's) dimensions
TINY_SD3 = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=JOINT_DIM,
    caption_projection_dim=16,
    pooled_projection_dim=2 * CROSS_DIM,
    out_channels=4,
    pos_embed_max_size=16,
)


def tiny_sd3(layout: str = "sd3", seed: int = 0, layers: int = 6) -> SD3Transformer2DModel:
    """SD 3's block layout in miniature; ``sd3.5``: SD 3.5-medium's (attn2 in the first blocks, RMS q/k norms)."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        **TINY_SD3,
        num_layers=layers,
        dual_attention_layers=(0, 1, 2) if layout == "sd3.5" else (),
        qk_norm="rms_norm" if layout == "sd3.5" else None,
    ).eval()


def inputs(batch=2, height=16, width=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, height, width, generator=g)
    context = torch.randn(batch, 5, JOINT_DIM, generator=g)
    pooled = torch.randn(batch, 2 * CROSS_DIM, generator=g)
    return sample.to(dtype), context.to(dtype), pooled.to(dtype)


def run(model, sample, context, pooled, timestep=500.0):
    t = torch.full((sample.shape[0],), float(timestep), dtype=sample.dtype)
    with torch.no_grad():
        return model(hidden_states=sample, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample


SHARED = dict(share_matching=True, min_tokens=0)
# (phases, what each tries): timesteps 900 (p = 0.1) and 300 (p = 0.7) run the first and the last phase
CASES = {
    "lean-agents-then-merged-kv": (
        Phase(end=0.4, sx=4, sy=4, ratio=0.0, agent_ratio=0.95, tokens="all", **SHARED),
        Phase(end=1.0, sx=2, sy=2, ratio=0.75, tokens="all", **SHARED),
    ),
    "paper-agents-then-tome": (
        Phase(end=0.4, sx=4, sy=4, ratio=0.4, agent_ratio=0.95, **SHARED),
        Phase(end=1.0, sx=2, sy=2, ratio=0.5, **SHARED),
    ),
    "lean-proportional": (
        Phase(end=0.4, sx=4, sy=4, ratio=0.0, agent_ratio=0.9, tokens="all", proportional=True, **SHARED),
        Phase(end=1.0, sx=2, sy=2, ratio=0.75, tokens="all", proportional=True, **SHARED),
    ),
    "partial-ranking": (
        Phase(end=0.4, sx=2, sy=2, ratio=0.0, agent_ratio=0.6, tokens="all", **SHARED),
        Phase(end=1.0, sx=2, sy=2, ratio=0.3, tokens="all", **SHARED),
    ),
}


@pytest.mark.parametrize("layout", ["sd3", "sd3.5"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "shape", [(2, 16, 16), (3, 14, 22), (1, 18, 12)], ids=["square", "odd-batch-ragged-grid", "batch-1-non-square"]
)
def test_joint_attention_equals_the_reference(layout, case, shape):
    """float64 throughout: agentsd against the formulas written token by token, two calls per phase (each call
    draws its own dst), blocks 1-4 of 6 patched."""
    model = tiny_sd3(layout, seed=1).double()
    batch, height, width = shape
    sample, context, pooled = inputs(batch, height, width, seed=2, dtype=torch.float64)
    phases = CASES[case]
    reference = reference_transformer(model, phases, range(1, 5), seed=7)
    timesteps = (900.0, 900.0, 300.0, 300.0)
    agentsd.apply(model, phases, blocks=range(1, 5), seed=7)
    ours = [run(model, sample, context, pooled, t) for t in timesteps]
    agentsd.remove(model)
    for t, out in zip(timesteps, ours):
        expected = reference(sample, t, context, pooled)
        assert (out - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())
        assert (out - run(model, sample, context, pooled, t)).abs().max() > 1e-4  # agentsd acted


def tiny_sd3_pipeline(tmp_path, kind: str = "txt2img", layout: str = "sd3", t5: bool = False):
    """SD 3 pipeline from configs: two char-level CLIP encoders (T5 absent), a small VAE, the tiny transformer."""
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer = char_tokenizer(tmp_path)
    torch.manual_seed(0)
    components = dict(
        transformer=tiny_sd3(layout),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(shift_factor=0.0),  # SD 3's pipelines shift latents by the VAE's factor
        text_encoder=CLIPTextModelWithProjection(_text_encoder_config(tokenizer, projection_dim=CROSS_DIM)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_encoder_config(tokenizer, projection_dim=CROSS_DIM)),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    if t5:  # a one-layer T5 over the same char-level vocabulary (saved pipelines need all three encoders)
        from transformers import T5Config, T5EncoderModel

        config = T5Config(
            vocab_size=tokenizer.vocab_size, d_model=JOINT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2
        )
        components.update(text_encoder_3=T5EncoderModel(config), tokenizer_3=tokenizer)
    cls = StableDiffusion3Img2ImgPipeline if kind == "img2img" else StableDiffusion3Pipeline
    return cls(**components)


FORCED = CASES["lean-agents-then-merged-kv"]


def generate(pipe, steps=3, **kwargs):
    return pipe(
        "a red box",
        num_inference_steps=steps,
        height=32,
        width=32,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **kwargs,
    ).images


@pytest.mark.parametrize("kind", ["txt2img", "img2img"])
def test_pipelines_act_and_remove_restores_vanilla_bit_for_bit(tmp_path, kind):
    pipe = tiny_sd3_pipeline(tmp_path, kind, layout="sd3.5")
    pipe.set_progress_bar_config(disable=True)
    extra = {}
    if kind == "img2img":
        extra = dict(image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)), strength=0.7)
    vanilla = generate(pipe, **extra)
    agentsd.apply(pipe, FORCED, blocks=range(6), seed=0)
    processors = [b.attn.processor for b in pipe.transformer.transformer_blocks]
    assert all(isinstance(p, JointAgentProcessor) for p in processors)
    assert all(isinstance(b.attn2.processor, JointAgentProcessor) for b in pipe.transformer.transformer_blocks[:3])
    patched = generate(pipe, **extra)
    assert torch.isfinite(patched).all() and (patched - vanilla).abs().max() > 1e-4
    agentsd.remove(pipe)
    assert not any(isinstance(b.attn.processor, JointAgentProcessor) for b in pipe.transformer.transformer_blocks)
    assert torch.equal(generate(pipe, **extra), vanilla)


def test_default_schedule_and_blocks():
    """apply(transformer) takes the 'sd3' preset on every block but the first and last two; a {blocks: phases}
    schedule bands blocks by position; bad block choices and UNet-only settings say what to do."""
    model = tiny_sd3(layers=6)
    agentsd.apply(model)
    patched = [isinstance(b.attn.processor, JointAgentProcessor) for b in model.transformer_blocks]
    assert patched == [False, False, True, True, False, False]
    assert agentsd.state_of(model).config.bands[0].phases == agentsd.PRESETS["sd3"]
    sample, context, pooled = inputs()
    agentsd.remove(model)
    vanilla = run(model, sample, context, pooled)
    agentsd.apply(model)  # 64 tokens: below the CPU's threshold, so nothing changes
    assert torch.equal(run(model, sample, context, pooled), vanilla)

    early, late = FORCED
    agentsd.apply(model, {range(0, 2): FORCED, 4: [dataclasses.replace(late, end=1.0)]})
    state = agentsd.state_of(model)
    assert [b.phases for b in state.config.bands] == [FORCED, (late,)]
    bands = [getattr(b.attn.processor, "band", None) for b in model.transformer_blocks]
    assert bands == [0, 0, None, None, 1, None]
    run(model, sample, context, pooled)
    agentsd.apply(model, {range(1, 5): "sd3-paper"})  # a preset per block range
    assert agentsd.state_of(model).config.bands[0].phases == agentsd.PRESETS["sd3-paper"]
    with pytest.raises(ValueError, match="blocks 0..5"):
        agentsd.apply(model, FORCED, blocks=[6])
    with pytest.raises(ValueError, match="named twice"):
        agentsd.apply(model, {range(0, 3): FORCED, 2: FORCED})
    with pytest.raises(ValueError, match="per-level UNet preset"):
        agentsd.apply(model, "lean")
    with pytest.raises(ValueError, match="max_downsample is for UNets"):
        agentsd.apply(model, FORCED, max_downsample=2)
    with pytest.warns(UserWarning, match="changes nothing"):
        agentsd.apply(tiny_sd3(layers=4))
    with pytest.raises(ValueError, match="blocks= is for SD 3"):
        from conftest import tiny_unet

        agentsd.apply(tiny_unet(), "paper", blocks=[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite(dtype):
    model = tiny_sd3("sd3.5").to(dtype)
    sample, context, pooled = inputs(dtype=dtype)
    agentsd.apply(model, FORCED, blocks=range(6), seed=0)
    for t in (900.0, 300.0):
        assert torch.isfinite(run(model, sample, context, pooled, t)).all()


def test_compiled_transformer_in_a_pipeline(tmp_path):
    """Compiled, then patched: no graph break, one graph per phase, a second run compiles nothing, equal to eager."""
    from torch._dynamo.utils import counters

    pipe = tiny_sd3_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    agentsd.apply(pipe, FORCED, blocks=range(6), seed=0)
    eager = generate(pipe, steps=4)
    agentsd.remove(pipe)
    torch._dynamo.reset()
    counters.clear()
    pipe.transformer = compile_graphs(pipe.transformer)
    agentsd.apply(pipe, FORCED, blocks=range(6), seed=0)
    compiled = generate(pipe, steps=4)
    graphs = counters["stats"]["unique_graphs"]
    generate(pipe, steps=4)
    assert sum(counters["graph_break"].values()) == 0
    assert graphs <= len(FORCED) and counters["stats"]["unique_graphs"] == graphs
    assert (compiled - eager).abs().max() < 1e-4 * eager.abs().max()
    agentsd.remove(pipe)


def test_controlnet_pipeline_patches_the_controlnet_too(tmp_path):
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    pipe = tiny_sd3_pipeline(tmp_path)
    torch.manual_seed(3)
    controlnet = SD3ControlNetModel(**TINY_SD3, num_layers=2)
    pipe = StableDiffusion3ControlNetPipeline(**pipe.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    control = dict(control_image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    vanilla = generate(pipe, **control)
    agentsd.apply(pipe, FORCED, blocks=range(2), seed=0)
    assert all(isinstance(b.attn.processor, JointAgentProcessor) for b in controlnet.transformer_blocks)
    assert agentsd.state_of(controlnet) is not None and agentsd.state_of(pipe.transformer) is not None
    patched = generate(pipe, **control)
    assert torch.isfinite(patched).all() and (patched - vanilla).abs().max() > 1e-4
    agentsd.remove(pipe)
    assert agentsd.state_of(controlnet) is None
    assert torch.equal(generate(pipe, **control), vanilla)


def test_cli_generates_with_an_sd3_folder(tmp_path, capsys):
    from agentsd.cli import main

    folder = tmp_path / "sd3"
    tiny_sd3_pipeline(tmp_path, t5=True).save_pretrained(folder)
    out = tmp_path / "grid.png"
    args = ["generate", "a red box", "--model", str(folder), "--steps", "2", "--size", "32", "--device", "cpu"]
    assert main([*args, "--compare", "none,agent,sd3-paper", "-o", str(out)]) == 0
    assert out.stat().st_size > 0 and "sd3-paper" in capsys.readouterr().out
    assert main([*args, "--method", "deepcache", "-o", str(out)]) == 2
    assert "has no UNet" in capsys.readouterr().err
