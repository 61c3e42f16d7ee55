#!/usr/bin/env bash
# The GPU check (about 8 minutes on one GPU): the cuda-marked tests, then the MNIST and ResNet-18
# recipes' fits on the GPU, with fit seconds, agreement, edit seconds and peak GPU memory written
# to benchmarks/results/gpu.json. Run from the repository root on a machine with a CUDA GPU:
#     bash benchmarks/gpu_check.sh [DATA_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT="${1:-${KOOPMAN_HOOKS_DATA:-../shared/data}}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c "import koopman_hooks" 2>/dev/null || "$PYTHON" -m pip install --quiet -e ".[dev]" || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt" || true
KOOPMAN_HOOKS_DATA="$DATA_ROOT" timeout 420 "$PYTHON" benchmarks/gpu_fit.py --out "$OUT/gpu.json"
