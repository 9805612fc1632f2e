"""`agentsd bench speed` on a tiny UNet folder: JSON, table, plot, resume, bad input."""

import json

import pytest
from conftest import tiny_unet

from agentsd.bench.speed import summarize
from agentsd.cli import main


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_unet("sd").save_config(folder / "unet")
    return folder


def test_speed_writes_json_table_and_plot_and_keeps_other_sizes(tiny_folder, tmp_path, capsys):
    out = tmp_path / "res" / "speed.json"
    common = ["bench", "speed", "--model", str(tiny_folder), "--repeats", "2", "--warmup", "0", "--out", str(out)]
    assert main([*common, "--sizes", "128"]) == 0
    assert main([*common, "--sizes", "64", "--methods", "vanilla", "agentsd-agent", "agentsd-tome", "ceiling"]) == 0
    results = json.loads(out.read_text())
    assert set(results["sizes"]) == {"128", "64"}  # the second run kept the first size
    first = results["sizes"]["128"]
    assert set(first["times"]) == {"vanilla", "tomesd", "agentsd-tome", "agentsd-agent", "ceiling"}
    assert all(len(ts) == 2 and all(t > 0 for t in ts) for ts in first["times"].values())
    assert first["speedup_median"]["vanilla"] == 1.0 and first["ceiling_share_median"]["ceiling"] == 1.0
    assert "tomesd" not in results["sizes"]["64"]["times"]
    table = out.with_suffix(".md").read_text()
    assert "| 128² | agentsd-paper |" in table and "| 64² | ceiling |" in table
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "plot:" in capsys.readouterr().out


def test_summarize_weights_the_paper_schedule_by_its_phases():
    summary = summarize(
        {"vanilla": [10, 12, 11], "ceiling": [6, 6, 6], "agentsd-agent": [7, 7, 7], "agentsd-tome": [9]}
    )
    assert summary["median"]["agentsd-paper"] == pytest.approx(0.4 * 7 + 0.6 * 9)
    assert summary["min"]["vanilla"] == 10
    assert summary["speedup_median"]["ceiling"] == pytest.approx(11 / 6)
    assert summary["ceiling_share_median"]["agentsd-agent"] == pytest.approx((11 - 7) / (11 - 6))


def test_bad_model_is_one_clear_line(tmp_path, capsys):
    assert main(["bench", "speed", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "unet/config.json" in err and "Traceback" not in err
