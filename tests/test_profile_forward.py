"""benchmarks/studies/profile_forward.py on the shipped demo UNet: per-op self times, vanilla against a method."""

import json

from conftest import load_script


def _script():
    return load_script("profile_forward")


def test_profile_shows_what_the_method_adds_and_saves(tmp_path):
    out = tmp_path / "profile.json"
    _script().main(["--model", "demo", "--size", "64", "--forwards", "2", "--top", "200", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["method"] == "agentsd-agent" and results["vanilla_s"] > 0 and results["method_s"] > 0
    ops = {r["op"]: r for r in results["ops"]}
    # agent attention runs two SDPA calls where vanilla runs one, in each patched self-attention
    sdpa = ops["aten::scaled_dot_product_attention"]
    assert sdpa["method_calls"] > sdpa["vanilla_calls"] > 0
    # matching and merging add ops vanilla never runs
    assert any(r["vanilla_calls"] == 0 and r["method_calls"] > 0 for r in results["ops"])
    assert results["method_calls"] > results["vanilla_calls"]
    assert "| `aten::scaled_dot_product_attention` |" in out.with_suffix(".md").read_text()


def test_profile_of_a_preset_at_a_progress_sums_ops_by_kind(tmp_path):
    out = tmp_path / "profile.json"
    args = ["--model", "demo", "--size", "64", "--forwards", "1", "--method", "paper", "--out", str(out)]
    _script().main([*args, "--progress", "0.2"])
    results = json.loads(out.read_text())
    assert results["method"] == "paper" and results["progress"] == 0.2
    assert results["method_calls"] > results["vanilla_calls"]  # the agent phase matches and merges
    for kinds in (results["vanilla_kinds"], results["method_kinds"]):
        assert set(kinds) == {"convolution", "linear", "attention", "other"} and kinds["convolution"] > 0
    # the agent phase's second product and the matching run as bmm: attention-kind time vanilla lacks
    assert results["method_kinds"]["attention"] > 0
    assert (
        "| convolution |" in out.with_suffix(".md").read_text()
        and "at progress 0.2" in out.with_suffix(".md").read_text()
    )


def test_profile_refuses_a_progress_outside_0_1(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        _script().main(["--method", "fast", "--progress", "1.5", "--out", str(tmp_path / "p.json")])
    assert "--progress must lie in [0, 1]" in capsys.readouterr().err
