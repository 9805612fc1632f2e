"""Every table of figures in README.md and docs/ is rendered here from the committed result files.

    agentsd bench report            # rewrite the marked tables in README.md and docs/*.md from benchmarks/results/
    agentsd bench report --check    # exit 1 and name the tables that differ from what the results give

A table sits between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``, NAME a key of :data:`TABLES`;
the test suite runs ``--check``, so a figure typed by hand, or a result re-measured without re-rendering, fails it.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from pathlib import Path

RESULTS = Path("benchmarks/results")
H100 = RESULTS / "gpu" / "nvidia-h100-80gb-hbm3"
DOCUMENTS = ("README.md", "docs/results.md")


def _load(root: Path, path: Path) -> dict | None:
    file = root / path
    return json.loads(file.read_text()) if file.is_file() else None


def _speedup(results: dict | None, size: int, method: str) -> str:
    value = (results or {}).get("sizes", {}).get(str(size), {}).get("speedup_median", {}).get(method)
    return "–" if value is None else f"{value:.2f}×"


def _commit(results: dict | None) -> str:
    return (results or {}).get("commit") or "before commits were recorded"


def _cpu(results: dict) -> str:
    """The device column of a CPU result: how many threads it ran on."""
    threads = results.get("threads", 2)
    return f"CPU, {threads} {'thread' if threads == 1 else 'cores'}"


def where_it_pays(root: Path) -> str:
    """Speed-up over vanilla SDPA per model, size and device: the default (lean), fast, and DeepCache + fast."""
    cpu512, cpu1024 = _load(root, RESULTS / "speed_cpu_lean.json"), _load(root, RESULTS / "speed_cpu_lean_1024.json")
    cpu_runs = _load(root, RESULTS / "speed_runs_cpu.json")
    gpu = {name: _load(root, H100 / f"{name}.json") for name in ("sd15_runs", "sdxl_runs", "sd15_compile")}
    rows = [
        ("SD 1.5", 512, "CPU, 2 cores", "UNet forwards", _speedup(cpu512, 512, "lean"), "–", "–", cpu512),
        ("SD 1.5", 1024, "CPU, 2 cores", "UNet forwards", _speedup(cpu1024, 1024, "lean"), "–", "–", cpu1024),
    ]
    for size in (512, 1024):
        lean = _speedup(cpu_runs, size, "lean").replace("–", "not yet")
        cells = (_speedup(cpu_runs, size, m) for m in ("fast", "deepcache+fast"))
        rows.append(("SD 1.5", size, "CPU, 2 cores", "20-step runs", lean, *cells, cpu_runs))
    for model, name, sizes in (("SD 1.5", "sd15_runs", (512, 1024, 2048)), ("SDXL", "sdxl_runs", (1024,))):
        for size in sizes:
            cells = (_speedup(gpu[name], size, m) for m in ("fast", "deepcache+fast"))
            rows.append((model, size, "H100, fp16", "20-step runs", "not yet", *cells, gpu[name]))
    sd35 = {}  # size -> its newest result file: speed_cpu_sd35.json, then speed_cpu_sd35_<size>.json (a re-measure)
    for path in [RESULTS / "speed_cpu_sd35.json", *sorted((root / RESULTS).glob("speed_cpu_sd35_*.json"))]:
        results = _load(root, RESULTS / Path(path).name)
        sd35.update({int(size): results for size in (results or {}).get("sizes", {})})
    for size, results in sorted(sd35.items()):
        default = f"{_speedup(results, size, 'sd3')} (sd3)"
        rows.append(("SD 3.5 medium", size, _cpu(results), "transformer forwards", default, "–", "–", results))
    for model, name, preset, label in (
        ("Flux.1", "flux", "flux", "{}²"),
        ("Wan 2.1 1.3B", "wan", "wan", "{}: 832×480, 81 frames"),
        ("Wan 2.1 14B", "wan14b", "wan", "{}: 832×480, 81 frames"),
    ):
        newest = {}  # size -> (results, summary): a later file of _blocks_results re-measures a size, as for SD 3.5
        for results in _blocks_results(root, name):
            if not _measured_as_today(results, preset):
                continue
            newest.update({size: (results, summary) for size, summary in results["sizes"].items()})
        for size, (results, summary) in sorted(newest.items(), key=lambda item: item[0].zfill(8)):
            value = summary.get("speedup", {}).get(preset)
            default = "–" if value is None else f"{value:.2f}× ({preset}, over a run)"
            where = (model, label.format(size), _cpu(results), "blocks at the real width")
            rows.append((*where, default, "–", "–", results))
    compiled = gpu["sd15_compile"]
    fast = f"{_speedup(compiled, 512, 'fast+compile')} (vanilla+compile {_speedup(compiled, 512, 'vanilla+compile')})"
    rows.append(("SD 1.5", 512, "H100, fp16", "20-step runs, compiled", "not yet", fast, "–", compiled))
    lines = [
        "| model | size | device | measured | lean (the default) | fast | DeepCache + fast | commit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, size, device, kind, lean, fast, deep, results in rows:
        size = f"{size}²" if isinstance(size, int) else size
        lines.append(f"| {model} | {size} | {device} | {kind} | {lean} | {fast} | {deep} | {_commit(results)} |")
    return "\n".join(lines)


def ops(root: Path) -> str:
    """Kernel ops added per patched block, per preset and phase (``agentsd bench ops``)."""
    from .ops import table

    results = _load(root, RESULTS / "ops_sd15.json")
    return "(no ops_sd15.json)" if results is None else table(results)


def quality_demo128(root: Path, folder: str = "quality_demo128") -> str:
    """Quality on a proving ground (``agentsd bench quality``): one-object captions in ``folder``, and the
    two-object set where it was measured (``<folder>_two``)."""
    results = _load(root, RESULTS / folder / "quality.json")
    if results is None:
        return f"(no {folder}/quality.json)"
    two = _load(root, RESULTS / f"{folder}_two" / "quality.json")
    two_rows = (two or {}).get("metrics", {}).get("methods", {})
    floor = results["metrics"].get("real_vs_real_fid")
    lines = [
        f"{results['num']} one-object captions"
        + (f" and {two['num']} two-object captions" if two else "")
        + f", {results['steps']} steps, guidance {results['guidance']}, commit {_commit(results)}"
        + ("" if floor is None else f"; real-vs-real FID (the floor): {floor:.1f}")
        + "; caption accuracy ± the half-width of its 95% interval",
        "",
        "| method | caption accuracy | two objects | FID | KID (± std) | PSNR vs vanilla | SSIM | s/image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, m in results["metrics"]["methods"].items():
        psnr = "–" if m.get("psnr_vs_none") is None else f"{m['psnr_vs_none']:.1f} dB"
        ssim = "–" if m.get("ssim_vs_none") is None else f"{m['ssim_vs_none']:.3f}"
        pair = two_rows.get(method, {})
        pair = "–" if pair.get("caption_accuracy") is None else _accuracy(pair["caption_accuracy"], pair["images"])
        seconds = "–" if m.get("seconds_per_image") is None else f"{m['seconds_per_image']:.2f}"
        fid = "–" if m.get("fid") is None else f"{m['fid']:.1f}"  # none against itself, where vanilla is the reference
        kid = "–" if m.get("kid") is None else f"{m['kid']:.0f} ± {m['kid_std']:.0f}"
        lines.append(
            f"| {method} | {_accuracy(m['caption_accuracy'], m['images'])} | {pair} | {fid} | {kid} | {psnr} | {ssim} "
            f"| {seconds} |"
        )
    return "\n".join(lines)


def _accuracy(p: float, n: int) -> str:
    """A caption accuracy with the half-width of its 95% interval: ``88.4% ± 2.8``."""
    return f"{100 * p:.1f}% ± {196 * math.sqrt(p * (1 - p) / n):.1f}"


def _measured_as_today(results: dict, preset: str) -> bool:
    """Whether a ``bench blocks`` result file timed ``preset`` as it stands today (a preset's phases can change:
    flux took DESIGN §12's options; a figure of its earlier phases is not today's)."""
    from agentsd.schedule import PRESETS, Phase

    try:  # a file from before a Phase field existed recorded it at its default
        measured = tuple(Phase(**phase) for phase in results.get("presets", {}).get(preset, ()))
    except (TypeError, ValueError):
        return False
    return measured == PRESETS[preset]


def _blocks_results(root: Path, model: str) -> list[dict]:
    """Every ``bench blocks`` result file of ``model``: ``speed_cpu_<model>.json`` and ``speed_cpu_<model>_<size>.json``
    (a size measured at another commit goes to a file of its own: one file never mixes commits)."""
    files = [root / RESULTS / f"speed_cpu_{model}.json", *sorted((root / RESULTS).glob(f"speed_cpu_{model}_*.json"))]
    return [json.loads(f.read_text()) for f in files if f.is_file()]


def dit_blocks(root: Path) -> str:
    """Flux.1 and Wan blocks at the real width (``agentsd bench blocks``): each result file's table."""
    from .blocks import table

    found = [results for model in ("flux", "wan", "wan14b") for results in _blocks_results(root, model)]
    return "\n\n".join(table(results) for results in found) or "(no bench blocks results)"


# quality tables of the proving grounds: report section -> the folder of ``agentsd bench quality`` results under
# benchmarks/results/ (each made by quality_demo128)
QUALITY_SECTIONS = {
    "quality-demo-flux": "quality_demo_flux",  # the DiT proving ground (a miniature Flux.1, 256 tokens)
    "quality-demo-flux-s12": "quality_demo_flux_s12",  # DESIGN §12's options there, first 100 captions
    "quality-demo-flux-s12-500": "quality_demo_flux_s12_500",  # ... all 500
    "quality-demo-flux-blocks": "quality_demo_flux_probes/blocks",  # the flux preset in one block at a time
    "quality-demo-flux256": "quality_demo_flux256_first100",  # the 1,024-token ground, stage 2, first 100
    "quality-demo-flux256-probes": "quality_demo_flux256_probes",  # flux+both's phases apart there, first 50
    "quality-demo-flux256-final": "quality_demo_flux256_final",  # the 1,024-token ground's final weights, first 100
    "quality-demo-flux256-blocks": "quality_demo_flux256_blocks",  # ... the flux preset in one block at a time
    "quality-demo-flux-late-windows": "quality_demo_flux_late_windows",  # flux's late phase, 4x4 windows, 256 tokens
    "quality-demo-flux256-late-windows": "quality_demo_flux256_late_windows",  # ... and at 1,024 tokens
    "quality-demo-flux-reach": "quality_demo_flux_reach",  # the near field over 3x3 windows, 256 tokens
    "quality-demo-flux256-reach": "quality_demo_flux256_reach",  # ... and at 1,024 tokens
    "quality-demo-flux-default-500": "quality_demo_flux_default_500",  # flux of 9a45504, all 500 captions
    "quality-demo-flux-reach-500": "quality_demo_flux_reach_500",  # today's flux, all 500 captions, 256 tokens
    "quality-demo-flux256-reach-100": "quality_demo_flux256_reach_100",  # ... first 100 captions, 1,024 tokens
}


def parallel_traffic(root: Path) -> str:
    """Bytes per rank and attention call under context parallelism (``agentsd bench traffic``)."""
    from .traffic import table

    results = _load(root, RESULTS / "parallel_traffic.json")
    return table(results) if results else "(no bench traffic results)"


def shard_grouping(root: Path) -> str:
    """The late phase grouped within each shard, simulated on the DiT proving ground
    (``benchmarks/studies/shard_grouping.py``)."""
    results = _load(root, RESULTS / "shard_grouping_demo_flux" / "shard_grouping.json")
    return shard_grouping_table(results) if results else "(no shard grouping results)"


def shard_grouping_table(results: dict) -> str:
    lines = [
        f"The late phase's grouping within R shards, simulated in one process on the DiT proving ground (first "
        f"{results['num']} one-object captions, 256 tokens, {results['steps']} steps); commit {results['commit']}; "
        "caption accuracy ± the half-width of its 95% interval",
        "",
        "| grouping | caption accuracy | PSNR vs vanilla | PSNR vs the global grouping |",
        "|---|---|---|---|",
    ]
    for name, row in results["metrics"]["methods"].items():
        label = {"none": "vanilla", "flux": "global (`flux`, what ships)"}.get(name)
        label = label or f"within {name.removeprefix('flux-shards')} shards"
        cells = [row.get("psnr_vs_none"), row.get("psnr_vs_flux")]
        db = ["–" if c is None else f"{c:.1f} dB" for c in cells]
        lines.append(f"| {label} | {_accuracy(row['caption_accuracy'], results['num'])} | {db[0]} | {db[1]} |")
    return "\n".join(lines)


TABLES = {
    "where-it-pays": where_it_pays,
    "ops": ops,
    "quality-demo128": quality_demo128,
    **{section: functools.partial(quality_demo128, folder=folder) for section, folder in QUALITY_SECTIONS.items()},
    "dit-blocks": dit_blocks,
    "parallel-traffic": parallel_traffic,
    "shard-grouping": shard_grouping,
}
_BLOCK = re.compile(r"(<!-- report:([a-z0-9-]+) -->\n)(.*?)(<!-- /report:\2 -->)", re.S)


def render(root: Path = Path(".")) -> dict[Path, tuple[str, str]]:
    """``{document: (as it is, as the results give it)}`` for every document with marked tables."""
    out = {}
    for name in DOCUMENTS:
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text()

        def fill(match: re.Match, name=name) -> str:
            table = match.group(2)
            if table not in TABLES:
                raise ValueError(f"{name}: unknown report table {table!r}; known: {', '.join(TABLES)}")
            return match.group(1) + TABLES[table](root) + "\n" + match.group(4)

        out[path] = (text, _BLOCK.sub(fill, text))
    return out


def stale(root: Path = Path(".")) -> list[str]:
    """The marked tables whose text differs from what the results give, as ``document: table``."""
    found = []
    for path, (now, rendered) in render(root).items():
        ours = {m.group(2): m.group(3) for m in _BLOCK.finditer(rendered)}
        found += [f"{path.name}: {m.group(2)}" for m in _BLOCK.finditer(now) if ours[m.group(2)] != m.group(3)]
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository (default: here)")


def bench(args: argparse.Namespace) -> int:
    if args.check:
        out_of_date = stale(args.root)
        for entry in out_of_date:
            print(f"out of date: {entry} (run agentsd bench report)", file=sys.stderr)
        return 1 if out_of_date else 0
    for path, (now, rendered) in render(args.root).items():
        if rendered != now:
            path.write_text(rendered)
            print(f"updated {path}")
    return 0
