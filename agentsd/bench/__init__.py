"""Benchmarks behind ``agentsd bench``: speed (UNet forwards) and image quality per method."""

from __future__ import annotations

import json
from pathlib import Path


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
    if figure is None:
        print("no plot: nothing to plot, or matplotlib is missing (pip install 'agentsd[bench]')")
        return
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=120)
    pyplot().close(figure)
    print(f"plot: {path.with_suffix('.png')}")


def write_results(path: Path, results: dict, table: str) -> None:
    """Write ``results`` as JSON at ``path`` (folders made) and ``table`` beside it (``.md``), and print the table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    path.with_suffix(".md").write_text(table + "\n")
    print(table)
