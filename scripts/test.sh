#!/usr/bin/env bash
# The whole test suite: installs everything (see setup.sh), checks lint and format, runs pytest.
# Extra arguments go to pytest (e.g. -m "not slow" to skip the slow end-to-end tests locally).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
