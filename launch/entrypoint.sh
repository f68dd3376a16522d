#!/usr/bin/env bash
# Container entrypoint: arguments are a dpldm command, unless they start with a launcher,
# an interpreter, a shell or an absolute path, which run as given.
#
#   docker run --gpus all -v "$PWD/work:/work" dpldm demo --quick
#   docker run --gpus all --ipc host -v "$PWD/work:/work" dpldm \
#       torchrun --nproc_per_node 8 -m trainer.cli finetune finetune.deepspeed_config=zero3
#   docker run --gpus all --network host --ipc host -v /shared/work:/work -e NO_SSH=1 -e NODE_RANK=0 \
#       -e MASTER_ADDR=gpu-node-0 -e HOSTFILE=/work/hostfile dpldm /opt/dpldm/launch/multinode.sh
#
# The working directory is /work (mount a volume there): run folders (runs/), the MLflow store
# (mlflow.db, mlruns/) and the compiled-kernel caches land on it.
#
# Variables (environment):
#   TORCH_EXTENSIONS_DIR  cache of DeepSpeed/torch JIT-built ops   (default: /work/.cache/torch_extensions)
#   TRITON_CACHE_DIR      cache of compiled Triton kernels         (default: /work/.cache/triton)
#   MLFLOW_TRACKING_URI   MLflow store                             (default: sqlite:///mlflow.db in /work)
set -euo pipefail

export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/work/.cache/torch_extensions}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/work/.cache/triton}"

case "${1:-}" in
    torchrun | deepspeed | python | python3 | bash | sh | mlflow | /*) exec "$@" ;;
    *) exec dpldm "$@" ;;
esac
