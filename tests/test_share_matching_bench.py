"""benchmarks/studies/share_matching.py on the shipped demo UNet: each method timed in each phase, a table from JSON."""

import json

import pytest
from conftest import load_script


def _script():
    return load_script("share_matching")


def test_share_matching_benchmark_times_each_method_in_each_phase(tmp_path):
    script = _script()
    assert all(p.share_matching for phases in script.SHARED.values() for p in phases)
    out = tmp_path / "share.json"
    script.main(["--model", "demo", "--size", "64", "--repeats", "2", "--out", str(out)])
    results = json.loads(out.read_text())
    assert list(results["progress"]) == ["0.25", "0.75"]
    for times in results["progress"].values():
        assert set(times) == set(script.METHODS) and all(len(ts) == 2 and min(ts) > 0 for ts in times.values())
    table = out.with_suffix(".md").read_text()
    assert table.count("| fast, shared matching |") == 2 and "median of 2 repeats" in table


def test_share_matching_benchmark_refuses_no_repeats(tmp_path):
    with pytest.raises(SystemExit):
        _script().main(["--repeats", "0", "--out", str(tmp_path / "x.json")])
