"""benchmarks/train_vit.py end to end with tiny settings: both models train, resume, scale and report."""

import json
import sys

import pytest
from conftest import BENCHMARKS, load_script

TINY = ["img_size=32", "patch_size=8", "dim=16", "depth=1", "heads=2", "agent_num=4", "batch=4", "steps=3", "test_n=8"]


@pytest.fixture(scope="module")
def vit():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports train_demo beside it
    return load_script("train_vit")


def settings():
    return [a for kv in TINY for a in ("--set", kv)]


def test_train_scale_report(vit, tmp_path):
    runs = {}
    for attention in ("softmax", "agent"):
        runs[attention] = tmp_path / attention
        vit.main(["train", "--attention", attention, "--run", str(runs[attention]), "--threads", "1", *settings()])
        result = json.loads((runs[attention] / "result.json").read_text())
        assert result["attention"] == attention and 0 <= result["test_accuracy"] <= 1
    before = (runs["agent"] / "model.pt").read_bytes()
    vit.main(["train", "--attention", "agent", "--run", str(runs["agent"]), "--threads", "1"])  # finished: resumes
    assert (runs["agent"] / "model.pt").read_bytes() == before  # nothing more trained
    scaling = tmp_path / "scaling.json"
    vit.main(["scale", "--sizes", "32", "64", "--repeats", "1", "--threads", "1", "--out", str(scaling), *settings()])
    sizes = json.loads(scaling.read_text())["sizes"]
    assert sizes["64"]["tokens"] == 64
    # agents: linear in N; softmax: quadratic. The FLOP gap widens with the input.
    assert sizes["64"]["flop_ratio"] > sizes["32"]["flop_ratio"]
    out = tmp_path / "vit.json"
    vit.main(
        ["report", "--runs", str(runs["softmax"]), str(runs["agent"]), "--scaling", str(scaling), "--out", str(out)]
    )
    results = json.loads(out.read_text())
    assert set(results["trained"]) == {"softmax", "agent"} and "| 64² | 64 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 1000


def test_unknown_setting_is_refused(vit, tmp_path):
    with pytest.raises(SystemExit):
        vit.main(["train", "--attention", "agent", "--run", str(tmp_path / "r"), "--set", "width=3"])
