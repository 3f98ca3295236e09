"""Configs of the small runs that several test modules train."""

from __future__ import annotations

from common.config import TrainConfig, load_config


def local_config(run_dir, model_dir, *extra: str) -> TrainConfig:
    """The small local-driver run of the training tests (4 leaves, 2 prompts a step, a checkpoint
    every step, no eval), on ``model_dir``; ``extra`` overrides go last."""
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            "driver=local",
            "data.epochs=1",
            f"model.path={model_dir}",
            "generators.kv_cache_gib=0.25",
            "generators.trees_in_flight=4",
            "tree.w=4",
            "learner.prompts_per_step=2",
            "learner.mini_batch_prompts=2",
            "algo.dynamic_sampling=false",
            "eval.every_steps=0",
            "log.progress=false",
            "log.backends=[]",
            "checkpoint.every_steps=1",
            *extra,
        ],
    )
