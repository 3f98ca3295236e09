"""The driver's Ray (``driver=ray``): connect to a cluster or start a private local one, without
letting ``ray.init`` change how the driver process ends on SIGTERM.

``ray.init`` installs two SIGTERM handlers in the driver: a Python one (``sys.exit(15)``) and, when
its core worker starts, abseil's failure-signal handler. On SIGTERM the latter prints a C++ stack
dump ("SIGTERM received") and arms a 3-second alarm that aborts the process (exit status 134, a
crash to any job scheduler) if it is still cleaning up by then, which stopping the actors, Ray and
the embedded Redis always is. :func:`connect_ray` puts back the handler the process had before (the
command line's: cleanup, then exit status 143), which also takes abseil's out of the chain.
"""

from __future__ import annotations

import os
import signal
import threading
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
    before = signal.getsignal(signal.SIGTERM)
    try:
        ctx = ray.init(
            address=address, include_dashboard=False, log_to_driver=verbose, configure_logging=verbose
        )
    except SystemExit as e:  # SIGTERM while Ray starts reached Ray's handler: end as ours would
        if e.code != signal.SIGTERM:
            raise
        signal.alarm(0)  # abseil's abort timer, armed if the core worker was up already
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        restore_sigterm(before)
    return True, (ctx.address_info.get("session_dir") if address == "local" else None)


def restore_sigterm(before: Any) -> None:
    """Reinstall ``before`` (what ``signal.getsignal`` returned before ``ray.init``) as the SIGTERM
    handler; where it was the default action, Ray's own Python handler stays, without abseil's layer
    under it. Setting a Python handler replaces the C-level one, so abseil's never runs again."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (and ray.init set none from another thread)
    keep = before if before not in (None, signal.SIG_DFL) else signal.getsignal(signal.SIGTERM)
    if keep is not None:
        signal.signal(signal.SIGTERM, keep)
