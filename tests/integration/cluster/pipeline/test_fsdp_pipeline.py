"""``learner.fsdp=true`` on CPU through the whole pipeline: real Ray (in-process, 3 CPUs: 2 learner
ranks + 1 generator), the session's Redis, a vLLM CPU engine in the generator, two learner ranks
sharding the model with FSDP2 over gloo. The run trains, its weights reach the generator, its
checkpoints hold the master weights and optimizer state sharded (torch.distributed.checkpoint), and a
resume reads them back and trains on with no prompt lost or repeated.

The refusal that remains: FSDP2 without the pipeline's process group (``driver=local``).
"""

from __future__ import annotations

import pytest
from pipeline_runs import audit_rows, metrics_rows
from ray_nodes import in_process_ray, small_pipeline_overrides

from common.config import load_config
from common.errors import ConfigError

PW_ENV = "TREEPO_TEST_PIPELINE_REDIS_PASSWORD"

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_3cpus():
    pytest.importorskip("vllm")
    with in_process_ray(3):
        yield


def _cfg(run_dir, model_dir, redis_server, monkeypatch, *extra):
    monkeypatch.setenv(PW_ENV, redis_server.password)
    over = small_pipeline_overrides(
        run_dir,
        model_dir,
        "learner.num_workers=2",
        "learner.fsdp=true",
        "checkpoint.every_steps=1",
        "data.synthetic_train_size=6",
        f"queue.url={redis_server.url}",
        f"queue.password_env={PW_ENV}",
        *extra,
    )
    return load_config(None, over)


def test_fsdp_needs_the_pipelines_process_group(tmp_path):
    for gpus in ("0", "1"):
        with pytest.raises(ConfigError, match=r"learner\.fsdp=true shards over .*set driver=ray"):
            load_config(None, ["learner.fsdp=true", "driver=local", f"learner.gpus_per_worker={gpus}"])
    for n in ("1", "2"):  # the pipeline builds a group for one rank too (a mesh of one)
        load_config(None, ["learner.fsdp=true", "driver=ray", f"learner.num_workers={n}"])


@pytest.mark.slow
def test_fsdp_pipeline_on_cpu_trains_checkpoints_sharded_and_resumes(
    tmp_path, tiny_model_dir, ray_3cpus, redis_server, monkeypatch
):
    from cluster.pipeline.controller import run_pipeline
    from learner.checkpoint import require_checkpoint

    run = tmp_path / "run"
    assert run_pipeline(_cfg(run, tiny_model_dir, redis_server, monkeypatch, "learner.total_steps=2")) == 0
    rows = audit_rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    ckpt = require_checkpoint(run / "checkpoints")
    assert ckpt.sharded, "FSDP2 ranks save master weights and optimizer state with DCP"
    metrics = metrics_rows(run)
    assert metrics[-1]["generator/version"] >= 1  # the sharded learner's weights reached the engine

    cfg = _cfg(run, tiny_model_dir, redis_server, monkeypatch, "learner.total_steps=3", "resume=true")
    assert run_pipeline(cfg) == 0
    rows = audit_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    ids = [t.split("@")[0] for r in rows for t in r["trees"]]
    assert len(ids) == len(set(ids)) == 6, "a prompt was lost or trained twice"
