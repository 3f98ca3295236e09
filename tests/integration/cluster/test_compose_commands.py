"""The compose cluster's commands, run on this machine as real processes: no Docker engine is needed.

Every command, healthcheck and environment comes from docker-compose.yml after compose's interpolation
(``load_compose``); nothing is re-typed here. What differs from a container is substituted
programmatically, and each substitution first checks that its target is there (a changed compose file
fails here instead of silently testing something else):

- container ports (Redis 6390, Ray GCS 6379, dashboard 8265) become free ports, never 6379 itself:
  other test sessions and people run Ray and Redis on this machine;
- service host names (``redis``, ``ray-head``) become 127.0.0.1, and ``0.0.0.0`` binds become 127.0.0.1;
- volume mount points become temporary folders;
- host-only flags are appended to ``ray start``: a short ``--temp-dir`` of our own, the node address,
  and free ports for every other port a Ray node binds.

Each process runs in its own process group and is stopped by killing that group (then any process
still naming our temp dir): never ``ray stop``, which would stop every Ray node of the user.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from compose_files import flag, load_compose, redis_port, train_argv
from ray_nodes import RAY_BIN, free_port, port_flags

pytestmark = pytest.mark.integration

redis = pytest.importorskip("redis")
from redis.backoff import NoBackoff  # noqa: E402
from redis.retry import Retry  # noqa: E402

NO_RETRY = Retry(NoBackoff(), 0)  # a refused AUTH fails at once instead of after retries

# Fresh secrets in the charset the redis command accepts; the sessions' environment is not used.
ENV = {"TREEPO_REDIS_PASSWORD": secrets.token_hex(24), "TREEPO_RAY_AUTH_TOKEN": secrets.token_hex(32)}
VENV_BIN = str(Path(sys.executable).parent)


# ------------------------------------------------------------------ helpers


def substitute(value, mapping: dict[str, str]):
    """Replace each key of ``mapping`` in a string or list of strings; every key must occur."""
    items = [value] if isinstance(value, str) else list(value)
    for old, new in mapping.items():
        assert any(old in x for x in items), f"{old!r} not found in {value!r}: the compose file changed"
        items = [x.replace(old, new) for x in items]
    return items[0] if isinstance(value, str) else items


def host_env(service: dict, volumes: dict[str, Path]) -> dict[str, str]:
    """This machine's environment plus the service's (mount points mapped to ``volumes``), this venv
    first on PATH, and no inherited Ray cluster address or token file."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", *ENV)
    }
    for key, value in (service.get("environment") or {}).items():
        for target, path in volumes.items():
            if value == target or value.startswith(target + "/"):
                value = str(path) + value[len(target) :]
        env[key] = str(value)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def mounts(service: dict, root: Path) -> dict[str, Path]:
    """The service's named-volume mount points -> folders under ``root``."""
    out = {}
    for spec in service.get("volumes", []):
        name, target = spec.split(":")[:2]
        out[target] = root / name
        out[target].mkdir(parents=True, exist_ok=True)
    return out


class Proc:
    """A command in its own process group, output to a log file; ``stop`` ends the group and any
    process left that names ``owned_marker`` (e.g. a Ray temp dir) on its command line."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, owned_marker: str = "") -> None:
        self.argv, self.log, self.owned_marker = argv, log, owned_marker
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while needle not in self.text():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.argv[:3]} exited with {self.proc.returncode}:\n{self.text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {needle!r} from {self.argv[:3]} in {timeout_s:.0f} s:\n{self.text()[-3000:]}"
                )
            time.sleep(0.3)

    def terminate(self) -> None:
        """SIGTERM to the command itself, as `docker compose stop` (through the init process) sends it:
        `ray start --block` then shuts its node down in ~2 s, while signalling the whole group at once
        leaves it waiting on its dying children for much longer."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.owned_marker:  # workers a raylet started in a session of their own
            marker = self.owned_marker.encode()
            for d in Path("/proc").iterdir():
                if d.name.isdigit() and int(d.name) != os.getpid():
                    with contextlib.suppress(OSError):
                        if marker in (d / "cmdline").read_bytes():
                            os.kill(int(d.name), signal.SIGKILL)
        self._out.close()


def run_healthcheck(
    test: list[str], env: dict[str, str], timeout_s: float = 30
) -> subprocess.CompletedProcess:
    """A compose healthcheck ``test`` (CMD or CMD-SHELL form) as compose would run it in the container."""
    kind, *rest = test
    argv = ["sh", "-c", rest[0]] if kind == "CMD-SHELL" else rest
    assert kind in ("CMD", "CMD-SHELL"), test
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)


# ------------------------------------------------------------------ redis


@contextlib.contextmanager
def redis_service(
    root: Path, password: str = ENV["TREEPO_REDIS_PASSWORD"]
) -> Iterator[tuple[Proc, int, dict]]:
    """The redis service's command, on a free port with its data volume in ``root``."""
    doc = load_compose({**ENV, "TREEPO_REDIS_PASSWORD": password})
    service = doc["services"]["redis"]
    vols = mounts(service, root)
    port = free_port()
    cmd = substitute(
        service["command"],
        {
            f"--port {redis_port(doc)}": f"--port {port}",
            "--bind 0.0.0.0": "--bind 127.0.0.1",
            "--dir /data": f"--dir {vols['/data']}",
        },
    )
    env = host_env(service, vols)
    proc = Proc(cmd, env, root / f"redis-{port}.log")
    hc = substitute(service["healthcheck"]["test"], {f"-p {redis_port(doc)}": f"-p {port}"})
    try:
        yield proc, port, {"env": env, "healthcheck": hc}
    finally:
        proc.stop()


def wait_ready(port: int, password: str, proc: Proc, timeout_s: float = 30) -> redis.Redis:
    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        username="treepo",
        password=password,
        socket_timeout=5,
        decode_responses=True,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return client
        except (redis.ConnectionError, redis.BusyLoadingError):
            assert proc.proc.poll() is None, f"redis exited {proc.proc.returncode}:\n{proc.text()}"
            assert time.monotonic() < deadline, proc.text()
            time.sleep(0.05)


def test_redis_command_auth_aof_noeviction_and_healthcheck(tmp_path):
    pw = ENV["TREEPO_REDIS_PASSWORD"]
    with redis_service(tmp_path) as (proc, port, extra):
        client = wait_ready(port, pw, proc)
        with pytest.raises(redis.AuthenticationError):  # no password: refused
            redis.Redis(host="127.0.0.1", port=port, retry=NO_RETRY).set("k", "v")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, password="wrong-password-123", retry=NO_RETRY).ping()
        with pytest.raises(redis.exceptions.NoPermissionError):  # the queue user is no admin
            client.config_get("appendonly")
        assert client.info("persistence")["aof_enabled"] == 1
        assert client.info("memory")["maxmemory_policy"] == "noeviction"
        assert client.info("server")["tcp_port"] == port
        # `exec` made redis-server the process compose signals, and argv never holds the password
        cmdline = Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes()
        assert b"redis-server" in cmdline and pw.encode() not in cmdline
        assert run_healthcheck(extra["healthcheck"], extra["env"]).returncode == 0
        wrong_env = {**extra["env"], "TREEPO_REDIS_PASSWORD": "wrong-password-123"}
        assert run_healthcheck(extra["healthcheck"], wrong_env).returncode != 0
        client.xadd("treepo:probe", {"v": "1"})
        client.close()
        # `docker compose stop` sends SIGTERM: the AOF is flushed, and the entry survives a restart
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(20) == 0, proc.text()
    assert list((tmp_path / "redis-data" / "appendonlydir").iterdir())
    with redis_service(tmp_path) as (proc, port, _):
        client = wait_ready(port, pw, proc)
        assert client.xlen("treepo:probe") == 1
        client.close()


def test_redis_command_refuses_a_weak_password(tmp_path):
    for bad in ("short", "has space in the password"):
        with redis_service(tmp_path, password=bad) as (proc, _, _):
            assert proc.proc.wait(10) == 2
            assert "TREEPO_REDIS_PASSWORD" in proc.text()


# ------------------------------------------------------------------ ray head + worker + submitter


def ray_node(service: dict, subs: dict[str, str], root: Path, name: str, head: bool) -> Proc:
    """The service's ``ray start`` with ``subs`` applied and this machine's extra flags appended."""
    cmd = substitute(service["command"], subs)
    assert cmd[:2] == ["ray", "start"]
    temp_dir = tempfile.mkdtemp(prefix="rcz", dir="/tmp")  # short: Ray's unix sockets live below it
    extra = [f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *port_flags()]
    if head:
        extra.append(f"--ray-client-server-port={free_port()}")
    env = host_env(service, mounts(service, root))
    return Proc([RAY_BIN, *cmd[1:], *extra], env, root / f"{name}.log", owned_marker=temp_dir)


def alive_nodes(status: str) -> int:
    """Nodes in the "Active:" section of `ray status` output."""
    if "Active:" not in status:
        return 0
    active = status.split("Active:", 1)[1].split("Pending:", 1)[0]
    return len(re.findall(r"^\s*\d+\s+node_[0-9a-f]+", active, re.M))


JOB = """
import json, os, sys
import ray, redis
ray.init()
alive = [n for n in ray.nodes() if n["Alive"]]
head = [n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"]]
client = redis.Redis.from_url(sys.argv[1], password=os.environ.get(sys.argv[2]), socket_timeout=10)
print("JOB_RESULT", json.dumps({
    "nodes": len(alive),
    "cpus": ray.cluster_resources().get("CPU", 0),
    "driver_on_head": ray.get_runtime_context().get_node_id() in head,
    "redis_ping": client.ping(),
}))
"""


@pytest.mark.slow  # ~35 s: two Ray nodes start and a job runs
@pytest.mark.timeout(600)
def test_ray_head_worker_and_submitter_commands(tmp_path):
    from common.config import QueueConfig

    doc = load_compose(ENV)
    s = doc["services"]
    head_cmd, worker_cmd = s["ray-head"]["command"], s["ray-worker"]["command"]
    gcs, dash = flag(head_cmd, "--port"), flag(head_cmd, "--dashboard-port")
    my_gcs, my_dash = free_port(), free_port()
    nodes: list[Proc] = []
    t0 = time.monotonic()
    with redis_service(tmp_path) as (redis_proc, rport, _):
        wait_ready(rport, ENV["TREEPO_REDIS_PASSWORD"], redis_proc).close()
        try:
            # head: compose starts it once redis is healthy
            head = ray_node(
                s["ray-head"],
                {
                    f"--port={gcs}": f"--port={my_gcs}",
                    f"--dashboard-port={dash}": f"--dashboard-port={my_dash}",
                    "--dashboard-host=0.0.0.0": "--dashboard-host=127.0.0.1",
                },
                tmp_path,
                "head",
                head=True,
            )
            nodes.append(head)
            head.wait_for("Ray runtime started", 180)
            t_head = time.monotonic() - t0

            # its healthcheck: passes once the job API is up, and fails with a wrong token
            hc = substitute(
                s["ray-head"]["healthcheck"]["test"], {f"127.0.0.1:{dash}": f"127.0.0.1:{my_dash}"}
            )
            head_env = host_env(s["ray-head"], mounts(s["ray-head"], tmp_path))
            deadline = time.monotonic() + 60
            while (r := run_healthcheck(hc, head_env)).returncode != 0:
                assert time.monotonic() < deadline, r.stderr
                time.sleep(1)
            bad = run_healthcheck(hc, {**head_env, "RAY_AUTH_TOKEN": "0" * 64})
            assert bad.returncode != 0 and re.search(r"HTTP Error 40[13]", bad.stderr), bad.stderr

            # worker: compose starts it once the head is healthy
            worker = ray_node(
                s["ray-worker"],
                {f"--address=ray-head:{gcs}": f"--address=127.0.0.1:{my_gcs}"},
                tmp_path,
                "worker",
                head=False,
            )
            nodes.append(worker)
            worker.wait_for("Ray runtime started", 180)
            status = ""
            deadline = time.monotonic() + 60
            while alive_nodes(status) < 2:
                assert time.monotonic() < deadline, status
                status = subprocess.run(
                    [RAY_BIN, "status", "--address", f"127.0.0.1:{my_gcs}"],
                    env=head_env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                ).stdout
                time.sleep(1)
            assert alive_nodes(status) == 2, status
            t_cluster = time.monotonic() - t0

            # submitter: its `ray job submit` prefix, with a trivial job in place of `treepo train` that
            # checks where the job runs and that it reaches the queue with the URL and password the
            # compose file gives it (the password comes from the head's environment)
            entry = s["submitter"]["entrypoint"]
            submit = substitute(
                entry[: entry.index("--")],
                {f"http://ray-head:{dash}": f"http://127.0.0.1:{my_dash}", "/app": str(tmp_path / "job")},
            )
            (tmp_path / "job").mkdir()
            (tmp_path / "job" / "README").write_text("working dir of a test job\n")
            url = urlsplit(next(a.split("=", 1)[1] for a in train_argv(doc) if a.startswith("queue.url=")))
            assert url.hostname in s and url.port == redis_port(doc), url
            assert url.username == "treepo"
            local_url = url._replace(netloc=f"{url.username}@127.0.0.1:{rport}").geturl()
            job = subprocess.run(
                [*submit, "--", "python", "-c", JOB, local_url, QueueConfig().password_env],
                env=host_env(s["submitter"], {}),
                capture_output=True,
                text=True,
                timeout=300,
            )
            out = job.stdout + job.stderr
            assert job.returncode == 0, out[-4000:]
            result = json.loads(re.search(r"JOB_RESULT (\{.*\})", out)[1])
            expected_cpus = float(flag(head_cmd, "--num-cpus")) + float(flag(worker_cmd, "--num-cpus"))
            assert result == {
                "nodes": 2,
                "cpus": expected_cpus,
                "driver_on_head": True,
                "redis_ping": True,
            }, out
            print(
                f"head up {t_head:.1f} s, 2 nodes {t_cluster:.1f} s, job done {time.monotonic() - t0:.1f} s"
            )
        finally:
            t_stop = time.monotonic()
            for proc in nodes:
                proc.terminate()
            for proc in reversed(nodes):
                proc.stop()
                shutil.rmtree(proc.owned_marker, ignore_errors=True)
            print(f"nodes stopped in {time.monotonic() - t_stop:.1f} s")
