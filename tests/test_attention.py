"""The patched UNet against tomesd (ToMe path) and against the float64 reference (agent path)."""

import dataclasses

import pytest
import tomesd
import torch
from conftest import tiny_unet, unet_inputs
from reference import reference_unet

import agentsd
from agentsd import Phase

TOL = 1e-4


def run(unet, sample, context, timestep=500):
    with torch.no_grad():
        return unet(sample, timestep, context).sample


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("size", [(16, 16), (18, 22), (30, 26)])
def test_tome_mode_matches_tomesd(ratio, size):
    unet = tiny_unet("sd")
    sample, context = unet_inputs(height=size[0], width=size[1], seed=ratio.as_integer_ratio()[0] % 97)
    vanilla = run(unet, sample, context)
    tomesd.apply_patch(unet, ratio=ratio, use_rand=False)
    theirs = run(unet, sample, context)
    tomesd.remove_patch(unet)
    agentsd.apply(unet, [Phase(end=1.0, sx=2, sy=2, ratio=ratio)], use_rand=False)
    ours = run(unet, sample, context)
    assert (ours - theirs).abs().max() < TOL
    assert (ours - vanilla).abs().max() > 100 * TOL  # merging really happened


SETTINGS = [
    # the paper's agent phase: every src merged into the agents (n = number of windows)
    dict(phase=Phase(end=1.0, sx=4, sy=4, ratio=0.4, agent_ratio=0.95), size=(16, 16)),
    # agents that keep some unmerged src tokens; ragged border; other constants
    dict(phase=Phase(end=1.0, sx=2, sy=2, ratio=0.3, agent_ratio=0.7), size=(18, 22), k_scale2=0.5, k_shortcut=0.2),
    # 2·n >= N - r: the gate turns agents off, plain ToMe attention
    dict(phase=Phase(end=1.0, sx=2, sy=2, ratio=0.5, agent_ratio=0.5), size=(16, 16)),
    # non-square windows, ragged on both sides
    dict(phase=Phase(end=1.0, sx=3, sy=2, ratio=0.45, agent_ratio=0.9), size=(14, 20)),
    # random dst choice, drawn the same way by both
    dict(phase=Phase(end=1.0, sx=4, sy=4, ratio=0.4, agent_ratio=0.95), size=(16, 16), seed=7),
    dict(phase=Phase(end=1.0, sx=2, sy=2, ratio=0.3, agent_ratio=0.7), size=(18, 18), seed=3),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=range(len(SETTINGS)))
def test_agent_path_matches_reference(setting):
    unet = tiny_unet("sd", seed=len(str(setting)))
    height, width = setting["size"]
    sample, context = unet_inputs(height=height, width=width, seed=len(str(setting)) + 1)
    constants = {k: setting[k] for k in ("k_scale2", "k_shortcut") if k in setting}
    seed = setting.get("seed")
    reference = reference_unet(unet, setting["phase"], seed=seed, **constants)
    agentsd.apply(unet, [setting["phase"]], use_rand=seed is not None, seed=seed, **constants)
    ours = run(unet, sample, context)
    expected = reference(sample, 500, context)
    assert (ours.double() - expected).abs().max() < TOL
    agentsd.remove(unet)
    assert (run(unet, sample, context).double() - expected).abs().max() > 100 * TOL


def test_random_dst_depends_on_seed_and_changes_between_calls(unet):
    sample, context = unet_inputs()
    phase = [Phase(end=1.0, sx=2, sy=2, ratio=0.5)]
    agentsd.apply(unet, phase, seed=1)
    first, second = run(unet, sample, context), run(unet, sample, context)
    agentsd.apply(unet, phase, seed=1)
    again = run(unet, sample, context)
    agentsd.apply(unet, phase, seed=2)
    other = run(unet, sample, context)
    assert torch.equal(first, again)
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, other)


def test_odd_batch_turns_random_dst_off(unet):
    sample, context = unet_inputs(batch=3)
    phase = [Phase(end=1.0, sx=2, sy=2, ratio=0.5)]
    agentsd.apply(unet, phase, use_rand=False)
    fixed = run(unet, sample, context)
    agentsd.apply(unet, phase, use_rand=True, seed=0)
    assert torch.equal(run(unet, sample, context), fixed)
    assert torch.equal(run(unet, sample, context), fixed)


def test_sdxl_layout_merges_at_its_first_attention_level():
    unet = tiny_unet("sdxl")
    sample, context = unet_inputs(height=32, width=32)
    phase = Phase(end=1.0, sx=2, sy=2, ratio=0.5, agent_ratio=0.8)
    reference = reference_unet(unet, phase, max_downsample=2)
    vanilla = run(unet, sample, context)
    agentsd.apply(unet, [phase], use_rand=False)  # max_downsample="auto" -> 2
    ours = run(unet, sample, context)
    assert (ours.double() - reference(sample, 500, context)).abs().max() < TOL
    assert (ours - vanilla).abs().max() > 100 * TOL
    with pytest.warns(UserWarning, match="changes nothing"):  # ToMeSD's default merges nothing here
        agentsd.apply(unet, [phase], use_rand=False, max_downsample=1)
    assert torch.equal(run(unet, sample, context), vanilla)


@pytest.mark.parametrize("schedule", ["paper", "lean"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, schedule):
    from agentsd.bench.checks import forced

    schedule = forced(schedule) if schedule == "lean" else schedule  # lean at the tiny UNet's 256 tokens
    unet = tiny_unet("sd")
    sample, context = unet_inputs()
    agentsd.apply(unet, schedule, use_rand=False)
    expected = run(unet, sample, context, timestep=900)
    unet.to(dtype)
    for precision in (None, "fp32"):
        agentsd.apply(unet, schedule, use_rand=False, attn_precision=precision)
        out = run(unet, sample.to(dtype), context.to(dtype), timestep=900)
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
        assert (out.float() - expected).abs().max() < 0.1 * expected.abs().max()


def test_attn_precision_fp32_runs_softmax_products_in_float32(monkeypatch):
    unet = tiny_unet("sd").to(torch.bfloat16)
    sample, context = unet_inputs(dtype=torch.bfloat16)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(agentsd.attention.F, "scaled_dot_product_attention", spy)
    agentsd.apply(unet, [Phase(end=1.0, sx=4, sy=4, ratio=0.4, agent_ratio=0.95)], attn_precision="fp32")
    run(unet, sample, context)
    fp32 = (torch.float32,) * 3
    # two agent products in each of the three top-level blocks (1 down, 2 up); diffusers' calls stay in bf16
    assert seen.count(fp32) == 2 * 3
    seen.clear()
    agentsd.apply(unet, [Phase(end=1.0, sx=4, sy=4, ratio=0.4, agent_ratio=0.95)])
    run(unet, sample, context)
    assert seen and fp32 not in seen


@pytest.mark.parametrize("size", [(16, 16), (18, 22)])
@pytest.mark.parametrize("crossattn, mlp", [(True, True), (True, False), (False, True)])
def test_merged_sublayers_match_tomesd(size, crossattn, mlp):
    unet = tiny_unet("sd", seed=5)
    sample, context = unet_inputs(height=size[0], width=size[1], seed=6)
    tomesd.apply_patch(unet, ratio=0.5, use_rand=False, merge_crossattn=crossattn, merge_mlp=mlp)
    theirs = run(unet, sample, context)
    tomesd.remove_patch(unet)
    attn1_only = run(agentsd.apply(unet, [Phase(sx=2, sy=2, ratio=0.5)], use_rand=False), sample, context)
    agentsd.apply(unet, [Phase(sx=2, sy=2, ratio=0.5, merge_crossattn=crossattn, merge_mlp=mlp)], use_rand=False)
    ours = run(unet, sample, context)
    assert (ours - theirs).abs().max() < TOL
    assert (ours - attn1_only).abs().max() > 100 * TOL


BLOCK_SETTINGS = [
    # an agent phase carried through the whole block
    dict(
        phases={1: Phase(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, merge_crossattn=True, merge_mlp=True)}, size=(16, 16)
    ),
    # two levels with their own settings (the tiny UNet's mid block is level 1; cross-attention merged on
    # one, the feed-forward on the other), random dst
    dict(
        phases={
            1: Phase(sx=4, sy=4, ratio=0.5, agent_ratio=0.9, merge_crossattn=True),
            2: Phase(sx=2, sy=2, ratio=0.4, agent_ratio=0.7, merge_mlp=True),
        },
        size=(16, 16),
        seed=4,
    ),
    # ragged windows; level 1 left alone by min_tokens, level 0 merged only in attn1
    dict(
        phases={1: Phase(sx=3, sy=2, ratio=0.3, agent_ratio=0.9), 2: Phase(sx=2, sy=2, ratio=0.5, min_tokens=80)},
        size=(18, 14),
    ),
]


# each phase of the fast preset on both levels (min_tokens lowered so that it acts on the tiny UNet)
BLOCK_SETTINGS += [
    dict(
        phases={
            downsample: dataclasses.replace(agentsd.PRESETS["fast"][level][k], end=1.0, min_tokens=0)
            for level, downsample in ((0, 1), (1, 2))
        },
        size=(16, 16),
        seed=7,
    )
    for k in range(2)
]


# one matching per level and call (share_matching): agents and merged cross-attention, random dst; ragged ToMe
BLOCK_SETTINGS += [
    dict(
        phases={
            1: Phase(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, merge_crossattn=True, share_matching=True),
            2: Phase(sx=2, sy=2, ratio=0.5, merge_mlp=True, share_matching=True),
        },
        size=(16, 16),
        seed=5,
    ),
    dict(phases={1: Phase(sx=3, sy=2, ratio=0.5, share_matching=True)}, size=(18, 14)),
]


@pytest.mark.parametrize("setting", BLOCK_SETTINGS, ids=range(len(BLOCK_SETTINGS)))
def test_per_level_and_whole_block_paths_match_reference(setting):
    unet = tiny_unet("sd", seed=11)
    sample, context = unet_inputs(height=setting["size"][0], width=setting["size"][1], seed=12)
    by_downsample = setting["phases"]
    levels = {agentsd.patch.attention_levels(unet).index(d): (p,) for d, p in by_downsample.items()}
    seed = setting.get("seed")
    vanilla = run(unet, sample, context)
    reference = reference_unet(unet, by_downsample, seed=seed)
    agentsd.apply(unet, levels, use_rand=seed is not None, seed=seed)
    ours = run(unet, sample, context)
    assert (ours.double() - reference(sample, 500, context)).abs().max() < TOL
    assert (ours - vanilla).abs().max() > 100 * TOL


def test_min_tokens_leaves_small_levels_alone(unet):
    sample, context = unet_inputs()  # 256 tokens at level 0, 64 in the mid block
    vanilla = run(unet, sample, context)
    agentsd.apply(unet, [Phase(sx=2, sy=2, ratio=0.5, min_tokens=257)], use_rand=False)
    assert torch.equal(run(unet, sample, context), vanilla)
    agentsd.apply(unet, [Phase(sx=2, sy=2, ratio=0.5, min_tokens=256)], use_rand=False)
    assert not torch.equal(run(unet, sample, context), vanilla)


def test_min_tokens_none_takes_the_default_of_the_device_the_model_runs_on(unet, monkeypatch):
    from agentsd import schedule

    sample, context = unet_inputs()  # 256 tokens at level 0: under the CPU default of 1,024
    vanilla = run(unet, sample, context)
    agentsd.apply(unet, [Phase(sx=2, sy=2, ratio=0.5, min_tokens=None)], use_rand=False)
    assert torch.equal(run(unet, sample, context), vanilla)
    monkeypatch.setitem(schedule.DEVICE_MIN_TOKENS, "cpu", 256)  # the lookup is by the hidden states' device
    assert not torch.equal(run(unet, sample, context), vanilla)


def test_shared_matching_matches_once_per_level_and_call(monkeypatch):
    """Shared: one matching per level per call (each call its own, as the reference over two calls); unshared:
    one per block. The two differ."""
    unet = tiny_unet("sd", seed=13)
    sample, context = unet_inputs(seed=14)
    phases = {1: Phase(sx=2, sy=2, ratio=0.5, agent_ratio=0.8), 2: Phase(sx=2, sy=2, ratio=0.5)}
    calls = []
    match = agentsd.attention.match
    monkeypatch.setattr(agentsd.attention, "match", lambda *a: calls.append(a[0].shape[1]) or match(*a))
    agentsd.apply(unet, {0: [phases[1]], 1: [phases[2]]}, seed=3)
    unshared = run(unet, sample, context)
    assert calls == [256, 64, 256, 256]  # 1 down and 2 up blocks at level 0, the mid block at level 1
    shared = {d: dataclasses.replace(p, share_matching=True) for d, p in phases.items()}
    reference = reference_unet(unet, shared, seed=3)
    agentsd.apply(unet, {0: [shared[1]], 1: [shared[2]]}, seed=3)
    for _ in range(2):
        calls.clear()
        ours = run(unet, sample, context)
        assert calls == [256, 64]
        assert (ours.double() - reference(sample, 500, context)).abs().max() < TOL
    assert (ours - unshared).abs().max() > 100 * TOL


LEAN = dict(ratio=0.0, tokens="all", share_matching=True)
ALL_TOKEN_SETTINGS = [
    # every src token merges (no ranking): one agent per window, random dst drawn per call
    dict(phase=Phase(sx=4, sy=4, agent_ratio=0.95, **LEAN), size=(16, 16), seed=7),
    dict(phase=Phase(sx=2, sy=2, agent_ratio=0.75, **LEAN), size=(16, 16), seed=2),
    # ragged border: some src tokens stay agents of their own (ranked as AgentSD does); fixed dst
    dict(phase=Phase(sx=4, sy=4, agent_ratio=0.9, **LEAN), size=(18, 22)),
    # non-square windows, a matching per block, other constants
    dict(
        phase=Phase(sx=3, sy=2, agent_ratio=0.9, ratio=0.0, tokens="all"),
        size=(14, 20),
        seed=4,
        k_scale2=0.5,
        k_shortcut=0.2,
    ),
    # pooled agents, ragged border left out of them
    dict(phase=Phase(sx=4, sy=4, agents="pooled", **LEAN), size=(18, 22)),
    # as many agents as half the tokens: plain attention
    dict(phase=Phase(sx=1, sy=2, agent_ratio=0.5, **LEAN), size=(16, 16), exact=True),
    # no agents: softmax attention over merged keys and values, every src merged (no ranking) or the top-ranked
    dict(phase=Phase(sx=2, sy=2, ratio=0.75, tokens="all", share_matching=True), size=(16, 16), seed=9),
    dict(phase=Phase(sx=2, sy=2, ratio=0.5, tokens="all", share_matching=True), size=(18, 22), seed=5),
    dict(phase=Phase(sx=3, sy=2, ratio=0.6, tokens="all"), size=(14, 20)),
    # proportional attention: groups of unequal size weigh by their tokens (agents, merged keys, pooled windows)
    dict(phase=Phase(sx=4, sy=4, agent_ratio=0.9, proportional=True, **LEAN), size=(18, 22), seed=3),
    dict(phase=Phase(sx=2, sy=2, ratio=0.75, tokens="all", share_matching=True, proportional=True), size=(16, 16)),
    dict(phase=Phase(sx=2, sy=2, ratio=0.7, tokens="all", proportional=True), size=(18, 22), seed=5),
    dict(phase=Phase(sx=4, sy=4, agents="pooled", proportional=True, **LEAN), size=(18, 22)),
]


@pytest.mark.parametrize("dense", [False, True], ids=["index_add", "dense-as-on-a-gpu"])
@pytest.mark.parametrize("setting", ALL_TOKEN_SETTINGS, ids=range(len(ALL_TOKEN_SETTINGS)))
def test_all_tokens_path_matches_reference(setting, dense, monkeypatch):
    """Phase(tokens="all") against the reference over two calls (each call draws its own dst); groups averaged by
    index_add (a CPU's way) and by the batched product (a GPU's)."""
    monkeypatch.setattr(agentsd.merge, "DENSE_ON_CPU", dense)
    unet = tiny_unet("sd", seed=21)
    height, width = setting["size"]
    sample, context = unet_inputs(height=height, width=width, seed=22)
    constants = {k: setting[k] for k in ("k_scale2", "k_shortcut") if k in setting}
    seed = setting.get("seed")
    vanilla = run(unet, sample, context, 700)
    reference = reference_unet(unet, setting["phase"], seed=seed, **constants)
    agentsd.apply(unet, [setting["phase"]], use_rand=seed is not None, seed=seed, **constants)
    outputs = []
    for timestep in (700, 300):
        ours = run(unet, sample, context, timestep)
        assert (ours.double() - reference(sample, timestep, context)).abs().max() < TOL
        outputs.append(ours)
    if setting.get("exact"):
        assert torch.equal(outputs[0], vanilla)
    else:
        assert (outputs[0] - vanilla).abs().max() > 100 * TOL
    if seed is not None:  # another seed draws other dst
        agentsd.apply(unet, [setting["phase"]], seed=seed + 1, **constants)
        assert (run(unet, sample, context, 700) - outputs[0]).abs().max() > 10 * TOL
