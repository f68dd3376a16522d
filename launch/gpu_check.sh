#!/usr/bin/env bash
# Check the Triton kernels on a GPU machine: the kernel tests on CUDA tensors (compiled
# kernels, no interpreter), then the benchmark, written to docs/kernel-bench-<gpu>.md.
# Installs nothing, except `pip install -e . --no-deps` when `import trainer` fails.
# Fits in 5 minutes on one H100/H200 (tests ~2 min, mostly compiling; bench ~1-2 min).
#
# Variables (environment):
#   PYTHON        python interpreter to use                  (default: python)
#   OUT_DIR       where the benchmark table is written        (default: docs)
#   TEST_TIMEOUT  seconds allowed for the tests               (default: 150)
#   BENCH_TIMEOUT seconds allowed for the benchmark           (default: 130)
#   BENCH_REPS    timed repetitions per benchmark case        (default: the benchmark's own, 20)
set -euo pipefail

PYTHON="${PYTHON:-python}"
OUT_DIR="${OUT_DIR:-docs}"
TEST_TIMEOUT="${TEST_TIMEOUT:-150}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-130}"
BENCH_REPS="${BENCH_REPS:-}"

cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # compiled kernels only

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device" >&2
    exit 1
fi
if ! "$PYTHON" -c "import trainer" 2>/dev/null; then
    "$PYTHON" -m pip install -e . --no-deps
fi

gpu_name="$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))")"
gpu_slug="$(echo "$gpu_name" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')"
out_file="$OUT_DIR/kernel-bench-$gpu_slug.md"
echo "gpu_check: $gpu_name -> $out_file"

timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest -q tests/test_kernels.py

mkdir -p "$OUT_DIR"
bench_args=(--out "$out_file")
if [[ -n "$BENCH_REPS" ]]; then
    bench_args+=(--reps "$BENCH_REPS")
fi
timeout "$BENCH_TIMEOUT" "$PYTHON" -m kernels.bench "${bench_args[@]}"
