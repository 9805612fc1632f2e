"""`agentsd generate` on the shipped demo model, few steps: happy paths and bad input."""

import json
import math
import os
from pathlib import Path

import pytest
from PIL import Image

from agentsd.cli import DEEPCACHE, GRID_MIN_SIDE, main
from agentsd.demo import MODEL_DIR

FAST = ["--steps", "2", "--seed", "3"]
SIDE = json.loads((MODEL_DIR / "unet" / "config.json").read_text())["sample_size"] * 4  # the demo VAE's factor


def test_generate_writes_png_with_metadata(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a small red circle on the left", "--method", "tome", *FAST, "-o", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (SIDE, SIDE)
    assert image.text["prompt"] == "a small red circle on the left"
    assert image.text["method"] == "tome"
    assert image.text["model"] == "agentsd-demo"
    assert json.loads(image.text["seed"]) == 3
    assert json.loads(image.text["settings"]) == {"schedule": "tome"}
    printed = capsys.readouterr().out
    assert "tome:" in printed and "s/image" in printed and str(out) in printed


def test_generate_is_reproducible_and_numbers_batches(tmp_path):
    args = ["generate", "a large blue square at the top", "--method", "none", *FAST, "--num-images", "2"]
    assert main([*args, "-o", str(tmp_path / "a.png")]) == 0
    assert main([*args, "-o", str(tmp_path / "b.png")]) == 0
    a0, a1, b0 = (Image.open(tmp_path / name) for name in ("a-0.png", "a-1.png", "b-0.png"))
    assert a0.tobytes() == b0.tobytes()
    assert a0.tobytes() != a1.tobytes()


def test_compare_grid_and_schedule_file(tmp_path):
    schedule = tmp_path / "s.json"
    schedule.write_text(json.dumps([{"end": 0.5, "sx": 4, "sy": 4, "ratio": 0.5, "agent_ratio": 0.9}, {"end": 1.0}]))
    out = tmp_path / "grid.png"
    code = main(
        [
            "generate",
            "a green cross",
            "--compare",
            "none,tome,agent",
            "--schedule",
            str(schedule),
            *FAST,
            "-o",
            str(out),
        ]
    )
    assert code == 0
    grid = Image.open(out)
    side = SIDE * math.ceil(GRID_MIN_SIDE / SIDE)  # small images enlarged, a caption under each
    assert grid.size == (3 * side, side + 16)
    assert json.loads(grid.text["methods"]) == ["none", "tome", "agent"]
    assert json.loads(grid.text["settings"])["agent"]["schedule"][0]["agent_ratio"] == 0.9


def test_per_level_schedule_file_and_fast_preset(tmp_path):
    schedule = tmp_path / "levels.json"
    schedule.write_text(
        json.dumps({"0": [{"sx": 2, "sy": 2, "ratio": 0.5, "merge_crossattn": True, "merge_mlp": True}], "1": [{}]})
    )
    for choice in (str(schedule), "fast"):
        out = tmp_path / f"{Path(choice).stem}.png"
        assert main(["generate", "a green cross", "--schedule", choice, *FAST, "-o", str(out)]) == 0
        settings = json.loads(Image.open(out).text["settings"])
        if choice == "fast":
            assert settings == {"schedule": "fast"}
        else:
            assert settings["schedule"]["0"][0]["merge_mlp"] is True and settings["schedule"]["1"][0]["ratio"] == 0.5


def test_compare_takes_presets_and_deepcache(tmp_path, capsys):
    out = tmp_path / "grid.png"
    methods = ["none", "lean", "fast", "deepcache", "deepcache+paper"]
    assert main(["generate", "a green cross", "--compare", ",".join(methods), *FAST, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"{m}: " in printed for m in methods) and "(fastest of 2 runs)" in printed
    grid = Image.open(out)
    settings = json.loads(grid.text["settings"])
    assert json.loads(grid.text["methods"]) == methods and settings["none"] == {}
    assert settings["lean"] == {"schedule": "lean"} and settings["deepcache"] == {"deepcache": DEEPCACHE}
    assert settings["deepcache+paper"] == {"deepcache": DEEPCACHE, "schedule": "paper"}
    columns = [grid.crop((i * grid.size[0] // 5, 0, (i + 1) * grid.size[0] // 5, grid.size[1] - 16)) for i in range(5)]
    assert columns[0].tobytes() != columns[3].tobytes()  # DeepCache changes the image


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "turbo"], "unknown method turbo"),
        (["--compare", "none,lean,none"], "named twice"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--schedule", "paper", "--method", "deepcache+fast"], "--schedule applies to --method agent"),
        (["--method", "agent,none"], "--method takes one method"),
        (["--num-images", "0"], "--num-images"),
        (["--seed", "x"], "invalid int value"),
        (["--compare", "none,turbo"], "unknown method turbo"),
        (["--size", "100x64"], "multiples of 8"),
        (["--size", "big"], "512x512"),
        (["--model", "./no/such/folder"], "model folder not found"),
        (["--schedule", "nope.json"], "schedule file not found"),
        (["--schedule", "paper", "--method", "tome"], "--schedule applies to --method agent"),
        (["--dtype", "fp8"], "unknown dtype"),
        (["--steps", "0"], "--steps"),
        (["-o", "out.jpg"], ".png"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, capsys, tmp_path):
    assert main(["generate", "a red circle", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_hub_model_while_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "a red circle", "--model", "someone/some-model"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_folder_that_is_not_a_pipeline(tmp_path, capsys):
    assert main(["generate", "a red circle", "--model", str(tmp_path)]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_first_command_prints_no_warnings(tmp_path):
    """The README's first command, as a user runs it (a new process): progress bars, timings and the file written;
    no warning and no library notice or loading bar."""
    import subprocess
    import sys

    out = tmp_path / "out.png"
    command = [sys.executable, "-m", "agentsd", "generate", "a small red circle on the left", "--steps", "2"]
    command += ["--compare", "none,lean", "--repeats", "1", "-o", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "PYTHONWARNINGS"))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed
    assert "warning" not in printed.lower() and "Loading" not in printed, printed
    assert "none: " in done.stdout and "lean: " in done.stdout and f"saved {out}" in done.stdout
    assert printed.count(" 0/2 [") == 2  # one progress bar per generation (each starts once at 0/2)


def test_version_help_and_a_missing_prompt(capsys):
    from agentsd import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"agentsd {__version__}"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    shown = capsys.readouterr().out
    assert "demo model" in shown and "Flux.1" in shown and "lean on a UNet" in shown and "fast" in shown
    assert main(["generate"]) == 2
    assert 'agentsd generate "a small red circle on the left"' in capsys.readouterr().err


def _lines_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle on the left\n\na large blue square at the top\na green cross\n")
    return prompts


def test_prompts_file_one_image_per_line_resumes(tmp_path, capsys):
    prompts, out = _lines_file(tmp_path), tmp_path / "images"
    assert main(["generate", "--prompts", str(prompts), "--method", "tome", *FAST, "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00002.png", "00003.png"]  # line 1 is blank
    image = Image.open(out / "00002.png")
    assert image.text["prompt"] == "a large blue square at the top" and json.loads(image.text["seed"]) == 3 + 2
    assert json.loads(image.text["line"]) == 2 and image.text["method"] == "tome"
    single = tmp_path / "single.png"  # the line's image is the one its prompt and seed make alone
    assert main(["generate", "a large blue square at the top", "--method", "tome", "--steps", "2", "--seed", "5",
                 "-o", str(single)]) == 0  # fmt: skip
    assert Image.open(single).tobytes() == image.tobytes()
    (out / "00003.png").unlink()
    capsys.readouterr()
    assert main(["generate", "--prompts", str(prompts), "--method", "tome", *FAST, "-o", str(out)]) == 0
    assert "1 images saved" in capsys.readouterr().out and (out / "00003.png").exists()


def test_prompts_file_split_between_processes(tmp_path):
    """Two processes as torchrun starts them (RANK, WORLD_SIZE) make the same files as one."""
    import os
    import subprocess
    import sys

    prompts = _lines_file(tmp_path)
    command = [sys.executable, "-m", "agentsd", "generate", "--prompts", str(prompts), "--method", "lean", *FAST]
    assert main(["generate", "--prompts", str(prompts), "--method", "lean", *FAST, "-o", str(tmp_path / "one")]) == 0
    import torch

    # the processes compute with as many threads as this one did (a CPU sum's rounding depends on how it is split)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    runs = [
        subprocess.Popen([*command, "-o", str(tmp_path / "two")], env={**env, "RANK": str(r), "WORLD_SIZE": "2"})
        for r in range(2)
    ]
    try:
        assert [run.wait(timeout=300) for run in runs] == [0, 0]
    finally:
        for run in runs:
            run.kill()
    one, two = (sorted((tmp_path / name).iterdir()) for name in ("one", "two"))
    assert [p.name for p in one] == [p.name for p in two] == ["00000.png", "00002.png", "00003.png"]
    for a, b in zip(one, two):
        assert Image.open(a).tobytes() == Image.open(b).tobytes() and Image.open(a).text == Image.open(b).text


def test_prompts_file_refuses_what_does_not_go_with_it(tmp_path, capsys):
    prompts, empty = _lines_file(tmp_path), tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for extra, message in [
        (["a prompt"], "not both"),
        (["--compare", "none,tome"], "--compare is for one prompt"),
        (["--num-images", "2"], "drop --num-images"),
        (["-o", str(tmp_path / "x.png")], "--output is a folder"),
        (["--prompts", str(empty)], "holds no prompt"),
        (["--prompts", str(tmp_path / "missing.txt")], "no such file"),
    ]:
        assert main(["generate", "--prompts", str(prompts), *extra]) == 2
        assert message in capsys.readouterr().err


def test_auto_device_gives_each_launched_process_its_own_card(monkeypatch):
    import torch

    from agentsd.cli import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _device("auto") == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert _device("auto") == torch.device("cuda", 0)
