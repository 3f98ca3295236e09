"""The console and the log files of a training run, the same for both drivers.

``log.level=warning`` (the default) keeps the console to what a person needs: the progress bar, the
project's own lines (``[eval]``, ``[pipeline]``, ``[train]``), warnings and errors of the project's
loggers, and every error with its cause (exceptions still propagate to the command line). What the
libraries say goes to files under ``<run_dir>/logs/``:

- ``driver.log``: the driver process's library loggers (vLLM, Ray, transformers, torch, the trackers,
  ...) and Python warnings; with the local driver also everything the in-process engine prints
  while it starts (its C++ and tqdm output included: the process's stdout/stderr are pointed at the
  file for that span).
- ``ray/``: with ``driver=ray`` the actors' output (the generators' engines, the learner ranks) stays
  off the console (Ray's ``log_to_driver=False``); at the end of a run on a Ray this command started,
  the actors' stdout/stderr files of this job are copied there from Ray's session directory. On a
  cluster they stay on the nodes: ``ray logs`` or the dashboard shows them.

``log.level=info`` / ``debug`` (``--verbose`` = info) changes nothing in the libraries' own logging:
the engine and Ray lines come back on the console as they always did.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from common.config import DataConfig, ModelConfig, TrainConfig
from common.errors import DataError

LIBRARY_LOGGERS = (
    "vllm",
    "ray",
    "transformers",
    "torch",
    "accelerate",
    "huggingface_hub",
    "datasets",
    "peft",
    "urllib3",
    "filelock",
    "wandb",
    "mlflow",
    "tensorboard",
    "absl",
    "httpx",
    "matplotlib",
    "PIL",
    "py.warnings",
)
PROJECT_LOGGER = "treepo"
_active: RunLogging | None = None  # the run logging of this process (set by RunLogging.start)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "logs"


def is_quiet(cfg: TrainConfig) -> bool:
    return cfg.log.level == "warning"


class RunLogging:
    """Set up (``start``) and undo (``close``) the driver process's logging for one run. Idempotent
    :meth:`route` re-detaches console handlers a library added when imported later (Ray, vLLM)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.quiet = is_quiet(cfg)
        self.level = getattr(logging, cfg.log.level.upper())
        self.dir = log_dir(cfg.run_dir)
        self.path = self.dir / "driver.log"
        self._file: logging.Handler | None = None
        self._console: logging.Handler | None = None
        self._saved: dict[str, tuple[list[logging.Handler], bool, int]] = {}
        self._env: dict[str, str | None] = {}

    def start(self) -> RunLogging:
        for line in demo_notes(self.cfg):  # the first lines of the run
            print(line, flush=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        project = logging.getLogger(PROJECT_LOGGER)
        self._saved[PROJECT_LOGGER] = (list(project.handlers), project.propagate, project.level)
        self._console = logging.StreamHandler(sys.stderr)
        self._console.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
        self._console.setLevel(self.level)
        project.addHandler(self._console)
        project.setLevel(min(self.level, logging.INFO))
        project.propagate = False
        if self.quiet:
            self._file = logging.FileHandler(self.path)
            self._file.setFormatter(logging.Formatter(_FORMAT))
            project.addHandler(self._file)
            for key, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error")):
                self._env[key] = os.environ.get(key)
                os.environ.setdefault(key, value)
            logging.captureWarnings(True)
            self.route()
        global _active
        _active = self
        return self

    def route(self) -> None:
        """Library loggers: into ``driver.log`` only (their console handlers detached)."""
        if self._file is None:
            return
        for name in LIBRARY_LOGGERS:
            lg = logging.getLogger(name)
            if name not in self._saved:
                self._saved[name] = (list(lg.handlers), lg.propagate, lg.level)
            for h in list(lg.handlers):
                if h is not self._file and not isinstance(h, logging.FileHandler):
                    lg.removeHandler(h)
            if self._file not in lg.handlers:
                lg.addHandler(self._file)
            lg.propagate = False
            if lg.level == logging.NOTSET:  # a level the library or the user set is kept
                lg.setLevel(logging.INFO)

    @contextlib.contextmanager
    def engine_output(self) -> Iterator[None]:
        """While an in-process engine starts: the process's stdout and stderr (C++ and tqdm output
        included) go to ``driver.log`` when quiet. An exception still reaches the caller."""
        if not self.quiet:
            yield
            return
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            with open(self.path, "a") as fh:
                os.dup2(fh.fileno(), 1)
                os.dup2(fh.fileno(), 2)
                try:
                    yield
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os.dup2(saved[0], 1)
                    os.dup2(saved[1], 2)
        finally:
            for fd in saved:
                os.close(fd)
        self.route()

    def close(self) -> None:
        global _active
        if _active is self:
            _active = None
        for name, (handlers, propagate, level) in self._saved.items():
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                lg.removeHandler(h)
            for h in handlers:
                lg.addHandler(h)
            lg.propagate, lg.level = propagate, level
        self._saved.clear()
        if self.quiet:
            logging.captureWarnings(False)
        for key, value in self._env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for h in (self._file, self._console):
            if h is not None:
                h.close()


def engine_output() -> contextlib.AbstractContextManager[None]:
    """:meth:`RunLogging.engine_output` of this process's run logging (nothing when none is active,
    e.g. a driver called from a test)."""
    return _active.engine_output() if _active is not None else contextlib.nullcontext()


def copy_ray_worker_logs(
    run_dir: str | os.PathLike, session_dir: str | None, job_id: str | None
) -> Path | None:
    """Copy this job's actor stdout/stderr files (``worker-<id>-<job>-<pid>.out/.err``) from a local
    Ray's session directory into ``<run_dir>/logs/ray/``; returns that folder (None: nothing found)."""
    if not session_dir or not job_id:
        return None
    src = Path(session_dir) / "logs"
    files = sorted(src.glob(f"worker-*-{job_id}-*.out")) + sorted(src.glob(f"worker-*-{job_id}-*.err"))
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        return None
    dst = log_dir(run_dir) / "ray"
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        with contextlib.suppress(OSError):  # a file Ray rotates away right now: the others still come
            shutil.copyfile(f, dst / f.name)
    return dst


DEMO_MODEL = ModelConfig().path  # the demo's defaults: model.path, data.train and data.eval
DEMO_DATA = DataConfig().train
DEMO_EVAL = DataConfig().eval


def demo_notes(cfg: TrainConfig) -> list[str]:
    """The run's first console lines when it uses the demo's model or held-out data (defaults that
    stay silently when only data.train is set), with a warning when the user's training data is
    evaluated on the demo's synthetic task."""
    lines = []
    if cfg.model.path == DEMO_MODEL:
        lines.append(
            f"[train] model: {DEMO_MODEL}, the demo's tiny model (set model.path=<model directory or hub id>)"
        )
    if cfg.eval.every_steps > 0 and cfg.data.eval == DEMO_EVAL:
        lines.append(
            f"[train] eval data: {DEMO_EVAL}, the demo's held-out problems (set data.eval=<file> for yours, "
            "or eval.every_steps=0)"
        )
    specs = cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train]
    users = [str(s) for s in specs if not str(s).startswith("synthetic:")]
    if cfg.eval.every_steps > 0 and users and str(cfg.data.eval).startswith("synthetic:"):
        lines.append(
            f"[train] warning: training on {', '.join(users)} but evaluating on the synthetic task "
            f"{cfg.data.eval}, which says nothing about your data: set data.eval=<your held-out file> "
            "or eval.every_steps=0"
        )
    return lines


def eval_line(step: int, metrics: dict[str, float]) -> str:
    """The console line of an evaluation, the same for both drivers: its ``eval/`` metrics."""
    shown = "  ".join(
        f"{k}={v:.3f}"
        for k, v in metrics.items()
        if k.startswith("eval/") and ("@" in k or k == "eval/answered")
    )
    return f"[eval] step {step}: {shown}"


def nothing_trained(cfg: TrainConfig, trees_dropped: int) -> DataError:
    """The error of a run that ended without training a step although ``learner.total_steps`` asked
    for more: the data ran out before one step's trees were kept."""
    why = (
        f"dynamic sampling dropped all {trees_dropped} tree(s) (every leaf right, or every leaf wrong): "
        "check that the reward tells answers apart (reward.fn, reward.correct/wrong), or set "
        "algo.dynamic_sampling=false"
        if trees_dropped
        else "no prompt was left to sample (a resumed run whose data is used up: raise data.epochs)"
    )
    return DataError(
        f"0 steps trained: the prompts ran out (data.epochs={cfg.data.epochs}) before a step's trees were "
        f"kept; {why}"
    )
