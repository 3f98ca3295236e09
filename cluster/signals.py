"""How a command ends on a signal: SIGTERM like Ctrl-C (the ``finally`` blocks run), and a cleanup
that, once begun, runs to its end.

A job scheduler (SIGTERM), ``timeout`` (SIGTERM to the whole process group) or a person at the
terminal (Ctrl-C: SIGINT to the process group) may signal a command at any moment, also while it is
already stopping its actors, Ray and the embedded Redis after its last step. Raising there would cut
that cleanup short and leave a ``redis-server`` or Ray's processes running. So:

- :func:`sigterm_as_exit` (the command line's frame): the first SIGTERM raises ``SystemExit(143)``
  where the command is (SIGINT ``KeyboardInterrupt``: exit status 130); later ones are ignored, up
  to the process's exit;
- :func:`hold_signals` (called where a cleanup begins, e.g. through :func:`cleanup_scope`): from
  then on SIGTERM and SIGINT are recorded, not raised, and a line says the cleanup finishes first;
  SIGKILL still ends the process at once;
- :func:`release_signals` (when the scope or the command ends): the handlers of before, and the
  first signal recorded, if any;
- :func:`run_child` (a command that runs others, e.g. ``treepo bench recipe``'s training runs): a
  signal that ends the parent is passed on to the child, which is waited for while it cleans up,
  instead of ``subprocess.run``'s SIGKILL (which would leave the child's Redis and Ray behind).

Handlers can only be set from the main thread; elsewhere (a command called in-process by a thread)
these do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

HELD = (signal.SIGTERM, signal.SIGINT)
_saved: dict[int, Any] = {}
_pending: list[int] = []
_ending = False  # a SIGTERM or SIGINT reached sigterm_as_exit's handler: the command ends on it


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _ignore_all() -> None:
    for sig in HELD:
        signal.signal(sig, signal.SIG_IGN)


def _terminate(signum: int, frame: object) -> None:
    """The first SIGTERM or SIGINT: the command ends on it; every later one is ignored, also after
    the cleanup, in the moment before the process exits (a default action there would kill it with
    another status)."""
    global _ending
    _ending = True
    _ignore_all()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM ends the command like Ctrl-C does: the ``finally`` blocks run, so the engines, Ray and
    Redis it started are shut down (the default action kills the process and leaves them running).
    Signals after the first are ignored; SIGKILL still ends it. The previous handlers are restored
    afterwards unless the command ended on a signal (``main`` is also called in-process, by tests)."""
    global _ending
    if not _main_thread():
        yield
        return
    _ending = False
    previous = {sig: signal.signal(sig, _terminate) for sig in HELD}
    try:
        yield
    finally:
        release_signals()  # a signal held during the cleanup was reported when it came
        if _ending:
            _ignore_all()
        else:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _record(signum: int, frame: object) -> None:
    if not _pending:
        name = signal.Signals(signum).name
        print(
            f"[treepo] {name} while shutting down: finishing the cleanup (actors, Ray, Redis) first; "
            "SIGKILL stops at once but may leave processes behind",
            file=sys.stderr,
            flush=True,
        )
    _pending.append(signum)


@contextlib.contextmanager
def cleanup_scope() -> Iterator[Callable[[], None]]:
    """Yields :func:`hold_signals`, to call where the scope's cleanup begins; the handlers of before
    come back when the scope ends (a command may run in-process, under pytest's main thread)."""
    try:
        yield hold_signals
    finally:
        release_signals()


def hold_signals() -> None:
    """From here until :func:`release_signals`, SIGTERM and SIGINT are recorded instead of raised.
    Idempotent: a nested cleanup may call it again."""
    if not _main_thread():
        return
    for sig in HELD:
        if sig not in _saved:
            _saved[sig] = signal.signal(sig, _record)


def release_signals() -> int | None:
    """Put back the handlers :func:`hold_signals` replaced; the first signal recorded meanwhile."""
    if not _main_thread():
        return None
    for sig, handler in _saved.items():
        signal.signal(sig, signal.SIG_IGN if _ending else handler)
    _saved.clear()
    first = _pending[0] if _pending else None
    _pending.clear()
    return first


def run_child(cmd: list[str], *, child_cleanup_s: float = 120.0, **popen: Any) -> int:
    """Run ``cmd`` to its end and return its exit status. If this process is told to stop meanwhile
    (SystemExit from SIGTERM, KeyboardInterrupt from SIGINT), the child gets the same signal and up to
    ``child_cleanup_s`` seconds to stop what it started; SIGKILL only after that."""
    proc = subprocess.Popen(cmd, **popen)
    try:
        return proc.wait()
    except BaseException as e:
        sig = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=child_cleanup_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
