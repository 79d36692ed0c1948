# neox for GPU clusters: CUDA + PyTorch + DeepSpeed + neox (`pip install .`), with ssh/pdsh/OpenMPI for
# multi-node launches. Installed by the same two scripts `make setup` runs. CPU variant: Dockerfile.cpu.
#   docker build -t neox:gpu .
#   docker run --rm --gpus all --shm-size 16g -v "$PWD/runs:/runs" neox:gpu train -d configs 125M.yml local_setup.yml
# A devel image: DeepSpeed compiles its fused CUDA ops (Adam, ...) on first use with nvcc and g++.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${BASE_IMAGE}

# torch's CUDA build from PyPI; setup_env.sh pins it (NEOX_TORCH_VERSION).
ARG NEOX_TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    OMPI_ALLOW_RUN_AS_ROOT=1 \
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The interpreter setup_env.sh makes its virtualenv from, and the compilers DeepSpeed's JIT ops and mpi4py need.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/neox
COPY tools/setup_system.sh tools/setup_system.sh
RUN bash tools/setup_system.sh && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md ./
COPY launcher launcher
COPY neox neox
COPY tools tools
COPY configs configs
COPY data/tokenizers data/tokenizers
RUN bash tools/setup_env.sh /opt/venv image

ENTRYPOINT ["deepy"]
CMD ["--help"]
