"""The whole schema: :class:`TrainConfig`, one section per component, plus the run's own keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config.fields import choice, doc, nested
from common.config.generation import (
    DataConfig,
    GeneratorConfig,
    ModelConfig,
    RewardConfig,
    SamplingConfig,
    ToolUseConfig,
    TreeConfig,
)
from common.config.run import CheckpointConfig, EvalConfig, LogConfig, QueueConfig, SyncConfig
from common.config.training import AlgoConfig, LearnerConfig

Driver = Literal["local", "ray"]  # driver


@dataclass
class TrainConfig:
    run_dir: str = doc(
        "runs/demo", "Run directory: resolved config, metrics, checkpoints, embedded Redis data."
    )
    run_name: str = doc(
        "",
        "Run name shown by the experiment trackers ('' = the run directory's name); queue keys come from the run directory's path.",
    )
    seed: int = doc(0, "Global seed.")
    resume: bool = doc(
        False, "Continue from the run directory's last checkpoint with queue and prompt cursor intact."
    )
    driver: str = choice(
        Driver,
        "ray",
        "'ray': the asynchronous pipeline (generator and learner actors on Ray, trees through the Redis "
        "replay queue; a local Ray and an embedded Redis unless RAY_ADDRESS / queue.url say otherwise) | "
        "'local': the synchronous reference driver in one process (engine and learner side by side).",
    )
    model: ModelConfig = nested(ModelConfig, "Policy model.")
    data: DataConfig = nested(DataConfig, "Prompts and templates.")
    tree: TreeConfig = nested(TreeConfig, "Segment-tree sampling.")
    sampling: SamplingConfig = nested(SamplingConfig, "Token sampling.")
    tools: list = doc(
        [],
        "Tools a response may call, ending its segment there (the result follows as observation tokens, "
        "masked from the loss): built-ins 'calculator' and 'python' (a limited child process), or "
        "'file.py:fn' / 'module:fn' (fn(**arguments) -> str); 'name=target' renames one, e.g. [calc=calculator].",
    )
    tool_use: ToolUseConfig = nested(ToolUseConfig, "How tools are called and bounded (with tools).")
    generators: GeneratorConfig = nested(GeneratorConfig, "Generator actors and their engines.")
    reward: RewardConfig = nested(RewardConfig, "Reward function.")
    algo: AlgoConfig = nested(AlgoConfig, "Advantages, loss and off-policy bounds.")
    learner: LearnerConfig = nested(LearnerConfig, "Learner group and optimizer.")
    queue: QueueConfig = nested(QueueConfig, "Replay queue (Redis).")
    sync: SyncConfig = nested(SyncConfig, "Weight broadcast to the generators.")
    checkpoint: CheckpointConfig = nested(CheckpointConfig, "Checkpoints.")
    eval: EvalConfig = nested(EvalConfig, "Periodic evaluation.")
    log: LogConfig = nested(LogConfig, "Metrics and progress output.")
