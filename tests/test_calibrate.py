"""`agentsd calibrate`: the threshold it picks from measured times, its cache, and what apply does with it."""

import json

import pytest
import torch
from conftest import tiny_unet, unet_inputs

import agentsd
from agentsd import calibration, schedule
from agentsd.bench import calibrate
from agentsd.cli import main


@pytest.fixture
def tiny_model(tmp_path):
    folder = tmp_path / "tiny"
    tiny_unet("sd").save_config(folder / "unet")
    return str(folder)


def test_threshold_is_where_every_phase_pays_from_there_on(tiny_model, monkeypatch):
    # median forward times in the order they are taken: vanilla, then the lean preset's 4x4 and 2x2 phases
    sizes = (32, 64, 96)
    times = iter(
        [
            *(10.0, 9.0, 11.0),  # 32²: the 2x2 phase is slower
            *(10.0, 9.0, 9.0),  # 64²: both pay
            *(10.0, 5.0, 9.5),  # 96²: both pay (9.5 <= 0.98 * 10)
        ]
    )
    monkeypatch.setattr(calibrate, "_time", lambda fn, repeats, device: next(times))
    result = calibrate.calibrate("cpu", torch.float32, model=tiny_model, sizes=sizes, repeats=1)
    assert [row["pays"] for row in result["sizes"].values()] == [False, True, True]
    assert result["min_tokens"] == result["sizes"]["64"]["tokens"] == (64 // 8) ** 2
    cached = json.loads(calibration.cache_path().read_text())
    assert cached["cpu | float32 | eager"]["min_tokens"] == 64
    assert schedule.CALIBRATED_MIN_TOKENS == {("cpu", "float32", "eager"): 64}

    # apply reads it: the lean default now acts on the tiny UNet's 256-token level (the CPU default is 1,024)
    unet = tiny_unet("sd")
    sample, context = unet_inputs()
    with torch.no_grad():
        vanilla = unet(sample, 500, context).sample
        agentsd.apply(unet, seed=0)
        assert not torch.equal(unet(sample, 500, context).sample, vanilla)
        calibration.cache_path().unlink()
        agentsd.apply(unet, seed=0)  # no calibration: the 1,024-token default leaves it alone
        assert torch.equal(unet(sample, 500, context).sample, vanilla)
    assert schedule.CALIBRATED_MIN_TOKENS == {}


def test_no_size_pays_puts_the_threshold_past_the_largest(tiny_model, monkeypatch):
    monkeypatch.setattr(calibrate, "_time", lambda fn, repeats, device: 1.0)  # never faster
    result = calibrate.calibrate("cpu", torch.float32, model=tiny_model, sizes=(32, 64), repeats=1, save=False)
    assert result["min_tokens"] == 4 * (64 // 8) ** 2
    assert not calibration.cache_path().exists()


def test_calibrate_command_times_real_forwards(tiny_model, tmp_path, capsys):
    args = ["calibrate", "--device", "cpu", "--model", tiny_model, "--sizes", "64", "--repeats", "1"]
    assert main([*args, "--out", str(tmp_path / "cal.json")]) == 0
    out = capsys.readouterr().out
    assert "64² (64 tokens): vanilla" in out and "the lean path from" in out
    entry = json.loads(calibration.cache_path().read_text())["cpu | float32 | eager"]
    assert json.loads((tmp_path / "cal.json").read_text()) == entry
    assert entry["sizes"]["64"]["vanilla_s"] > 0 and entry["sizes"]["64"]["4x4_s"] > 0
    calibration.cache_path().unlink()
    calibration.load()
    assert main(["calibrate", "--device", "cpu", "--model", "nowhere"]) == 2


def test_the_core_imports_no_measuring_code():
    """The house's arrows point down: agentsd (apply, the processors) never imports agentsd.bench."""
    import subprocess
    import sys

    code = "import sys, agentsd, agentsd.patch; print(sorted(m for m in sys.modules if m.startswith('agentsd')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "agentsd.calibration" in loaded and "agentsd.bench" not in loaded
