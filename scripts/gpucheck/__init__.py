"""The device checks behind ``scripts/gpu_checks.py``: one module per check, each with its time budget.

:mod:`gpucheck.runner` runs them (one forked process per check, killed past its budget, a summary table
and JSON at the end); :mod:`gpucheck.sizes` holds the shapes of the GPU run, the CPU stand-in
(``--smoke``) and tests/gpu, taken from ``common/plan.py``; :mod:`gpucheck.base` the helpers the checks
share; :mod:`gpucheck.envinfo` what the run reports about the machine and the packages it imports.

A check module names ``NAME``, ``BUDGET_S`` (seconds on the GPU run), ``NEEDS_MODEL`` (whether it reads
the model that ``setup`` writes), a one-line ``ABOUT``, and ``run(ctx) -> dict`` returning its details
with ``summary`` and ``problems`` (an empty list: passed); it raises :class:`gpucheck.base.Skip` where it
cannot run.
"""
