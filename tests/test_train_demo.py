"""The demo model's training recipe (``benchmarks/train_demo.py``), run end to end with tiny settings."""

import json
from pathlib import Path

import pytest
import torch
from conftest import load_script
from safetensors.torch import load_file

from agentsd.demo import Evaluator, data

TINY = [
    "eval_steps=2",
    "eval_batch=8",
    "vae_steps=2",
    "vae_batch=4",
    "cache_size=64",
    "text_steps=2",
    "text_batch=16",
    "unet_batch=2",
    "unet_warmup=4",
    "unet_bf16=false",
    "test_n=16",
]


@pytest.fixture(scope="module")
def recipe():
    return load_script("train_demo")


def _train(recipe, run: Path, out: Path) -> None:
    args = ["--run", str(run), "--out", str(out), "--threads", str(torch.get_num_threads()), "--unet-steps", "3"]
    recipe.main(args + [a for kv in TINY for a in ("--set", kv)])


@pytest.fixture(scope="module")
def trained(recipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    _train(recipe, root / "run", root / "out")
    return root


def test_recipe_writes_a_loadable_pipeline_and_evaluator(trained):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(trained / "out" / "model", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a small red circle on the left", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, data.IMAGE_SIZE, data.IMAGE_SIZE) and torch.isfinite(image).all()
    assert Evaluator.load(trained / "out" / "evaluator.safetensors").features(image).shape == (1, 256)


def test_recipe_logs_every_stage_and_records_its_config(trained):
    rows = [json.loads(line) for line in (trained / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows if "loss" not in r and "rec" not in r][-1] == "done"
    assert {"evaluator", "vae", "cache", "text", "unet"} <= {r["stage"] for r in rows}
    text = [r for r in rows if r["stage"] == "text" and "test_accuracy" in r]
    assert len(text) == 1 and 0 <= text[0]["test_accuracy"] <= 1
    config = json.loads((trained / "run" / "config.json").read_text())
    assert config["unet_steps"] == 3 and config["vae_batch"] == 4 and config["cache_size"] == 64


def test_recipe_is_seeded_and_resumes_from_its_checkpoints(recipe, trained, tmp_path):
    first = load_file(trained / "out" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    # The same settings in a fresh run folder give the same weights ...
    _train(recipe, tmp_path / "run", tmp_path / "out")
    again = load_file(tmp_path / "out" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    # ... and re-running a finished run folder trains nothing more: it exports from the checkpoints.
    before = len((tmp_path / "run" / "log.jsonl").read_text().splitlines())
    _train(recipe, tmp_path / "run", tmp_path / "out2")
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()[before:]]
    assert not [r for r in rows if "loss" in r or "rec" in r]
    resumed = load_file(tmp_path / "out2" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(first[k], resumed[k]) for k in first)


def test_recipe_rejects_unknown_settings(recipe, tmp_path):
    with pytest.raises(SystemExit):
        recipe.main(["--run", str(tmp_path / "run"), "--set", "unet_lrate=1"])
    with pytest.raises(SystemExit):
        recipe.main(["--run", str(tmp_path / "run"), "--set", "unet_lr=fast"])


def test_a_resumed_run_refuses_other_settings_but_takes_a_new_budget(recipe, trained, tmp_path):
    """A run folder keeps the settings it started with: another one given on resuming is refused, not ignored;
    the step count (with or without the minutes) may change, and is logged."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    base = ["--run", str(run), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"unet_batch=3 \(it ran with 2\)"):
        recipe.main(base + ["--set", "unet_batch=3"])
    with pytest.raises(SystemExit, match="minutes=200.0 alone would change nothing"):
        recipe.main(base + ["--minutes", "200"])
    _train(recipe, run, tmp_path / "out")  # the settings it ran with: nothing changes, nothing is refused
    settings = [a for kv in TINY for a in ("--set", kv)]
    recipe.main(base + ["--threads", "1", "--unet-steps", "4", "--minutes", "200", *settings])
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"stage": "budget", "unet_steps": 4, "minutes": 200.0}.items() <= next(
        r for r in rows if r["stage"] == "budget"
    ).items()
    assert torch.load(run / "unet.pt", weights_only=False)["step"] == 4  # one more step than it had
    assert json.loads((run / "config.json").read_text())["unet_steps"] == 4


def test_recipe_continues_from_a_trained_model(recipe, trained, tmp_path):
    init = trained / "out"
    args = ["--run", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--init", str(init), "--unet-steps", "2"]
    recipe.main(args + [a for kv in [*TINY, "unet_lr=0"] for a in ("--set", kv)])  # lr 0: the UNet stays put
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in rows}
    assert {"init", "cache", "unet", "done"} <= stages and not {"evaluator", "vae", "text"} & stages
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        before, after = (load_file(root / "model" / f"{part}.safetensors") for root in (init, tmp_path / "out"))
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), part
    assert (tmp_path / "out" / "evaluator.safetensors").read_bytes() == (init / "evaluator.safetensors").read_bytes()
    # --export: the model as the UNet checkpoint holds it (its EMA weights): here the finished run's
    recipe.main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "now"), "--export"])
    part = "unet/diffusion_pytorch_model.safetensors"
    final, now = (load_file(root / "model" / part) for root in (tmp_path / "out", tmp_path / "now"))
    assert final.keys() == now.keys() and all(torch.equal(final[k], now[k]) for k in final)
    with pytest.raises(SystemExit, match="--export needs"):
        recipe.main(["--run", str(trained / "run"), "--out", str(tmp_path / "x"), "--export"])
    with pytest.raises(FileNotFoundError, match="--init needs"):
        recipe.main(["--run", str(tmp_path / "run2"), "--init", str(tmp_path / "nowhere")])
