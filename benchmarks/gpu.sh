#!/usr/bin/env bash
# The GPU suite (≤ 8 minutes on one H100-class GPU, by its --budget), fp16: first the checks (no host sync in a
# patched forward; torch.compile in the default, max-autotune-no-cudagraphs and reduce-overhead modes; the near
# field's fused kernel against the plain formula), then whole
# 20-step runs of SD 1.5 at 512², 1024², 2048², SDXL at 1024² and 2048² and SDXL's 2048² hi-res pass
# (image-to-image, strength 0.5), compiled runs (default mode and CUDA graphs) at 1024², UNet forwards last.
# Results: benchmarks/results/gpu/<card>/*.{json,md,png} (e.g. nvidia-h100-80gb-hbm3), checks.json, suite.md and
# suite.json (what ran, what the budget left out). Re-running on the same card skips what is already measured
# there, so a second run finishes what the budget of the first left out.
# Extra arguments go to `agentsd bench suite` (e.g. --out, --budget).
set -euo pipefail
cd "$(dirname "$0")/.."
# The suite measures the default as a user gets it, uncalibrated; then `agentsd calibrate` measures where the lean
# default pays on this card (eager), written beside the results (and cached, so later runs here use it).
"${PYTHON:-python3}" -m agentsd bench suite --device cuda --dtype float16 --budget 420 "$@"
card=$("${PYTHON:-python3}" -c "from agentsd.bench.suite import card_folder; print(card_folder('cuda'))")
if [ ! -f "$card/calibration_eager.json" ]; then
    "${PYTHON:-python3}" -m agentsd calibrate --device cuda --dtype float16 --repeats 3 --out "$card/calibration_eager.json"
fi
