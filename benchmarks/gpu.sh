#!/usr/bin/env bash
# The GPU suite (≤ 8 minutes on one H100-class GPU, by its --budget): SD 1.5 at 512², 1024², 2048² and SDXL at
# 1024², fp16, UNet forwards and whole 20-step runs, torch.compile on and off for vanilla and fast.
# Results: benchmarks/results/gpu/<card>/*.{json,md,png} (e.g. nvidia-h100-80gb-hbm3), suite.md and suite.json
# (what ran, what the budget left out). Re-running on the same card skips what is already measured there.
# Extra arguments go to `agentsd bench suite` (e.g. --out, --budget).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m agentsd bench suite --device cuda --dtype float16 "$@"
