"""`agentsd bench speed` on a tiny UNet folder: JSON, table, plot, resume, bad input."""

import json
import os
import statistics
from pathlib import Path

import pytest
import torch
from conftest import tiny_sdxl_pipeline, tiny_unet

from agentsd.bench import runs
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
    assert set(first["times"]) == {
        "vanilla", "tomesd", "agentsd-tome", "agentsd-agent", "lean-early", "lean-late", "pooled-early", "ceiling"
    }  # fmt: skip
    assert all(len(ts) == 2 and all(t > 0 for t in ts) for ts in first["times"].values())
    median = {m: statistics.median(ts) for m, ts in first["times"].items()}  # the summary from the raw times
    assert first["speedup_median"]["lean-early"] == pytest.approx(median["vanilla"] / median["lean-early"])
    saving = median["vanilla"] - median["ceiling"]
    assert first["ceiling_share_median"]["tomesd"] == pytest.approx((median["vanilla"] - median["tomesd"]) / saving)
    assert "tomesd" not in results["sizes"]["64"]["times"]
    table = out.with_suffix(".md").read_text()
    assert "| 128² | agentsd-paper |" in table and "| 128² | lean |" in table and "| 64² | ceiling |" in table
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


def test_pipeline_runs_every_method_with_memory(tiny_folder, tmp_path):
    out = tmp_path / "runs.json"
    args = ["bench", "speed", "--pipeline", "--model", str(tiny_folder), "--sizes", "64", "--steps", "3"]
    assert main([*args, "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["kind"] == "pipeline" and results["pipeline"] == "StableDiffusionPipeline"
    summary = results["sizes"]["64"]
    assert set(summary["times"]) == set(runs.DEFAULT_METHODS)
    assert all(len(ts) == 1 and ts[0] > 0 for ts in summary["times"].values())
    assert all(m >= 0 for m in summary["peak_mib"].values())
    times = summary["times"]
    assert summary["speedup_median"]["deepcache+lean"] == pytest.approx(
        times["vanilla"][0] / times["deepcache+lean"][0]
    )
    assert summary["min"] == {m: ts[0] for m, ts in times.items()}  # one repeat: its own min
    assert "| 64² | deepcache+fast |" in out.with_suffix(".md").read_text()


def test_fresh_runs_each_method_in_its_own_process(tiny_folder, tmp_path):
    out = tmp_path / "fresh.json"
    args = ["bench", "speed", "--pipeline", "--model", str(tiny_folder), "--sizes", "64", "--steps", "2"]
    two = ["--fresh", "2", "--methods", "vanilla", "fast", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    assert main([*args, *two]) == 0
    results = json.loads(out.read_text())
    assert results["processes"] == "one per method" and results["kind"] == "pipeline"
    summary = results["sizes"]["64"]
    assert summary["processes_per_method"] == 2
    assert set(summary["times"]) == {"vanilla", "fast"} and all(len(ts) == 2 for ts in summary["times"].values())
    for method, peaks in summary["memory_bytes"].items():  # one peak per process; the median, and their range
        assert len(peaks) == 2 and summary["peak_mib"][method] == sum(peaks) / 2 / 2**20
        assert summary["peak_mib_range"][method] == [min(peaks) / 2**20, max(peaks) / 2**20]
    vanilla, fast = (statistics.median(summary["times"][m]) for m in ("vanilla", "fast"))
    assert summary["speedup_median"]["fast"] == pytest.approx(vanilla / fast)
    table = out.with_suffix(".md").read_text()
    assert "each method in a new process" in table and "median of 2 processes" in table
    assert out.with_suffix(".png").stat().st_size > 1000  # speed-up, and memory in a figure of its own
    assert out.with_name("fresh_memory.png").stat().st_size > 1000
    assert main(["bench", "speed", "--report", "--out", str(out)]) == 0  # the summary is remade the same
    assert json.loads(out.read_text())["sizes"]["64"] == summary
    # A second size joins the first (same setup); the first one's figures stay as they were.
    one = ["--fresh", "--methods", "vanilla", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    assert main([*args[:-4], "--sizes", "32", "--steps", "2", *one]) == 0
    again = json.loads(out.read_text())
    assert set(again["sizes"]) == {"64", "32"} and again["sizes"]["64"] == summary
    assert set(again["sizes"]["32"]["times"]) == {"vanilla"}
    # Another setup (step count) starts afresh rather than mixing.
    assert main([*args[:-1], "4", *one]) == 0
    assert set(json.loads(out.read_text())["sizes"]) == {"64"}


def test_heap_settings_are_part_of_the_setup(tiny_folder, tmp_path, monkeypatch):
    """glibc's heap variables change the resident set: recorded, named in the table, never mixed with other runs."""
    for name in [k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    out = tmp_path / "runs.json"
    args = ["bench", "speed", "--pipeline", "--model", str(tiny_folder), "--sizes", "64", "--steps", "2"]
    args += ["--methods", "vanilla", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    assert main(args) == 0
    assert "heap" not in json.loads(out.read_text())
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert main([*args[:6], "32", *args[7:]]) == 0
    results = json.loads(out.read_text())
    assert results["heap"] == {"MALLOC_MMAP_THRESHOLD_": "65536"} and set(results["sizes"]) == {"32"}
    assert "MALLOC_MMAP_THRESHOLD_=65536" in out.with_suffix(".md").read_text()


def test_fresh_needs_pipeline_and_a_process_count(tmp_path, capsys):
    assert main(["bench", "speed", "--fresh", "--out", str(tmp_path / "x.json")]) == 2
    assert "--fresh goes with --pipeline" in capsys.readouterr().err
    assert main(["bench", "speed", "--pipeline", "--fresh", "-1", "--out", str(tmp_path / "x.json")]) == 2
    assert "--fresh takes a number of processes >= 1" in capsys.readouterr().err


def test_pipeline_methods_change_the_run(tiny_folder, tmp_path):
    """Every method really acts: the final latents differ from vanilla's (and the undo restores vanilla)."""
    pipe, _ = runs.build_pipeline(str(tiny_folder), "ddim", tmp_path)

    def latents():
        generator = torch.Generator().manual_seed(0)
        return pipe(
            "a b", num_inference_steps=4, height=256, width=256, output_type="latent", generator=generator
        ).images

    vanilla = latents()
    for name in runs.DEFAULT_METHODS:
        if name == "vanilla":
            continue
        undo = runs.METHODS[name](pipe, 256)
        changed = latents()
        undo()
        assert not torch.allclose(changed, vanilla), name
    assert torch.equal(latents(), vanilla)


def test_sdxl_pipeline_is_built_around_the_unet(tmp_path):
    folder = tmp_path / "xl"
    tiny_sdxl_pipeline(tmp_path).unet.save_config(folder / "unet")
    pipe, _ = runs.build_pipeline(str(folder), "euler", tmp_path)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    seconds, _ = runs.time_run(pipe, 64, 2, torch.device("cpu"))
    assert seconds > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pipeline", "--methods", "agentsd-agent"], "unknown --pipeline method"),
        (["--methods", "deepcache"], "unknown UNet-forward method"),
        (["--pipeline", "--scheduler", "heun"], "--scheduler must be one of"),
        (["--steps", "0"], "must be >= 1"),
    ],
)
def test_bad_speed_arguments_are_one_clear_line(tiny_folder, tmp_path, capsys, args, message):
    assert main(["bench", "speed", "--model", str(tiny_folder), *args, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_gpu_suite_runs_end_to_end_on_cpu_at_a_tiny_size(tmp_path, capsys):
    out = tmp_path / "suite"
    args = ["bench", "suite", "--tiny", "--device", "cpu", "--dtype", "float32", "--out", str(out)]
    assert main(args) == 0
    forward = json.loads((out / "tiny_forward.json").read_text())
    whole = json.loads((out / "tiny_runs.json").read_text())
    compiled = json.loads((out / "tiny_compile.json").read_text())
    assert set(forward["sizes"]) == set(whole["sizes"]) == set(compiled["sizes"]) == {"64", "128"}
    assert {"deepcache+lean", "paper", "fast", "ceiling-attn1-levels12"} <= set(whole["sizes"]["128"]["times"])
    assert set(compiled["sizes"]["128"]["times"]) == {"vanilla", "vanilla+compile", "lean", "lean+compile"}
    assert (out / "tiny_runs.png").stat().st_size > 1000 and "lean+compile" in (out / "suite.md").read_text()
    checks = json.loads((out / "checks.json").read_text())
    assert checks["passed"] and checks["compile"]["default"]["graph_breaks"] == 0
    assert checks["compile_backend"] == "aot_eager" and runs.COMPILE_BACKEND == "inductor"  # the CPU check's, undone
    assert checks["no_sync"] == {"tiny, lean forced": "not applicable: needs CUDA"}
    log = json.loads((out / "suite.json").read_text())
    assert [p["status"] for p in log["parts"]] == ["passed"] + ["measured"] * 3 and log["seconds"] < log["budget_s"]
    capsys.readouterr()
    assert main(args) == 0
    out_text = capsys.readouterr().out
    assert out_text.count("already measured, skipped") == 3 and "checks: already run" in out_text  # resumes


def test_gpu_suite_leaves_out_what_its_budget_does_not_allow(tmp_path, capsys):
    out = tmp_path / "suite"
    assert main(["bench", "suite", "--tiny", "--device", "cpu", "--budget", "0", "--out", str(out)]) == 0
    log = json.loads((out / "suite.json").read_text())
    assert [p["status"] for p in log["parts"]] == ["left out: time budget spent"] * 4
    assert not (out / "tiny_forward.json").exists() and "left out" in (out / "suite.md").read_text()


def test_gpu_suite_writes_into_a_folder_of_its_card_by_default(tmp_path, monkeypatch, capsys):
    from agentsd.bench import suite

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert suite.card_folder("cuda") == Path("benchmarks/results/gpu/nvidia-h100-80gb-hbm3")
    assert suite.card_folder("cpu") == Path("benchmarks/results/gpu/cpu")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "suite", "--tiny", "--device", "cpu", "--budget", "0"]) == 0
    assert (tmp_path / "benchmarks/results/gpu/cpu/suite.json").exists()


def test_rounds_cut_repeats_to_the_deadline_but_keep_one(monkeypatch):
    from types import SimpleNamespace

    from agentsd.bench import core

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(core, "time", SimpleNamespace(monotonic=lambda: clock.now))
    assert list(core.rounds(2, 3, None)) == ["warm-up", "warm-up", "repeat 1", "repeat 2", "repeat 3"]
    assert list(core.rounds(1, 3, -1.0)) == ["warm-up", "repeat 1"]  # the deadline has passed: one timed round
    labels = []
    for label in core.rounds(0, 5, 2.5):
        labels.append(label)
        clock.now += 1.0  # each round takes 1 s: a third would end past the deadline
    assert labels == ["repeat 1", "repeat 2"]


def test_speed_times_sd3_transformer_forwards(tmp_path, monkeypatch):
    """--model sd35 (shrunk here): vanilla, the ceiling (patched blocks' attention free), the sd3 and sd3-paper phases,
    weighted into "sd3"; UNet-only methods are refused."""
    from agentsd.bench import core

    tiny = dict(core.SD35_MEDIUM, num_layers=6, num_attention_heads=2, attention_head_dim=8, joint_attention_dim=16)
    tiny |= dict(caption_projection_dim=16, pooled_projection_dim=8, in_channels=4, out_channels=4)
    monkeypatch.setitem(core.ARCHITECTURES, "sd35", tiny | {"dual_attention_layers": (0, 1)})
    out = tmp_path / "sd35.json"
    common = ["bench", "speed", "--model", "sd35", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    assert main([*common, "--sizes", "256", "--batch", "1"]) == 0
    entry = json.loads(out.read_text())["sizes"]["256"]
    phases = {f"{preset}-{k}" for preset in ("sd3", "sd3-paper") for k in ("early", "late")}
    assert set(entry["times"]) == {"vanilla", "ceiling", "ceiling-softmax", *phases}
    assert "sd3-early" in entry["softmax_share_median"]
    assert {"sd3", "sd3-paper"} <= set(entry["speedup_median"])
    assert main([*common, "--sizes", "256", "--methods", "vanilla", "tomesd"]) == 2


def test_gpu_suite_times_the_dit_presets_with_design_12s_options():
    """The suite's DiT block parts time every default method and the presets with proportional attention and the
    near field, all names `bench blocks` knows (a GPU run cannot stop on an unknown one)."""
    import argparse

    from agentsd.bench import blocks, suite

    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    args = parser.parse_args(["--device", "cuda", "--out", "x"])
    parts = [p for p in suite.parts(args, None) if getattr(p, "kind", None) == "blocks"]
    assert [p.model for p in parts] == ["flux", "wan"]
    for part in parts:
        known = blocks.methods_for(part.model)
        assert set(part.methods) <= set(known) and "vanilla" in part.methods
        assert {f"{part.model}-early", f"{part.model}-late"} <= set(part.methods)
    # flux has both options (flux-bare neither, flux+all the shift too); wan has them by name
    assert {"flux-bare-early", "flux-bare-late", "flux+all-early", "flux+all-late"} <= set(parts[0].methods)
    assert {"wan+both-early", "wan+both-late"} <= set(parts[1].methods)
