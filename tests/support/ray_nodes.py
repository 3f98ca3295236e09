"""Real Ray nodes for integration tests: ``ray start --block`` processes that tests own and stop.

Several Ray clusters may run on one machine at the same time (other test sessions, people): every
port a node binds is chosen free here instead of Ray's defaults (6379, 8265, 10001, ...), each node
gets its own short ``--temp-dir`` (unix socket paths are limited to ~107 characters), and a node is
stopped by killing ITS process group — never ``ray stop``, which stops every Ray process of the user.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY_BIN = str(Path(sys.executable).with_name("ray"))
# Token authentication with a token of our own, passed to every node and client through the
# environment: the user's ~/.ray/auth_token may exist or not, and a head started while it exists
# turns token auth on while nodes joining it would not (they fail with InvalidAuthToken).
AUTH_TOKEN = secrets.token_hex(32)
WORKER_PORTS = 200  # worker processes bind one port each; a pipeline run starts a few dozen at most


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _range_is_free(lo: int, hi: int) -> bool:
    for port in range(lo, hi + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                return False
    return True


def free_port_range(n: int = WORKER_PORTS) -> tuple[int, int]:
    """``n`` consecutive ports that are free right now (a random block, so parallel sessions differ)."""
    import random

    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(100):
        lo = rng.randrange(20000, 30000 - n)  # below the kernel's ephemeral range (32768+)
        if _range_is_free(lo, lo + n - 1):
            return lo, lo + n - 1
    raise RuntimeError(f"no block of {n} free ports found for Ray workers")


def port_flags() -> list[str]:
    """``ray start`` flags that put every port a node binds (besides the head's own) on a free one."""
    lo, hi = free_port_range()
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--min-worker-port={lo}",
        f"--max-worker-port={hi}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``ray`` commands and clients of these nodes: this venv first on PATH (the
    job entrypoint's ``python`` and every worker resolve to it), no inherited cluster address, the
    nodes' auth token."""
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=AUTH_TOKEN)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.update(extra or {})
    return env


class RayNode:
    """One ``ray start --block`` process (head or worker) in its own process group."""

    def __init__(
        self,
        *,
        num_cpus: int,
        resources: dict[str, float] | None = None,
        head_address: str | None = None,
        object_store_mb: int = 256,
        start_timeout_s: float = 90.0,
        attempts: int = 2,
    ) -> None:
        self.head = head_address is None
        self._args = (num_cpus, resources or {}, head_address, object_store_mb)
        for attempt in range(attempts):
            try:
                self._start(start_timeout_s)
                return
            except RuntimeError:
                # `ray start` gives the raylet a fixed 30 s to register: a busy machine can miss it
                if attempt == attempts - 1:
                    raise

    def _start(self, timeout_s: float) -> None:
        num_cpus, resources, head_address, object_store_mb = self._args
        # short: Ray puts unix sockets under <temp dir>/session_*/sockets/
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        cmd = [
            RAY_BIN,
            "start",
            "--block",
            "--disable-usage-stats",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
            f"--temp-dir={self.temp_dir}",
            f"--object-store-memory={object_store_mb * 1024 * 1024}",
            *port_flags(),
        ]
        if self.head:
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            cmd += [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ]
        else:
            cmd += [f"--address={head_address}"]
        self.log_path = Path(self.temp_dir) / "ray_start.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=node_env(), start_new_session=True
        )
        self._wait_started(timeout_s)

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def _wait_started(self, timeout_s: float) -> None:
        # `ray start --block` prints this once the node's processes are up, then blocks
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{tail}")
            if "Ray runtime started" in self.log_tail(100_000):
                return
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"ray start did not come up within {timeout_s:.0f} s:\n{tail}")

    def _session_pids(self) -> list[int]:
        """Processes still running with this node's temp dir on their command line (workers that left
        the process group); all of them were started by this node."""
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if self.temp_dir.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
        return pids

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM to the node's process group (raylet, GCS, dashboard, workers), then SIGKILL."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL below either way
                self.proc.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        for pid in self._session_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def in_process_ray(num_cpus: int):
    """A local Ray in this process with ``num_cpus`` logical CPUs, shut down on exit; an already
    initialised one is used as it is (and left running)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def small_pipeline_overrides(run_dir, model_dir, *extra: str) -> list[str]:
    """``key=value`` overrides of the small pipeline the Ray tests run (1 generator, 1 learner rank,
    2 prompts of 4 leaves per step, random-init tiny model)."""
    return [
        f"run_dir={run_dir}",
        f"model.path={model_dir}",
        "driver=ray",
        "data.epochs=1",
        "generators.kv_cache_gib=0.25",
        "generators.trees_in_flight=4",
        "tree.w=4",
        "tree.d=2",
        "tree.l=32",
        "tree.max_response_tokens=64",
        "learner.prompts_per_step=2",
        "learner.mini_batch_prompts=2",
        "algo.dynamic_sampling=false",
        "algo.max_staleness=1",
        "eval.every_steps=0",
        "log.progress=false",
        "log.backends=[]",
        "reward.workers=1",
        *extra,
    ]


@contextlib.contextmanager
def connected(head: RayNode):
    """This process as a driver of ``head``'s cluster (its token in the environment), disconnected
    on exit with the environment and Ray's authentication state as they were. Ray reads the token
    settings once per process, so they are re-read on the way in and out (an in-process Ray started
    later must not ask for a token)."""
    import ray
    from ray._private.authentication_test_utils import reset_auth_token_state

    saved = {k: os.environ.get(k) for k in (*node_env(), "RAY_ADDRESS")}
    os.environ.update(node_env())
    os.environ.pop("RAY_ADDRESS", None)
    reset_auth_token_state()
    try:
        ray.init(address=head.gcs_address, log_to_driver=False)
        yield ray
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_auth_token_state()
