"""Qwen-Image through agentsd.dit, a third family as a small adapter: equal to the float64 reference of DESIGN.md §11
with its text mask, its pipelines act and remove restores vanilla bit for bit, its phases switch where the docs say
under its own scheduler (time shift by image size, stretched to a terminal noise level)."""

import pytest
import torch
from conftest import char_tokenizer
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageImg2ImgPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from PIL import Image
from reference_dit import reference_qwen
from test_dit import phases
from test_dit_pipelines import _phases_per_step
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import agentsd
from agentsd import Phase

TEXT_DIM = 16
QWEN_PHASES = (  # forced (min_tokens=0): agents to p = 0.4, then merged keys and values
    Phase(end=0.4, sx=2, sy=2, ratio=0.0, agents="pooled", tokens="all", min_tokens=0),
    Phase(end=1.0, sx=2, sy=2, ratio=0.75, tokens="all", min_tokens=0),
)


def tiny_qwen(in_channels=8, seed=0):
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=in_channels, out_channels=in_channels // 4, num_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()  # fmt: skip


def qwen_inputs(batch, grids, t, masked, seed=1):
    """Forward kwargs of a Qwen-Image call over image grids ``[(h, w), ...]`` (a second one as Edit's reference
    image); ``masked``: the second prompt padded (its last 3 text tokens masked out)."""
    g = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in grids)
    mask = torch.ones(batch, 7, dtype=torch.long)
    if masked:
        mask[-1, 4:] = 0
    return dict(
        hidden_states=torch.randn(batch, tokens, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 7, TEXT_DIM, generator=g),
        encoder_hidden_states_mask=mask if masked else None,
        timestep=torch.full((batch,), t),
        img_shapes=[[(1, h, w) for h, w in grids]] * batch,
    )


def _forward(model, kwargs):
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


QWEN_CASES = [  # (batch, grids, agents, masked)
    (1, [(8, 12)], "pooled", False),
    (2, [(8, 12)], "merged", True),
    (2, [(6, 10)], "pooled", True),  # windows that leave a ragged border
    (1, [(6, 10)], "merged", False),
    (2, [(8, 8), (4, 8)], "pooled", True),  # two grids (Edit's latent and reference image)
    (2, [(8, 8), (4, 8)], "merged", False),
]


@pytest.mark.parametrize("batch,grids,agents,masked", QWEN_CASES)
@pytest.mark.parametrize("t", [0.9, 0.3], ids=["agent-phase", "late-phase"])
def test_qwen_equals_the_reference(batch, grids, agents, masked, t):
    model = tiny_qwen()
    schedule = phases(agents, (1, 4, 4), (1, 2, 2))
    blocks = [1, 2]
    ref = reference_qwen(model, schedule, blocks, seed=5)
    agentsd.apply(model, schedule, blocks=blocks, seed=5)
    kwargs = qwen_inputs(batch, grids, t, masked)
    for _ in range(2):  # a second call takes the next random dst draw
        expected = ref(**kwargs)
        out = _forward(model, kwargs)
        assert agentsd.state_of(model).grids == tuple((1, h, w) for h, w in grids)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert (out - _forward(tiny_qwen(), kwargs)).abs().max() > 1e-3  # it acted


def test_the_text_mask_counts():
    """A padded prompt's masked text keys are left out as vanilla leaves them out: dropping the mask changes the
    output of the padded sample and only of it."""
    model = tiny_qwen()
    agentsd.apply(model, phases("pooled", (1, 4, 4), (1, 2, 2)), blocks=range(3))
    kwargs = qwen_inputs(2, [(8, 8)], 0.9, masked=True)
    masked = _forward(model, kwargs)
    unmasked = _forward(model, {**kwargs, "encoder_hidden_states_mask": None})
    assert torch.equal(masked[0], unmasked[0])
    assert (masked[1] - unmasked[1]).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite(dtype):
    model = tiny_qwen().to(dtype)
    agentsd.apply(model, phases("merged", (1, 4, 4), (1, 2, 2)), blocks=range(3))
    for t in (0.9, 0.3):
        kwargs = qwen_inputs(2, [(8, 12)], t, masked=True)
        kwargs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
        out = _forward(model, kwargs)
        assert out.dtype == dtype and torch.isfinite(out).all()


def qwen_pipeline(tmp_path, cls=QwenImagePipeline):
    """A Qwen-Image pipeline: char-level tokenizer, a 2-layer Qwen2.5-VL, a factor-4 VAE, Qwen-Image's scheduler
    config (dynamic shift, stretched to a terminal level of 0.02)."""
    tokenizer = char_tokenizer(tmp_path)
    vocab = tokenizer.vocab_size
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=TEXT_DIM, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_DIM),
        vocab_size=vocab, vision_start_token_id=vocab - 1, vision_end_token_id=vocab - 2, vision_token_id=vocab - 3,
    )  # fmt: skip
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9,
        shift_terminal=0.02, time_shift_type="exponential",
    )  # fmt: skip
    pipe = cls(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=tiny_qwen(16))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps=3, output_type="pt", **kwargs):
    if isinstance(pipe, QwenImageImg2ImgPipeline):
        kwargs.setdefault("image", Image.new("RGB", (64, 64), (120, 60, 200)))
        kwargs.setdefault("strength", 0.8)
    return pipe(
        prompt=["a red circle", "a big blue square on the left"], height=64, width=64, num_inference_steps=steps,
        max_sequence_length=32, generator=torch.Generator().manual_seed(0), output_type=output_type, **kwargs,
    ).images  # fmt: skip


@pytest.mark.parametrize("cls", [QwenImagePipeline, QwenImageImg2ImgPipeline])
def test_qwen_pipelines_act_and_remove_restores_vanilla_bit_for_bit(tmp_path, cls):
    pipe = qwen_pipeline(tmp_path, cls)
    vanilla = generate(pipe)
    agentsd.apply(pipe, QWEN_PHASES, blocks=range(3), seed=0)
    patched = generate(pipe)
    assert agentsd.state_of(pipe.transformer).grids == ((1, 8, 8),)  # 64² / 4 (VAE) / 2 (patches)
    assert (patched - vanilla).abs().max() > 1e-4
    agentsd.remove(pipe)
    assert torch.equal(generate(pipe), vanilla)


def test_default_preset_and_what_it_leaves_alone(tmp_path):
    pipe = qwen_pipeline(tmp_path)
    assert agentsd.patch.default_schedule(pipe) == "qwen"
    with pytest.warns(UserWarning, match="changes nothing"):  # 3 blocks: the 2 edge blocks at each end take them all
        agentsd.apply(pipe)


@pytest.mark.parametrize("steps,switch", [(50, 20), (28, 12), (8, 4)])
def test_phases_switch_where_the_docs_say(tmp_path, steps, switch):
    """Qwen-Image's scheduler shifts the noise levels by the image size and stretches them so the last lands on
    0.02: with both undone the agent phase runs the first 40% of the steps (at 28 and 8 steps the stretch alone
    would move the switch one step early)."""
    pipe = qwen_pipeline(tmp_path)
    agentsd.apply(pipe, QWEN_PHASES, blocks=range(3), seed=0)
    assert _phases_per_step(pipe, steps, generate) == [0] * switch + [1] * (steps - switch)


def test_the_controlnet_is_patched_too():
    """QwenImageControlNetModel runs the same blocks: agentsd acts on it bare and remove restores it bit for bit."""
    from diffusers import QwenImageControlNetModel

    torch.manual_seed(0)
    controlnet = QwenImageControlNetModel(
        patch_size=2, in_channels=8, out_channels=2, num_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(8, 4, 4), extra_condition_channels=0,
    ).eval()  # fmt: skip
    for layer in controlnet.controlnet_blocks:  # zero at initialisation: give them weights so that outputs differ
        torch.nn.init.normal_(layer.weight)
    kwargs = qwen_inputs(2, [(8, 8)], 0.9, masked=True)
    kwargs["controlnet_cond"] = torch.randn_like(kwargs["hidden_states"])
    vanilla = _forward(controlnet, kwargs)
    agentsd.apply(controlnet, QWEN_PHASES, blocks=range(3))
    patched = _forward(controlnet, kwargs)
    assert agentsd.state_of(controlnet).grids == ((1, 8, 8),)
    assert max((p - v).abs().max() for p, v in zip(patched, vanilla)) > 1e-4
    agentsd.remove(controlnet)
    assert all(torch.equal(a, b) for a, b in zip(_forward(controlnet, kwargs), vanilla))
