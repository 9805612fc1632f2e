"""Flux.1 and Wan 2.x pipelines built from configs (text encoders and tokenizers made here): agentsd acts, its phases
switch where the docs say, it composes with LoRA, torch.compile and diffusers' step caches, and remove restores
vanilla bit for bit."""

import json

import pytest
import torch
from conftest import CROSS_DIM, _text_encoder_config, char_tokenizer, compile_graphs
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from PIL import Image
from transformers import CLIPTextModel, T5Config, T5EncoderModel

import agentsd
from agentsd import Phase

T5_DIM = 32
# Forced phases (min_tokens=0: the tiny grids lie far below any device's threshold): agents to p = 0.4, then merged
# keys and values.
FLUX_PHASES = (
    Phase(end=0.4, sx=2, sy=2, ratio=0.0, agents="pooled", tokens="all", min_tokens=0),
    Phase(end=1.0, sx=2, sy=2, ratio=0.75, tokens="all", min_tokens=0),
)
WAN_PHASES = (
    Phase(end=0.4, st=2, sx=2, sy=2, ratio=0.0, agents="pooled", tokens="all", min_tokens=0),
    Phase(end=1.0, st=1, sx=2, sy=2, ratio=0.75, tokens="all", min_tokens=0),
)


def _t5(tokenizer):
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=tokenizer.vocab_size, d_model=T5_DIM, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=1, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def flux_transformer(in_channels=16):
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=CROSS_DIM, axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip


def flux_pipeline(tmp_path, cls=FluxPipeline):
    """A Flux pipeline of the given class: char-level tokenizer, 2-layer CLIP, 1-layer T5, a factor-2 VAE."""
    tokenizer = char_tokenizer(tmp_path)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32,
        shift_factor=0.1, scaling_factor=0.5, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    torch.manual_seed(0)
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256),
        vae=vae,
        text_encoder=CLIPTextModel(_text_encoder_config(tokenizer)).eval(),
        tokenizer=tokenizer,
        text_encoder_2=_t5(tokenizer),
        tokenizer_2=tokenizer,
        transformer=flux_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_transformer(in_channels=16):
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=16, text_dim=T5_DIM, freq_dim=32, ffn_dim=32, num_layers=3, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()  # fmt: skip


def wan_pipeline(tmp_path, cls=WanPipeline):
    """Wan text-to-video, or image-to-video in Wan 2.2's layout (two experts, no image encoder)."""
    tokenizer = char_tokenizer(tmp_path)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    components = dict(
        vae=vae,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        text_encoder=_t5(tokenizer),
        tokenizer=tokenizer,
        transformer=wan_transformer(),
    )
    if cls is WanImageToVideoPipeline:
        components.update(
            transformer=wan_transformer(36), transformer_2=wan_transformer(36), image_encoder=None,
            image_processor=None, boundary_ratio=0.9,  # the high-noise expert runs the first step
        )  # fmt: skip
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps=3, output_type="pt", **kwargs):
    generator = torch.Generator().manual_seed(0)
    if isinstance(pipe, (WanPipeline, WanImageToVideoPipeline)):
        if isinstance(pipe, WanImageToVideoPipeline):
            kwargs.setdefault("image", Image.new("RGB", (32, 32), (120, 60, 200)))
        out = pipe(
            prompt="a red circle", negative_prompt="blur", height=32, width=32, num_frames=9, num_inference_steps=steps,
            guidance_scale=4.0, max_sequence_length=16, generator=generator, output_type=output_type, **kwargs,
        )  # fmt: skip
        return out.frames
    if not isinstance(pipe, (FluxPipeline, FluxImg2ImgPipeline, FluxKontextPipeline)):  # SD 3
        kwargs.setdefault("guidance_scale", 3.0)
    elif isinstance(pipe, (FluxImg2ImgPipeline, FluxKontextPipeline)):
        kwargs.setdefault("image", Image.new("RGB", (32, 32), (120, 60, 200)))
    if isinstance(pipe, FluxImg2ImgPipeline):
        kwargs.setdefault("strength", 0.8)
    if isinstance(pipe, FluxKontextPipeline):
        kwargs.update(_auto_resize=False, max_area=32 * 32)
    return pipe(
        prompt="a red circle", height=32, width=32, num_inference_steps=steps, max_sequence_length=16,
        generator=generator, output_type=output_type, **kwargs,
    ).images  # fmt: skip


@pytest.mark.parametrize("cls", [FluxPipeline, FluxImg2ImgPipeline, FluxKontextPipeline])
def test_flux_pipelines_act_and_remove_restores_vanilla_bit_for_bit(tmp_path, cls):
    pipe = flux_pipeline(tmp_path, cls)
    vanilla = generate(pipe)
    agentsd.apply(pipe, FLUX_PHASES, blocks=range(3), seed=0)
    patched = generate(pipe)
    state = agentsd.state_of(pipe.transformer)
    assert state.grids == (((1, 8, 8), (1, 8, 8)) if cls is FluxKontextPipeline else ((1, 8, 8),))
    assert (patched - vanilla).abs().max() > 1e-4
    agentsd.remove(pipe)
    assert torch.equal(generate(pipe), vanilla)


def test_flux_controlnet_pipeline_patches_the_controlnet_too(tmp_path):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    base = flux_pipeline(tmp_path)
    torch.manual_seed(1)
    controlnet = FluxControlNetModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=T5_DIM, pooled_projection_dim=CROSS_DIM, axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip
    pipe = FluxControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    control = Image.new("RGB", (32, 32), (200, 200, 200))
    vanilla = generate(pipe, control_image=control)
    agentsd.apply(pipe, FLUX_PHASES, blocks=range(3), seed=0)
    assert agentsd.state_of(pipe.controlnet) is not None and agentsd.state_of(pipe.transformer) is not None
    patched = generate(pipe, control_image=control)
    assert agentsd.state_of(pipe.controlnet).grids == ((1, 8, 8),)
    assert (patched - vanilla).abs().max() > 1e-4
    agentsd.remove(pipe)
    assert agentsd.state_of(pipe.controlnet) is None
    assert torch.equal(generate(pipe, control_image=control), vanilla)


@pytest.mark.parametrize("cls", [WanPipeline, WanImageToVideoPipeline])
def test_wan_pipelines_act_and_remove_restores_vanilla_bit_for_bit(tmp_path, cls):
    pipe = wan_pipeline(tmp_path, cls)
    vanilla = generate(pipe)
    agentsd.apply(pipe, WAN_PHASES, blocks=range(3), seed=0)
    experts = [pipe.transformer] + ([pipe.transformer_2] if cls is WanImageToVideoPipeline else [])
    assert all(agentsd.state_of(t) is not None for t in experts)
    patched = generate(pipe)
    assert all(agentsd.state_of(t).grids == ((3, 2, 2),) for t in experts)  # 9 frames -> 3 latent frames, 16² / 8
    assert (patched - vanilla).abs().max() > 1e-4
    agentsd.remove(pipe)
    assert torch.equal(generate(pipe), vanilla)


def _phases_per_step(pipe, steps, run=None):
    """The phase index of every transformer call of a run at the pipeline's defaults (scheduler, shift); ``run``
    generates (this module's ``generate`` if ``None``)."""
    seen = []
    handle = pipe.transformer.register_forward_hook(
        lambda module, args, output: seen.append(int(agentsd.state_of(module).phase.end > 0.5))
    )
    try:
        (run or generate)(pipe, steps=steps, output_type="latent")
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("family,steps,switch", [("flux", 28, 12), ("wan", 50, 20), ("sd3", 28, 11), ("flux", 10, 4)])
def test_phases_switch_where_the_docs_say(tmp_path, family, steps, switch):
    """The pipelines' default schedulers (Flux: 28 steps, shifted by the image size; Wan: 50 UniPC steps, flow shift 3;
    SD 3: 28 steps, shift 3): the agent phase runs while the unshifted noise level is above 0.6, the steps that
    docs/dits.md lists, whatever the shift does to the noise levels."""
    if family == "sd3":
        from test_sd3 import FORCED, tiny_sd3_pipeline

        pipe = tiny_sd3_pipeline(tmp_path)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD 3's own scheduler config
        pipe.set_progress_bar_config(disable=True)
        agentsd.apply(pipe, FORCED, blocks=range(6), seed=0)
    else:
        pipe = flux_pipeline(tmp_path) if family == "flux" else wan_pipeline(tmp_path)
        agentsd.apply(pipe, FLUX_PHASES if family == "flux" else WAN_PHASES, blocks=range(3), seed=0)
    seen = _phases_per_step(pipe, steps)
    per_step = seen[::2] if family == "wan" else seen  # Wan runs the conditional and unconditional calls apart
    assert per_step == [0] * switch + [1] * (steps - switch)


def test_compiled_transformer_in_a_pipeline(tmp_path):
    """Compiled, then patched: no graph break, one graph per phase, a second run compiles nothing, equal to eager."""
    from torch._dynamo.utils import counters

    pipe = flux_pipeline(tmp_path)
    agentsd.apply(pipe, FLUX_PHASES, blocks=range(3), seed=0)
    eager = generate(pipe, steps=4)
    agentsd.remove(pipe)
    torch._dynamo.reset()
    counters.clear()
    pipe.transformer = compile_graphs(pipe.transformer)
    agentsd.apply(pipe, FLUX_PHASES, blocks=range(3), seed=0)
    compiled = generate(pipe, steps=4)
    graphs = counters["stats"]["unique_graphs"]
    generate(pipe, steps=4)
    assert sum(counters["graph_break"].values()) == 0
    assert graphs <= len(FLUX_PHASES) and counters["stats"]["unique_graphs"] == graphs
    assert (compiled - eager).abs().max() < 1e-4
    agentsd.remove(pipe)


def _block_calls(transformer) -> list:
    """Records every block of ``transformer`` whose attention computes (its query projection runs) in a list: a
    cache that skips a block or predicts its attention's output leaves it out."""
    calls = []
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    for block in blocks:
        block.attn.to_q.register_forward_pre_hook(lambda module, args: calls.append(module))
    return calls


@pytest.mark.parametrize("cache", ["first-block", "taylorseer", "magcache"])
@pytest.mark.parametrize("order", ["cache-first", "agentsd-first"])
def test_step_caches_compose(tmp_path, cache, order):
    """diffusers' step caches for DiTs and agentsd, enabled in either order: both act, and removing both gives vanilla
    back bit for bit."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    config = {
        "first-block": lambda: FirstBlockCacheConfig(threshold=0.5),
        "taylorseer": lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
        "magcache": lambda: MagCacheConfig(
            mag_ratios=[1.0] * 6, num_inference_steps=6, threshold=1.0, max_skip_steps=2
        ),
    }[cache]
    pipe = flux_pipeline(tmp_path)
    calls = _block_calls(pipe.transformer)
    vanilla = generate(pipe, steps=6)
    full = len(calls)
    calls.clear()
    pipe.transformer.enable_cache(config())
    cached = generate(pipe, steps=6)
    assert len(calls) < full  # the cache skips blocks
    pipe.transformer.disable_cache()
    steps = [lambda: pipe.transformer.enable_cache(config()), lambda: agentsd.apply(pipe, FLUX_PHASES, blocks=range(3))]
    for enable in steps if order == "cache-first" else steps[::-1]:
        enable()
    calls.clear()
    both = generate(pipe, steps=6)
    assert len(calls) < full  # the cache still skips blocks
    assert agentsd.state_of(pipe.transformer).calls > 0 and (both - cached).abs().max() > 1e-4  # and agentsd acts
    agentsd.remove(pipe)
    pipe.transformer.disable_cache()
    assert torch.equal(generate(pipe, steps=6), vanilla)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_cli_compares_on_a_saved_folder(tmp_path, capsys, family):
    """`agentsd generate --compare` on a Flux folder writes a grid; on a Wan folder, side-by-side frames."""
    from PIL import Image as PILImage

    from agentsd.cli import main

    pipe = flux_pipeline(tmp_path) if family == "flux" else wan_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "out.png"
    args = ["generate", "a red circle", "--model", str(tmp_path / "model"), "--compare", f"none,{family}"]
    args += ["--steps", "2", "--size", "32", "--repeats", "1", "-o", str(out)]
    if family == "wan":
        args += ["--frames", "5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{family}: " in printed and "none: " in printed
    if family == "flux":
        assert PILImage.open(out).size == (2 * 256, 256 + 16)  # two 32² images enlarged to 256², labels under them
    else:
        frames = sorted(tmp_path.glob("out-f*.png"))
        assert len(frames) == 5 and PILImage.open(frames[0]).size == (2 * 256, 256 + 16)
        assert main(args[:-2] + ["-o", str(tmp_path / "clip.gif")]) == 2  # videos: .png frames or .mp4


def test_bench_quality_reads_a_video_pipelines_frames(tmp_path):
    """`agentsd bench quality` on a Wan folder: each video saved as one filmstrip of its frames, measured whole."""
    from PIL import Image as PILImage

    from agentsd.cli import main

    wan_pipeline(tmp_path).save_pretrained(tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "quality"
    args = ["bench", "quality", "--model", str(tmp_path / "model"), "--prompts", str(prompts), "--num", "2"]
    args += ["--steps", "2", "--batch", "2", "--size", "32", "--frames", "5", "--methods", "none", "wan", "--force"]
    args += ["--out", str(out)]
    assert main(args) == 0
    strip = PILImage.open(out / "images" / "wan" / "00001.png")
    width, height = strip.size
    assert height == 5 * width  # five square frames, one above the other
    vanilla = PILImage.open(out / "images" / "none" / "00001.png")
    assert (
        vanilla.size == strip.size
        and vanilla.tobytes() != PILImage.open(out / "images" / "none" / "00000.png").tobytes()
    )
    results = json.loads((out / "quality.json").read_text())["metrics"]["methods"]
    assert results["wan"]["images"] == 2 and results["wan"]["psnr_vs_none"] > 0  # read from the strips
    assert main([*args[:-2], "--model", "demo", "--out", str(tmp_path / "x")]) == 2  # --frames: videos only
