#!/usr/bin/env bash
# The main job: installs everything (see setup.sh), then runs `treepo train` on the embedded
# defaults (the CPU demo). Extra arguments are passed to `treepo train` (e.g. learner.total_steps=10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
exec .venv/bin/treepo train "$@"
