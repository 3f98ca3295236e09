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


PARENT = textwrap.dedent(
    """
    import sys
    from cluster.signals import run_child, sigterm_as_exit
    CHILD = '''
    import signal, sys, time
    def stop(signum, frame):
        time.sleep(0.5)  # a cleanup that takes a while: its Redis, its Ray
        open(sys.argv[1], "w").write(signal.Signals(signum).name)
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    print("child up", flush=True)
    time.sleep(60)
    '''
    with sigterm_as_exit():
        run_child([sys.executable, "-c", CHILD, sys.argv[1]])
    """
)


def test_a_child_run_gets_the_signal_that_stops_its_parent_and_time_to_clean_up(tmp_path):
    """``treepo bench recipe`` stopped by SIGTERM: its training run is stopped the same way and waited
    for (subprocess.run would SIGKILL it, leaving its Redis and Ray running)."""
    import signal
    import time

    done = tmp_path / "child-cleaned-up"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(done)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout.readline().strip() == "child up"
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 143
    time.sleep(0.2)
    assert done.read_text() == "SIGTERM"  # the child's handler ran to its end before the parent exited
