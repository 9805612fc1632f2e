#!/usr/bin/env bash
# The GPU suite (≤ 8 minutes on one H100-class GPU, by its --budget), fp16: first the checks (no host sync in a
# patched forward; torch.compile in the default, max-autotune-no-cudagraphs and reduce-overhead modes), then whole
# 20-step runs of SD 1.5 at 512², 1024², 2048², SDXL at 1024² and 2048² and SDXL's 2048² hi-res pass
# (image-to-image, strength 0.5), compiled runs (default mode and CUDA graphs) at 1024², UNet forwards last.
# Results: benchmarks/results/gpu/<card>/*.{json,md,png} (e.g. nvidia-h100-80gb-hbm3), checks.json, suite.md and
# suite.json (what ran, what the budget left out). Re-running on the same card skips what is already measured
# there, so a second run finishes what the budget of the first left out.
# Extra arguments go to `agentsd bench suite` (e.g. --out, --budget).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m agentsd bench suite --device cuda --dtype float16 "$@"
