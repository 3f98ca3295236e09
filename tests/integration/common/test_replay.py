"""The replay queue and prompt dispatch against a real redis-server (embedded launcher).

Most tests share the session server and isolate themselves by run name; the restart tests use a
module server with ``appendfsync always``.
"""

from __future__ import annotations

import argparse
import threading
from collections import Counter

import msgpack
import numpy as np
import pytest
from redis_fixture import unique_run

from cluster.bench.queue import synthetic_tree
from cluster.pipeline.redis_launcher import EmbeddedRedis
from common.errors import QueueError, WireError
from common.prompts import PromptDispatcher, epoch_permutation
from common.replay import ReplayQueue
from common.tree import SCHEMA_VERSION

pytestmark = pytest.mark.integration


def tree(i: int, seg_tokens: int = 8):
    return synthetic_tree(f"tree-{i}", 4, 3, seg_tokens, seed=i)


def make_queue(server, run=None, **kw) -> ReplayQueue:
    return ReplayQueue(server.url, run or unique_run("q"), password=server.password, block_ms=200, **kw)


@pytest.fixture(scope="module")
def aof_server(tmp_path_factory):
    """A server this module may restart: AOF with appendfsync always (every write on disk)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis-aof"), appendfsync="always", maxmemory_mb=256)
    server.start()
    yield server
    server.stop()


# ---------------------------------------------------------------------------- queue


def test_round_trip_push_read_ack(server):
    q = make_queue(server)
    sent = [tree(i) for i in range(5)]
    ids = [q.push(t) for t in sent]
    assert q.depth() == 5 and q.undelivered() == 5
    got = q.read(10, consumer="c0")
    assert [i for i, _ in got] == ids
    for (_, back), orig in zip(got, sent):
        assert back.tree_id == orig.tree_id
        assert [s.token_ids.tolist() for s in back.segments] == [s.token_ids.tolist() for s in orig.segments]
        assert [s.logprobs.tobytes() for s in back.segments] == [s.logprobs.tobytes() for s in orig.segments]
    assert q.pending() == ids and q.depth() == 5 and q.undelivered() == 0
    assert q.read(10, block_ms=0, consumer="c0") == []
    assert q.ack(ids[:3]) == 3
    assert q.pending() == ids[3:] and q.depth() == 2
    s = q.stats()
    assert s["pending_per_consumer"] == {"c0": 2} and s["oldest_pending_age_s"] is not None
    assert s["length"] == 5 and s["dead_count"] == 0


def test_entries_pushed_before_consumer_group_reader_are_delivered(server):
    run = unique_run("early")
    producer = make_queue(server, run)
    first = producer.push(tree(0))
    consumer = make_queue(server, run)  # a later client must not reset the group
    assert [i for i, _ in consumer.read(5, consumer="c")] == [first]


def test_malformed_entries_go_to_dead_letter_and_do_not_block(server):
    q = make_queue(server)
    key = q.keys["trees"]
    good0 = q.push(tree(0))
    garbage = b"\x00\xffnot msgpack at all\xc1"
    bad_tree = msgpack.packb({"schema": SCHEMA_VERSION, "tree_id": "x"}, use_bin_type=True)
    wrong_schema = msgpack.packb({"schema": 999}, use_bin_type=True)
    ids_bad = [
        q.redis.xadd(key, {"tree": garbage}).decode(),
        q.redis.xadd(key, {"tree": bad_tree}).decode(),
        q.redis.xadd(key, {"tree": wrong_schema}).decode(),
        q.redis.xadd(key, {"something": b"else"}).decode(),
    ]
    good1 = q.push(tree(1))
    got = q.read(10, consumer="c")
    assert [i for i, _ in got] == [good0, good1]
    assert q.dead_count() == 4
    dead = q.dead_entries(10)[::-1]  # oldest first
    assert [d["source_id"] for d in dead] == ids_bad
    assert "msgpack" in dead[0]["reason"] and dead[0]["data"] == garbage
    assert "missing fields" in dead[1]["reason"] and dead[1]["data"] == bad_tree
    assert "schema version 999" in dead[2]["reason"]
    assert "no 'tree' field" in dead[3]["reason"]
    # Dead entries are acknowledged: only the good ones are pending, nothing comes back.
    assert q.pending() == [good0, good1]
    assert {i for i, _ in q.reclaim("c")} == {good0, good1}
    assert q.dead_count() == 4


def test_consumer_side_size_limit_dead_letters(server):
    run = unique_run("size")
    big = ReplayQueue(server.url, run, password=server.password, max_entry_bytes=1 << 20)
    small = ReplayQueue(server.url, run, password=server.password, max_entry_bytes=2000)
    eid = big.push(tree(0, seg_tokens=64))
    assert small.read(5, block_ms=0, consumer="c") == []
    assert small.dead_count() == 1 and "exceeds the limit" in small.dead_entries(1)[0]["reason"]
    assert small.dead_entries(1)[0]["source_id"] == eid


def test_oversize_entry_refused_at_producer(server):
    q = make_queue(server, max_entry_bytes=4000)
    with pytest.raises(WireError, match="exceeds queue.max_entry_mb"):
        q.push(tree(0, seg_tokens=200))
    assert q.redis.xlen(q.keys["trees"]) == 0
    q.push(tree(0, seg_tokens=8))  # a small one still goes through


def test_reclaim_after_consumer_dies_and_on_resume_with_same_name(server):
    run = unique_run("reclaim")
    q = make_queue(server, run)
    ids = [q.push(tree(i)) for i in range(6)]
    assert len(q.read(4, consumer="dead-learner")) == 4
    # Resume under the same name: a fresh client sees its own pending entries again.
    same = make_queue(server, run)
    assert [i for i, _ in same.reclaim("dead-learner")] == ids[:4]
    # A consumer under a new name takes them over (XAUTOCLAIM); a min idle time protects live ones.
    other = make_queue(server, run)
    assert other.reclaim("new-learner", min_idle_ms=60_000) == []
    got = other.reclaim("new-learner", min_idle_ms=0)
    assert [i for i, _ in got] == ids[:4] and [t.tree_id for _, t in got] == [f"tree-{i}" for i in range(4)]
    assert other.stats()["pending_per_consumer"] == {"new-learner": 4}
    # Undelivered entries are not touched by reclaim and still arrive normally.
    assert [i for i, _ in other.read(10, consumer="new-learner")] == ids[4:]


def test_trim_never_removes_unacked_or_undelivered(server):
    q = make_queue(server)
    ids = [q.push(tree(i, seg_tokens=2)) for i in range(100)]
    got = []
    while len(got) < 100:
        got += q.read(40, consumer="c")
    q.ack(ids[:50])
    later = [q.push(tree(1000 + i, seg_tokens=2)) for i in range(5)]  # undelivered
    assert q.trim_acked() == 50
    assert q.redis.xlen(q.keys["trees"]) == 55
    back = q.reclaim("c2")
    assert [i for i, _ in back] == ids[50:]
    # Interleaved acks: only the prefix below the oldest unacked entry can go.
    q.ack([ids[60], ids[99]])
    assert q.trim_acked() == 0
    q.ack(ids[50:60])
    assert q.trim_acked() == 11  # ids[50..60]
    assert q.pending() == ids[61:99]
    assert [i for i, _ in q.read(10, consumer="c")] == later
    q.ack(ids[61:99] + later)
    assert q.trim_acked() == 44 and q.redis.xlen(q.keys["trees"]) == 0 and q.depth() == 0


def test_redis_restart_with_aof_loses_nothing(aof_server):
    run = unique_run("restart")
    q = make_queue(aof_server, run)
    ids = [q.push(tree(i)) for i in range(10)]
    assert len(q.read(6, consumer="c")) == 6
    q.ack(ids[:3])
    q.close()
    aof_server.restart()
    q = make_queue(aof_server, run)
    assert q.pending() == ids[3:6]  # acknowledged stay acknowledged, pending stay pending
    assert [i for i, _ in q.reclaim("c")] == ids[3:6]
    assert [i for i, _ in q.read(10, consumer="c")] == ids[6:]
    assert q.depth() == 7


def test_wrong_password_and_unreachable_server(server):
    with pytest.raises(QueueError, match=r"127\.0\.0\.1:\d+.*password"):
        ReplayQueue(server.url, unique_run(), password="not-the-password")
    with pytest.raises(QueueError, match="password"):
        ReplayQueue(server.url, unique_run(), password=None)
    port = server.port
    with pytest.raises(QueueError, match="cannot reach Redis at 127.0.0.1"):
        ReplayQueue(
            f"redis://127.0.0.1:{port + 1 if port < 65535 else port - 1}/0",
            unique_run(),
            password="x",
            connect_timeout_s=1,
        )


def test_server_gone_mid_run_raises_queue_error(tmp_path):
    with EmbeddedRedis(tmp_path) as own:
        q = make_queue(own)
        q.push(tree(0))
    with pytest.raises(
        QueueError, match=r"cannot reach Redis at 127\.0\.0\.1:\d+.*check that the server is running"
    ):
        q.read(1, block_ms=0, consumer="c")
    with pytest.raises(QueueError, match="cannot reach"):
        q.push(tree(1))


def _inspect_args(*argv: str) -> argparse.Namespace:
    from cluster.commands import queue as queue_cmd

    parser = argparse.ArgumentParser()
    queue_cmd.add_arguments(parser)
    return parser.parse_args(["inspect", *argv])


def test_queue_inspect_command(server, capsys, monkeypatch):
    from cluster.commands import queue as queue_cmd

    run = unique_run("inspect")
    q = make_queue(server, run)
    q.push(tree(0))
    q.redis.xadd(q.keys["trees"], {"tree": b"junk"})
    q.read(5, consumer="learner-0")
    monkeypatch.setenv("TREEPO_TEST_PW", server.password)
    assert (
        queue_cmd.run(
            _inspect_args("--url", server.url, "--password-env", "TREEPO_TEST_PW", "--run-name", run)
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"treepo:{run}:trees" in out and "learner-0" in out and "not a msgpack entry" in out


def test_queue_inspect_run_dir_starts_and_stops_server(tmp_path, capsys):
    from cluster.commands import queue as queue_cmd
    from cluster.pipeline.redis_launcher import find_running, queue_endpoint
    from common.config import QueueConfig

    with queue_endpoint(QueueConfig(), tmp_path) as (url, password):
        ReplayQueue(url, "demo", password=password).push(tree(0))
    assert find_running(tmp_path) is None
    assert queue_cmd.run(_inspect_args("--run-dir", str(tmp_path), "--json")) == 0
    out = capsys.readouterr().out
    assert '"run": "demo"' in out and '"length": 1' in out
    assert find_running(tmp_path) is None


def test_bench_queue_smoke(capsys):
    from cluster.bench import queue as bench_queue

    parser = argparse.ArgumentParser()
    bench_queue.add_arguments(parser)
    args = parser.parse_args(
        ["--sizes", "small", "--trees", "3", "--latency-trees", "5", "--bench-requests", "5"]
    )
    assert bench_queue.run(args) == 0
    out = capsys.readouterr().out
    assert "trees_per_s" in out and "ratio" in out


# ---------------------------------------------------------------------------- prompt dispatch

PROMPTS = [f"p{i:03d}" for i in range(40)]


def test_shuffle_is_deterministic_per_seed_and_epoch(server):
    a = PromptDispatcher(server.client(), unique_run("sh"), PROMPTS, seed=7, epochs=2)
    b = PromptDispatcher(server.client(), unique_run("sh"), PROMPTS, seed=7, epochs=2)
    order_a = a.claim("g", 80)
    assert order_a == b.claim("g", 80)
    e0 = [p for e, p in order_a if e == 0]
    e1 = [p for e, p in order_a if e == 1]
    assert sorted(e0) == PROMPTS and sorted(e1) == PROMPTS and e0 != e1 and e0 != PROMPTS
    assert e0 == [PROMPTS[i] for i in np.random.default_rng([7, 0]).permutation(40)]
    assert not np.array_equal(epoch_permutation(40, 7, 0), epoch_permutation(40, 8, 0))
    assert a.exhausted() and a.claim("g", 5) == []


def test_each_prompt_claimed_once_across_concurrent_claimers(server):
    run, epochs = unique_run("conc"), 3
    claimed: dict[str, list] = {}

    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def worker(g: str, seed: int) -> None:
        try:
            d = PromptDispatcher(server.client(), run, PROMPTS, seed=1, epochs=epochs)
            mine = claimed.setdefault(g, [])
            rng = np.random.default_rng(seed)
            start.wait(30)
            while batch := d.claim(g, int(rng.integers(1, 5))):
                mine += batch
                for e, p in batch:
                    assert d.done(g, e, p)
        except BaseException as e:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(f"gen{i}", i)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    everything = [x for rows in claimed.values() for x in rows]
    counts = Counter(everything)
    assert len(claimed) == 3 and len(everything) == 40 * epochs and set(counts.values()) == {1}
    d = PromptDispatcher(server.client(), run, PROMPTS, seed=1, epochs=epochs)
    assert d.finished() and d.cursor() == {"epoch": 3, "position": 0, "claimed": 120, "total": 120}


def test_dead_generator_prompts_are_reissued_once(server):
    run = unique_run("dead")
    q = make_queue(server, run)
    d = PromptDispatcher(server.client(), run, PROMPTS, seed=3, epochs=1)
    a = d.claim("A", 5)
    assert d.push_and_done(q, tree(0), "A", *a[0]) is not None  # A finished one prompt
    assert d.done("A", *a[1])
    assert set(d.in_flight()["A"][i][:2] for i in range(3)) == set(a[2:])
    assert d.requeue_generator("A") == 3
    retry = d.retry()
    assert retry == sorted(a[2:], key=lambda x: d.position_of(*x))
    b = d.claim("B", 4)
    assert b[:3] == retry and d.retry() == []  # retries first...
    assert b[3] not in a  # ...then the cursor
    # The "dead" generator was only slow: its late tree is refused, B's is taken.
    assert d.push_and_done(q, tree(1), "A", *a[2]) is None
    assert d.push_and_done(q, tree(2), "B", *a[2]) is not None
    assert q.redis.xlen(q.keys["trees"]) == 2
    assert [e[1] for e in d.state()["in_flight"]["B"]] == sorted(p for _, p in b[1:])
    # A hung generator: prompts in flight too long are re-issued too (none is young enough to stay).
    assert d.requeue_older_than(3600) == 0
    assert d.requeue_older_than(-1) == 3 and "B" not in d.in_flight()
    assert sorted(d.claim("C", 3)) == sorted(b[1:])


def test_dispatch_refuses_different_dataset_for_same_run(server):
    run = unique_run("meta")
    PromptDispatcher(server.client(), run, PROMPTS, seed=1, epochs=1)
    PromptDispatcher(server.client(), run, PROMPTS, seed=1, epochs=3)  # more epochs on resume: fine
    with pytest.raises(QueueError, match="different prompt list"):
        PromptDispatcher(server.client(), run, PROMPTS[::-1], seed=1, epochs=1)
    with pytest.raises(QueueError, match="seed"):
        PromptDispatcher(server.client(), run, PROMPTS, seed=2, epochs=1)


def test_prompt_cursor_and_in_flight_survive_restart(aof_server):
    run = unique_run("cursor")
    d = PromptDispatcher(aof_server.client(), run, PROMPTS, seed=5, epochs=2)
    first = d.claim("g0", 30)
    d.claim("g1", 15)
    for x in first[:10]:
        d.done("g0", *x)
    before = d.state()
    aof_server.restart()
    d = PromptDispatcher(aof_server.client(), run, PROMPTS, seed=5, epochs=2)
    assert d.state() == before and d.cursor()["epoch"] == 1 and d.cursor()["position"] == 5
    nxt = d.claim("g0", 1)
    assert nxt == [d.prompt_at(45)]
