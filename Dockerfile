# One image for CPU and GPU: `docker build --build-arg VARIANT=gpu .` installs the official vLLM
# (CUDA) instead of the CPU build. The project is installed editable so `ray job submit
# --working-dir .` and the image run the same code.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ARG VARIANT=cpu
ARG TORCH_INDEX=
ENV PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TREEPO_TORCH_INDEX=${TORCH_INDEX}
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      redis-server gcc g++ git && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN if [ "$VARIANT" = "gpu" ]; then \
      python -m venv .venv && .venv/bin/pip install -q -e ".[gpu,dev]"; \
    else \
      bash scripts/setup.sh; \
    fi
ENV PATH=/app/.venv/bin:$PATH
CMD ["treepo", "--help"]
