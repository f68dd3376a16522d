# CUDA runtime image for cloud GPUs: the pinned stack with the GPU extras, entrypoint `dpldm`.
#   docker build -t dpldm .
#   docker run --gpus all -v $PWD/runs:/work/runs dpldm demo
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /opt/dpldm
# the CUDA build of the same torch version first, so nothing else pulls another torch
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY setup.py requirements-offline.txt ./
COPY trainer ./trainer
COPY kernels ./kernels
COPY configs ./configs
COPY launch ./launch
RUN pip install -e ".[text,eval,gpu]" \
 && pip install --no-deps -r requirements-offline.txt

WORKDIR /work
ENTRYPOINT ["dpldm"]
CMD ["--help"]
