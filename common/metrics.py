"""Metrics with explicit reductions, the local JSONL log (always; other trackers: :mod:`common.trackers`) and PNG plots.

Keys are namespaced: ``rollout/``, ``tree/``, ``learner/``, ``sync/``, ``staleness/``, ``timing/``,
``eval/``. A value that will be combined with others (micro-batches, ranks, generators) is a
:class:`Metric`, which carries its reduction (mean, sum, max, min, last) and a weight for means;
:class:`Reducer` / :func:`reduce_metrics` combine them, so nothing is averaged that should have been
summed and nothing is guessed from a key's name.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REDUCTIONS = ("mean", "sum", "max", "min", "last")


@dataclass(frozen=True)
class Metric:
    """A value that carries how it combines with the same key's values from elsewhere (other
    micro-batches, ranks, generators): ``reduce`` is one of :data:`REDUCTIONS`; ``weight`` weighs a
    mean (e.g. by tokens). A plain frozen dataclass, so it crosses the Ray boundary intact; nothing
    is ever reduced by guessing from a key's name."""

    value: float
    reduce: str = "mean"
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduction {self.reduce!r} is not one of {REDUCTIONS}")

    @classmethod
    def mean(cls, value: float, weight: float = 1.0) -> Metric:
        return cls(float(value), "mean", float(weight))

    @classmethod
    def sum(cls, value: float) -> Metric:
        return cls(float(value), "sum")

    @classmethod
    def max(cls, value: float) -> Metric:
        return cls(float(value), "max")

    @classmethod
    def min(cls, value: float) -> Metric:
        return cls(float(value), "min")


def values(metrics: Mapping[str, Metric]) -> dict[str, float]:
    """The values of one source's metrics (nothing to combine)."""
    return {k: m.value for k, m in metrics.items()}


class Reducer:
    """Accumulate metrics under keys, each with its declared reduction; ``result()`` gives one dict.

    A key keeps the reduction it was first added with (a second one raises: that is a bug, not a
    choice). Means are weighted by each :class:`Metric`'s ``weight``."""

    def __init__(self) -> None:
        self._acc: dict[str, list[float]] = {}  # key -> [value or weighted sum, total weight]
        self._how: dict[str, str] = {}

    def add(self, key: str, value: float | Metric, how: str | None = None) -> None:
        """Add a :class:`Metric`, or a plain value with reduction ``how`` (default mean, weight 1)."""
        m = value if isinstance(value, Metric) else Metric(float(value), how or "mean")
        prev = self._how.setdefault(key, m.reduce)
        if prev != m.reduce:
            raise ValueError(f"metric {key!r} was declared with reduction {prev!r}, now {m.reduce!r}")
        acc = self._acc.get(key)
        if acc is None:
            self._acc[key] = [m.value * m.weight if m.reduce == "mean" else m.value, m.weight]
        elif m.reduce == "mean":
            acc[0] += m.value * m.weight
            acc[1] += m.weight
        elif m.reduce == "sum":
            acc[0] += m.value
        elif m.reduce == "max":
            acc[0] = max(acc[0], m.value)
        elif m.reduce == "min":
            acc[0] = min(acc[0], m.value)
        else:
            acc[0] = m.value

    def update(self, metrics: Mapping[str, float | Metric], how: str | None = None) -> None:
        for k, v in metrics.items():
            self.add(k, v, how)

    def result(self) -> dict[str, float]:
        return {
            key: (total / weight if self._how[key] == "mean" and weight else total)
            for key, (total, weight) in self._acc.items()
        }


def reduce_metrics(parts: Iterable[Mapping[str, Metric]]) -> dict[str, float]:
    """Combine several sources' metrics, each key by its declared reduction (weighted means)."""
    red = Reducer()
    for part in parts:
        red.update(part)
    return red.result()


class MetricsLog:
    """Append-only JSONL metrics, one object per step (``metrics.jsonl``; the other trackers are in
    :mod:`common.trackers`)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._fh = open(self.path, "a", buffering=1)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        record = {"step": int(step), "time": time.time(), **clean}
        self._fh.write(json.dumps(record, allow_nan=True) + "\n")

    def close(self) -> None:
        self._fh.close()


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


def by_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metric rows with one row per step, in step order: the rows of one step merged (an evaluation
    that ran beside training is logged as a row of its own when it finishes, at the step it evaluated)."""
    merged: dict[int, dict[str, Any]] = {}
    for row in rows:
        merged.setdefault(int(row.get("step", 0)), {}).update(row)
    return [merged[k] for k in sorted(merged)]


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
