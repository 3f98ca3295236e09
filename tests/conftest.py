"""Session-wide test setup: quiet, 2-thread CPU defaults and shared tiny-model fixtures.

Layout: ``unit/<package>/``, ``integration/<package>/`` (the rooms of the code), ``gpu/``;
``support/`` holds what several test modules share.

``tiny_model_dir``: size "xs", random init, built once per session in a temp dir (well under a second).
``warm_model_dir``: the demo's model (``ModelConfig``'s defaults: size "s" warm-started on arith),
cached under $TREEPO_CACHE (or ~/.cache/treepo) so only the first session pays the 3-8 minute build.
``TREEPO_TEST_TINY_SEED=N`` makes it the build of seed N (``model.tiny_seed``), to check that what the
tests assert of the demo model holds for other builds too.
``tool_model_dir``: a short warm-start on the tool task (``tiny:calc``, 300 steps: it calls the
calculator in about a third of its answers), cached like the demo's (about a minute to build).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Shared helpers (builders, fakes, server fixtures) for the test tree, which mirrors the packages:
# ``from ray_nodes import ...`` works from any depth.
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

# Set before vllm / tokenizers are imported by any test module.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Tests never download: a hub id fails at once instead of after network retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # 2 unless the caller says otherwise

ARITH_SEED = 1234


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init "xs" tiny:arith model directory (Hugging Face format, vLLM-loadable)."""
    from common.tiny import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("tiny") / "tiny-xs", task="arith", size="xs", progress=False
    )


@pytest.fixture(scope="session")
def warm_model_dir():
    """The demo's tiny:arith model (the config defaults), built once and cached across sessions."""
    from pathlib import Path

    from common.config import ModelConfig
    from common.models import resolve_model

    return Path(resolve_model(ModelConfig(tiny_seed=int(os.environ.get("TREEPO_TEST_TINY_SEED", "0")))))


@pytest.fixture(scope="session")
def tool_model_dir():
    """A tiny:calc model that calls the calculator in part of its answers (300 warm-start steps)."""
    from common.tiny import resolve_tiny

    return resolve_tiny("tiny:calc", "s", TOOL_MODEL_WARMUP_STEPS, seed=0, progress=False, unboxed_share=0.0)


TOOL_MODEL_WARMUP_STEPS = 300


@pytest.fixture(scope="session")
def arith_rows():
    """A few arith rows: 8 train, 8 held-out."""
    from common.tasks import generate

    return generate("arith", 8, seed=ARITH_SEED, split="train") + generate(
        "arith", 8, seed=ARITH_SEED, split="eval"
    )
