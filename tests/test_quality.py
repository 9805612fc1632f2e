"""`agentsd bench quality` on the demo model: metrics, resume, sharding under accelerate, bad input."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import char_tokenizer

from agentsd.bench import git_commit
from agentsd.bench.quality import _timing, load_prompts, psnr, ssim
from agentsd.cli import main
from agentsd.demo import MODEL_DIR

FAST = ["--num", "6", "--steps", "2", "--batch", "2"]


def comparable(path):
    """quality.json without what depends on the machine or the number of processes."""
    results = json.loads(path.read_text())
    results.pop("processes")
    for row in results["metrics"]["methods"].values():
        row.pop("seconds_per_image")
    return results


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "single"
    assert main(["bench", "quality", *FAST, "--out", str(out)]) == 0
    return out


def test_metrics_table_and_plot(single):
    results = json.loads((single / "quality.json").read_text())
    rows = results["metrics"]["methods"]
    assert set(rows) == {"none", "tome", "agent"} and results["metrics"]["reference"] == "none"
    assert "psnr_vs_none" not in rows["none"] and "ssim_vs_none" not in rows["none"]  # no self-comparison
    for method in ("tome", "agent"):
        assert 0 < rows[method]["ssim_vs_none"] < 1 and 10 < rows[method]["psnr_vs_none"] < 100
        assert math.isfinite(rows[method]["fid"]) and rows[method]["kid_subset"] == 3
        assert rows[method]["seconds_per_image"] > 0
    assert all(0 <= row["caption_accuracy"] <= 1 for row in rows.values())
    assert len(list((single / "images" / "agent").glob("*.png"))) == 6
    assert "| agent |" in (single / "quality.md").read_text()
    assert (single / "quality.png").stat().st_size > 1000


def test_resume_remakes_only_missing_batches_identically(single, tmp_path):
    before = (single / "images" / "agent" / "00003.png").read_bytes()
    (single / "images" / "agent" / "00003.png").unlink()
    timing = len(list((single / "timing").glob("*.json")))
    assert main(["bench", "quality", *FAST, "--out", str(single)]) == 0
    assert (single / "images" / "agent" / "00003.png").read_bytes() == before
    made = json.loads(max((single / "timing").glob("*.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert len(list((single / "timing").glob("*.json"))) == timing + 1
    methods = made["methods"]
    assert methods == {"none": [0, 0.0], "tome": [0, 0.0], "agent": [2, methods["agent"][1]]}  # one batch of two
    assert made["commit"] == git_commit()
    rows = json.loads((single / "quality.json").read_text())["metrics"]["methods"]
    assert all(row.get("made_at") == ([git_commit()] if git_commit() else None) for row in rows.values())


def test_timing_pools_runs_and_names_the_commits_that_made_images(tmp_path):
    (tmp_path / "timing").mkdir()
    runs = [  # the first format (no commit), then two runs at two commits; a run that made no images names none
        {"none": [4, 8.0], "agent": [4, 4.0]},
        {"commit": "bbb", "methods": {"none": [0, 0.0], "agent": [2, 1.0], "tome": [6, 3.0]}},
        {"commit": "aaa", "methods": {"tome": [2, 3.0]}},
    ]
    for k, run in enumerate(runs):
        (tmp_path / "timing" / f"{k}-0.json").write_text(json.dumps(run))
    seconds, made_at = _timing(tmp_path)
    assert seconds == {"none": 2.0, "agent": 5.0 / 6, "tome": 6.0 / 8}
    assert made_at == {"agent": ["bbb"], "tome": ["aaa", "bbb"]}


def test_two_processes_under_accelerate_match_one(tmp_path):
    # Both runs with one thread per process: the thread count changes float reduction order, not the sharding.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = ["-m", "agentsd.cli", "bench", "quality", *FAST, "--out"]
    subprocess.run([sys.executable, *command, str(tmp_path / "one")], env=env, check=True, capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    subprocess.run([*launch, *command, str(tmp_path / "two")], env=env, check=True, capture_output=True)
    out = tmp_path / "two"
    assert json.loads((out / "quality.json").read_text())["processes"] == 2
    assert {p.stem.rsplit("-", 1)[1] for p in (out / "timing").glob("*.json")} == {"0", "1"}
    assert comparable(out / "quality.json") == comparable(tmp_path / "one" / "quality.json")


def test_psnr_and_ssim():
    torch.manual_seed(0)
    a = torch.randint(20, 200, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(psnr(a, a + 10), torch.full((2,), 10 * math.log10(255**2 / 100), dtype=torch.float64))
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))
    slightly = (a.int() + torch.randint(-5, 6, a.shape)).clamp(0, 255).to(torch.uint8)
    badly = (a.int() + torch.randint(-60, 61, a.shape)).clamp(0, 255).to(torch.uint8)
    assert (ssim(a, badly) < ssim(a, slightly)).all() and (ssim(a, slightly) < 1).all()
    # the formula written out (Wang et al. 2004), as this project computed SSIM before using torchmetrics
    x, y = a.double() / 255, slightly.double() / 255
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 11, 11)

    def blur(t):
        return torch.nn.functional.conv2d(t, window, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    written = ((2 * mx * my + 1e-4) * (2 * cxy + 9e-4)) / ((mx**2 + my**2 + 1e-4) * (vx + vy + 9e-4))
    assert torch.allclose(ssim(a, slightly), written.flatten(1).mean(1), atol=1e-3)


def test_fast_and_deepcache_methods(tmp_path):
    out = tmp_path / "more"
    methods = ["none", "fast", "deepcache", "deepcache+fast"]
    assert main(["bench", "quality", *FAST, "--num", "4", "--methods", *methods, "--out", str(out)]) == 0
    rows = json.loads((out / "quality.json").read_text())["metrics"]["methods"]
    assert list(rows) == methods
    assert rows["deepcache"]["psnr_vs_none"] < 100  # step caching changed the images
    images = {m: (out / "images" / m / "00001.png").read_bytes() for m in methods}
    assert images["deepcache"] != images["none"]
    # fast leaves blocks under 1,024 tokens alone: it acts where the demo model's top level is that large
    acts = json.loads((MODEL_DIR / "unet" / "config.json").read_text())["sample_size"] ** 2 >= 1024
    assert (images["fast"] != images["none"]) == acts and (images["deepcache+fast"] != images["deepcache"]) == acts


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompts", "nothing.txt"], "--prompts"),
        (["--reference", "no/such/dir"], "reference folder not found"),
        (["--num", "0"], ">= 1"),
        (["--inception-weights", "missing.pth"], "Inception weights file not found"),
    ],
)
def test_bad_input(args, message, capsys, tmp_path):
    assert main(["bench", "quality", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_prompt_sets(tmp_path):
    prompts, scenes = load_prompts("imagenet", 2000, seed=0)
    assert len(set(prompts)) == 1000 and prompts[0] == prompts[1] == "A high quality photograph of a tench."
    assert prompts[-1] == "A high quality photograph of a toilet paper."
    few, _ = load_prompts("imagenet", 10, seed=0)
    assert len(set(few)) == 10 and few[0] == prompts[0] and few[5] == prompts[1000]
    demo, scenes = load_prompts("demo:2", 4, seed=1)
    assert [s.caption for s in scenes] == demo and all(len(s.objects) == 2 for s in scenes)
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    assert load_prompts(str(tmp_path / "p.txt"), 3, seed=0) == (["a cat", "a dog", "a cat"], None)


def test_clip_score_with_a_local_clip_model(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = tmp_path / "clip"
    folder.mkdir()
    tokenizer = char_tokenizer(folder, max_length=32)
    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={
            **small,
            "vocab_size": tokenizer.vocab_size,
            "max_position_embeddings": 32,
            "bos_token_id": 0,
            "eos_token_id": 1,
        },
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    out = tmp_path / "q"
    args = ["bench", "quality", "--num", "2", "--steps", "1", "--methods", "none", "--clip-model", str(folder)]
    assert main([*args, "--out", str(out)]) == 0
    score = json.loads((out / "quality.json").read_text())["metrics"]["methods"]["none"]["clip_score"]
    assert math.isfinite(score) and -100 <= score <= 100


def test_reference_folder_gives_fid_for_every_method(single, tmp_path):
    reference = tmp_path / "real"
    reference.mkdir()
    for i, image in enumerate(sorted((single / "images" / "none").glob("*.png"))[:4]):
        (reference / f"real{i}.png").write_bytes(image.read_bytes())
    out = tmp_path / "q"
    for method in ("none", "agent"):  # reuse the made images: nothing to generate
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "images" / method).symlink_to(single / "images" / method)
    assert (
        main(
            ["bench", "quality", *FAST, "--methods", "none", "agent", "--reference", str(reference), "--out", str(out)]
        )
        == 0
    )
    results = json.loads((out / "quality.json").read_text())["metrics"]
    assert results["reference"] == str(reference)
    assert all(math.isfinite(row["fid"]) for row in results["methods"].values())


def test_lean_no_late_is_lean_agent_phase_then_vanilla(tmp_path):
    """lean-no-late (the UNet default's agent phase alone) runs lean's agents while p < 0.4 and leaves every block
    alone after: its images differ from vanilla's and from lean's."""
    from agentsd.bench.quality import apply_kwargs
    from agentsd.schedule import PRESETS

    schedule = apply_kwargs("lean-no-late")["schedule"]
    assert set(schedule) == set(PRESETS["lean"])
    for level, (early, late) in schedule.items():
        assert early == PRESETS["lean"][level][0] and late.end == 1.0 and not late.merges
    out = tmp_path / "phases"
    methods = ["none", "lean", "lean-no-late"]
    args = ["bench", "quality", *FAST, "--num", "2", "--steps", "4", "--methods", *methods, "--out", str(out)]
    assert main(args) == 0
    images = {m: (out / "images" / m / "00000.png").read_bytes() for m in methods}
    acts = json.loads((MODEL_DIR / "unet" / "config.json").read_text())["sample_size"] ** 2 >= 1024
    assert acts and len(set(images.values())) == 3


def test_images_only_makes_images_and_measures_nothing(single, tmp_path):
    out = tmp_path / "split"
    (out / "images").mkdir(parents=True)
    (out / "images" / "none").symlink_to(single / "images" / "none")
    assert main(["bench", "quality", *FAST, "--methods", "none", "tome", "--images-only", "--out", str(out)]) == 0
    assert len(list((out / "images" / "tome").glob("*.png"))) == 6 and not (out / "quality.json").exists()
    made = json.loads(next((out / "timing").glob("*.json")).read_text())["methods"]
    assert made["tome"][0] == 6 and made["none"] == [0, 0.0]
    # a last run without it measures what the others made, making nothing
    assert main(["bench", "quality", *FAST, "--methods", "none", "tome", "--out", str(out)]) == 0
    rows = json.loads((out / "quality.json").read_text())["metrics"]["methods"]
    assert rows["tome"] == json.loads((single / "quality.json").read_text())["metrics"]["methods"]["tome"] | {
        "seconds_per_image": rows["tome"]["seconds_per_image"]
    }
