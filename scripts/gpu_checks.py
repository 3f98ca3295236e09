#!/usr/bin/env python3
"""GPU checks of the paths that need nothing but torch, in one short call on one GPU: the ``runs`` packed
attention at Qwen2.5-7B's head shapes, the FSDP2 bf16 learner (tree-packed log-probs against
packing=none, training steps, peak memory against the plan), NCCL from a side thread, the engine
worker's weight-sync receiver on CUDA, weight packing, two-process sync and transformers-backend
sampling. One JSON and one table; the checks live in scripts/gpucheck/, one module per check.

On a GPU machine that has python and torch (CUDA) only — no Ray, no vLLM, no network — build the
pure-Python dependencies here once, then carry them along:

    bash scripts/gpu_vendor.sh                                           # here: .gpu-vendor/
    PYTHONPATH=.gpu-vendor:. python3 scripts/gpu_checks.py --out $OUT    # there, carry [".gpu-vendor"]

``--list`` shows the checks and their budgets (they add up to at most 390 s), ``--only NAME[,NAME]``
reruns some. The same code paths at CPU sizes (gloo instead of NCCL; seconds;
tests/integration/scripts/test_gpu_checks_smoke.py runs it):

    python scripts/gpu_checks.py --smoke --out /tmp/gpu-checks

Every check runs in its own forked process with its own time budget (killed past it); a failure is
recorded and the next check runs. Status per check: ok | failed | timeout | skipped. Exit code 1 when
a check failed or timed out, 2 when none could run (no CUDA), else 0. Results: ``gpu_checks.json`` and
``gpu_checks.md`` under ``--out``. tests/gpu runs the learner and wsync_pack checks at small sizes under
pytest (skipped without CUDA).
"""

from __future__ import annotations

import sys
from pathlib import Path

_SCRIPTS = Path(__file__).resolve().parent
for _p in (str(_SCRIPTS.parent), str(_SCRIPTS)):  # the repository (common, learner, ...) and gpucheck
    if _p not in sys.path:
        sys.path.insert(0, _p)

from gpucheck.base import Context, Skip  # noqa: E402
from gpucheck.model import build_model_dir  # noqa: E402
from gpucheck.runner import TOTAL_LIMIT_S, budget, checks, main, markdown_table, run_checks  # noqa: E402
from gpucheck.sizes import SIZES, Sizes  # noqa: E402

__all__ = [
    "SIZES",
    "TOTAL_LIMIT_S",
    "Context",
    "Sizes",
    "Skip",
    "budget",
    "build_model_dir",
    "check_learner",
    "check_wsync_pack",
    "checks",
    "main",
    "markdown_table",
    "run_checks",
]


def _check(name: str, model_dir, sz: Sizes, gpu: bool) -> dict:
    workdir = Path(model_dir).parent if model_dir is not None else Path(".")
    ctx = Context(sz, gpu, workdir)
    if model_dir is not None and Path(model_dir) != ctx.model_dir:
        raise ValueError(f"the model must be at <work dir>/model, got {model_dir}")
    return checks()[name].run(ctx)


def check_learner(model_dir, sz: Sizes, gpu: bool) -> dict:
    """The learner check on the model at ``model_dir`` (``<dir>/model``, as build_model_dir writes it)."""
    return _check("learner", model_dir, sz, gpu)


def check_wsync_pack(shape: dict, sz: Sizes, gpu: bool) -> dict:
    """The weight-pack round trip on tensors shaped like ``shape`` (a model's config fields)."""
    import dataclasses

    return _check("wsync_pack", None, dataclasses.replace(sz, model=shape), gpu)


if __name__ == "__main__":
    sys.exit(main())
