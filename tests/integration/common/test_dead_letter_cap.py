"""The dead-letter stream is bounded: entries by ``dead_maxlen`` (exact trim), bytes per entry by
``dead_data_bytes`` (the payload's head, with its full size and SHA-256), so poison entries of any
size cannot fill the queue's Redis. Against the session's real redis-server."""

from __future__ import annotations

import hashlib
import os

import pytest
from redis_fixture import unique_run

from common.replay import DEAD_DATA_BYTES, DEAD_MAXLEN, ReplayQueue

pytestmark = pytest.mark.integration


def test_default_cap_is_small_against_the_embedded_maxmemory():
    # the worst case the defaults allow, next to the embedded server's 2 GiB default maxmemory
    assert DEAD_MAXLEN * DEAD_DATA_BYTES <= 64 << 20


def test_large_poison_entries_are_kept_truncated_and_capped(server):
    q = ReplayQueue(
        server.url,
        unique_run("deadcap"),
        password=server.password,
        max_entry_bytes=8 << 20,
        block_ms=100,
        dead_maxlen=4,
        dead_data_bytes=1024,
    )
    key = q.keys["trees"]
    payloads = [os.urandom(300_000) for _ in range(7)]  # undecodable (not msgpack), 300 KB each
    small = b"\xc1 tiny poison"
    ids = [q.redis.xadd(key, {"tree": p}).decode() for p in payloads]
    ids.append(q.redis.xadd(key, {"tree": small}).decode())
    assert q.read(20, consumer="c") == []  # all dead-lettered, none delivered

    assert q.dead_count() == 8  # the counter counts every one
    assert q.redis.xlen(q.keys["dead"]) == 4  # the stream keeps the newest dead_maxlen, exactly
    dead = q.dead_entries(10)[::-1]  # oldest first
    assert [d["source_id"] for d in dead] == ids[-4:]
    for d, payload in zip(dead[:3], payloads[-3:], strict=True):
        assert d["bytes"] == len(payload) and d["truncated"]
        assert d["data"] == payload[:1024]
        assert d["sha256"] == hashlib.sha256(payload).hexdigest()
    assert dead[3]["data"] == small and not dead[3]["truncated"] and dead[3]["bytes"] == len(small)
    # what the stream holds in memory: ~4 KiB of payloads, not 2 MB
    assert q.redis.memory_usage(q.keys["dead"]) < 64 << 10
    assert q.pending() == []  # acknowledged on the main stream


def test_quarantine_of_a_decoded_tree_is_capped_too(server):
    from cluster.bench.queue import synthetic_tree

    q = ReplayQueue(
        server.url, unique_run("deadq"), password=server.password, block_ms=100, dead_data_bytes=512
    )
    eid = q.push(synthetic_tree("big", 4, 3, 512, seed=0))
    ((got_id, _),) = q.read(5, consumer="c")
    assert got_id == eid
    size = len(q.redis.xrange(q.keys["trees"], min=eid, max=eid)[0][1][b"tree"])
    q.quarantine(eid, "failed in training: boom", consumer="learner")
    (d,) = q.dead_entries(1)
    assert d["source_id"] == eid and d["reason"] == "failed in training: boom"
    assert d["bytes"] == size > 512 and len(d["data"]) == 512 and d["truncated"]
    assert q.pending() == []


def test_bad_caps_are_refused(server):
    from common.errors import QueueError

    with pytest.raises(QueueError, match="dead_maxlen"):
        ReplayQueue(server.url, unique_run("x"), password=server.password, dead_maxlen=0)
