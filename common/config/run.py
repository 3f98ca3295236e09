"""The run's plumbing: the replay queue, the weight broadcast, checkpoints, periodic evaluation,
metrics and trackers. Each section checks its own rules (``check``); rules that join two sections
live in :mod:`common.config.validation`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from common.config.fields import choice, doc, nested
from common.errors import ConfigError, QueueError

AppendFsync = Literal["everysec", "always"]  # queue.appendfsync


@dataclass
class QueueConfig:
    url: str = doc(
        "",
        "Redis URL (redis:// or rediss:// for TLS). Empty: start an embedded redis-server in the run directory.",
    )
    password_env: str = doc(
        "TREEPO_REDIS_PASSWORD",
        "Environment variable holding the Redis password (never put passwords in configs).",
    )
    appendfsync: str = choice(
        AppendFsync, "everysec", "AOF fsync policy of the embedded Redis: 'everysec' | 'always'."
    )
    max_entry_mb: float = doc(8.0, "Largest accepted tree entry in MiB.", at_least=0.001)
    maxmemory_mb: int = doc(
        2048, "maxmemory of the embedded Redis (policy noeviction: data is never dropped).", at_least=1
    )
    block_ms: int = doc(2000, "Longest blocking read before the consumer re-checks its state.", at_least=1)
    outage_s: float = doc(
        60.0,
        "How long every Redis client (controller, generators) retries a broken connection before failing: "
        "a restart or an outage shorter than this is ridden out.",
        at_least=0.0,
    )

    def check(self) -> None:
        """No password in queue.url: the resolved config is written to the run directory."""
        # imported here: common.replay imports redis, and configs must load where redis is not installed
        from common.replay import check_url

        try:
            check_url(self.url, self.password_env)
        except QueueError as e:
            raise ConfigError(str(e)) from None


SyncBackend = Literal["auto", "gloo", "nccl"]  # sync.backend
SyncReceiver = Literal["auto", "generator", "engine_workers"]  # sync.receiver


@dataclass
class SyncConfig:
    every_steps: int = doc(1, "Broadcast new weights every k optimizer steps.", at_least=1)
    bucket_mb: float = doc(64.0, "Weight broadcast bucket size in MiB.", at_least=0.001)
    timeout_s: float = doc(120.0, "Timeout of every wait in a weight sync.", at_least=0.001)
    backend: str = choice(SyncBackend, "auto", "'auto' (nccl on GPU, gloo on CPU) | 'gloo' | 'nccl'.")
    receiver: str = choice(
        SyncReceiver,
        "auto",
        "Who receives the broadcast on a generator: 'auto' (each vLLM engine worker when the engine runs in "
        "worker processes, else the generator's process) | 'generator' | 'engine_workers' (each vLLM engine "
        "worker is a rank; the engine keeps generating while the weights arrive).",
    )


@dataclass
class CheckpointConfig:
    every_steps: int = doc(
        10, "Save (then acknowledge consumed queue entries) every n optimizer steps.", at_least=1
    )
    keep_last: int = doc(2, "Checkpoints kept on disk.", at_least=1)


@dataclass
class EvalConfig:
    every_steps: int = doc(10, "Evaluate on data.eval every n optimizer steps (0 = never).", at_least=0)
    k: int = doc(4, "Samples per held-out problem.", at_least=1)
    max_problems: int = doc(128, "Held-out problems per evaluation (0 = all).", at_least=0)


@dataclass
class WandbConfig:
    project: str = doc("treepo", "Weights & Biases project (with 'wandb' in log.backends).")
    entity: str = doc("", "W&B entity (user or team; '' = the API key's default).")
    group: str = doc("", "W&B run group ('' = none).")
    tags: list = doc([], "W&B run tags, e.g. [treepo,7b].")


@dataclass
class MlflowConfig:
    tracking_uri: str = doc(
        "",
        "MLflow tracking URI (with 'mlflow' in log.backends): a server (http://...) or a local file store "
        "(file:/path, no server needed). '' = $MLFLOW_TRACKING_URI, else a file store in <run_dir>/mlruns.",
    )
    experiment: str = doc("treepo", "MLflow experiment name.")


Tracker = Literal["jsonl", "tensorboard", "wandb", "mlflow"]  # log.backends (jsonl: metrics.jsonl, always on)
TRACKERS: tuple[str, ...] = typing.get_args(Tracker)
LogLevel = Literal["warning", "info", "debug"]  # log.level


@dataclass
class LogConfig:
    backends: list = doc(
        ["tensorboard"],
        "Experiment trackers besides metrics.jsonl (always written): any of tensorboard, wandb, mlflow "
        "(their client libraries are the 'trackers' extra). W&B uses the client's own credentials (`wandb login` "
        "or WANDB_API_KEY, checked when the config is validated; or WANDB_MODE=offline); MLflow gets the "
        "config as run params; the W&B and MLflow run ids are kept in the run directory, so --resume "
        "continues the same runs.",
    )
    wandb: WandbConfig = nested(WandbConfig, "Weights & Biases.")
    mlflow: MlflowConfig = nested(MlflowConfig, "MLflow.")
    level: str = choice(
        LogLevel,
        "warning",
        "Console verbosity: 'warning' = one progress line per step plus warnings (engine and Ray logs go "
        "to <run_dir>/logs/) | 'info' | 'debug' (engine and Ray logs on the console too; = --verbose).",
    )
    rollouts_every_steps: int = doc(
        10,
        "Every k steps, write each trained tree to <run_dir>/rollouts.jsonl (prompt; per leaf the decoded "
        "text, reward, verdict, advantage, finish reason, depth, versions), also a W&B table (0 = off).",
        at_least=0,
    )
    tree_pictures: int = doc(
        3,
        "At every eval step, draw this many of the step's trained trees (the most branched) into "
        "<run_dir>/trees/step-<k>.html: segments as nodes with their text, leaf rewards, verdicts, finish "
        "reasons and the advantages trained with (0 = off).",
        at_least=0,
    )
    progress: bool = doc(True, "Show a progress bar.")

    def check(self) -> None:
        backends = [str(b) for b in self.backends]
        unknown = [b for b in backends if b not in TRACKERS]
        if unknown:
            raise ConfigError(
                f"log.backends={backends}: {unknown[0]!r} is not a tracker; choose from {', '.join(TRACKERS)}"
            )
        if len(set(backends)) != len(backends):
            raise ConfigError(f"log.backends={backends} names a tracker twice: list each once")
        if "wandb" in backends:
            # the client's own credential lookup, now rather than when the run has started (lazy: it
            # imports the W&B client, which configs that do not list wandb never need)
            from common.trackers import check_wandb_credentials

            check_wandb_credentials()
