"""A training run's directory, the same for both drivers: the refusals made before anything is
written into it (:func:`check_before_writing`), the truncation of logs past a resumed checkpoint,
the exactly-once audit trail ``trained_trees.jsonl`` and the final PNGs.

Layout: ``config.yaml`` (written by :func:`common.config.save_resolved`), ``metrics.jsonl``,
``trained_trees.jsonl``, ``rollouts.jsonl`` (``log.rollouts_every_steps``), ``trackers.json`` (W&B /
MLflow run ids), ``logs/`` (engine and Ray logs: :mod:`cluster.logs`), ``tensorboard/``, ``wandb/``,
``mlruns/``, ``checkpoints/``, ``reward_curve.png``, ``staleness.png``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from common.config import TrainConfig
from common.errors import ConfigError
from common.metrics import by_step, plot_histogram, plot_series, read_metrics
from common.models import resolve_model_path
from common.tree import Tree
from learner.checkpoint import Checkpoint, require_checkpoint

# rows keyed by step: truncated on resume (rollouts.jsonl: one row per logged tree)
LOGS = ("metrics.jsonl", "trained_trees.jsonl", "rollouts.jsonl")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def check_run_dir(cfg: TrainConfig, ckpt_dir: Path) -> None:
    """Refuse a run directory holding checkpoints unless the run resumes it."""
    has_ckpt = ckpt_dir.exists() and any(ckpt_dir.glob("ckpt-*"))
    if has_ckpt and not cfg.resume:
        raise ConfigError(
            f"run_dir={cfg.run_dir} already holds checkpoints: pass --resume to continue it, or choose another run_dir"
        )


def check_before_writing(cfg: TrainConfig, *, fallback: bool = True) -> Checkpoint | None:
    """Every refusal that needs no server, made before the run directory is touched, so a refused
    run leaves it byte for byte as it was (or absent): checkpoints without ``--resume``, a
    ``--resume`` with no usable checkpoint (``fallback``: whether an older intact one may stand in
    for a damaged published one), a ``model.path`` that names no model directory. Returns the
    checkpoint a resume continues (verified), None on a fresh start."""
    ckpt_dir = checkpoint_dir(cfg.run_dir)
    check_run_dir(cfg, ckpt_dir)
    # a 'tiny:' model is built when resolved (minutes on first use): that happens later, with the
    # run's logging on; a directory or hub id is checked here without loading anything
    if not cfg.model.path.startswith("tiny:"):
        resolve_model_path(cfg.model.path)
    return require_checkpoint(ckpt_dir, fallback) if cfg.resume else None


def truncate_after(path: Path, step: int) -> None:
    """Drop log rows past ``step`` (a resumed run redoes the steps after its checkpoint)."""
    if not path.exists():
        return
    keep = [row for row in read_metrics(path) if row.get("step", 0) <= step]  # torn lines are dropped
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))
    tmp.replace(path)


def truncate_logs(run_dir: Path, step: int) -> None:
    """Every per-step log of the run directory, truncated to ``step`` (see :func:`truncate_after`)."""
    for name in LOGS:
        truncate_after(run_dir / name, step)


def append_trained(run_dir: Path, step: int, version: int, trees: Sequence[Tree]) -> None:
    """One line of the exactly-once audit trail: the tree ids trained at ``step``."""
    append_row(run_dir, trained_row(step, version, trees))


def trained_row(step: int, version: int, trees: Sequence[Tree]) -> dict:
    """The audit row of one step: its number, the policy version it produced and its tree ids."""
    return {"step": step, "version": version, "trees": [t.tree_id for t in trees]}


def append_row(run_dir: Path, row: dict) -> None:
    with open(run_dir / "trained_trees.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


def restore_trained_rows(run_dir: Path, rows: list[dict]) -> int:
    """Add the rows of ``rows`` whose step is missing from the audit trail (a checkpoint holds the
    rows of its window); the file stays sorted by step. Returns how many were added."""
    path = run_dir / "trained_trees.jsonl"
    have = read_metrics(path) if path.exists() else []
    steps = {r.get("step") for r in have}
    missing = [r for r in rows if r.get("step") not in steps]
    if missing:
        merged = sorted([*have, *missing], key=lambda r: r.get("step", 0))
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in merged))
        tmp.replace(path)
    return len(missing)


def trained_tree_ids(run_dir: Path) -> set[str]:
    """Every tree id in the audit trail (a resumed run truncates it to its checkpoint first)."""
    path = run_dir / "trained_trees.jsonl"
    if not path.exists():
        return set()
    return {tree_id for row in read_metrics(path) for tree_id in row.get("trees", [])}


def progress_bar(cfg: TrainConfig, initial: int, desc: str) -> tqdm:
    """The step progress bar of a training run (``log.progress``), from ``initial`` to ``learner.total_steps``."""
    return tqdm(
        total=cfg.learner.total_steps,
        initial=initial,
        desc=desc,
        disable=not cfg.log.progress,
        dynamic_ncols=True,
    )


def final_plots(run_dir: Path, staleness_hist: dict[int, int]) -> None:
    """The reward-curve and staleness PNGs of a finished run."""
    rows = by_step(read_metrics(run_dir / "metrics.jsonl"))
    plot_series(
        rows,
        ["rollout/reward", "rollout/accuracy", "rollout/trained_reward", "eval/accuracy"],
        run_dir / "reward_curve.png",
        "reward and accuracy",
    )
    plot_histogram(
        staleness_hist, run_dir / "staleness.png", "leaf staleness at training time", "policy versions behind"
    )
