"""The embedded Redis of local runs: a ``redis-server`` child process owned by the run directory.

Everything lives under ``<run_dir>/redis/``:

- ``password``   random password, mode 0600, created once and reused by every later launcher
                 (a resumed run talks to the same data with the same secret);
- ``redis.conf`` generated config, mode 0600 (it holds ``requirepass``: the password never
                 appears on a command line, where ``ps`` would show it);
- ``appendonlydir/`` the AOF (Redis 7 multi-part AOF), the only persistence: RDB snapshots are
                 off (``save ""``) because a periodic fork-and-dump of a multi-GB queue doubles its
                 memory briefly and adds nothing the AOF does not already guarantee; AOF rewrites
                 still use an RDB preamble for a compact file;
- ``endpoint.json`` port and pid of the running server, so ``treepo queue inspect --run-dir``
                 and a second launcher can find it; removed on a clean stop;
- ``redis.log``  the server's log (its tail is quoted when start-up fails).

The server binds 127.0.0.1 on a free port (never 6379, which a Ray head uses), runs with
``maxmemory`` and ``noeviction`` (eviction would silently drop streams: memory is bounded by the
generators' admission control instead), and ``appendfsync`` ``everysec`` (loses ≤ ~1 s on a machine
crash, nothing on a process crash) or ``always``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path

import redis

from common.errors import QueueError

RAY_REDIS_PORT = 6379
_APPENDFSYNC = ("everysec", "always", "no")


def _free_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != RAY_REDIS_PORT:
            return port
    raise QueueError("could not find a free TCP port on 127.0.0.1 for the embedded Redis")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists but not ours
        return True
    # A zombie child still "exists": reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _read_password(path: Path) -> str:
    """The run directory's password, created (0600) on first use."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise QueueError(f"{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")
    password = path.read_text().strip()
    if not password:
        raise QueueError(f"{path} is empty; delete it to generate a new password (only for a new run)")
    return password


def find_running(run_dir: str | os.PathLike) -> tuple[str, str] | None:
    """``(url, password)`` of the embedded Redis of ``run_dir`` if it is running and answers, else None."""
    root = Path(run_dir) / "redis"
    endpoint, pw_path = root / "endpoint.json", root / "password"
    if not endpoint.exists() or not pw_path.exists():
        return None
    try:
        info = json.loads(endpoint.read_text())
        port, pid = int(info["port"]), int(info["pid"])
    except (ValueError, KeyError, TypeError):
        return None
    if not _pid_alive(pid):
        return None
    url, password = f"redis://127.0.0.1:{port}/0", _read_password(pw_path)
    try:
        client = redis.Redis.from_url(url, password=password, socket_timeout=2, socket_connect_timeout=2)
        client.ping()
        client.close()
    except redis.RedisError:
        return None
    return url, password


class EmbeddedRedis:
    """Start, stop and restart the run directory's ``redis-server``; use as a context manager.

    ``url``/``password`` are what :class:`common.replay.ReplayQueue` needs. ``restart()`` keeps the
    port, password and AOF (tests use it to check that nothing is lost).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        appendfsync: str = "everysec",
        maxmemory_mb: int = 2048,
        port: int | None = None,
        startup_timeout_s: float = 30.0,
        stop_timeout_s: float = 30.0,
        executable: str = "redis-server",
    ) -> None:
        if appendfsync not in _APPENDFSYNC:
            raise QueueError(f"appendfsync must be one of {_APPENDFSYNC}, not {appendfsync!r}")
        if port == RAY_REDIS_PORT:
            raise QueueError(f"port {RAY_REDIS_PORT} is the Ray head's Redis port; choose another or leave it unset")
        if maxmemory_mb <= 0:
            raise QueueError(f"maxmemory_mb must be > 0, not {maxmemory_mb}")
        self.dir = Path(run_dir).resolve() / "redis"
        self.appendfsync = appendfsync
        self.maxmemory_mb = int(maxmemory_mb)
        self.port: int | None = port
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.executable = executable
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None
        self.password = ""

    # ------------------------------------------------------------------ properties
    @property
    def url(self) -> str:
        if self.port is None:
            raise QueueError("the embedded Redis has not been started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def aof_dir(self) -> Path:
        return self.dir / "appendonlydir"

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, **kwargs) -> redis.Redis:
        """A new redis-py client for this server (binary responses)."""
        kwargs.setdefault("socket_timeout", 10)
        kwargs.setdefault("socket_connect_timeout", 5)
        return redis.Redis.from_url(self.url, password=self.password, decode_responses=False, **kwargs)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> EmbeddedRedis:
        if self.running():
            return self
        exe = shutil.which(self.executable)
        if exe is None:
            raise QueueError(
                f"{self.executable!r} not found on PATH: install Redis ≥ 7.0 (Debian/Ubuntu: "
                "`apt-get install redis-server`; macOS: `brew install redis`), or set queue.url to an "
                "existing Redis server"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        other = find_running(self.dir.parent)
        if other is not None:
            raise QueueError(
                f"an embedded Redis for {self.dir.parent} is already running at {other[0]} "
                f"(see {self.dir / 'endpoint.json'}); stop it (`redis-cli -p PORT -a PASSWORD shutdown`) "
                "before starting another on the same data"
            )
        self.password = _read_password(self.dir / "password")
        fixed_port = self.port is not None
        last_error = ""
        for _attempt in range(1 if fixed_port else 5):
            port = self.port if fixed_port else _free_port()
            ok, last_error = self._launch(exe, port)
            if ok:
                return self
            if "Address already in use" not in last_error:
                break
        self.port = self.port if fixed_port else None
        raise QueueError(
            f"redis-server did not start in {self.dir} ({last_error.strip().splitlines()[0] if last_error else ''}); "
            f"last lines of {self.log_path}:\n{self._log_tail()}"
        )

    def _write_config(self, port: int) -> Path:
        conf = "\n".join(
            [
                "bind 127.0.0.1",
                "protected-mode yes",
                f"port {port}",
                "daemonize no",
                f'dir "{self.dir}"',
                f'logfile "{self.log_path}"',
                f'pidfile "{self.dir / "redis.pid"}"',
                f"requirepass {self.password}",
                "appendonly yes",
                'appenddirname "appendonlydir"',
                f"appendfsync {self.appendfsync}",
                "aof-use-rdb-preamble yes",
                'save ""',
                f"maxmemory {self.maxmemory_mb}mb",
                "maxmemory-policy noeviction",
                "",
            ]
        )
        path = self.dir / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(conf)
        os.chmod(path, 0o600)
        return path

    def _launch(self, exe: str, port: int) -> tuple[bool, str]:
        conf = self._write_config(port)
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # Own session: a Ctrl-C in the terminal reaches us, and we shut Redis down cleanly (AOF flushed).
        proc = subprocess.Popen(
            [exe, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._proc, self.port = proc, port
        deadline = time.monotonic() + self.startup_timeout_s
        client = redis.Redis(
            host="127.0.0.1", port=port, password=self.password, socket_timeout=2, socket_connect_timeout=1
        )
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    err += self._log_tail(since=log_offset)
                    self._proc = None
                    return False, err
                try:
                    client.ping()
                    break
                except redis.BusyLoadingError:  # replaying a large AOF: keep waiting
                    pass
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                time.sleep(0.02)
            else:
                self._kill(proc)
                self._proc = None
                return False, f"no PING answer within {self.startup_timeout_s:.0f} s"
        finally:
            client.close()
        if proc.stderr is not None:
            proc.stderr.close()
        (self.dir / "endpoint.json").write_text(json.dumps({"port": port, "pid": proc.pid}))
        # Safety net for a forgotten stop(): the server must not outlive the interpreter.
        self._finalizer = weakref.finalize(self, EmbeddedRedis._finalize, proc)
        return True, ""

    @staticmethod
    def _finalize(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def _kill(self, proc: subprocess.Popen) -> None:
        for sig, wait_s in ((signal.SIGTERM, self.stop_timeout_s), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                return
            proc.send_signal(sig)
            try:
                proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop(self) -> None:
        """SHUTDOWN (the AOF is fsynced), then SIGTERM, then SIGKILL, each with a timeout."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                c = redis.Redis(
                    host="127.0.0.1",
                    port=self.port,
                    password=self.password,
                    socket_timeout=self.stop_timeout_s,
                    socket_connect_timeout=2,
                )
                c.shutdown()
            except redis.RedisError:
                pass  # the signals below finish the job
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self._kill(proc)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc = None
        endpoint = self.dir / "endpoint.json"
        try:
            if json.loads(endpoint.read_text()).get("pid") == proc.pid:
                endpoint.unlink()
        except (OSError, ValueError):
            pass

    def restart(self) -> None:
        """Stop and start again on the same port with the same password and AOF."""
        self.stop()
        self.start()

    def _log_tail(self, lines: int = 20, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedRedis({self.dir}, port={self.port}, pid={self.pid}, appendfsync={self.appendfsync})"
