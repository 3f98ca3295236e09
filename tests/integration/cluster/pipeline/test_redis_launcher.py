"""The embedded redis-server launcher: port, password, AOF location, clean stop, resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import redis
from paths import REPO
from redis.backoff import NoBackoff
from redis.retry import Retry

from cluster.pipeline.redis_launcher import RAY_REDIS_PORT, EmbeddedRedis, find_running
from common.errors import QueueError

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else x


def test_start_secure_persistent_and_stop_leaves_no_process(tmp_path):
    with EmbeddedRedis(tmp_path, appendfsync="always") as server:
        assert server.port != RAY_REDIS_PORT and server.url == f"redis://treepo@127.0.0.1:{server.port}/0"
        pid = server.pid
        assert _alive(pid)
        # A password is required: an unauthenticated command is refused.
        anon = redis.Redis(
            host="127.0.0.1", port=server.port, socket_timeout=5, protocol=2, retry=Retry(NoBackoff(), 0)
        )
        with pytest.raises(redis.AuthenticationError):
            anon.set("k", "v")
        pw_file = tmp_path / "redis" / "password"
        assert pw_file.read_text() == server.password and len(server.password) >= 32
        assert (pw_file.stat().st_mode & 0o777) == 0o600
        assert ((tmp_path / "redis" / "redis.conf").stat().st_mode & 0o777) == 0o600
        c = server.client()
        c.set("k", "v")
        cfg = {_s(k): _s(v) for k, v in c.config_get("*").items()}
        assert cfg["appendonly"] == "yes" and cfg["appendfsync"] == "always"
        assert cfg["maxmemory-policy"] == "noeviction" and cfg["bind"] == "127.0.0.1"
        assert cfg["dir"] == str(tmp_path.resolve() / "redis")
        assert find_running(tmp_path) == (server.url, server.password)
        # A second server on the same data is refused while this one runs.
        with pytest.raises(QueueError, match="already running"):
            EmbeddedRedis(tmp_path, adopt=False).start()
    assert not _alive(pid)
    assert not (tmp_path / "redis" / "endpoint.json").exists() and find_running(tmp_path) is None
    aof = list((tmp_path / "redis" / "appendonlydir").iterdir())
    assert any(p.name.endswith(".manifest") for p in aof) and any(".incr.aof" in p.name for p in aof)
    assert b"k" in b"".join(p.read_bytes() for p in aof)


def test_the_aof_is_for_its_owner_only(tmp_path):
    """The AOF holds the queue's contents: its directory 0700 and its files 0600 after writes and a
    rewrite, whatever the umask of the process that started the server; an AOF left 0644 by an older
    build is tightened at the next start."""
    old = os.umask(0o022)
    try:
        with EmbeddedRedis(tmp_path, appendfsync="always") as server:
            c = server.client()
            c.xadd("treepo:r:trees", {"tree": b"x" * 1000})
            c.bgrewriteaof()  # a new base file and a new incremental file
            for _ in range(250):
                if int(c.info("persistence")["aof_rewrite_in_progress"]) == 0:
                    break
                time.sleep(0.02)
            c.xadd("treepo:r:trees", {"tree": b"y" * 1000})
            root, aof = tmp_path / "redis", tmp_path / "redis" / "appendonlydir"
            modes = {p.name: p.stat().st_mode & 0o777 for p in [root, aof, *aof.iterdir()]}
            assert modes["redis"] == 0o700 and modes["appendonlydir"] == 0o700, modes
            files = {n: m for n, m in modes.items() if n not in ("redis", "appendonlydir")}
            assert len(files) >= 3 and set(files.values()) == {0o600}, files
            assert (root / "redis.log").stat().st_mode & 0o777 == 0o600
        for p in [root, aof, *aof.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        with EmbeddedRedis(tmp_path):
            assert {p.stat().st_mode & 0o777 for p in aof.iterdir()} == {0o600}
            assert root.stat().st_mode & 0o777 == 0o700 and aof.stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(old)


def test_second_launcher_resumes_password_and_data(tmp_path):
    with EmbeddedRedis(tmp_path) as first:
        first.client().set("kept", "yes")
        password = first.password
    with EmbeddedRedis(tmp_path) as second:
        assert second.password == password
        assert second.client().get("kept") == b"yes"


def test_restart_keeps_port_password_and_data(tmp_path):
    with EmbeddedRedis(tmp_path, appendfsync="always") as server:
        port, pid = server.port, server.pid
        server.client().rpush("l", "a", "b")
        server.restart()
        assert server.port == port and server.pid != pid and not _alive(pid)
        assert server.client().lrange("l", 0, -1) == [b"a", b"b"]
        assert json.loads((tmp_path / "redis" / "endpoint.json").read_text())["pid"] == server.pid


def test_clear_errors(tmp_path):
    with pytest.raises(QueueError, match="apt-get install redis-server"):
        EmbeddedRedis(tmp_path, executable="redis-server-not-installed").start()
    with pytest.raises(QueueError, match="Ray head"):
        EmbeddedRedis(tmp_path, port=RAY_REDIS_PORT)
    with pytest.raises(QueueError, match="appendfsync"):
        EmbeddedRedis(tmp_path, appendfsync="sometimes")
    # A server that cannot start (its fixed port is taken) says so and quotes its log.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(QueueError, match="(?s)redis-server did not start.*Address already in use"):
            EmbeddedRedis(tmp_path / "busy", port=busy.getsockname()[1]).start()
    assert find_running(tmp_path / "busy") is None


def test_server_orphaned_by_a_killed_owner_is_adopted_then_stopped(tmp_path):
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from cluster.pipeline.redis_launcher import EmbeddedRedis\n"
            "s = EmbeddedRedis(sys.argv[1], appendfsync='always').start()\n"
            "s.client().set('k', 'v')\n"
            "print(s.pid, flush=True)\n"
            "time.sleep(120)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        pid = int(owner.stdout.readline())
    finally:
        owner.kill()  # SIGKILL: no cleanup runs, the server survives in its own session
        owner.wait(10)
    assert _alive(pid) and find_running(tmp_path) is not None
    server = EmbeddedRedis(tmp_path, appendfsync="everysec").start()
    try:
        assert server.pid == pid and server.running()
        assert server.client().get("k") == b"v"
        assert server.client().config_get("appendfsync")["appendfsync"] in ("everysec", b"everysec")
    finally:
        server.stop()
    assert not server.running() and find_running(tmp_path) is None
