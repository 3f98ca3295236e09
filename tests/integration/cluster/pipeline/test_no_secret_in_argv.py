"""No secret on a command line or in a Ray actor's arguments or environment.

- The embedded redis-server and ``treepo bench queue``'s redis-benchmark are spawned for real; their
  argv (what ``ps`` shows) holds neither the queue's nor the admin's password.
- A generator actor is created through :func:`cluster.pipeline.topology.start_generator` on a real
  local Ray; the arguments it receives (what Ray stored in the GCS), its command line and its
  environment hold no password, and it reads the password from the run directory's 0600 file. The
  actor class is a stand-in with the generator's constructor signature (the real one needs an engine);
  the wiring, Ray and the file are real.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
from ray_nodes import in_process_ray

from cluster.bench import queue as bench_queue
from common.errors import QueueError
from common.replay import SecretFile, resolve_password

pytestmark = pytest.mark.integration


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _environ(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode(errors="replace")


def test_redis_server_argv_has_no_password(server):
    argv = _cmdline(server.pid)
    assert "redis-server" in argv
    assert server.password not in argv and server.admin_password not in argv


@pytest.mark.skipif(not shutil.which("redis-benchmark"), reason="redis-benchmark is not installed")
def test_redis_benchmark_argv_has_no_password(server, monkeypatch):
    spawned: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(argv, *a, **kw):  # records, then runs the real redis-benchmark
        spawned.append([str(x) for x in argv])
        return real_run(argv, *a, **kw)

    monkeypatch.setattr(bench_queue.subprocess, "run", recording_run)
    rps = bench_queue._redis_benchmark(server, 1000, 2000, 1)
    assert rps is not None and rps > 0
    (argv,) = spawned
    assert Path(argv[0]).name == "redis-benchmark"
    line = " ".join(argv)
    assert server.password not in line and server.admin_password not in line
    # its one-use user is gone once it has run
    user = argv[argv.index("--user") + 1]
    users = [u.decode() if isinstance(u, bytes) else u for u in server.client().acl_users()]
    assert user.startswith("bench-") and user not in users
    # against a --url server (no admin rights) there is no baseline rather than a password in argv
    spawned.clear()
    assert bench_queue._redis_benchmark(None, 1000, 10, 1) is None and spawned == []


def test_secret_file_round_trip_and_refusals(tmp_path):
    secret = SecretFile.write(tmp_path, "the-queue-password-0123456789")
    assert secret.read() == "the-queue-password-0123456789" == resolve_password(secret)
    assert "0123456789" not in repr(secret)
    assert (tmp_path / "secrets").stat().st_mode & 0o777 == 0o700
    assert Path(secret.path).stat().st_mode & 0o777 == 0o600
    assert resolve_password("by-value") == "by-value" and resolve_password(None) is None
    os.chmod(secret.path, 0o644)
    with pytest.raises(QueueError, match="chmod 600"):
        secret.read()
    secret.remove()
    with pytest.raises(QueueError, match="every Ray node shares"):
        secret.read()


@pytest.fixture(scope="module")
def ray_local():
    pytest.importorskip("ray")
    with in_process_ray(1) as ray:
        yield ray


def test_generator_actor_gets_no_password(ray_local, tmp_path, monkeypatch):
    from cluster.pipeline import topology
    from common.config import load_config

    ray = ray_local

    # defined here so that Ray ships it by value (a test module is not importable on its workers)
    class StandInGenerator:
        """The generator's constructor signature; keeps what Ray handed it."""

        def __init__(self, cfg, generator_id, queue_url, queue_password, run_name, *, backend=None):
            self.received = pickle.dumps((cfg, generator_id, queue_url, queue_password, run_name))
            self.password = resolve_password(queue_password)

        def report(self):
            return self.received, self.password, os.getpid()

    password = "queue-password-that-must-not-leak-0123456789"
    monkeypatch.setenv("TREEPO_REDIS_PASSWORD", password)
    monkeypatch.setattr(topology, "Generator", StandInGenerator)
    cfg = load_config(
        "configs/demo.yaml",
        [f"run_dir={tmp_path}", "queue.url=redis://treepo@127.0.0.1:6390/0", "generators.gpus_per_engine=0"],
    )
    with pytest.raises(TypeError, match="SecretFile"):
        topology.start_generator(cfg, 0, cfg.queue.url, password, "run")
    secret = SecretFile.write(tmp_path.resolve(), password)
    actor = topology.start_generator(cfg, 0, cfg.queue.url, secret, "run")
    try:
        received, got, pid = ray.get(actor.report.remote(), timeout=120)
        assert got == password  # read from the file on the actor's node
        assert password.encode() not in received  # not in what Ray stored and delivered
        assert password not in _cmdline(pid) and password not in _environ(pid)
    finally:
        ray.kill(actor, no_restart=True)
    # the pipeline's shutdown removes the file
    topology.shutdown(topology.Topology([], [], None, queue_secret=secret))
    assert not Path(secret.path).exists()
