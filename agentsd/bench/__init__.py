"""Benchmarks behind ``agentsd bench``: speed (UNet forwards) and image quality per method."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """The commit of the code being measured (``+changes`` when the work tree differs from it), or ``None`` outside
    a git checkout: every result file names it."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "agentsd"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changed else "")


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or ``None`` when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(path: Path, table: str, figure) -> None:
    """Write ``table`` beside the JSON at ``path`` (``.md``) and print it; save ``figure`` as ``.png``."""
    path.with_suffix(".md").write_text(table + "\n")
    print(table)
    save_figure(path.with_suffix(".png"), figure)


def save_figure(path: Path, figure) -> None:
    """Save ``figure`` at ``path`` (a ``.png``) and close it; say so when there is none."""
    if figure is None:
        print("no plot: nothing to plot, or matplotlib is missing (pip install 'agentsd[bench]')")
        return
    figure.tight_layout(rect=(0, 0.08, 1, 1) if figure.legends else None)  # a figure's legend sits at its foot
    figure.savefig(path, dpi=120)
    pyplot().close(figure)
    print(f"plot: {path}")


def write_results(path: Path, results: dict, table: str) -> None:
    """Write ``results`` as JSON at ``path`` (folders made) and ``table`` beside it (``.md``), and print the table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    path.with_suffix(".md").write_text(table + "\n")
    print(table)
