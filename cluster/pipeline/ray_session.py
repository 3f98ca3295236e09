"""The driver's Ray (``driver=ray``): connect to a cluster or start a private local one, without
letting ``ray.init`` change how the driver process ends on SIGTERM.

``ray.init`` installs two SIGTERM handlers in the driver: a Python one (``sys.exit(15)``) and, when
its core worker starts, abseil's failure-signal handler. On SIGTERM the latter prints a C++ stack
dump ("SIGTERM received") and arms a 3-second alarm that aborts the process (exit status 134, a
crash to any job scheduler) if it is still cleaning up by then, which stopping the actors, Ray and
the embedded Redis always is. :func:`connect_ray` puts back the handler the process had before (the
command line's: cleanup, then exit status 143), which also takes abseil's out of the chain.

A private local Ray's processes (GCS, raylet, their agents) are the driver's children, in its process
group. ``timeout``, ``kill -- -PGID`` or a scheduler that signals every process of a job would stop
them under a driver that is still stopping its actors: its Ray calls then wait for a GCS that is gone
until Ray's core worker ends the process ~60 s later, past every ``finally`` (the embedded Redis left
running). So SIGTERM is blocked while ``ray.init`` starts them (a blocked signal stays blocked across
``exec``: they never see one; Ray blocks SIGINT the same way) and unblocked again in every worker
process Ray starts for the job (:func:`unblock_sigterm`, its setup hook). :func:`shutdown_ray` stops
them with SIGKILL, which they cannot block, instead of Ray's SIGTERM-then-wait.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from common.config import TrainConfig


def connect_ray(cfg: TrainConfig) -> tuple[bool, str | None]:
    """Connect to the Ray cluster named by ``RAY_ADDRESS`` (set inside ``ray job submit``, or by the
    user) or start a private local one; (True if we connected, the session directory of a Ray we
    started). Never attaches to some other cluster that happens to run on this machine (plain
    ``ray.init()`` would join the last ``ray start``)."""
    if ray.is_initialized():
        return False, None
    address = os.environ.get("RAY_ADDRESS") or "local"
    # quiet (log.level=warning): the actors' output stays in Ray's log files, off the console
    # (cluster/logs.py copies a local Ray's into the run directory)
    verbose = cfg.log.level != "warning"
    local = address == "local"
    hook = {"runtime_env": {"worker_process_setup_hook": f"{__name__}.unblock_sigterm"}} if local else {}
    before = signal.getsignal(signal.SIGTERM)
    try:
        with _sigterm_blocked(local):
            ctx = ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=verbose,
                configure_logging=verbose,
                **hook,
            )
    except SystemExit as e:  # SIGTERM while Ray starts reached Ray's handler: end as ours would
        if e.code != signal.SIGTERM:
            raise
        signal.alarm(0)  # abseil's abort timer, armed if the core worker was up already
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        restore_sigterm(before)
    return True, (ctx.address_info.get("session_dir") if local else None)


@contextlib.contextmanager
def _sigterm_blocked(block: bool) -> Iterator[None]:
    """SIGTERM blocked in this thread (and so in the processes it starts) inside the block; one that
    arrives meanwhile is delivered when the block ends."""
    if not block:
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def unblock_sigterm() -> None:
    """Ray's worker set-up hook for a local Ray: its workers (the actors, their engines and reward
    workers) take SIGTERM as usual; they inherited the raylet's blocked mask."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _node_processes() -> dict[int, str]:
    """The processes of the local Ray this driver started and their descendants (agents, workers):
    pid -> start time (so that a reused pid is never signalled)."""
    node = getattr(ray._private.worker, "_global_node", None)
    roots = [i.process.pid for infos in getattr(node, "all_processes", {}).values() for i in infos]
    table: dict[int, tuple[int, str]] = {}
    for d in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            table[int(d.name)] = (int(fields[1]), fields[19])
    found = {pid: table[pid][1] for pid in roots if pid in table}
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def shutdown_ray() -> None:
    """``ray.shutdown()`` of the Ray :func:`connect_ray` started; a local one's processes are stopped
    with SIGKILL (they block SIGTERM, see the module's docstring), their agents included, which
    otherwise linger until they notice the raylet is gone."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not hasattr(node, "kill_all_processes"):
        ray.shutdown()
        return
    processes = _node_processes()
    kill_all = node.kill_all_processes

    def kill_at_once(check_alive: bool = True, allow_graceful: bool = False, wait: bool = False) -> None:
        kill_all(check_alive=check_alive, allow_graceful=False, wait=wait)

    node.kill_all_processes = kill_at_once
    ray.shutdown()
    for pid, start in processes.items():
        with contextlib.suppress(OSError, IndexError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19] == start:
                os.kill(pid, signal.SIGKILL)


def restore_sigterm(before: Any) -> None:
    """Reinstall ``before`` (what ``signal.getsignal`` returned before ``ray.init``) as the SIGTERM
    handler; where it was the default action, Ray's own Python handler stays, without abseil's layer
    under it. Setting a Python handler replaces the C-level one, so abseil's never runs again."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (and ray.init set none from another thread)
    keep = before if before not in (None, signal.SIG_DFL) else signal.getsignal(signal.SIGTERM)
    if keep is not None:
        signal.signal(signal.SIGTERM, keep)
