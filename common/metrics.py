"""Metrics with explicit reductions, a local JSONL log (always), TensorBoard (optional) and PNG plots.

Keys are namespaced: ``rollout/``, ``tree/``, ``learner/``, ``sync/``, ``staleness/``, ``timing/``,
``eval/``. A :class:`Reducer` collects values under a key with a declared reduction (mean, sum, max,
min, last) so that nothing is averaged that should have been summed.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REDUCTIONS = ("mean", "sum", "max", "min", "last")


class Reducer:
    """Accumulate ``(key, value)`` pairs with a per-key reduction; ``result()`` gives one dict."""

    def __init__(self) -> None:
        self._values: dict[str, list[float]] = defaultdict(list)
        self._how: dict[str, str] = {}

    def add(self, key: str, value: float, how: str = "mean") -> None:
        if how not in REDUCTIONS:
            raise ValueError(f"reduction {how!r} is not one of {REDUCTIONS}")
        prev = self._how.setdefault(key, how)
        if prev != how:
            raise ValueError(f"metric {key!r} was declared with reduction {prev!r}, now {how!r}")
        self._values[key].append(float(value))

    def update(self, metrics: dict[str, float], how: str = "mean") -> None:
        for k, v in metrics.items():
            self.add(k, v, how)

    def result(self) -> dict[str, float]:
        out = {}
        for key, vals in self._values.items():
            how = self._how[key]
            if how == "mean":
                out[key] = sum(vals) / len(vals)
            elif how == "sum":
                out[key] = sum(vals)
            elif how == "max":
                out[key] = max(vals)
            elif how == "min":
                out[key] = min(vals)
            else:
                out[key] = vals[-1]
        return out


class MetricsLog:
    """Append-only JSONL metrics (one object per step) plus optional TensorBoard events."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = False) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._fh = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:  # tensorboard is a declared dependency; keep the JSONL log regardless
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        record = {"step": int(step), "time": time.time(), **clean}
        self._fh.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL log (metrics, audit trail); a torn last line (killed writer) is ignored."""
    rows = []
    with open(path) as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def plot_series(
    rows: list[dict[str, Any]], keys: list[str], out: str | os.PathLike, title: str, ylabel: str = ""
) -> Path | None:
    """Plot the given keys against step into a PNG; returns None when no key has data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for key in keys:
        pts = [
            (r["step"], r[key])
            for r in rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 40 else None, label=key)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_histogram(counts: dict[int, int], out: str | os.PathLike, title: str, xlabel: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not counts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = sorted(counts)
    ax.bar([str(k) for k in keys], [counts[k] for k in keys])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
