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
    assert scale["n"] == 8 and scale["streams"] == [0, 1] and scale["fid"] > 0 and scale["size"] == 128
    assert sorted(p.name for p in real.iterdir()) == [f"{i:05d}.png" for i in range(8)]


def test_real_only_at_the_1024_token_grounds_size(tmp_path, monkeypatch):
    """--real-size 256: the same scenes drawn at 256² (the 1,024-token ground's reference set)."""
    from PIL import Image

    module = load_script("eval_demo")
    out, real = tmp_path / "real_vs_real.json", tmp_path / "real"
    argv = ["eval_demo.py", "--real-only", "--real-n", "4", "--real-size", "256", "--real-dir", str(real)]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out), "--threads", "1"])
    module.main()
    assert json.loads(out.read_text())["size"] == 256
    assert all(Image.open(p).size == (256, 256) for p in real.iterdir()) and len(list(real.iterdir())) == 4


def test_weight_sizes_of_a_model_folder_outside_the_package(tmp_path):
    """A trained run's model (``--model runs/.../model``) and the shipped evaluator: each file's size, by name."""
    module = load_script("eval_demo")
    (tmp_path / "model" / "transformer").mkdir(parents=True)
    (tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 10)
    sizes = module.weight_sizes(tmp_path / "model")
    assert sizes["model/transformer/diffusion_pytorch_model.safetensors"] == 10
    assert sizes["evaluator.safetensors"] == module.WEIGHTS.stat().st_size and len(sizes) == 2
