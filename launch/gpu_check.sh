#!/usr/bin/env bash
# The one prepared check for a GPU machine (about 4 minutes on one H200):
#   1. the kernel tests and the engine-on-Triton tests on CUDA tensors (compiled kernels);
#   2. the kernel benchmark               -> docs/kernel-bench-<gpu>.md
#   3. the DP step benchmark on the GPU   -> docs/bench-dp-step-<gpu>.md
#      (engine vs non-private vs Opacus hooks and ghost clipping, time and memory, the noise's share)
#   4. the pretraining benchmark on every visible GPU (runtime vs DDP) -> docs/bench-pretrain-<gpu>.md
#   5. `dpldm demo --quick` with device=cuda, in fp32 then precision=bf16 -> docs/demo-quick-<gpu>.md
#   6. `dpldm sample` on the GPU from that fine-tune, DDIM and DPM-Solver++(2M) (exit codes only)
# Installs nothing: the checkout is put on PYTHONPATH; its dependencies must be importable.
# A failing step does not stop the later ones (a GPU lease is short): each step's exit code and
# wall time are listed at the end, and the script exits 1 if any step failed.
#
# Variables (environment):
#   PYTHON        python interpreter to use                  (default: python, else python3)
#   OUT_DIR       where the tables are written               (default: docs)
#   TEST_TIMEOUT  seconds allowed for the tests               (default: 180)
#   BENCH_TIMEOUT seconds allowed for each benchmark          (default: 130)
#   DEMO_TIMEOUT  seconds allowed for each quick demo         (default: 150)
set -uo pipefail

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
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
# the checkout itself, not an installed copy, wherever a step runs (the demo runs in a scratch folder)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

gpu_name="$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))")"
gpu_slug="$(echo "$gpu_name" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')"
mkdir -p "$OUT_DIR"
echo "gpu_check: $gpu_name"

summary=()
failed=0
step() {  # step NAME COMMAND...: run it, record its exit code and wall time, go on either way
    local name="$1" start rc
    shift
    echo "== $name"
    start=$(date +%s)
    "$@"
    rc=$?
    summary+=("$name: exit $rc, $(( $(date +%s) - start )) s")
    [[ $rc -eq 0 ]] || failed=1
}

step "1. kernel and engine-on-Triton tests" \
    timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest -q tests/test_kernels.py tests/test_engine_triton.py

step "2. kernel benchmark" \
    timeout "$BENCH_TIMEOUT" "$PYTHON" -m trainer.kernels.bench --out "$OUT_DIR/kernel-bench-$gpu_slug.md"

step "3. DP step benchmark" \
    timeout "$BENCH_TIMEOUT" "$PYTHON" bench/bench_dp_step.py --device cuda --batch 64 --repeats 10 \
    --out "$OUT_DIR/bench-dp-step-$gpu_slug.md"

n_gpus="$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")"
step "4. pretraining benchmark (runtime vs DDP)" \
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
    (cd "$work" && MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db" timeout "$DEMO_TIMEOUT" \
        "$PYTHON" -m trainer.cli demo --quick --output-dir "$work/runs-$precision" device=cuda "precision=$precision")
    rc=$?
    echo "| $precision | $(( $(date +%s) - start )) | $rc |" >> "$demo_md"
    summary+=("5. quick demo ($precision): exit $rc, $(( $(date +%s) - start )) s")
    [[ $rc -eq 0 ]] || failed=1
done
cat "$demo_md"

# the fp32 quick demo's fine-tune, sampled on the GPU by both samplers (the solver's grid and update on CUDA)
for sampler in ddim dpmpp_2m; do
    step "6. dpldm sample --sampler $sampler on the GPU" \
        timeout "$BENCH_TIMEOUT" "$PYTHON" -m trainer.cli sample --checkpoint "$work/runs-fp32/demo-quick/finetune" \
        --num 4 --sampler "$sampler" --out "$work/samples-$sampler" --device cuda
done
rm -rf "$work"
echo "gpu_check: tables in $OUT_DIR"
printf 'gpu_check: %s\n' "${summary[@]}"
exit "$failed"
