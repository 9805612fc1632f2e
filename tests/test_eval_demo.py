"""benchmarks/eval_demo.py --real-only: the real reference set and its real-vs-real FID/KID, nothing else."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "eval_demo.py"


def test_real_only_writes_the_reference_set_and_its_floor(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("eval_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, real = tmp_path / "real_vs_real.json", tmp_path / "real"
    argv = [
        "eval_demo.py",
        "--real-only",
        "--real-n",
        "8",
        "--real-dir",
        str(real),
        "--out",
        str(out),
        "--threads",
        "1",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    scale = json.loads(out.read_text())
    assert scale["n"] == 8 and scale["streams"] == [0, 1] and scale["fid"] > 0
    assert sorted(p.name for p in real.iterdir()) == [f"{i:05d}.png" for i in range(8)]
