#!/usr/bin/env bash
# DP fine-tuning on several nodes with the deepspeed launcher: one `dpldm finetune` process per
# GPU of every host in the hostfile; ZeRO stage and offload come from the DeepSpeed JSON.
#
#   launch/multinode.sh [KEY=VALUE config overrides ...]
#   HOSTFILE=hosts DS_CONFIG=zero3-offload launch/multinode.sh finetune.steps=2000
#
# An interrupted run resumes from its last checkpoint when started again, on any number of
# nodes or GPUs; the privacy ledger (ledger.json in the run folder) stays exact.
#
# Variables (environment):
#   CONFIG       experiment YAML: a path, or a name in configs/               (default: demo)
#   DS_CONFIG    DeepSpeed JSON: a path, or a name in configs/deepspeed/      (default: zero3)
#   HOSTFILE     "host slots=N" lines, see launch/hostfile.example            (default: launch/hostfile)
#   MASTER_ADDR  address of the first host, reachable from all hosts          (default: found by the launcher)
#   MASTER_PORT  rendezvous port on the first host                            (default: 29500)
#   NO_SSH       1: start nothing over ssh; run this script on every node     (default: 0)
#                with its NODE_RANK (and MASTER_ADDR set)
#   NODE_RANK    this node's line in HOSTFILE, counted from 0 (with NO_SSH=1)
#   OUTPUT_DIR   root of the run folders, on a filesystem shared by all hosts (default: the config's output_dir)
#   PYTHON       interpreter that has the package installed                   (default: python)
# MLFLOW_* variables are passed on to every host; others go in a .deepspeed_env file (KEY=VALUE lines).
set -euo pipefail

CONFIG="${CONFIG:-demo}"
DS_CONFIG="${DS_CONFIG:-zero3}"
HOSTFILE="${HOSTFILE:-$(dirname "$0")/hostfile}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
NO_SSH="${NO_SSH:-0}"
NODE_RANK="${NODE_RANK:-}"
OUTPUT_DIR="${OUTPUT_DIR:-}"
PYTHON="${PYTHON:-python}"

if [[ ! -f "$HOSTFILE" ]]; then
    echo "multinode.sh: hostfile $HOSTFILE not found (see launch/hostfile.example)" >&2
    exit 2
fi
launcher=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT" --no_local_rank)
if [[ -n "$MASTER_ADDR" ]]; then
    launcher+=(--master_addr "$MASTER_ADDR")
fi
if [[ "$NO_SSH" == 1 ]]; then
    if [[ -z "$NODE_RANK" || -z "$MASTER_ADDR" ]]; then
        echo "multinode.sh: NO_SSH=1 needs NODE_RANK and MASTER_ADDR" >&2
        exit 2
    fi
    launcher+=(--no_ssh --node_rank "$NODE_RANK")
fi
stage=(finetune --config "$CONFIG")
if [[ -n "$OUTPUT_DIR" ]]; then
    stage+=(--output-dir "$OUTPUT_DIR")
fi
stage+=("finetune.deepspeed_config=$DS_CONFIG")  # overrides last: options cannot follow them

exec "$PYTHON" -m deepspeed.launcher.runner "${launcher[@]}" --module trainer.cli "${stage[@]}" "$@"
