#!/usr/bin/env bash
# The GPU suite (≤ 8 minutes on one H100-class GPU): SD 1.5 at 512², 1024², 2048² and SDXL at 1024², fp16,
# UNet forwards and whole 20-step runs, torch.compile on and off for vanilla and fast.
# Results: benchmarks/results/gpu/*.{json,md,png} and suite.md. Re-running skips what is already measured.
set -euo pipefail
cd "$(dirname "$0")/.."
exec agentsd bench suite --device cuda --dtype float16 --out "benchmarks/results/gpu" "$@"
