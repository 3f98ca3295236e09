"""Engine processes never outlive their owner.

vLLM's multiprocess engine runs its core in a child process (``VLLM::EngineCore``) that runs the
model in worker processes of its own. The owner (a command, a generator actor) shuts it down in
``VLLMBackend.close``; this module covers the owner dying first (SIGKILL, an OOM kill, a Ray actor
kill), which no ``finally`` survives:

- :func:`mark_owner` records the owner's pid in the environment before the engine starts, so every
  engine process inherits it;
- :func:`vllm_plugin`, registered as a vLLM general plugin (``pyproject.toml``: entry point group
  ``vllm.general_plugins``), runs in every vLLM process; in an engine process of a marked owner it
  starts a watchdog thread that notices its parent going away (the parent pid changes when the
  process is re-parented) and then stops the process: SIGTERM first (vLLM's own graceful shutdown,
  which also stops its workers), SIGKILL of its children and itself after ``GRACE_S``.

A thread that polls the parent pid is used rather than ``PR_SET_PDEATHSIG``, which fires when the
*thread* that started the child exits (Ray runs actor methods in threads of their own).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

OWNER_ENV = "TREEPO_ENGINE_OWNER_PID"
POLL_S = 0.5
GRACE_S = 10.0

_started = False


def mark_owner() -> None:
    """Make this process the owner of the engine processes it starts from now on."""
    os.environ[OWNER_ENV] = str(os.getpid())


def vllm_plugin() -> None:
    """vLLM general-plugin hook: in an engine process of a marked owner, watch the parent."""
    owner = os.environ.get(OWNER_ENV, "")
    if not owner.isdigit() or int(owner) == os.getpid():
        return  # not started by a treepo engine owner, or the owner itself
    watch_parent(os.getppid())


def watch_parent(parent_pid: int, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> None:
    """Start (once per process) a daemon thread that stops this process once ``parent_pid`` is no
    longer its parent."""
    global _started
    if _started:
        return
    _started = True
    threading.Thread(
        target=_watch, args=(parent_pid, poll_s, grace_s), name="treepo-parent-watch", daemon=True
    ).start()


def _watch(parent_pid: int, poll_s: float, grace_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    for pid in children(os.getpid()):
        _kill(pid)
    os.kill(os.getpid(), signal.SIGKILL)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux ``/proc``; empty where it is not available)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def _kill(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
