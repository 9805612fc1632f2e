"""benchmarks/studies/hook_overhead.py: times the hooks only where nothing merges, and says what it measured."""

import json

import pytest
from conftest import load_script


def test_hook_overhead_times_an_unmerged_patch_against_vanilla(tmp_path):
    out = tmp_path / "hooks.json"
    assert load_script("hook_overhead").main(["--rounds", "2", "--forwards", "3", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    result = results["result"]
    assert results["method"] == "fast" and results["device"] == "cpu" and results["threads"] == 1
    assert result["transformer_blocks"] == 11
    assert {name: len(times) for name, times in result["times"].items()} == {"vanilla": 2, "fast": 2}
    low, high = result["overhead_per_call_us_range"]
    assert low <= result["overhead_per_call_us"] <= high
    assert result["overhead_per_block_us"] == pytest.approx(result["overhead_per_call_us"] / 11, abs=0.01)
    assert "bit for bit" in out.with_suffix(".md").read_text()


def test_hook_overhead_refuses_a_method_that_merges(tmp_path):
    with pytest.raises(SystemExit, match="merged something"):  # ToMe merges at any token count
        load_script("hook_overhead").main(["--method", "tome", "--rounds", "1", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        load_script("hook_overhead").main(["--rounds", "0", "--out", str(tmp_path / "x.json")])
