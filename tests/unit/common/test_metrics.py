from __future__ import annotations

import pytest

from common.metrics import MetricsLog, Reducer, plot_histogram, plot_series, read_metrics


def test_reducer_reductions():
    r = Reducer()
    for v in (1, 2, 3):
        r.add("a/mean", v)
        r.add("a/sum", v, "sum")
        r.add("a/max", v, "max")
        r.add("a/min", v, "min")
        r.add("a/last", v, "last")
    assert r.result() == {"a/mean": 2.0, "a/sum": 6.0, "a/max": 3.0, "a/min": 1.0, "a/last": 3.0}
    with pytest.raises(ValueError, match="declared"):
        r.add("a/sum", 1, "mean")
    with pytest.raises(ValueError):
        r.add("x", 1, "median")


def test_log_read_and_plots(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(5):
        log.log(step, {"rollout/reward": step / 10, "eval/accuracy": float("nan") if step % 2 else step / 5})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 9, "rollout/rew')  # torn line from a killed writer
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[3]["rollout/reward"] == pytest.approx(0.3)
    png = plot_series(rows, ["rollout/reward", "eval/accuracy"], tmp_path / "reward.png", "reward")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_series(rows, ["missing"], tmp_path / "none.png", "x") is None
    h = plot_histogram({0: 5, 1: 2}, tmp_path / "stale.png", "staleness", "versions")
    assert h is not None and h.stat().st_size > 1000


def test_a_metric_carries_its_reduction_whatever_its_name():
    import pickle  # what Ray does to a return value

    from common.metrics import Metric, reduce_metrics

    a = {"x/peak_rate": Metric.sum(2.0), "x/frac": Metric.max(0.5), "x/tok": Metric.mean(1.0, weight=3)}
    b = {"x/peak_rate": Metric.sum(3.0), "x/frac": Metric.max(0.25), "x/tok": Metric.mean(3.0, weight=1)}
    assert pickle.loads(pickle.dumps(a)) == a
    assert reduce_metrics([a, b]) == {"x/peak_rate": 5.0, "x/frac": 0.5, "x/tok": 1.5}
    with pytest.raises(ValueError, match="declared"):
        reduce_metrics([a, {"x/frac": Metric.mean(1.0)}])
    with pytest.raises(ValueError):
        Metric(1.0, "median")
