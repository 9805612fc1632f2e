"""benchmarks/studies/fast_ablation.py: its variants are valid schedules, every committed result names one of them."""

import json
from pathlib import Path

from conftest import load_script

import agentsd
from agentsd.schedule import resolve_schedule

ROOT = Path(__file__).parents[1]


def _script():
    return load_script("fast_ablation")


def test_variants_are_schedules_and_results_come_from_them():
    variants = _script().VARIANTS
    for schedule in variants.values():
        resolve_schedule(schedule)
    first_fast = variants["first fast: whole block merged (cross-attention + feed-forward), late ratio 0.5"]
    assert all(p.merge_crossattn and p.merge_mlp for phases in first_fast.values() for p in phases)
    assert not any(p.merge_mlp for phases in agentsd.PRESETS["fast"].values() for p in phases)
    committed = json.loads((ROOT / "benchmarks/results/quality_demo128/fast_ablation.json").read_text())
    assert set(committed["variants"]) - {"none"} <= set(variants)
