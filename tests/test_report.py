"""`agentsd bench report`: the tables of README.md and docs/ are what the committed results give."""

import json
import shutil
from pathlib import Path

from agentsd.bench import report
from agentsd.cli import main

ROOT = Path(__file__).parents[1]


def test_committed_tables_are_what_the_results_give(capsys):
    assert main(["bench", "report", "--check", "--root", str(ROOT)]) == 0, capsys.readouterr().err


def test_a_changed_result_makes_check_fail_until_re_rendered(tmp_path, capsys):
    for name in report.DOCUMENTS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    path = tmp_path / "benchmarks" / "results" / "speed_cpu_lean_1024.json"
    results = json.loads(path.read_text())
    results["sizes"]["1024"]["speedup_median"]["lean"] = 9.87
    path.write_text(json.dumps(results))
    assert main(["bench", "report", "--check", "--root", str(tmp_path)]) == 1
    assert "README.md: where-it-pays" in capsys.readouterr().err
    assert main(["bench", "report", "--root", str(tmp_path)]) == 0
    assert "| 9.87× |" in (tmp_path / "README.md").read_text()
    assert main(["bench", "report", "--check", "--root", str(tmp_path)]) == 0


def test_unknown_table_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "README.md").write_text("<!-- report:nothing -->\n<!-- /report:nothing -->\n")
    assert main(["bench", "report", "--root", str(tmp_path)]) == 2
    assert "unknown report table 'nothing'" in capsys.readouterr().err


def test_a_size_re_measured_at_another_commit_takes_its_row(tmp_path):
    """SD 3.5: speed_cpu_sd35_<size>.json (a re-measure, its own commit and threads) replaces that size's row of
    speed_cpu_sd35.json; the other size keeps its own."""
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)

    def write(name, commit, threads, sizes):
        rows = {str(s): {"speedup_median": {"sd3": speedup}} for s, speedup in sizes.items()}
        (results / name).write_text(json.dumps({"commit": commit, "threads": threads, "sizes": rows}))

    write("speed_cpu_sd35.json", "aaaa", 2, {2048: 1.98, 1024: 1.29})
    write("speed_cpu_sd35_1024.json", "bbbb", 1, {1024: 1.40})
    rows = [line for line in report.where_it_pays(tmp_path).splitlines() if line.startswith("| SD 3.5")]
    assert rows == [
        "| SD 3.5 medium | 1024² | CPU, 1 thread | transformer forwards | 1.40× (sd3) | – | – | bbbb |",
        "| SD 3.5 medium | 2048² | CPU, 2 cores | transformer forwards | 1.98× (sd3) | – | – | aaaa |",
    ]


def test_a_dit_row_is_only_of_the_preset_as_it_stands(tmp_path):
    """A bench blocks file that timed a DiT preset's earlier phases (flux before it took DESIGN §12's options) gives no
    row of today's preset, however new; a file that timed today's phases does; one from before a Phase field existed
    counts it at its default."""
    import dataclasses

    from agentsd.schedule import PRESETS

    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)

    def write(name, commit, preset, speedup):
        phases = [dataclasses.asdict(phase) for phase in preset]
        sizes = {"2048": {"speedup": {"flux": speedup}}}
        (results / name).write_text(
            json.dumps({"commit": commit, "threads": 1, "presets": {"flux": phases}, "sizes": sizes})
        )

    def rows():
        return [line for line in report.where_it_pays(tmp_path).splitlines() if line.startswith("| Flux")]

    write("speed_cpu_flux.json", "aaaa", PRESETS["flux"], 1.40)
    write("speed_cpu_flux_zz.json", "bbbb", PRESETS["flux-bare"], 1.44)  # newer, of the phases without the options
    assert rows() == [
        "| Flux.1 | 2048² | CPU, 1 thread | blocks at the real width | 1.40× (flux, over a run) | – | – | aaaa |"
    ]
    old = json.loads((results / "speed_cpu_flux.json").read_text())
    for phase in old["presets"]["flux"]:
        del phase["shift"]  # recorded before the field existed: at its default, False, as today's
    (results / "speed_cpu_flux.json").write_text(json.dumps(old))
    assert len(rows()) == 1
    (results / "speed_cpu_flux.json").unlink()
    assert rows() == []


def test_quality_table_gives_intervals_and_a_dash_where_no_time_was_kept(tmp_path):
    """Caption accuracy carries its 95% interval (1.96·sqrt(p(1-p)/n)); a method whose images were made by runs that
    kept no timing shows – for s/image, not a crash."""
    folder = tmp_path / "benchmarks" / "results" / "quality_demo_flux"
    folder.mkdir(parents=True)
    row = {"images": 500, "fid": 170.8, "kid": 111.4, "kid_std": 32.0, "caption_accuracy": 0.5}
    methods = {
        "none": {**row, "seconds_per_image": None},
        "flux": {**row, "seconds_per_image": 2.5, "psnr_vs_none": 24.6},
    }
    results = {"num": 500, "steps": 25, "guidance": 3.0, "commit": "abcd", "metrics": {"methods": methods}}
    (folder / "quality.json").write_text(json.dumps(results))
    lines = report.TABLES["quality-demo-flux"](tmp_path).splitlines()
    assert "| none | 50.0% ± 4.4 | – | 170.8 | 111 ± 32 | – | – | – |" in lines
    assert "| flux | 50.0% ± 4.4 | – | 170.8 | 111 ± 32 | 24.6 dB | – | 2.50 |" in lines
