"""benchmarks/eval_demo.py --real-only: the real reference set and its real-vs-real FID/KID, nothing else."""

import json
import sys

from conftest import load_script


def test_real_only_writes_the_reference_set_and_its_floor(tmp_path, monkeypatch):
    module = load_script("eval_demo")
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
