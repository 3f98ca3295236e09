"""The embedded Redis of local runs: a ``redis-server`` child process owned by the run directory.

Everything lives under ``<run_dir>/redis/``:

- ``password``   the password of the ACL user ``treepo`` that every queue client (controller,
                 generators, ``treepo queue inspect``) logs in as; random, mode 0600, created once and
                 reused by every later launcher (a resumed run talks to the same data with the same secret);
- ``admin_password`` the ``default`` user's password (``requirepass``), mode 0600: only this launcher
                 uses it (SHUTDOWN, CONFIG SET on adoption, tests' :meth:`EmbeddedRedis.client`);
- ``redis.conf`` generated config, mode 0600 (it holds ``requirepass`` and the treepo user's
                 password as a SHA-256 hash: no password ever appears on a command line, where ``ps``
                 would show it);
- ``appendonlydir/`` the AOF (Redis 7 multi-part AOF: the queue's contents), the only persistence: RDB snapshots are
                 off (``save ""``) because a periodic fork-and-dump of a multi-GB queue doubles its
                 memory briefly and adds nothing the AOF does not already guarantee; AOF rewrites
                 still use an RDB preamble for a compact file;
- ``endpoint.json`` port and pid of the running server, so ``treepo queue inspect --run-dir``
                 and a second launcher can find it; removed on a clean stop;
- ``redis.log``  the server's log (its tail is quoted when start-up fails).

Least privilege: the ``treepo`` user (:data:`QUEUE_ACL`) may run every command except Redis's
``@dangerous`` category (CONFIG, DEBUG, FLUSHALL, FLUSHDB, SHUTDOWN, KEYS, MONITOR, ACL, MODULE,
REPLICAOF, ...) bar INFO (queue stats read its memory section), SCRIPT FLUSH, SCRIPT DEBUG and
FUNCTION (the queue's Lua scripts run with EVALSHA and SCRIPT LOAD), on keys under ``treepo:`` only,
with no pub/sub channels. A leaked queue password can read and write the queue, not reconfigure, wipe or
stop the server. ``redis/`` is mode 0700 and the server runs with umask 077, so the AOF, its
directory and the log it writes are its owner's only (0600/0700). ``cluster/head_redis.sh`` sets up
the cluster's server the same way.

The server binds 127.0.0.1 on a free port (never 6379, which a Ray head uses), runs with
``maxmemory`` and ``noeviction`` (eviction would silently drop streams: memory is bounded by the
generators' admission control instead), and ``appendfsync`` ``everysec`` (loses ≤ ~1 s on a machine
crash, nothing on a process crash) or ``always``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.errors import QueueError

RAY_REDIS_PORT = 6379
QUEUE_USER = "treepo"
# What the queue's clients need (common/replay.py, common/prompts.py Lua scripts, recovery's SCAN):
# streams, strings, hashes, lists, sets, EVALSHA/SCRIPT LOAD, TIME, SCAN, INFO; nothing dangerous,
# nor SCRIPT FLUSH / SCRIPT DEBUG (wipe every client's scripts, block the server) or FUNCTION (unused).
QUEUE_ACL = "resetchannels ~treepo:* -@all +@all -@dangerous +info -script|flush -script|debug -function"
_APPENDFSYNC = ("everysec", "always", "no")


def _free_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != RAY_REDIS_PORT:
            return port
    raise QueueError("could not find a free TCP port on 127.0.0.1 for the embedded Redis")


def _direct_client(url: str, password: str, timeout_s: float) -> redis.Redis:
    """A client that fails at once (no retries): for probing and shutting down our own server."""
    return redis.Redis.from_url(
        url,
        password=password,  # the user name, if any, comes from the URL
        socket_timeout=timeout_s,
        socket_connect_timeout=min(timeout_s, 2.0),
        retry=Retry(NoBackoff(), 0),
        protocol=2,
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists but not ours
        return True
    # A zombie still "exists": reap it if it is our child; otherwise ask /proc (an orphan's zombie
    # lingers where the init process does not reap, e.g. in some containers).
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _read_password(path: Path) -> str:
    """A password file of the run directory, created (0600) on first use."""
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
    """``(url, password)`` of the embedded Redis of ``run_dir`` (as the queue user) if it is running
    and answers, else None."""
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
    url, password = f"redis://{QUEUE_USER}@127.0.0.1:{port}/0", _read_password(pw_path)
    try:
        client = _direct_client(url, password, 2.0)
        client.ping()
        client.close()
    except redis.RedisError:
        return None
    return url, password


class EmbeddedRedis:
    """Start, stop and restart the run directory's ``redis-server``; use as a context manager.

    ``url``/``password`` are what :class:`common.replay.ReplayQueue` needs: the least-privilege
    ``treepo`` user (its name is in the URL). :meth:`client` logs in as the ``default`` (admin) user.
    ``restart()`` keeps the port, passwords and AOF (tests use it to check that nothing is lost).
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
        adopt: bool = True,
    ) -> None:
        if appendfsync not in _APPENDFSYNC:
            raise QueueError(f"appendfsync must be one of {_APPENDFSYNC}, not {appendfsync!r}")
        if port == RAY_REDIS_PORT:
            raise QueueError(
                f"port {RAY_REDIS_PORT} is the Ray head's Redis port; choose another or leave it unset"
            )
        if maxmemory_mb <= 0:
            raise QueueError(f"maxmemory_mb must be > 0, not {maxmemory_mb}")
        self.dir = Path(run_dir).resolve() / "redis"
        self.appendfsync = appendfsync
        self.maxmemory_mb = int(maxmemory_mb)
        self.port: int | None = port
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.executable = executable
        self.adopt = adopt
        self._proc: subprocess.Popen | None = None
        self._adopted_pid: int | None = None  # a server left running by a process that died
        self._finalizer: weakref.finalize | None = None
        self.password = ""  # the queue user's
        self.admin_password = ""

    # ------------------------------------------------------------------ properties
    @property
    def url(self) -> str:
        """The queue clients' URL: the ``treepo`` user (no password in it)."""
        return f"redis://{QUEUE_USER}@127.0.0.1:{self._port()}/0"

    @property
    def admin_url(self) -> str:
        """The ``default`` (admin) user's URL: for this launcher and tests only."""
        return f"redis://127.0.0.1:{self._port()}/0"

    def _port(self) -> int:
        if self.port is None:
            raise QueueError("the embedded Redis has not been started")
        return self.port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else self._adopted_pid

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def aof_dir(self) -> Path:
        return self.dir / "appendonlydir"

    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._adopted_pid is not None and _pid_alive(self._adopted_pid)

    def client(self, **kwargs) -> redis.Redis:
        """A new redis-py admin client for this server (binary responses; the ``default`` user, every
        command allowed): for tests and maintenance, never handed to the queue's processes."""
        kwargs.setdefault("socket_timeout", 10)
        kwargs.setdefault("socket_connect_timeout", 5)
        kwargs.setdefault("protocol", 2)
        return redis.Redis.from_url(
            self.admin_url, password=self.admin_password, decode_responses=False, **kwargs
        )

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
        self._owner_only()
        other = find_running(self.dir.parent)
        if other is not None:
            if not self.adopt:
                raise QueueError(
                    f"an embedded Redis for {self.dir.parent} is already running at {other[0]} "
                    f"(see {self.dir / 'endpoint.json'}); stop it (`REDISCLI_AUTH=$(cat admin_password) redis-cli -p PORT shutdown`) "
                    "before starting another on the same data"
                )
            return self._adopt(other[1])
        stray = self._stray_pid()
        if stray is not None:
            raise QueueError(
                f"a redis-server (pid {stray}) runs on {self.dir} but does not accept this run's queue "
                "user (started by an older version, or its password files changed): stop it "
                f"(`kill {stray}`: SIGTERM flushes the AOF) and start again"
            )
        self._read_passwords()
        fixed_port = self.port is not None
        reason, log = "", ""
        for _attempt in range(1 if fixed_port else 5):
            port = self.port if fixed_port else _free_port()
            reason, log = self._launch(exe, port)
            if not reason:
                return self
            if "Address already in use" not in log:
                break  # a lost race for a free port is retried; anything else is reported
        if not fixed_port:
            self.port = None
        raise QueueError(
            f"redis-server did not start in {self.dir} ({reason}); last lines of {self.log_path}:\n{log}"
        )

    def _stray_pid(self) -> int | None:
        """The pid in endpoint.json if that process is a live redis-server (that did not answer us)."""
        try:
            info = json.loads((self.dir / "endpoint.json").read_text())
            pid, port = int(info["pid"]), int(info["port"])
            title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, KeyError, TypeError):
            return None
        # redis-server sets its title to "redis-server ADDR:PORT": a reused pid does not match
        name = title.split(" ", 1)[0].rsplit("/", 1)[-1]
        return pid if name == "redis-server" and f":{port}" in title and _pid_alive(pid) else None

    def _owner_only(self) -> None:
        """``redis/`` and an AOF written before (by a build that left it 0644) for this user only; what
        the server writes from now on is created so (umask 077, :meth:`_launch`)."""
        self.dir.chmod(0o700)
        if self.aof_dir.is_dir():
            self.aof_dir.chmod(0o700)
            for f in self.aof_dir.iterdir():
                if f.is_file():
                    f.chmod(0o600)

    def _read_passwords(self) -> None:
        self.password = _read_password(self.dir / "password")
        self.admin_password = _read_password(self.dir / "admin_password")
        if self.admin_password == self.password:
            raise QueueError(
                f"{self.dir / 'admin_password'} equals {self.dir / 'password'}: delete admin_password "
                "(a new one is generated at the next start)"
            )

    def _adopt(self, password: str) -> EmbeddedRedis:
        """Take over the run directory's server left running by a process that died (e.g. a killed
        controller: the server runs in its own session, so it outlives it with all its data)."""
        info = json.loads((self.dir / "endpoint.json").read_text())
        self.port, self._adopted_pid = int(info["port"]), int(info["pid"])
        self._read_passwords()
        if self.password != password:
            raise QueueError(f"{self.dir / 'password'} changed while its server runs")
        client = _direct_client(self.admin_url, self.admin_password, 5.0)
        try:  # apply this launcher's settings; the data and AOF stay as they are
            client.config_set("appendfsync", self.appendfsync)
            client.config_set("maxmemory", f"{self.maxmemory_mb}mb")
        finally:
            client.close()
        return self

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
                f"requirepass {self.admin_password}",
                # the queue's user; its password as a SHA-256 hash ('#'), so not even this file
                # holds it in clear
                f"user {QUEUE_USER} on #{hashlib.sha256(self.password.encode()).hexdigest()} {QUEUE_ACL}",
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

    def _launch(self, exe: str, port: int) -> tuple[str, str]:
        """Start on ``port`` and wait for PING; returns ``("", "")`` or (failure reason, log tail)."""
        conf = self._write_config(port)
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # Own session: a Ctrl-C in the terminal reaches us, and we shut Redis down cleanly (AOF flushed).
        proc = subprocess.Popen(
            [exe, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            umask=0o077,  # the AOF (the queue's contents), its directory and the log: owner only
        )
        self._proc, self.port = proc, port
        deadline = time.monotonic() + self.startup_timeout_s
        client = _direct_client(f"redis://{QUEUE_USER}@127.0.0.1:{port}/0", self.password, 1.0)
        reason = ""
        try:
            while True:
                if proc.poll() is not None:
                    reason = f"exited with code {proc.returncode}"
                    break
                if time.monotonic() > deadline:
                    reason = f"no PING answer within {self.startup_timeout_s:.0f} s"
                    self._kill(proc)
                    break
                try:
                    client.ping()
                    break
                except redis.BusyLoadingError:  # replaying a large AOF: keep waiting
                    pass
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                time.sleep(0.02)
        finally:
            client.close()
        if reason:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            self._proc = None
            return reason, "\n".join(x for x in (err, self._log_tail(since=log_offset)) if x)
        if proc.stderr is not None:
            proc.stderr.close()
        (self.dir / "endpoint.json").write_text(json.dumps({"port": port, "pid": proc.pid}))
        # Safety net for a forgotten stop(): the server must not outlive the interpreter.
        self._finalizer = weakref.finalize(self, EmbeddedRedis._finalize, proc)
        return "", ""

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
        proc, pid = self._proc, self.pid
        if pid is None:
            return
        if self.running():
            with contextlib.suppress(redis.RedisError):  # the signals below finish the job
                _direct_client(self.admin_url, self.admin_password, self.stop_timeout_s).shutdown()
            if proc is not None:
                try:
                    proc.wait(self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    self._kill(proc)
            else:
                self._kill_pid(pid)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc, self._adopted_pid = None, None
        endpoint = self.dir / "endpoint.json"
        try:
            if json.loads(endpoint.read_text()).get("pid") == pid:
                endpoint.unlink()
        except (OSError, ValueError):
            pass

    def _kill_pid(self, pid: int) -> None:
        """Wait for an adopted (not our child) server to exit; TERM then KILL it on timeout."""
        for sig, wait_s in (
            (None, self.stop_timeout_s),
            (signal.SIGTERM, self.stop_timeout_s),
            (signal.SIGKILL, 10.0),
        ):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not _pid_alive(pid):
                    return
                time.sleep(0.02)

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


@contextlib.contextmanager
def queue_endpoint(queue_cfg, run_dir: str | os.PathLike) -> Iterator[tuple[str, str | None]]:
    """``(url, password)`` of a run's Redis from a :class:`common.config.QueueConfig`.

    ``queue.url`` set: that URL, the password read from the ``queue.password_env`` variable (None if
    unset: the URL's own password, if any, applies). Empty: the embedded server of ``run_dir``
    (started, or adopted if left running; stopped when the block exits).
    """
    if queue_cfg.url:
        yield queue_cfg.url, os.environ.get(queue_cfg.password_env) or None
        return
    with EmbeddedRedis(
        run_dir, appendfsync=queue_cfg.appendfsync, maxmemory_mb=queue_cfg.maxmemory_mb
    ) as server:
        yield server.url, server.password
