#!/usr/bin/env bash
# The one prepared check for a GPU machine (about 6-8 minutes on one H100/H200):
#   1. the kernel tests and the engine-on-Triton tests on CUDA tensors (compiled kernels);
#   2. the kernel benchmark               -> docs/kernel-bench-<gpu>.md
#   3. the DP step benchmark on the GPU   -> docs/bench-dp-step-<gpu>.md
#      (engine vs non-private vs Opacus hooks and ghost clipping, time and memory, the noise's share)
#   4. the pretraining benchmark on every visible GPU (runtime vs DDP) -> docs/bench-pretrain-<gpu>.md
#   5. `dpldm demo --quick` with device=cuda, in fp32 then precision=bf16 -> docs/demo-quick-<gpu>.md
# Installs nothing, except `pip install -e . --no-deps` when `import trainer` fails.
#
# Variables (environment):
#   PYTHON        python interpreter to use                  (default: python)
#   OUT_DIR       where the tables are written               (default: docs)
#   TEST_TIMEOUT  seconds allowed for the tests               (default: 180)
#   BENCH_TIMEOUT seconds allowed for each benchmark          (default: 130)
#   DEMO_TIMEOUT  seconds allowed for each quick demo         (default: 150)
set -euo pipefail

PYTHON="${PYTHON:-python}"
OUT_DIR="${OUT_DIR:-docs}"
TEST_TIMEOUT="${TEST_TIMEOUT:-180}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-130}"
DEMO_TIMEOUT="${DEMO_TIMEOUT:-150}"

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
mkdir -p "$OUT_DIR"
echo "gpu_check: $gpu_name"

echo "== 1. kernel and engine-on-Triton tests"
timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest -q tests/test_kernels.py tests/test_engine_triton.py

echo "== 2. kernel benchmark"
timeout "$BENCH_TIMEOUT" "$PYTHON" -m trainer.kernels.bench --out "$OUT_DIR/kernel-bench-$gpu_slug.md"

echo "== 3. DP step benchmark"
timeout "$BENCH_TIMEOUT" "$PYTHON" bench/bench_dp_step.py --device cuda --batch 64 --repeats 10 \
    --out "$OUT_DIR/bench-dp-step-$gpu_slug.md"

echo "== 4. pretraining benchmark (runtime vs DDP)"
n_gpus="$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")"
timeout "$BENCH_TIMEOUT" "$PYTHON" bench/bench_pretrain.py --device cuda --world "$n_gpus" --batch $((64 * n_gpus)) \
    --repeats 20 --out "$OUT_DIR/bench-pretrain-$gpu_slug.md"

echo "== 5. quick demo on the GPU (fp32, then bf16)"
demo_md="$OUT_DIR/demo-quick-$gpu_slug.md"
work="$(mktemp -d)"
{
    echo "# \`dpldm demo --quick\` on $gpu_name"
    echo
    echo "| precision | wall time (s) | exit code |"
    echo "| --- | ---: | ---: |"
} > "$demo_md"
for precision in fp32 bf16; do
    start=$(date +%s)
    set +e
    (cd "$work" && MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db" timeout "$DEMO_TIMEOUT" \
        "$PYTHON" -m trainer.cli demo --quick --output-dir "$work/runs-$precision" device=cuda "precision=$precision")
    rc=$?
    set -e
    echo "| $precision | $(( $(date +%s) - start )) | $rc |" >> "$demo_md"
done
cat "$demo_md"
rm -rf "$work"
echo "gpu_check: tables in $OUT_DIR"
