"""The DiT proving ground's recipe (``benchmarks/train_flux_demo.py``) end to end with tiny settings, its loader
(``agentsd.demo.load_flux_pipeline``, ``--model demo-flux``) and the quality bench's DiT methods on it."""

import json

import pytest
import torch
from conftest import load_script
from safetensors.torch import load_file

import agentsd
from agentsd.bench.quality import apply_kwargs
from agentsd.demo import data, load_flux_pipeline

TINY = ["cache_size=64", "text_steps=2", "text_batch=16", "dit_batch=4", "dit_warmup=4"]


def _train(recipe, run, out):
    recipe.main(["--run", str(run), "--out", str(out), "--dit-steps", "3"] + [a for kv in TINY for a in ("--set", kv)])


@pytest.fixture(scope="module")
def recipe():
    return load_script("train_flux_demo")


@pytest.fixture(scope="module")
def trained(recipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    _train(recipe, root / "run", root / "out")
    return root


def test_recipe_writes_a_flux_pipeline_the_loader_samples_at_its_settings(trained):
    pipe = load_flux_pipeline(folder=trained / "out" / "model")
    assert type(pipe).__mro__[1].__name__ == "FluxPipeline"
    vae = pipe.vae.config
    assert vae.shift_factor is not None and vae.scaling_factor > 0  # what the Flux pipeline reads
    image = pipe("a small red circle on the left", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, data.IMAGE_SIZE, data.IMAGE_SIZE) and torch.isfinite(image).all()
    # height=None (what the CLI passes without --size) is the trained side too, not FluxPipeline's own 512²
    seeded = [
        pipe("a small red circle on the left", num_inference_steps=2, output_type="pt", generator=torch.manual_seed(0),
             **size).images
        for size in ({}, {"height": None, "width": None})
    ]  # fmt: skip
    assert torch.equal(*seeded)
    grid = (data.IMAGE_SIZE // 4 // 2,) * 2  # factor-4 VAE, 2x2 packing: 16x16 = 256 tokens
    agentsd.apply(pipe, **apply_kwargs("flux", force=True), seed=0)
    patched = pipe("a small red circle on the left", num_inference_steps=2, output_type="pt").images
    assert agentsd.state_of(pipe.transformer).grids == ((1, *grid),)
    assert (patched - image).abs().max() > 1e-4
    agentsd.remove(pipe)


def test_recipe_logs_its_stages_and_budget(trained):
    rows = [json.loads(line) for line in (trained / "run" / "log.jsonl").read_text().splitlines()]
    assert {"cache", "t5", "dit", "done"} <= {r["stage"] for r in rows}
    config = json.loads((trained / "run" / "config.json").read_text())
    assert config["dit_steps"] == 3 and config["spent_s"] > 0


def test_recipe_resumes_from_its_checkpoints(recipe, trained, tmp_path):
    """A finished run folder trains nothing more and exports the same weights."""
    before = len((trained / "run" / "log.jsonl").read_text().splitlines())
    _train(recipe, trained / "run", tmp_path / "again")
    rows = [json.loads(line) for line in (trained / "run" / "log.jsonl").read_text().splitlines()[before:]]
    assert not [r for r in rows if "loss" in r]
    part = "transformer/diffusion_pytorch_model.safetensors"
    first, again = (load_file(root / "model" / part) for root in (trained / "out", tmp_path / "again"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_ablation_methods_patch_what_they_say(trained):
    pipe = load_flux_pipeline(folder=trained / "out" / "model")
    count = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    for method, patched in (("flux", count - 4), ("flux-all-blocks", count)):
        agentsd.apply(pipe, **apply_kwargs(method, force=True))
        assert len(pipe.transformer._agentsd_patch.blocks) == patched
    agentsd.apply(pipe, **apply_kwargs("flux-no-late", force=True))
    assert [p.merges for p in agentsd.state_of(pipe.transformer).bands[0]] == [True, False]
    agentsd.apply(pipe, **apply_kwargs("flux-agents-2x2", force=True))
    early, late = agentsd.state_of(pipe.transformer).bands[0]
    assert (early.end, early.sy, early.sx, early.agents) == (0.4, 2, 2, "pooled")
    assert (late.sy, late.sx, late.ratio) == (2, 2, 0.75)
    agentsd.apply(pipe, **apply_kwargs("flux-plain-broadcast", force=True))
    assert (agentsd.state_of(pipe.transformer).k_scale2, agentsd.state_of(pipe.transformer).k_shortcut) == (1.0, 0.0)
    agentsd.apply(pipe, **apply_kwargs("flux-whole-run", force=True))
    assert [p.end for p in agentsd.state_of(pipe.transformer).bands[0]] == [1.0]
    assert all(p.min_tokens == 0 for p in agentsd.state_of(pipe.transformer).bands[0])
    agentsd.remove(pipe)


def test_cli_names_the_proving_ground(trained, monkeypatch, tmp_path, capsys):
    from agentsd import demo
    from agentsd.cli import main

    monkeypatch.setattr(demo, "FLUX_MODEL_DIR", trained / "out" / "model")
    monkeypatch.setattr(demo.flux, "FLUX_MODEL_DIR", trained / "out" / "model")
    monkeypatch.setattr(
        demo, "load_flux_pipeline", lambda **kw: load_flux_pipeline(folder=trained / "out" / "model", **kw)
    )
    out = tmp_path / "grid.png"
    args = ["generate", "a small red circle on the left", "--model", "demo-flux", "--compare", "none,flux"]
    assert main(args + ["--steps", "2", "--repeats", "1", "-o", str(out)]) == 0
    assert out.is_file() and "flux: " in capsys.readouterr().out


def test_a_compact_checkpoint_resumes_the_run(recipe, trained, tmp_path):
    """--keep packs what a later machine needs (the run folder is not committed); --resume starts a run folder from
    it: the transformer from its EMA weights, the T5 as trained, the step count and budget as they were."""
    recipe.main(["--run", str(trained / "run"), "--out", str(tmp_path / "o"), "--keep", str(tmp_path / "keep")])
    recipe.main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--resume", str(tmp_path / "keep")])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (
        config["dit_steps"] == 3
        and config["spent_s"] >= json.loads((tmp_path / "keep" / "config.json").read_text())["spent_s"]
    )
    part = "transformer/diffusion_pytorch_model.safetensors"
    first, resumed = (load_file(root / "model" / part) for root in (trained / "out", tmp_path / "out"))
    assert first.keys() == resumed.keys() and all(torch.equal(first[k], resumed[k]) for k in first)  # fp16 both


def test_a_new_stage_starts_from_a_compact_checkpoint_at_another_size(recipe, trained, tmp_path):
    """--init: a resolution curriculum's next stage, its transformer from the checkpoint's EMA weights at step 0 with a
    fresh budget, its latents rendered at image_size (64² here: 256 tokens of a 16×16 grid)."""
    recipe.main(["--run", str(trained / "run"), "--out", str(tmp_path / "o"), "--keep", str(tmp_path / "keep")])
    argv = ["--run", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--dit-steps", "2", "--init"]
    settings = [a for kv in [*TINY, "image_size=64"] for a in ("--set", kv)]
    recipe.main([*argv, str(tmp_path / "keep"), *settings])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["init"] == str(tmp_path / "keep") and config["image_size"] == 64 and config["dit_steps"] == 2
    assert torch.load(tmp_path / "run" / "cache.pt")["latents"].shape[-1] == 16  # 64² through the factor-4 VAE
    pipe = load_flux_pipeline(folder=tmp_path / "out" / "model")  # the stage's export samples at its size
    assert pipe("a small red circle on the left", num_inference_steps=1, output_type="pt").images.shape[-1] == 64
    # --model <that folder> in the CLI and the benches: the proving ground's loader and settings, not FluxPipeline's
    from agentsd.cli import _demo_setting, _load
    from agentsd.demo import FLUX_GUIDANCE, FLUX_STEPS

    pipe, name = _load(str(tmp_path / "out" / "model"), "cpu", torch.float32)
    assert type(pipe).__name__ == "DemoFluxPipeline" and pipe.demo_size == 64 and name.startswith("agentsd-demo-flux")
    model = str(tmp_path / "out" / "model")
    assert (_demo_setting(model, 1), _demo_setting(model, 2)) == (FLUX_STEPS, FLUX_GUIDANCE)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "dit" and "loss" in r] == [0]  # a fresh stage from step 0
    with pytest.raises(SystemExit, match="exists already"):
        recipe.main([*argv, str(tmp_path / "keep")])
