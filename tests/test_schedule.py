import pytest

from agentsd.schedule import PRESETS, Phase, phase_at, progress, resolve_schedule


def test_paper_preset_switches_at_step_20_of_50():
    # SD 1.5 with 50 PLMS steps calls the UNet at t = 981, 961, ..., 1.
    timesteps = [981 - 20 * i for i in range(50)]
    phases = [phase_at(PRESETS["paper"], progress(t, 1000)) for t in timesteps]
    assert phases[:20] == [PRESETS["paper"][0]] * 20
    assert phases[20:] == [PRESETS["paper"][1]] * 30
    assert phases[0].agent_ratio == 0.95 and phases[0].sx == 4 and phases[-1].agent_ratio is None


def test_phase_at_edges():
    phases = (Phase(end=0.25), Phase(end=0.5, ratio=0.3), Phase(end=1.0, ratio=0.1))
    assert phase_at(phases, 0.0) is phases[0]
    assert phase_at(phases, 0.25) is phases[1]
    assert phase_at(phases, 0.999) is phases[2]
    assert phase_at(phases, 1.0) is phases[2]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(ratio=1.0), ValueError),
        (dict(ratio=-0.1), ValueError),
        (dict(agent_ratio=1.0), ValueError),
        (dict(sx=0), ValueError),
        (dict(sy=0), ValueError),
        (dict(sx=2.0), TypeError),
        (dict(end=0.0), ValueError),
        (dict(end=1.5), ValueError),
    ],
)
def test_phase_validation(kwargs, error):
    with pytest.raises(error):
        Phase(**kwargs)


def test_resolve_schedule():
    assert resolve_schedule("tome") == (Phase(end=1.0, sx=2, sy=2, ratio=0.5),)
    single = Phase(end=1.0, ratio=0.2)
    assert resolve_schedule(single) == (single,)
    assert resolve_schedule([Phase(end=0.3), single]) == (Phase(end=0.3), single)
    with pytest.raises(ValueError):
        resolve_schedule([])
    with pytest.raises(ValueError):
        resolve_schedule([Phase(end=0.6), Phase(end=0.3), Phase(end=1.0)])


def test_per_level_schedule():
    agent = Phase(end=0.5, sx=4, sy=4, ratio=0.4, agent_ratio=0.95)
    resolved = resolve_schedule({1: [Phase(ratio=0.3)], 0: (agent, Phase())})
    assert resolved == {0: (agent, Phase()), 1: (Phase(ratio=0.3),)}
    assert list(resolved) == [0, 1]
    for bad in ({}, {-1: [Phase()]}, {"0": [Phase()]}, {True: [Phase()]}):
        with pytest.raises(ValueError):
            resolve_schedule(bad)
    with pytest.raises(ValueError):
        resolve_schedule({0: [Phase(end=0.5)]})  # each level's phases must end at 1.0


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(min_tokens=-1), ValueError),
        (dict(min_tokens=1.5), TypeError),
        (dict(merge_crossattn=1), TypeError),
        (dict(merge_mlp=None), TypeError),
    ],
)
def test_block_options_validation(kwargs, error):
    with pytest.raises(error):
        Phase(**kwargs)


def test_min_tokens_none_is_the_device_default():
    from agentsd.schedule import ACCELERATOR_MIN_TOKENS, DEVICE_MIN_TOKENS, min_tokens_on

    auto = Phase(min_tokens=None)
    assert min_tokens_on(auto, "cpu") == DEVICE_MIN_TOKENS["cpu"] == 1024
    assert min_tokens_on(auto, "cuda") == min_tokens_on(auto, "xpu") == ACCELERATOR_MIN_TOKENS > 16384
    assert min_tokens_on(Phase(min_tokens=7), "cuda") == 7
    assert all(p.min_tokens is None for phases in PRESETS["fast"].values() for p in phases)


def test_fast_preset_merges_cross_attention_and_shares_matchings_but_never_the_feed_forward():
    phases = [p for level in PRESETS["fast"].values() for p in level]
    assert all(p.merge_crossattn and p.share_matching and not p.merge_mlp for p in phases)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tokens="some"), "tokens must be"),
        (dict(agents="random"), "agents must be"),
        (dict(tokens="all", agent_ratio=0.9), "ratio must be 0.0"),
        (dict(tokens="all", ratio=0.0), "needs agents"),
        (dict(tokens="all", ratio=0.0, agent_ratio=0.9, merge_crossattn=True), "merge_crossattn"),
        (dict(agents="pooled", ratio=0.0), "needs tokens='all'"),
        (dict(agents="pooled", tokens="all", ratio=0.0, agent_ratio=0.9), "agent_ratio must be None"),
    ],
)
def test_lean_phase_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Phase(**kwargs)


def test_default_is_the_lean_preset_of_merged_agents():
    from conftest import tiny_unet

    import agentsd
    from agentsd.schedule import DEFAULT

    unet = agentsd.apply(tiny_unet())  # no schedule: the default
    assert DEFAULT == "lean" and agentsd.state_of(unet).config.bands[0].phases == PRESETS["lean"][0]
    for early, late in PRESETS["lean"].values():
        assert early.end == PRESETS["paper"][0].end  # agents while the layout forms, as published
        assert early.agent_ratio is not None and late.agent_ratio is None and late.ratio > 0  # then merged K/V
        for phase in (early, late):  # ToMe-merged tokens, every query attends, one matching per level
            assert phase.tokens == "all" and phase.agents == "merged" and phase.share_matching
            merged = phase.ratio if phase.agent_ratio is None else phase.agent_ratio
            assert merged >= 1 - 1 / (phase.sx * phase.sy)  # every src merged: no ranking
            assert phase.min_tokens is None  # only where it pays on the device


def test_lean_thresholds_by_device_then_calibrated(monkeypatch):
    from agentsd import schedule

    lean, merged = Phase(tokens="all", ratio=0.0, agent_ratio=0.95, min_tokens=None), Phase(min_tokens=None)
    assert schedule.min_tokens_on(lean, "cpu") == schedule.LEAN_DEVICE_MIN_TOKENS["cpu"]
    assert schedule.min_tokens_on(lean, "cuda") == schedule.LEAN_ACCELERATOR_MIN_TOKENS
    assert schedule.min_tokens_on(merged, "cuda") == schedule.ACCELERATOR_MIN_TOKENS
    monkeypatch.setitem(schedule.CALIBRATED_MIN_TOKENS, ("cuda", "float16", "compiled"), 4096)
    assert schedule.min_tokens_on(lean, "cuda", "torch.float16", compiled=True) == 4096
    assert schedule.min_tokens_on(lean, "cuda", "torch.float16") == schedule.LEAN_ACCELERATOR_MIN_TOKENS
    assert schedule.min_tokens_on(merged, "cuda", "torch.float16", compiled=True) == schedule.ACCELERATOR_MIN_TOKENS
    assert schedule.min_tokens_on(Phase(tokens="all", ratio=0.0, agent_ratio=0.95, min_tokens=7), "cuda") == 7
