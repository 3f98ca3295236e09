"""Least privilege on the embedded Redis: queue clients log in as the ACL user ``treepo``, which can
run the whole queue (streams, the dispatcher's Lua scripts, stats, recovery's SCAN) and nothing that
reconfigures, wipes or stops the server. Against a real redis-server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis
from paths import REPO
from redis.backoff import NoBackoff
from redis.retry import Retry

from cluster.bench.queue import synthetic_tree
from cluster.pipeline.redis_launcher import QUEUE_ACL, QUEUE_USER, EmbeddedRedis, find_running
from common.errors import QueueError
from common.prompts import PromptDispatcher
from common.replay import ReplayQueue, connect

pytestmark = pytest.mark.integration

REFUSED = [
    ("CONFIG", "SET", "maxmemory", "1mb"),
    ("CONFIG", "GET", "requirepass"),
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("DEBUG", "SLEEP", "0"),
    ("SHUTDOWN", "NOSAVE"),
    ("KEYS", "*"),
    ("ACL", "LIST"),
    ("ACL", "SETUSER", QUEUE_USER, "+@all"),
    ("MONITOR",),
    ("REPLICAOF", "127.0.0.1", "1"),
    ("BGREWRITEAOF",),
    ("CLIENT", "KILL", "TYPE", "normal"),
    ("MODULE", "LIST"),
    ("SCRIPT", "FLUSH"),  # would wipe every client's loaded scripts
    ("SCRIPT", "DEBUG", "SYNC"),  # would block the server in a debugging session
    ("FUNCTION", "FLUSH"),
    ("FUNCTION", "LOAD", "#!lua name=probe\nredis.register_function('probe', function() return 1 end)"),
]


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory):
    with EmbeddedRedis(tmp_path_factory.mktemp("acl"), maxmemory_mb=128) as s:
        yield s


def _no_retry(client: redis.Redis) -> redis.Redis:
    client.set_retry(Retry(NoBackoff(), 0))
    return client


def test_the_queue_runs_as_the_treepo_user(acl_server):
    assert acl_server.url.startswith(f"redis://{QUEUE_USER}@") and acl_server.password not in acl_server.url
    q = ReplayQueue(acl_server.url, "acl-run", password=acl_server.password, block_ms=100)
    assert _no_retry(q.redis).acl_whoami() in (QUEUE_USER, QUEUE_USER.encode())
    ids = [q.push(synthetic_tree(f"t{i}", 4, 2, 8, seed=i)) for i in range(3)]
    assert [i for i, _ in q.read(5, consumer="c")] == ids
    assert q.ack(ids[:2]) == 2 and q.pending() == ids[2:]
    q.quarantine(ids[2], "test", consumer="c")
    assert q.trim_acked() >= 0 and q.stats()["dead_count"] == 1  # INFO memory, XINFO, TIME
    d = PromptDispatcher(q.redis, "acl-run", [f"p{i}" for i in range(10)], seed=0, epochs=1)  # Lua
    got = d.claim("g0", 4)
    assert len(got) == 4 and d.done("g0", *got[0])
    assert d.requeue_generator("g0") == 3
    assert list(q.redis.scan_iter(match="treepo:acl-run:*", count=100))  # recovery's listing
    assert find_running(acl_server.dir.parent) == (acl_server.url, acl_server.password)


@pytest.mark.parametrize("command", REFUSED, ids=lambda c: " ".join(c[:2]))
def test_the_treepo_user_is_refused_dangerous_commands(acl_server, command):
    client = _no_retry(connect(acl_server.url, acl_server.password))
    # DEBUG is also off server-wide (enable-debug-command no): refused before the ACL check
    expected = redis.exceptions.ResponseError if command[0] == "DEBUG" else redis.exceptions.NoPermissionError
    with pytest.raises(expected):
        client.execute_command(*command)
    client.close()
    admin = acl_server.client()
    assert admin.ping() and _s(admin.config_get("maxmemory")["maxmemory"]) == str(128 << 20)


def test_the_queue_lua_scripts_still_run_after_a_refused_script_flush(acl_server):
    """The dispatcher's scripts load (SCRIPT LOAD on a NOSCRIPT) and run (EVALSHA) as the queue user;
    the refused flush leaves them loaded."""
    q = ReplayQueue(acl_server.url, "acl-lua", password=acl_server.password, block_ms=100)
    client = _no_retry(q.redis)
    d = PromptDispatcher(client, "acl-lua", [f"p{i}" for i in range(4)], seed=0, epochs=1)
    assert len(d.claim("g0", 2)) == 2  # loads the claim script
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.script_flush()
    assert len(d.claim("g0", 2)) == 2 and d.requeue_generator("g0") == 4


def test_the_cluster_head_server_has_the_same_acl():
    script = (REPO / "cluster" / "head_redis.sh").read_text()
    assert re.search(rf'^QUEUE_ACL="{re.escape(QUEUE_ACL)}"', script, re.M)


def test_the_treepo_user_is_confined_to_treepo_keys(acl_server):
    client = _no_retry(connect(acl_server.url, acl_server.password))
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set("other-app:key", "x")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.publish("chan", "x")
    client.set("treepo:acl-run:probe", "x")


def test_secrets_are_files_not_arguments(acl_server):
    root = acl_server.dir
    admin = (root / "admin_password").read_text()
    assert admin != acl_server.password and len(admin) >= 32
    for name in ("password", "admin_password", "redis.conf"):
        assert (root / name).stat().st_mode & 0o777 == 0o600
    conf = (root / "redis.conf").read_text()
    assert acl_server.password not in conf  # only its SHA-256
    cmdline = Path(f"/proc/{acl_server.pid}/cmdline").read_bytes().decode(errors="replace")
    assert acl_server.password not in cmdline and admin not in cmdline
    # the admin password does not work for the queue user, nor the reverse
    with pytest.raises(QueueError, match="password"):
        connect(acl_server.url, admin)
    with pytest.raises(QueueError, match="password"):
        connect(acl_server.admin_url, acl_server.password)


def test_a_server_that_refuses_the_queue_user_is_not_doubled(tmp_path):
    with EmbeddedRedis(tmp_path) as first:
        (first.dir / "password").write_text("changed-password-0123456789abcdef")
        with pytest.raises(QueueError, match=f"pid {first.pid}"):
            EmbeddedRedis(tmp_path).start()
        (first.dir / "password").write_text(first.password)
        assert first.running()


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else x
