"""tests/gpu: CUDA paths at small sizes. Every test here is marked ``gpu`` and skipped without CUDA.

On a GPU machine that has python + torch only, the packages these paths import beyond torch come from
``.gpu-vendor`` (built here by ``bash scripts/gpu_vendor.sh``, carried along), which must come first on
the path there:

    PYTHONPATH=.gpu-vendor:. python3 -m pytest tests/gpu -q

It is deliberately not added to sys.path here: this conftest is loaded by every local run too, where
the project's own environment must stay in charge.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_checks():
    """scripts/gpu_checks.py as a module (it is a script, not part of a package)."""
    name = "treepo_gpu_checks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "gpu_checks.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]
