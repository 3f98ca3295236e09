"""The python tool in real child processes: what it refuses comes back as ``error: ...`` text, the
runner keeps serving after each refusal, and ordinary code works."""

from __future__ import annotations

import os
import socket
import time

import pytest

from common.errors import ConfigError
from common.tools import SandboxLimits, ToolCall, ToolRunner, resolve_tools

LIMITS = SandboxLimits(timeout_s=1.0, memory_mb=256, output_bytes=16 * 1024)


@pytest.fixture(scope="module")
def runner():
    with ToolRunner(resolve_tools(["python"], python=LIMITS), max_workers=2, max_chars=64 * 1024) as r:
        yield r


def run_code(runner: ToolRunner, code: str):
    return runner.run(ToolCall("python", {"code": code}))


def still_serving(runner: ToolRunner) -> None:
    result = run_code(runner, "print(6 * 7)")
    assert result.ok and result.text == "42"


def test_ordinary_code(runner):
    assert run_code(runner, "print(sum(range(10)))").text == "45"
    result = run_code(runner, "import json, math\nprint(json.dumps({'pi': round(math.pi, 2)}))")
    assert result.ok and result.text == '{"pi": 3.14}'


def test_writing_inside_its_directory_works_and_the_directory_is_removed(runner):
    code = (
        "import os, pathlib\n"
        "pathlib.Path('notes.txt').write_text('kept')\n"
        "os.makedirs('a/b')\n"
        "open('a/b/c.txt', 'w').write('x')\n"
        "os.chmod('a', 0)\n"
        "print(os.getcwd(), open('notes.txt').read())"
    )
    result = run_code(runner, code)
    assert result.ok, result.text
    workdir, content = result.text.split()
    assert content == "kept"
    assert not os.path.exists(workdir)


def test_infinite_loop_times_out(runner):
    start = time.monotonic()
    result = run_code(runner, "while True: pass")
    # whichever limit comes first: the wall clock, or on a loaded machine the CPU time (both 1 s)
    assert result.text in ("error: timed out after 1 s", "error: CPU time limit (1 s) reached")
    assert time.monotonic() - start < 10
    still_serving(runner)


def test_one_gib_allocation_hits_the_memory_limit(runner):
    result = run_code(runner, "x = bytearray(1 << 30)\nprint('allocated')")
    assert result.text == "error: MemoryError (memory limit 256 MiB)"
    still_serving(runner)


def test_network_connection_is_refused(runner):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        for code in (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
            f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
        ):
            result = run_code(runner, code)
            assert not result.ok and "the sandbox refuses socket." in result.text, result.text
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever connected
    still_serving(runner)


def test_write_outside_its_directory_is_refused(runner, tmp_path):
    target = tmp_path / "outside.txt"
    for code in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/outside.txt', 'w').write('x')",
        f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\nos.open('outside.txt', os.O_CREAT | os.O_WRONLY, dir_fd=fd)",
        f"import os.path\nos.path.realpath = lambda p, **k: os.getcwd()\nopen({str(target)!r}, 'w')",
        f"import shutil\nshutil.copyfile('{os.devnull}', {str(target)!r})",
        f"import sqlite3\nsqlite3.connect({str(target)!r})",
    ):
        result = run_code(runner, code)
        assert not result.ok and "the sandbox refuses" in result.text, (code, result.text)
        assert not target.exists(), code
    still_serving(runner)


def test_files_made_without_an_audit_event_are_not_reachable(runner, tmp_path):
    for code in (
        f"import os\nos.mkfifo({str(tmp_path / 'f')!r})",
        f"import posix\nposix.mknod({str(tmp_path / 'n')!r})",
    ):
        result = run_code(runner, code)
        assert not result.ok and "has no attribute" in result.text, result.text
    assert list(tmp_path.iterdir()) == []


def test_removing_or_renaming_outside_is_refused(runner, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    for code in (
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        f"import os\nos.chmod({str(victim)!r}, 0)",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
    ):
        result = run_code(runner, code)
        assert not result.ok and "the sandbox refuses" in result.text, (code, result.text)
    assert victim.read_text() == "mine"


@pytest.mark.parametrize(
    "code, refused",
    [
        ("import ctypes", "importing ctypes"),
        ("import subprocess\nsubprocess.run(['true'])", "importing _posixsubprocess"),
        ("import os\nos.system('true')", "os.system"),
        ("import os\nos.fork()", "os.fork"),
        ("import os\nos.execv('/bin/true', ['true'])", "os.exec"),
        ("import os, signal\nos.kill(1, signal.SIGTERM)", "os.kill"),
        ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "resource.setrlimit"),
        ("import gc\ngc.get_objects()", "gc.get_objects"),
        ("import sys\nsys.settrace(lambda *a: None)", "sys.settrace"),
    ],
)
def test_escapes_are_refused(runner, code, refused):
    result = run_code(runner, code)
    assert not result.ok and f"the sandbox refuses {refused}" in result.text, result.text


def test_huge_output_is_capped_quickly(runner):
    start = time.monotonic()
    result = run_code(runner, 'print("x" * 100_000_000)')
    elapsed = time.monotonic() - start
    assert elapsed < 3, elapsed
    assert len(result.text) < 17 * 1024
    assert result.text.startswith("x" * 1000) and result.text.endswith("the program was stopped]")
    # stopped at the cap, not drained: a program that never stops printing returns as soon
    start = time.monotonic()
    result = run_code(runner, 'while True:\n    print("y" * 1000)')
    assert result.text.startswith("y" * 1000) and result.text.endswith("the program was stopped]")
    assert time.monotonic() - start < 0.9  # well before the 1 s time-out
    still_serving(runner)


def test_exceptions_and_exit_codes(runner):
    assert run_code(runner, "1 / 0").text == "error: ZeroDivisionError: division by zero"
    assert run_code(runner, "import sys\nsys.exit(3)").text == "error: exit code 3"
    assert run_code(runner, "import sys\nsys.exit(0)").ok
    assert run_code(runner, "def f(:\n  pass").text.startswith("error: SyntaxError")
    assert run_code(runner, "import numpy").text.startswith("error: ModuleNotFoundError")  # stdlib only


def test_bad_limits():
    with pytest.raises(ConfigError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ConfigError, match="memory_mb"):
        SandboxLimits(memory_mb=4)
