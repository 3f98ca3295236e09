"""The actors' start-up timeout is ``generators.start_timeout_s``: it bounds the learners' placement
group, their set-up and the generators' start, and running past it names the key to raise. Ray's
calls are replaced by fakes that record the timeouts they were given (and inject the time-out)."""

from __future__ import annotations

import pytest
from ray.exceptions import GetTimeoutError

from cluster.pipeline import topology
from common.config import load_config
from common.errors import ConfigError


class _Ref:
    def remote(self, *args):
        return "ref"


class _Actor:
    ready = _Ref()


@pytest.fixture
def waits(monkeypatch):
    """Every timeout given to ray.get / ray.wait, in call order; ray.get times out when told to."""
    seen: dict = {"get": [], "wait": [], "get_times_out": False}

    def get(refs, timeout=None):
        seen["get"].append(timeout)
        if seen["get_times_out"]:
            raise GetTimeoutError("timed out")
        return [0 for _ in refs] if isinstance(refs, list) else 0

    def wait(refs, timeout=None):
        seen["wait"].append(timeout)
        return [], list(refs)  # the placement group never gets its room

    monkeypatch.setattr(topology.ray, "get", get)
    monkeypatch.setattr(topology.ray, "wait", wait)
    monkeypatch.setattr(topology, "_check_resources", lambda cfg: None)
    monkeypatch.setattr(topology, "start_generator", lambda *a: _Actor())
    return seen


def test_start_waits_for_the_configured_time(waits, monkeypatch):
    cfg = load_config(None, ["generators.start_timeout_s=1234", "generators.num=2"])
    learner_timeouts = []

    def start_learners(cfg, timeout_s=None):
        learner_timeouts.append(timeout_s)
        return [], None

    monkeypatch.setattr(topology, "start_learners", start_learners)
    topology.start(cfg, "redis://127.0.0.1:1/0", None, "run")
    assert learner_timeouts == [1234.0] and waits["get"] == [1234.0]  # the generators' ready
    topology.start(cfg, "redis://127.0.0.1:1/0", None, "run", timeout_s=5.0)  # an explicit one wins
    assert learner_timeouts[-1] == 5.0 and waits["get"][-1] == 5.0


def test_a_start_past_the_timeout_names_the_key(waits, monkeypatch):
    cfg = load_config(None, ["generators.start_timeout_s=7"])
    monkeypatch.setattr(topology, "start_learners", lambda cfg, timeout_s=None: ([], None))
    waits["get_times_out"] = True
    with pytest.raises(ConfigError, match=r"did not all start within 7 s \(generators.start_timeout_s\)"):
        topology.start(cfg, "redis://127.0.0.1:1/0", None, "run")


def test_learners_placement_waits_for_the_configured_time(waits, monkeypatch):
    removed = []

    class _Group:
        def ready(self):
            return "pg-ready"

    monkeypatch.setattr(topology, "placement_group", lambda bundles, strategy: _Group())
    monkeypatch.setattr(topology, "remove_placement_group", removed.append)
    cfg = load_config(None, ["generators.start_timeout_s=42"])
    with pytest.raises(ConfigError, match=r"within 42 s: .* raise generators.start_timeout_s"):
        topology.start_learners(cfg)
    assert waits["wait"] == [42.0] and len(removed) == 1
