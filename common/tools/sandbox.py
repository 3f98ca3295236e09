"""The ``python`` tool: a snippet of Python run in a limited child process, its output as the result.

Each call runs ``python -I -S -B`` (isolated: no environment variables, no site-packages, no
bytecode written) in a fresh temporary directory, its working directory, removed afterwards, with:

- a wall-clock timeout (``timeout_s``): the whole process group is killed;
- a CPU-time limit (``RLIMIT_CPU``, ``timeout_s`` rounded up) and an address-space limit
  (``RLIMIT_AS``, ``memory_mb``), a file-size limit (``RLIMIT_FSIZE``, ``file_mb``);
- output read as it comes, at most ``output_bytes`` of it: beyond that the process is killed (a
  program printing 100 MB costs what it prints before the cap, never 100 MB of memory here);
- no network, no new processes and no writes outside its directory: an audit hook installed before
  the code runs refuses them (:mod:`common.tools.sandbox_child` lists what it refuses and its limits).

The result is the program's standard output (its last newline dropped). Every failure is the text
``error: <reason>`` (a time out, the memory limit, a refused operation, an exception, a non-zero exit),
never an exception in the caller, and the next call runs as usual.
"""

from __future__ import annotations

import contextlib
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError
from common.tools.sandbox_child import SNIPPET

CHILD = Path(__file__).with_name("sandbox_child.py")
_ERR_TAIL = 4096  # bytes of standard error kept (its last line names the exception)
_ERR_MAX = 1 << 20  # a program writing more than this to standard error is stopped


@dataclass(frozen=True)
class SandboxLimits:
    """The limits of one python tool call."""

    timeout_s: float = 5.0
    memory_mb: int = 256
    output_bytes: int = 16 * 1024
    file_mb: int = 16

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"python tool timeout_s={self.timeout_s}: it must be > 0 seconds")
        if self.memory_mb < 32:
            raise ConfigError(f"python tool memory_mb={self.memory_mb}: the interpreter needs >= 32 MiB")
        if self.output_bytes < 1 or self.file_mb < 1:
            raise ConfigError("python tool output_bytes and file_mb must be >= 1")


@dataclass
class _Run:
    """What a child wrote and how it ended."""

    out: bytearray
    err: bytearray
    returncode: int | None = None
    timed_out: bool = False
    out_capped: bool = False
    err_capped: bool = False


class PythonSandbox:
    """The ``python`` tool: ``PythonSandbox(limits)(code) -> str`` (thread-safe: one process per call)."""

    def __init__(self, limits: SandboxLimits | None = None):
        self.limits = limits or SandboxLimits()

    def __call__(self, code: str) -> str:
        if not isinstance(code, str):
            return f"error: the code must be text, not {type(code).__name__}"
        workdir = tempfile.mkdtemp(prefix="treepo-python-")
        try:
            Path(workdir, SNIPPET).write_text(code, encoding="utf-8")
            run = self._run(workdir)
        except OSError as e:
            return f"error: could not start python ({e})"
        finally:
            remove_tree(workdir)
        return describe(run, self.limits)

    def _run(self, workdir: str) -> _Run:
        lim = self.limits
        cmd = [
            sys.executable,
            "-I",
            "-S",
            "-B",
            "-X",
            "utf8",
            str(CHILD),
            workdir,
            str(math.ceil(lim.timeout_s)),
            str(lim.memory_mb << 20),
            str(lim.file_mb << 20),
        ]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a kill reaches everything it started
            close_fds=True,
        )
        try:
            run = _collect(proc, lim)
        finally:
            _kill_group(proc)
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]
        run.returncode = proc.wait()
        return run


def _collect(proc: subprocess.Popen, lim: SandboxLimits) -> _Run:
    """Read the child's output until it closes both pipes, the deadline passes or a cap is reached."""
    run = _Run(bytearray(), bytearray())
    deadline = time.monotonic() + lim.timeout_s
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")  # type: ignore[arg-type]
    sel.register(proc.stderr, selectors.EVENT_READ, "err")  # type: ignore[arg-type]
    err_total = 0
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                run.timed_out = True
                break
            for key, _ in sel.select(timeout=left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.data == "out":
                    run.out += chunk[: lim.output_bytes + 1 - len(run.out)]
                    run.out_capped = len(run.out) > lim.output_bytes
                else:
                    err_total += len(chunk)
                    run.err = (run.err + chunk)[-_ERR_TAIL:]
                    run.err_capped = err_total > _ERR_MAX
            if run.out_capped or run.err_capped:
                break
    finally:
        sel.close()
    return run


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)


def describe(run: _Run, lim: SandboxLimits) -> str:
    """The tool result of a finished run: its output, or ``error: <reason>``."""
    if run.timed_out:
        return f"error: timed out after {lim.timeout_s:g} s"
    if run.out_capped:
        text = bytes(run.out[: lim.output_bytes]).decode("utf-8", "replace")
        return f"{text}\n[output cut at {lim.output_bytes} bytes: the program was stopped]"
    if run.err_capped:
        return f"error: more than {_ERR_MAX >> 20} MiB written to standard error: the program was stopped"
    code = run.returncode or 0
    if code < 0:
        return _signal_error(-code, lim)
    if code > 0:
        return _exit_error(code, bytes(run.err).decode("utf-8", "replace"), lim)
    return bytes(run.out).decode("utf-8", "replace").rstrip("\n")  # print's last newline


def _signal_error(signum: int, lim: SandboxLimits) -> str:
    if signum == signal.SIGXCPU:
        return f"error: CPU time limit ({math.ceil(lim.timeout_s)} s) reached"
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return f"error: killed by {name}"


def _exit_error(code: int, err: str, lim: SandboxLimits) -> str:
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if last.startswith("MemoryError"):
        return f"error: MemoryError (memory limit {lim.memory_mb} MiB)"
    if last and not last.startswith(("File ", "Traceback")):
        return f"error: {last[:300]}"
    return f"error: exit code {code}"


def remove_tree(path: str) -> None:
    """Remove a work directory, whatever permissions the program left on the folders inside it."""
    for folder, subfolders, _files in os.walk(path):
        for name in [".", *subfolders]:
            with contextlib.suppress(OSError, NotImplementedError):
                os.chmod(os.path.join(folder, name), 0o700, follow_symlinks=False)
    shutil.rmtree(path, ignore_errors=True)


__all__ = ["CHILD", "PythonSandbox", "SandboxLimits", "describe", "remove_tree"]
