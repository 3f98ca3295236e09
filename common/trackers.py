"""Experiment trackers: one interface, thin adapters, chosen by ``log.backends``.

``metrics.jsonl`` (and ``rollouts.jsonl``) in the run directory is always written; ``tensorboard``,
``wandb`` and ``mlflow`` are optional adapters whose client libraries are imported only when listed
(``pip install 'treepo[trackers]'`` brings W&B and MLflow). Both drivers log through
:func:`open_trackers`, so every tracker sees the same keys at the same steps.

- **W&B**: project/entity/group/tags from ``log.wandb``, the flattened config as the run's config;
  the credentials are the client's own (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE`` or the key
  ``wandb login`` stored), never a config file, and are looked up when the config is validated
  (:func:`check_wandb_credentials`), before anything starts; ``WANDB_MODE=offline`` logs into
  ``<run_dir>/wandb`` with no network (``wandb sync`` uploads later). A quiet console
  (``log.level=warning``) gets none of the client's own lines. Every row carries ``train/step`` as its x-axis, so a resumed
  run that redoes steps after its checkpoint never fights W&B's monotonic internal step.
- **MLflow**: the flattened config as the run's params (filter and compare runs by any key), the
  resolved ``config.yaml`` as an artifact; ``log.mlflow.tracking_uri`` names a server or a file store; a file store needs no server
  (MLflow 3 only writes one when ``MLFLOW_ALLOW_FILE_STORE`` is set, which a ``file:`` URI sets).
  Metric names may not hold ``@``: ``eval/mean@4`` is logged as ``eval/mean_at_4``.
- The W&B and MLflow run ids are kept in ``<run_dir>/trackers.json``: ``--resume`` continues the same
  runs; a fresh run starts new ones.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from common.config.fields import flat_config  # not the package: its validation imports this module
from common.errors import ConfigError
from common.metrics import MetricsLog

if TYPE_CHECKING:  # config validation imports this module (the W&B credential check)
    from common.config import TrainConfig

IDS_FILE = "trackers.json"
ROLLOUTS_FILE = "rollouts.jsonl"


class Tracker(Protocol):
    def log(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class JsonlTracker:
    """``metrics.jsonl`` (one object per step) and ``rollouts.jsonl`` (one object per logged tree)."""

    def __init__(self, run_dir: Path) -> None:
        self.metrics = MetricsLog(run_dir)
        self.rollouts_path = Path(run_dir) / ROLLOUTS_FILE

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.metrics.log(step, dict(metrics))

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        with open(self.rollouts_path, "a") as fh:
            for rec in records:
                fh.write(json.dumps({"step": int(step), **rec}, allow_nan=True) + "\n")

    def close(self) -> None:
        self.metrics.close()


class TensorBoardTracker:
    """Scalars into ``<run_dir>/tensorboard`` (torch's SummaryWriter)."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                f"log.backends has tensorboard but it cannot be imported ({e}): pip install tensorboard, "
                "or remove tensorboard from log.backends"
            ) from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for k, v in _finite(metrics).items():
            self.writer.add_scalar(k, v, step)

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        pass  # scalars only; the rollouts are in rollouts.jsonl

    def close(self) -> None:
        self.writer.close()


def _import(module: str, backend: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"log.backends has {backend} but the {module} package is not installed: "
            f"pip install 'treepo[trackers]' (or remove {backend} from log.backends)"
        ) from None


ROLLOUT_COLUMNS = (
    "step",
    "tree_id",
    "prompt",
    "leaf",
    "text",
    "reward",
    "correct",
    "advantage",
    "finish_reason",
    "depth",
    "versions",
)


def rollout_rows(step: int, records: list[dict[str, Any]]) -> list[list[Any]]:
    """One table row per leaf (columns :data:`ROLLOUT_COLUMNS`) from :func:`common.rollouts.tree_record` records."""
    return [
        [
            int(step),
            rec["tree_id"],
            rec["prompt"],
            i,
            leaf["text"],
            leaf["reward"],
            leaf["correct"],
            leaf["advantage"],
            leaf["finish_reason"],
            leaf["depth"],
            ",".join(str(v) for v in leaf["versions"]),
        ]
        for rec in records
        for i, leaf in enumerate(rec["leaves"])
    ]


WANDB_OFFLINE_MODES = ("offline", "disabled", "dryrun")
WANDB_SERVER = "https://api.wandb.ai"


def wandb_credentials() -> str | None:
    """Where the W&B client will find its credentials, by its own lookup: ``WANDB_API_KEY``,
    ``WANDB_IDENTITY_TOKEN_FILE``, or the key ``wandb login`` stored in the netrc file for the server
    (``WANDB_BASE_URL``); None if nowhere."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(var):
            return var
    _import("wandb", "wandb")
    # the client's own netrc reader (the file `wandb login` writes; NETRC names another one)
    from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

    host = os.environ.get("WANDB_BASE_URL") or WANDB_SERVER
    try:
        key = read_netrc_auth(host=host)
    except Exception as e:  # a key in the file that the client would refuse
        raise ConfigError(
            f"log.backends has wandb but the W&B key stored for {host} is not valid ({e}): "
            "run `wandb login --relogin`"
        ) from None
    return "netrc" if key else None


def check_wandb_credentials() -> None:
    """Refuse W&B online logging that would fail at start for want of credentials (offline modes and
    the client's own credential sources pass)."""
    if os.environ.get("WANDB_MODE", "online") in WANDB_OFFLINE_MODES or wandb_credentials():
        return
    raise ConfigError(
        "log.backends has wandb but no W&B credentials were found: run `wandb login` or export "
        "WANDB_API_KEY=<your key> (WANDB_API_KEY is not set), or WANDB_MODE=offline to log locally and "
        "`wandb sync` later"
    )


class WandbTracker:
    """A W&B run in ``<run_dir>/wandb``; metrics against ``train/step``; rollouts as a table."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, run_id: str | None, quiet: bool) -> None:
        wandb = _import("wandb", "wandb")
        check_wandb_credentials()
        w = cfg.log.wandb
        self.wandb = wandb
        self.run = wandb.init(
            project=w.project,
            entity=w.entity or None,
            group=w.group or None,
            tags=[str(t) for t in w.tags] or None,
            name=cfg.run_name or Path(cfg.run_dir).name,
            id=run_id or secrets.token_hex(6),
            resume="allow",
            dir=str(run_dir),
            config=flat_config(cfg),
            settings=wandb.Settings(console="off", quiet=quiet, silent=quiet),
        )
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")
        self.id = self.run.id

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.run.log({**_finite(metrics), "train/step": int(step)})

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        table = self.wandb.Table(columns=list(ROLLOUT_COLUMNS), data=rollout_rows(step, records))
        self.run.log({"rollouts": table, "train/step": int(step)})

    def close(self) -> None:
        self.run.finish()
        self.wandb.teardown()  # stops the wandb-core service process this run started


def mlflow_key(key: str) -> str:
    """A metric name MLflow accepts: ``@`` becomes ``_at_``, any other character it refuses ``_``."""
    return re.sub(r"[^/\w.\- ]", "_", key.replace("@", "_at_"))


def mlflow_uri(cfg: TrainConfig, run_dir: Path) -> str:
    """``log.mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a file store in ``<run_dir>/mlruns``."""
    uri = cfg.log.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return (Path(run_dir) / "mlruns").resolve().as_uri()
    if "://" not in uri and not uri.startswith("file:"):  # a plain path: a file store there
        return Path(uri).resolve().as_uri()
    return uri


MLFLOW_PARAM_CHARS = 6000


class MlflowTracker:
    """An MLflow run (client API, no global state): metrics by step, the resolved config and the
    rollouts as artifacts."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, run_id: str | None) -> None:
        _import("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        self.uri = mlflow_uri(cfg, run_dir)
        if self.uri.startswith("file:"):  # the user chose a file store: MLflow 3 asks for this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.uri)
        name = cfg.log.mlflow.experiment
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        self.id = run_id if run_id and self._exists(run_id) else None
        if self.id is None:
            run = self.client.create_run(exp_id, run_name=cfg.run_name or Path(cfg.run_dir).name)
            self.id = run.info.run_id
            self._log_params(cfg)  # once: a resume may change keys (resume, total_steps), params are fixed
            config = Path(run_dir) / "config.yaml"
            if config.exists():
                self.client.log_artifact(self.id, str(config))

    def _log_params(self, cfg: TrainConfig) -> None:
        """The flattened config as run params (MLflow's limits: 100 a batch, values of 6000 chars)."""
        from mlflow.entities import Param

        text = lambda v: json.dumps(v) if isinstance(v, (list, dict)) else str(v)  # noqa: E731
        params = [Param(k, text(v)[:MLFLOW_PARAM_CHARS]) for k, v in flat_config(cfg).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.id, params=params[i : i + 100])

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # deleted, or another store: start a new run
            return False

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), v, ms, int(step)) for k, v in _finite(metrics).items()]
        for i in range(0, len(batch), 1000):  # MLflow's batch limit
            self.client.log_batch(self.id, metrics=batch[i : i + 1000])

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps({"step": int(step), **r}) + "\n" for r in records)
        self.client.log_text(self.id, text, f"rollouts/step-{int(step):06d}.jsonl")

    def close(self) -> None:
        self.client.set_terminated(self.id)


class Trackers:
    """Every tracker of a run behind one ``log`` / ``log_rollouts`` / ``close``."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log(step, metrics)

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        if records:
            for t in self.trackers:
                t.log_rollouts(step, records)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def _saved_ids(run_dir: Path) -> dict[str, str]:
    try:
        return dict(json.loads((run_dir / IDS_FILE).read_text()))
    except (OSError, ValueError):
        return {}


def open_trackers(cfg: TrainConfig) -> Trackers:
    """The trackers ``log.backends`` lists, plus the JSONL logs, for ``cfg.run_dir``. With
    ``cfg.resume`` the W&B and MLflow runs of ``trackers.json`` continue; otherwise new ones start."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    backends = [str(b) for b in cfg.log.backends]
    old = _saved_ids(run_dir) if cfg.resume else {}
    trackers: list[Tracker] = [JsonlTracker(run_dir)]
    ids: dict[str, str] = {}
    try:
        if "tensorboard" in backends:
            trackers.append(TensorBoardTracker(run_dir))
        if "wandb" in backends:
            wb = WandbTracker(cfg, run_dir, old.get("wandb"), quiet=cfg.log.level == "warning")
            trackers.append(wb)
            ids["wandb"] = wb.id
        if "mlflow" in backends:
            ml = MlflowTracker(cfg, run_dir, old.get("mlflow"))
            trackers.append(ml)
            ids["mlflow"] = ml.id
    except BaseException:
        Trackers(trackers).close()
        raise
    if ids:
        tmp = run_dir / (IDS_FILE + ".tmp")
        tmp.write_text(json.dumps(ids) + "\n")
        tmp.replace(run_dir / IDS_FILE)
    return Trackers(trackers)
