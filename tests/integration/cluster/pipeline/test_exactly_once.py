"""Exactly-once under faults, one hole at a time, against the real Redis of the session.

The fast tests drive the controller's consumer (:meth:`TreeConsumer.collect`) without Ray: it
holds a real queue and prompt dispatcher (the generators are not needed to consume
what a test pushes). The resume checks run :func:`run_pipeline` up to its Redis-against-checkpoint
check, which refuses before anything starts. The slow tests run the real pipeline (Ray, vLLM CPU
engine, learner actor) through a generator loop failure, a hung generator, and a controller crash
between a checkpoint's publish and its acknowledgement.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from types import SimpleNamespace

import pytest
from poison import poison_entries, valid_tree
from ray_nodes import small_pipeline_overrides
from redis_fixture import unique_run

from common.config import load_config
from common.errors import CheckpointError, ConfigError, QueueError
from common.replay import FIELD_SCHEMA, FIELD_TREE, SCHEMA_VERSION, ReplayQueue

pytestmark = pytest.mark.integration
PW_ENV = "TREEPO_TEST_EXACTLY_ONCE_REDIS_PASSWORD"


def _cfg(run_dir, model_dir, server, monkeypatch, *extra):
    monkeypatch.setenv(PW_ENV, server.password)
    return load_config(
        None,
        small_pipeline_overrides(
            run_dir, model_dir, f"queue.url={server.url}", f"queue.password_env={PW_ENV}", *extra
        ),
    )


def _shell(cfg, server, run: str, prompt_ids: list[str], world: int = 1, fresh: bool = True):
    """The controller's consumer without actors: the queue, the dispatcher (``fresh``: every prompt
    handed out and done, so the data is finished once the queue is drained; else the run's state as
    Redis holds it, as on resume) and the learner's version 0."""
    from cluster.pipeline.consuming import CONSUMER, TreeConsumer, run_limits
    from cluster.pipeline.controller import COUNTS
    from common.prompts import PromptDispatcher
    from learner.selection import VersionLineage

    cfg = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, num_workers=world))
    queue = ReplayQueue(server.url, run, password=server.password, block_ms=100)
    dispatcher = PromptDispatcher(queue.redis, run, prompt_ids, 0, 1)
    for epoch, pid in dispatcher.claim("0", len(prompt_ids)) if fresh else []:
        dispatcher.done("0", epoch, pid)
    policy = SimpleNamespace(version=0, lineage=VersionLineage())
    limits = run_limits(cfg, prompt_ids)
    c = TreeConsumer(cfg, queue, run, dispatcher, limits, policy, dict.fromkeys(COUNTS, 0))
    return c, CONSUMER


def _push_raw(queue: ReplayQueue, data: bytes) -> str:
    return queue.redis.xadd(queue.keys["trees"], {FIELD_TREE: data, FIELD_SCHEMA: SCHEMA_VERSION}).decode()


def test_poison_trees_are_quarantined_with_their_reason_and_never_come_back(
    tmp_path, tiny_model_dir, redis_server, monkeypatch, capsys
):
    """Hole 1: trees that decode but do not fit the run (each kind, a reward of 1e6 among them), and a
    tree whose processing raises, go to the dead-letter stream with the reason, each counted in
    ``pipeline/quarantined`` and said on the console; the valid trees are collected; a resumed
    consumer (reclaim) sees only the valid ones again, so nothing crash-loops."""
    import learner.advantages as adv

    cfg = _cfg(tmp_path / "run", tiny_model_dir, redis_server, monkeypatch, "data.max_prompt_tokens=32")
    run = unique_run("poison")
    c, consumer = _shell(cfg, redis_server, run, ["p-0", "p-1", "p-2"])
    lim = c.limits
    poison = poison_entries(lim.vocab_size, lim.max_prompt_tokens, lim.max_response_tokens, lim.leaves)
    for _, data, _ in poison:
        _push_raw(c.queue, data)
    good = [c.queue.push(valid_tree(f"p-{i}@e0", f"p-{i}")) for i in range(2)]
    c.queue.push(valid_tree("p-2@e0", "p-2"))  # its advantages raise inside the controller
    original = adv.tree_advantages

    def raising(trees, algo):
        if any(t.tree_id == "p-2@e0" for t in trees):
            raise FloatingPointError("injected failure on one tree")
        return original(trees, algo)

    monkeypatch.setattr(adv, "tree_advantages", raising)
    trees, _ = c.collect(3)
    assert sorted(t.tree_id for t in trees) == ["p-0@e0", "p-1@e0"]
    dead = c.queue.dead_entries(count=50)
    reasons = [d["reason"] for d in dead]
    assert len(dead) == len(poison) + 1 and c.queue.dead_count() == len(poison) + 1
    for kind, _, reason in poison:
        assert any(re.search(reason, r) for r in reasons), (kind, reasons)
    assert any("injected failure on one tree" in r for r in reasons)
    assert all(d["bytes"] > 0 for d in dead), "the dead letters keep the original bytes"
    # counted and said, whether the queue's decoder or check refused it or the controller's preparation
    assert c.counts["quarantined"] == len(poison) + 1
    lines = [x for x in capsys.readouterr().out.splitlines() if "quarantined in the dead-letter" in x]
    assert len(lines) == len(poison) + 1
    for kind, _, reason in poison:
        assert any(re.search(reason, x) for x in lines), (kind, lines)
    assert sorted(c.queue.pending()) == sorted(good) == sorted(c.unacked)
    # a resume: only the two valid trees are re-delivered
    c2, _ = _shell(cfg, redis_server, run, ["p-0", "p-1", "p-2"])
    assert [i for i, _ in c2.queue.reclaim(consumer)] == good


def test_trees_short_of_a_mini_batch_stay_pending_at_the_end_of_data(
    tmp_path, tiny_model_dir, redis_server, monkeypatch
):
    """Hole 3: with two ranks (mini-batches of 2), the third tree left at the end of the data is
    neither trained nor acknowledged."""
    cfg = _cfg(
        tmp_path / "run",
        tiny_model_dir,
        redis_server,
        monkeypatch,
        "learner.num_workers=2",
        "learner.prompts_per_step=4",
    )
    c, _ = _shell(cfg, redis_server, unique_run("short"), ["p-0", "p-1", "p-2"], world=2)
    ids = [c.queue.push(valid_tree(f"p-{i}@e0", f"p-{i}")) for i in range(3)]
    trees, _ = c.collect(4)
    assert len(trees) == 2
    assert c.held == [ids[2]] and ids[2] not in c.unacked
    c.finish()  # the end of the run: what was consumed is acknowledged, not the held one
    assert c.queue.pending() == [ids[2]], "the untrained tree must stay pending"


def test_entries_of_a_read_whose_reply_was_lost_are_taken_in(
    tmp_path, tiny_model_dir, redis_server, monkeypatch
):
    """Hole 3: an XREADGROUP the client retried after its reply was lost leaves entries delivered to
    the controller but never seen; the controller finds them in the pending list, trains them, and
    the stream is trimmed to nothing once they are acknowledged."""
    cfg = _cfg(tmp_path / "run", tiny_model_dir, redis_server, monkeypatch)
    c, consumer = _shell(cfg, redis_server, unique_run("lost"), ["p-0", "p-1"])
    ids = [c.queue.push(valid_tree(f"p-{i}@e0", f"p-{i}")) for i in range(2)]
    c.queue.redis.xreadgroup("learners", consumer, {c.queue.keys["trees"]: ">"}, count=10)  # reply lost
    trees, _ = c.collect(2)
    assert sorted(t.tree_id for t in trees) == ["p-0@e0", "p-1@e0"] and c.counts["orphans"] == 2
    c.finish()  # nothing trained here: acknowledges what was consumed
    assert sorted(c.unacked) == [] and c.queue.pending() == []
    assert c.queue.redis.xlen(c.queue.keys["trees"]) == 0 and len(ids) == 2


def test_a_stale_trees_prompt_is_reissued_once_even_when_a_crash_re_delivers_it(
    tmp_path, tiny_model_dir, redis_server, monkeypatch
):
    """No prompt lost to staleness: a tree dropped for staleness puts its prompt back on the retry list, once, without
    raising the admission rule's drop count (the prompt takes its own place again). The driver is
    lost before the next checkpoint: the resume re-delivers the stale entry, drops it again, and
    re-issues nothing twice; the re-issued prompt's new tree (the same tree id) is trained, not taken
    for a duplicate; the checkpoint's acknowledgement forgets the re-issue record."""
    from common.keys import RunKeys

    cfg = _cfg(tmp_path / "run", tiny_model_dir, redis_server, monkeypatch, "algo.max_staleness=1")
    run, prompts = unique_run("stale"), ["p-0", "p-1", "p-2"]
    c, _ = _shell(cfg, redis_server, run, prompts)
    c.policy.version = 2
    stale = c.queue.push(valid_tree("p-0@e0", "p-0", version=0))  # 2 versions behind: past the limit 1
    c.queue.push(valid_tree("p-1@e0", "p-1", version=2))
    trees, m = c.collect(1)
    assert [t.tree_id for t in trees] == ["p-1@e0"]
    assert c.dispatcher.retry() == [(0, "p-0")] and not c.dispatcher.exhausted()
    assert m["pipeline/reissued_stale"] == 1 and c.dropped == 0 and c.counts["dropped_stale"] == 1
    reissued = c.queue.redis.hgetall(RunKeys(run).prompts_reissued)
    assert reissued == {stale.encode(): str(c.dispatcher.position_of(0, "p-0")).encode()}

    # the driver is lost before the next checkpoint; a checkpoint's acknowledged entry kept its record
    c.queue.redis.hset(RunKeys(run).prompts_reissued, "1-0", "0")
    c2, _ = _shell(cfg, redis_server, run, prompts, fresh=False)
    c2.policy.version = 2
    assert c2.reclaim() == (2, 1, 1)  # re-delivered, kept, too stale
    assert c2.dispatcher.retry() == [(0, "p-0")] and c2.dispatcher.reissued_total() == 1
    assert c2.queue.redis.hkeys(RunKeys(run).prompts_reissued) == [stale.encode()]
    assert c2.unacked == [stale] and [t.tree_id for _, t in c2.backlog] == ["p-1@e0"]

    # a generator takes the re-issued prompt; its new tree is trained with the re-delivered one
    assert c2.dispatcher.claim("0", 5) == [(0, "p-0")]
    again = valid_tree("p-0@e0", "p-0", version=2)
    assert c2.dispatcher.push_and_done(c2.queue, again, "0", 0, "p-0")
    trees, m = c2.collect(2)
    assert sorted(t.tree_id for t in trees) == ["p-0@e0", "p-1@e0"] and c2.counts["duplicates"] == 0
    assert m["pipeline/reissued_stale"] == 1 and c2.dispatcher.finished()
    c2.ack_consumed()  # the checkpoint covering them is published
    assert c2.queue.pending() == [] and not c2.queue.redis.exists(RunKeys(run).prompts_reissued)


# ------------------------------------------------------------------ resume checks (no Ray needed)


def _fake_checkpoint(root, step: int, extra: dict) -> None:
    """A published checkpoint holding only trainer.json (enough for the resume checks)."""
    from learner import checkpoint as ckpt

    tmp = ckpt.begin(root, step)
    (tmp / ckpt.TRAINER).write_text(json.dumps({"step": step, "version": step, "extra": extra}))
    ckpt.publish(root, tmp, step, keep_last=5)


def _extra(run_name: str, claimed: int, **config) -> dict:
    return {
        "step": 2,
        "prompts": {"cursor": {"claimed": claimed}},
        "stream": {"run": run_name},
        "config": config,
    }


def test_a_corrupt_newest_checkpoint_is_refused_not_skipped(
    tmp_path, tiny_model_dir, redis_server, monkeypatch
):
    """Hole 3: the newest checkpoint's entries were acknowledged: falling back to the older one
    would lose them, so the resume stops and says how to proceed."""
    from cluster.pipeline.controller import run_pipeline
    from common.keys import run_name_for

    run = tmp_path / "run"
    name = run_name_for(run)
    _fake_checkpoint(run / "checkpoints", 1, _extra(name, 2))
    _fake_checkpoint(run / "checkpoints", 2, _extra(name, 4))
    (run / "checkpoints" / "ckpt-00000002" / "trainer.json").write_text("{}")
    cfg = _cfg(run, tiny_model_dir, redis_server, monkeypatch, "resume=true")
    with pytest.raises(
        CheckpointError, match=r"ckpt-00000002 is unusable .* restore ckpt-00000002 from a copy, or"
    ):
        run_pipeline(cfg)


def test_a_resume_against_lost_redis_state_or_a_moved_run_dir_is_refused(
    tmp_path, tiny_model_dir, redis_server, monkeypatch
):
    """Hole 4: Redis holds no state for the run (wiped, no AOF), the run directory moved, or the
    resume changes what a tree is: each refused with the cause and the fix, before anything starts."""
    from cluster.pipeline.controller import run_pipeline
    from common.keys import run_name_for

    run = tmp_path / "run"
    cfg = _cfg(run, tiny_model_dir, redis_server, monkeypatch, "resume=true")
    _fake_checkpoint(run / "checkpoints", 2, _extra(run_name_for(run), 4))
    t0 = time.perf_counter()
    with pytest.raises(QueueError, match=r"holds no state for run .* prompt cursor 4: Redis lost"):
        run_pipeline(cfg)
    _fake_checkpoint(run / "checkpoints", 3, _extra("elsewhere-0123abcd", 4))
    with pytest.raises(ConfigError, match=r"belongs to run 'elsewhere-0123abcd'.*the run directory moved"):
        run_pipeline(cfg)
    _fake_checkpoint(run / "checkpoints", 4, _extra(run_name_for(run), 0, **{"tree.w": 8}))
    with pytest.raises(ConfigError, match=r"resume changes tree.w: 8 -> 4"):
        run_pipeline(cfg)
    assert time.perf_counter() - t0 < 60


def test_a_fresh_start_clears_the_state_of_an_attempt_that_never_checkpointed(
    tmp_path, tiny_model_dir, redis_server, monkeypatch, capsys
):
    """Hole 4: a crash before the first checkpoint leaves a prompt cursor and queue entries in Redis;
    starting the run again (no --resume) must not mix them in: they are removed, with a message."""
    from cluster.pipeline.recovery import check_queue_state
    from common.keys import RunKeys, run_name_for
    from common.prompts import PromptDispatcher

    run = tmp_path / "run"
    cfg = _cfg(run, tiny_model_dir, redis_server, monkeypatch)
    name = run_name_for(run)
    q = ReplayQueue(redis_server.url, name, password=redis_server.password)
    PromptDispatcher(q.redis, name, ["p-0", "p-1"], 0, 1).claim("0", 2)
    q.push(valid_tree("p-0@e0", "p-0"))
    run.mkdir(parents=True, exist_ok=True)
    (run / "trained_trees.jsonl").write_text('{"step": 1, "version": 1, "trees": ["p-0@e0"]}\n')
    check_queue_state(cfg, q.redis, name, "test")
    assert "removed the queue state of an earlier attempt" in capsys.readouterr().out
    assert not list(q.redis.scan_iter(match=f"{RunKeys(name).base}:*"))
    assert (run / "trained_trees.jsonl").read_text() == ""


def test_quarantined_trees_free_their_admission_place_and_a_run_of_them_stops_the_run(
    tmp_path, tiny_model_dir, redis_server, monkeypatch
):
    """A reward function past reward.max_abs gets every tree quarantined: each counts in the
    admission's D (else the generators, their places all held, wait forever), and two steps' worth
    in a row stop the run with the first reason instead of waiting for trees that never come."""
    from common.keys import RunKeys

    cfg = _cfg(tmp_path / "run", tiny_model_dir, redis_server, monkeypatch, "learner.prompts_per_step=8")
    run = unique_run("qstreak")
    ids = [f"p-{i}" for i in range(40)]
    c, _ = _shell(cfg, redis_server, run, ids)
    for i in range(3):
        t = valid_tree(f"p-{i}@e0", f"p-{i}")
        t.leaves[0].reward = 1e6
        c.queue.push(t)
    c.queue.push(valid_tree("p-3@e0", "p-3"))
    trees, _ = c.collect(1)
    assert [t.tree_id for t in trees] == ["p-3@e0"]
    assert c.counts["quarantined"] == 3 and c.dropped == 3
    assert int(c.queue.redis.get(RunKeys(run).dropped)) == 3, "admission must see the quarantined trees"
    for i in range(4, 4 + 16):
        t = valid_tree(f"p-{i}@e0", f"p-{i}")
        t.leaves[1].reward = 1e6
        c.queue.push(t)
    with pytest.raises(
        QueueError, match=r"last 16 trees were all quarantined, the first for: .*reward 1e\+06"
    ):
        c.collect(8)
