"""A cleanup, once begun, runs to its end: a SIGTERM or Ctrl-C that comes while a command stops its
actors, Ray and Redis is reported and held (cluster/signals.py), and the handlers of before come back
afterwards. Each case runs in a fresh interpreter (signal handlers are process-wide)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from paths import REPO

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from cluster.signals import cleanup_scope, sigterm_as_exit
    HOLD = sys.argv[1] == "hold"
    before = signal.getsignal(signal.SIGINT)
    with sigterm_as_exit():
        with cleanup_scope() as hold:
            try:
                print("working", flush=True)
            finally:
                if HOLD:
                    hold()
                os.kill(os.getpid(), signal.SIGTERM)  # a scheduler, during the cleanup
                os.kill(os.getpid(), signal.SIGINT)  # and Ctrl-C
                time.sleep(0.3)
                print("cleanup finished", flush=True)
    print("handlers restored", signal.getsignal(signal.SIGINT) is before, flush=True)
    """
)


def _run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_a_signal_during_the_cleanup_is_held_until_it_ends():
    out = _run("hold")
    assert out.returncode == 0, out.stderr
    assert "cleanup finished" in out.stdout and "handlers restored True" in out.stdout, out.stdout
    # one line, for the first of the two signals, naming it and what SIGKILL would cost
    lines = [line for line in out.stderr.splitlines() if "while shutting down" in line]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "SIGKILL" in lines[0], out.stderr


def test_without_holding_the_signal_cuts_the_cleanup_short():
    """The same cleanup without ``hold()``: what the hold prevents (the test above is not vacuous)."""
    out = _run("plain")
    assert out.returncode == 143
    assert "cleanup finished" not in out.stdout


AFTER = textwrap.dedent(
    """
    import os, signal, time
    from cluster.signals import sigterm_as_exit
    try:
        with sigterm_as_exit():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        # the cleanup is over; a scheduler's second SIGTERM and a Ctrl-C come before the exit
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)
        print("still here", flush=True)
    """
)


def test_signals_after_the_first_cannot_change_how_the_command_ends():
    out = subprocess.run([sys.executable, "-c", AFTER], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 143, (out.returncode, out.stderr)
    assert "still here" in out.stdout
