"""Flux and Wan through agentsd.dit: equal to the float64 reference of DESIGN.md §11, and remove restores vanilla."""

import copy
import dataclasses

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, WanTransformer3DModel
from reference_dit import reference_flux, reference_wan

import agentsd
from agentsd import Phase
from agentsd.schedule import PRESETS


def tiny_flux(seed=0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_wan(seed=0):
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=3,
        rope_max_seq_len=32,
    ).eval()


def flux_inputs(batch, grids, t, seed=1):
    """Forward kwargs of a Flux call over image grids ``[(h, w), ...]`` (a second grid as Kontext's reference)."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for k, (h, w) in enumerate(grids):
        grid = FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)
        grid[:, 0] = k
        ids.append(grid)
    img_ids = torch.cat(ids)
    return dict(
        hidden_states=torch.randn(batch, len(img_ids), 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g),
        timestep=torch.full((batch,), t),
        img_ids=img_ids,
        txt_ids=torch.zeros(5, 3),
    )


def wan_inputs(batch, frames, h, w, t, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, frames, 2 * h, 2 * w, generator=g),
        timestep=torch.full((batch,), t),
        encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
    )


def phases(agents, window, late_window):
    """An agent phase to p = 0.4, then merged keys and values; explicit thresholds (the reference takes them)."""
    st, sy, sx = window
    early = dict(agents="pooled") if agents == "pooled" else dict(agent_ratio=1 - 1 / (st * sy * sx))
    lt, ly, lx = late_window
    return (
        Phase(end=0.4, st=st, sy=sy, sx=sx, ratio=0.0, tokens="all", min_tokens=0, **early),
        Phase(end=1.0, st=lt, sy=ly, sx=lx, ratio=1 - 1 / (lt * ly * lx), tokens="all", min_tokens=0),
    )


def _forward(model, kwargs):
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


FLUX_CASES = [  # (batch, grids, agents): windows that tile the grid and ones that leave a ragged border
    (1, [(8, 12)], "pooled"),
    (2, [(8, 12)], "merged"),
    (2, [(6, 10)], "pooled"),
    (1, [(6, 10)], "merged"),
    (2, [(8, 8), (4, 8)], "pooled"),  # two grids (Kontext's latent and reference image)
    (2, [(8, 8), (4, 8)], "merged"),
]


@pytest.mark.parametrize("batch,grids,agents", FLUX_CASES)
@pytest.mark.parametrize("t", [0.9, 0.3], ids=["agent-phase", "late-phase"])
def test_flux_equals_the_reference(batch, grids, agents, t):
    model = tiny_flux()
    schedule = phases(agents, (1, 4, 4), (1, 2, 2))
    blocks = [1, 2, 3]  # the second double-stream block and both single-stream ones
    ref = reference_flux(model, schedule, blocks, seed=7)
    agentsd.apply(model, schedule, blocks=blocks, seed=7)
    kwargs = flux_inputs(batch, grids, t)
    for _ in range(2):  # a second call takes the next random dst draw
        expected = ref(**kwargs)
        out = _forward(model, kwargs)
        assert agentsd.state_of(model).phase is schedule[0 if t > 0.6 else 1]
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    vanilla = tiny_flux()
    assert (out - _forward(vanilla, kwargs)).abs().max() > 1e-3  # it acted


WAN_CASES = [  # (batch, frames, h, w, agents): frame counts the frame window does not divide, ragged grids
    (1, 4, 4, 8, "pooled"),
    (2, 5, 4, 6, "pooled"),
    (2, 5, 5, 6, "merged"),
    (1, 3, 4, 8, "merged"),
]


@pytest.mark.parametrize("batch,frames,h,w,agents", WAN_CASES)
@pytest.mark.parametrize("t", [900, 300], ids=["agent-phase", "late-phase"])
def test_wan_equals_the_reference(batch, frames, h, w, agents, t):
    model = tiny_wan()
    schedule = phases(agents, (2, 2, 2), (1, 2, 2))
    blocks = [0, 1, 2]
    ref = reference_wan(model, schedule, blocks, seed=3)
    agentsd.apply(model, schedule, blocks=blocks, seed=3)
    kwargs = wan_inputs(batch, frames, h, w, t)
    for _ in range(2):
        expected = ref(**kwargs)
        out = _forward(model, kwargs)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert (out - _forward(tiny_wan(), kwargs)).abs().max() > 1e-3


@pytest.mark.parametrize("late_window", [(1, 1, 2), (1, 2, 1)])
@pytest.mark.parametrize("options", [{}, dict(proportional=True, near=True)], ids=["plain", "both"])
def test_a_late_phase_over_pairs_of_tokens_acts_and_equals_the_reference(late_window, options):
    """Merged keys of windows of two tokens that tile the grids (half the keys merged away) still merge; batch 2."""
    schedule = tuple(dataclasses.replace(p, **options) for p in phases("pooled", (1, 4, 4), late_window))
    model = tiny_flux()
    ref = reference_flux(model, schedule, [1, 3], seed=5)
    agentsd.apply(model, schedule, blocks=[1, 3], seed=5)
    kwargs = flux_inputs(2, [(8, 8), (4, 6)], 0.3)
    out = _forward(model, kwargs)
    torch.testing.assert_close(out.double(), ref(**kwargs), atol=1e-5, rtol=1e-5)
    assert (out - _forward(tiny_flux(), kwargs)).abs().max() > 1e-3  # it acted
    wan = tiny_wan()
    ref = reference_wan(wan, schedule, [0, 2], seed=5)
    agentsd.apply(wan, schedule, blocks=[0, 2], seed=5)
    kwargs = wan_inputs(2, 2, 4, 4, 300)
    out = _forward(wan, kwargs)
    torch.testing.assert_close(out.double(), ref(**kwargs), atol=1e-5, rtol=1e-5)
    assert (out - _forward(tiny_wan(), kwargs)).abs().max() > 1e-3


@pytest.mark.parametrize("t", [0.9, 0.3], ids=["agent-phase", "late-phase"])
def test_the_flux_preset_takes_both_options_and_equals_the_reference(t):
    """flux (Flux.1's and Qwen-Image's default) runs proportional attention and the near field over the 3x3 windows
    around each query's own in both phases, its late phase over 4x4 windows (chosen on the DiT proving grounds);
    flux-bare's agent phase is flux's without the options. Its phases, forced to act, equal the reference on a grid its
    4x4 windows do not tile, with more windows in a row than a neighbourhood holds."""
    early, late = PRESETS["flux"]
    assert all(p.proportional and p.near is True and p.near_reach == 1 for p in (early, late))
    assert PRESETS["qwen"] == PRESETS["flux"]
    assert dataclasses.replace(early, proportional=False, near=False, near_reach=0) == PRESETS["flux-bare"][0]
    assert (late.sx, late.sy, late.ratio, late.tokens) == (4, 4, 1 - 1 / 16, "all") and not late.makes_agents
    schedule = tuple(dataclasses.replace(p, min_tokens=0) for p in PRESETS["flux"])
    model = tiny_flux()
    ref = reference_flux(model, schedule, [1, 2, 3], seed=7)
    agentsd.apply(model, schedule, blocks=[1, 2, 3], seed=7)
    kwargs = flux_inputs(2, [(6, 18)], t)  # 1 x 4 windows of 4x4 and a ragged border
    out = _forward(model, kwargs)
    torch.testing.assert_close(out.double(), ref(**kwargs), atol=1e-5, rtol=1e-5)
    assert (out - _forward(tiny_flux(), kwargs)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_remove_restores_vanilla_bit_for_bit(family):
    model = tiny_flux() if family == "flux" else tiny_wan()
    kwargs = flux_inputs(2, [(8, 12)], 0.9) if family == "flux" else wan_inputs(2, 5, 4, 8, 900)
    processors = dict(model.attn_processors)
    vanilla = _forward(model, kwargs)
    schedule = phases("pooled", (1, 4, 4) if family == "flux" else (2, 2, 2), (1, 2, 2))
    agentsd.apply(model, schedule, blocks=range(3))
    assert not torch.equal(_forward(model, kwargs), vanilla)
    agentsd.remove(model)
    assert all(model.attn_processors[name] is p for name, p in processors.items())
    assert torch.equal(_forward(model, kwargs), vanilla)


def test_other_transformers_say_what_is_supported():
    from diffusers import PixArtTransformer2DModel

    class PixArtLike:
        transformer = PixArtTransformer2DModel(
            sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2, in_channels=4,
            cross_attention_dim=16, caption_channels=16, norm_type="ada_norm_single", out_channels=8,
        )  # fmt: skip

    with pytest.raises(TypeError, match="PixArtTransformer2DModel.*Stable Diffusion 3.*Flux.1.*Wan 2.x"):
        agentsd.apply(PixArtLike())
    with pytest.raises(TypeError, match="PixArtTransformer2DModel.*FluxTransformer2DModel.*WanTransformer3DModel"):
        agentsd.apply(PixArtLike.transformer)


def test_dit_phases_are_checked():
    """What a Flux or Wan patch cannot do is refused, not ignored."""
    with pytest.raises(ValueError, match="tokens='all'"):
        agentsd.apply(tiny_flux(), "sd3-paper")
    with pytest.raises(ValueError, match="every src token"):
        agentsd.apply(tiny_flux(), [Phase(sx=2, sy=2, ratio=0.5, tokens="all")])
    with pytest.raises(ValueError, match="max_downsample is for UNets"):
        agentsd.apply(tiny_wan(), max_downsample=2)
    with pytest.raises(ValueError, match="per-level UNet preset"):
        agentsd.apply(tiny_wan(), "lean")
    with pytest.raises(ValueError, match="has blocks 0..3"):
        agentsd.apply(tiny_flux(), blocks=[4])


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite(family, dtype):
    model = (tiny_flux() if family == "flux" else tiny_wan()).to(dtype)
    schedule = phases("merged", (1, 4, 4) if family == "flux" else (2, 2, 2), (1, 2, 2))
    agentsd.apply(model, schedule, blocks=range(3))
    for t in (0.9, 0.3) if family == "flux" else (900, 300):
        kwargs = flux_inputs(2, [(8, 12)], t) if family == "flux" else wan_inputs(2, 5, 4, 6, t)
        kwargs = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in kwargs.items()}
        out = _forward(model, kwargs)
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_flux_with_peft_lora_on_the_attention_projections():
    """A LoRA on every attention projection (Flux users load these most) runs inside agentsd's adapter: the output
    equals the reference on the same model with the LoRA merged into its weights."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = tiny_flux()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    merged = copy.deepcopy(model)
    for module in merged.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    schedule = phases("pooled", (1, 4, 4), (1, 2, 2))
    ref = reference_flux(merged, schedule, [1, 2, 3])
    kwargs = flux_inputs(1, [(8, 12)], 0.9)
    without = _forward(model, kwargs)
    agentsd.apply(model, schedule, blocks=[1, 2, 3])
    out = _forward(model, kwargs)
    torch.testing.assert_close(out.double(), ref(**kwargs), atol=1e-5, rtol=1e-5)
    model.disable_adapters()
    assert (out - _forward(model, kwargs)).abs().max() > 1e-3  # the LoRA counted
    model.enable_adapters()
    agentsd.remove(model)
    assert torch.equal(_forward(model, kwargs), without)
