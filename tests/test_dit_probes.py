"""benchmarks/studies/dit_probes.py: its probes are valid methods, and the text-exact broadcast is what it says."""

import json
from pathlib import Path

import torch
from conftest import load_script
from reference import softmax_attention
from test_blocks_bench import tiny  # noqa: F401 (the fixture: tiny Flux and Wan configs)

from agentsd.bench.quality import METHODS
from agentsd.dit import Layout, Window, pool
from agentsd.schedule import resolve_schedule

ROOT = Path(__file__).parents[1]


def test_probes_are_schedules_and_results_come_from_them():
    probes = load_script("dit_probes").PROBES
    for kwargs in probes.values():
        resolve_schedule(kwargs["schedule"])
    for path in (ROOT / "benchmarks/results/quality_demo_flux_probes").glob("*/quality.json"):
        methods = set(json.loads(path.read_text())["metrics"]["methods"]) - {"none"}
        assert methods <= set(probes) | set(METHODS), path


def test_text_exact_broadcast_equals_its_formula():
    """Image queries: softmax over [Q_X·A·s^k2 ; Q_X·K_T·s] of [V_A ; V_T] plus the V shortcut; text queries exact."""
    script = load_script("dit_probes")
    torch.manual_seed(0)
    B, T, h, w, H, D = 2, 3, 4, 4, 2, 8
    q, k, v = (torch.randn(B, T + h * w, H, D, dtype=torch.float64) for _ in range(3))
    layout = Layout(T, True, ((1, h, w),))

    def agents(x):
        return pool(x, layout.grids, Window(1, 2, 2))

    out = script.text_exact_attention(q, k, v, layout, agents=agents, k_scale2=0.3, k_shortcut=0.075)
    s = D**-0.5
    for b in range(B):
        for i in range(H):
            qi, ki, vi = q[b, :, i], k[b, :, i], v[b, :, i]
            a = torch.stack([qi[T:][[r * w + c for r in rows for c in cols]].mean(0)
                             for rows in ((0, 1), (2, 3)) for cols in ((0, 1), (2, 3))])  # fmt: skip
            v_a = softmax_attention(a, ki, vi, s)
            logits = torch.cat([qi[T:] @ a.T * s**0.3, qi[T:] @ ki[:T].T * s], dim=-1)
            image = torch.softmax(logits, -1) @ torch.cat([v_a, vi[:T]]) + 0.075 * vi[T:]
            torch.testing.assert_close(out[b, T:, i], image)
            torch.testing.assert_close(out[b, :T, i], softmax_attention(qi[:T], ki, vi, s))


def test_flux_both_apart_are_its_phases():
    """flux+both-no-late: its agent phase, then vanilla; flux+both-late-only: its late phase for the whole run."""
    probes = load_script("dit_probes").PROBES
    early, late = METHODS["flux-bare+both"]["schedule"]
    (first, after), (alone,) = probes["flux+both-no-late"]["schedule"], probes["flux+both-late-only"]["schedule"]
    assert first == early and not after.merges and after.end == 1.0
    assert alone.end == 1.0 and alone.near and alone.proportional and (alone.sx, alone.ratio) == (late.sx, late.ratio)


def test_late_probes_are_timed_by_bench_blocks(tiny, tmp_path):  # noqa: F811
    """``dit_probes.py blocks`` times the probes' late phases beside bench blocks' own methods, then leaves bench
    blocks as it was."""
    from agentsd.bench import blocks

    script = load_script("dit_probes")
    methods = ["vanilla", "flux-late", *(f"{p}-late" for p in script.LATE_PROBES)]
    out = tmp_path / "r.json"
    argv = ["blocks", "--model", "flux", "--sizes", "256", "--methods", *methods, "--out", str(out)]
    assert script.main(argv) == 0
    assert set(json.loads(out.read_text())["sizes"]["256"]["model_s"]) == set(methods)
    assert "flux-late-4x2-late" not in blocks.methods_for("flux")
    phase = script.PROBES["flux-late-4x2"]["schedule"][1]
    assert (phase.sx, phase.sy, phase.ratio, phase.near, phase.proportional) == (4, 2, 0.875, True, True)
