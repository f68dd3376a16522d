# CUDA runtime image for cloud GPUs: the pinned stack with the GPU extras, entrypoint `dpldm`
# (through launch/entrypoint.sh, which also runs torchrun/deepspeed/python/shell commands as given).
#   docker build -t dpldm .
#   docker run --gpus all --ipc host -v "$PWD/work:/work" dpldm demo --quick
#   docker run --gpus all --ipc host -v "$PWD/work:/work" dpldm \
#       torchrun --nproc_per_node 8 -m trainer.cli finetune finetune.deepspeed_config=zero3
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# Triton and DeepSpeed build kernels at run time: keep a C compiler and the Python headers.
# Distribution packages follow the base image's release (not pinned one by one).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /opt/dpldm
# the CUDA build of the torch version setup.py pins, first, so that nothing else pulls another torch
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY setup.py requirements-offline.txt ./
COPY trainer ./trainer
COPY configs ./configs
COPY launch ./launch
# editable: configs/ stays next to the package; the gpu extra is xformers, pinned to a release for torch >= 2.10
RUN pip install -e ".[text,eval,gpu]" "xformers==0.0.35" \
 && pip install --no-deps -r requirements-offline.txt

WORKDIR /work
ENTRYPOINT ["/opt/dpldm/launch/entrypoint.sh"]
CMD ["--help"]
