"""The sizing configs of docs/sizing.md (configs/sizing/): each passes `treepo plan` (the memory plan
`treepo train` enforces), asks for the GPUs its header says, keeps the paper's tree, loss and
mini-batch settings of the 7B preset, and sets max_staleness to one step's optimizer steps."""

from __future__ import annotations

import re

import pytest
from paths import REPO

from cluster.cli import main
from common.config import flat_config, load_config

SIZING = sorted((REPO / "configs" / "sizing").glob("*.yaml"))
BASE = REPO / "configs" / "qwen2.5-7b-treepo.yaml"
# what a sizing config may change against the 7B preset (docs/sizing.md says why)
SIZE_KEYS = {
    "run_dir",
    "generators.num",
    "learner.num_workers",
    "learner.prompts_per_step",
    "algo.max_staleness",
    "checkpoint.every_steps",
    "eval.every_steps",
    "generators.ray_resources",
    "learner.ray_resources",
    "generators.gpu_memory_utilization",
}


@pytest.fixture(autouse=True)
def _no_queue_url(monkeypatch):
    monkeypatch.delenv("TREEPO_QUEUE_URL", raising=False)


def gpus(cfg) -> int:
    return (
        cfg.generators.num * cfg.generators.gpus_per_engine
        + cfg.learner.num_workers * cfg.learner.gpus_per_worker
    )


def test_the_sizes_of_docs_sizing_md_are_there():
    sizes = {(load_config(p).model.path, gpus(load_config(p))) for p in SIZING}
    assert sizes == {("Qwen/Qwen2.5-7B", 8), ("Qwen/Qwen2.5-7B", 16), ("Qwen/Qwen2.5-7B", 32)}
    page = (REPO / "docs" / "sizing.md").read_text()
    for p in SIZING:
        assert f"configs/sizing/{p.name}" in page, f"docs/sizing.md should show {p.name}"


@pytest.mark.parametrize(
    "path", [*SIZING, REPO / "configs" / "qwen2.5-1.5b-treepo.yaml"], ids=lambda p: p.name
)
def test_treepo_plan_accepts_it(path, capsys):
    assert main(["plan", "--config", str(path)]) == 0, capsys.readouterr().out[-2000:]
    assert "verdict: fits" in capsys.readouterr().out


@pytest.mark.parametrize("path", SIZING, ids=lambda p: p.name)
def test_sizing_config_follows_the_preset(path):
    cfg = load_config(path)
    header = path.read_text().split("\n\n", 1)[0]
    assert int(re.search(r"^# GPUs: (\d+)", header, re.M).group(1)) == gpus(cfg)
    assert f"treepo plan --config configs/sizing/{path.name}" in header
    base, mine = flat_config(load_config(BASE)), flat_config(cfg)
    assert {k for k in base if base[k] != mine[k]} <= SIZE_KEYS
    # the paper's mini-batch; one step's optimizer steps of staleness, so generation overlaps training
    assert (
        cfg.learner.mini_batch_prompts == 32 and cfg.learner.mini_batch_prompts % cfg.learner.num_workers == 0
    )
    assert cfg.algo.max_staleness == cfg.learner.prompts_per_step // cfg.learner.mini_batch_prompts
    # the batch follows the cluster: the paper's 512 prompts on the preset's 32 GPUs
    assert cfg.learner.prompts_per_step * 32 == 512 * gpus(cfg)
