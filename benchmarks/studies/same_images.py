"""Does a method still make the images it made at an older commit? (Then that commit's quality figures stand.)

Checks the older commit out into a temporary git worktree, samples the shipped demo model (the same weights for
both, read from this tree) with the method under each commit's agentsd in a process of its own, and compares the
images bit for bit.

    python benchmarks/studies/same_images.py --commit 69960a1 --method lean
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ["a small red circle on the left", "a large blue square at the top"]

SAMPLE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import agentsd
from agentsd.demo import load_pipeline
assert agentsd.__file__.startswith(sys.argv[1]), agentsd.__file__
pipe = load_pipeline(device=torch.device("cpu"), dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
if sys.argv[3] != "none":
    agentsd.apply(pipe, sys.argv[3], seed=0)
captions = sys.argv[4:]
out = pipe(captions, num_inference_steps=25, guidance_scale=3.0, output_type="pt",
           generator=[torch.Generator().manual_seed(i) for i in range(len(captions))]).images
torch.save(out, sys.argv[2])
"""


def sample(tree: Path, method: str, out: Path) -> torch.Tensor:
    subprocess.run([sys.executable, "-c", SAMPLE, str(tree), str(out), method, *CAPTIONS], check=True)
    return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--method", default="lean")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        old = Path(folder) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.commit], check=True)
        try:
            before = sample(old, args.method, Path(folder) / "before.pt")
            now = sample(ROOT, args.method, Path(folder) / "now.pt")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    same = torch.equal(before, now)
    print(f"{args.method}: {len(CAPTIONS)} images at {args.commit} and now: "
          + ("the same bit for bit" if same else f"differ (max {float((before - now).abs().max()):.3g})"))  # fmt: skip
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
