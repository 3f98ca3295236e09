"""The python tool's child process: limits, an audit hook, then the user's code.

Run as ``python -I -S -B -X utf8 sandbox_child.py WORKDIR CPU_S MEMORY_BYTES FILE_BYTES`` (by
:mod:`common.tools.sandbox`, which made WORKDIR, the process's working directory, and wrote the code to
``WORKDIR/snippet.py``). In order, before the code runs:

1. a new user and network namespace where the OS allows it (``os.unshare``, Python 3.12+; on older
   Pythons, or where unprivileged namespaces are off, this step is skipped and the hook alone keeps
   the network closed);
2. resource limits, soft and hard (the code cannot raise them): CPU seconds, address space, file size;
3. an audit hook (:func:`sys.addaudithook`; it cannot be removed) that refuses, with PermissionError:
   every socket operation; creating processes (``subprocess``, ``os.system``, ``os.exec*``,
   ``os.fork``, ``os.posix_spawn``) and signalling others; changing limits; tracing hooks; the gc's
   object walks (which would reach the hook itself); importing ``ctypes``, ``_posixsubprocess`` and
   other modules that reach C directly; opening any directory (so no ``dir_fd`` can point outside);
   and opening for writing, creating, removing, renaming, linking or changing any path outside
   WORKDIR (symbolic links resolved).

The hook looks up nothing at call time that the code could replace: the functions and types it uses
are bound when it is made (closure cells), and it resolves paths with its own ``realpath`` over the C
functions of ``posix``, so patching ``os.path`` or ``builtins`` changes nothing.

``os.mkfifo`` and ``os.mknod`` raise no audit event: they are removed from ``os`` and ``posix``.

Limits of the guard: reading files is allowed; a fresh copy of ``posix`` made through ``_imp`` still
has ``mkfifo`` and ``mknod`` (they make empty special files, nothing more); a path object whose
``__fspath__`` answers differently on each call, or a symbolic link swapped by a second thread between
the check and the open, can slip past the path check. For code written to attack the host, run the
generators in a container.
"""

from __future__ import annotations

import builtins
import os
import posix
import resource
import sys
import types

SNIPPET = "snippet.py"
REFUSED_PREFIXES = (
    "socket.",
    "ctypes.",
    "subprocess.",
    "os.exec",
    "os.spawn",
    "os.posix_spawn",
    "os.fork",
    "os.system",
    "os.kill",
    "os.killpg",
    "os.startfile",
    "pty.",
    "resource.",
    "signal.pthread_kill",
    "sys.settrace",
    "sys.setprofile",
    "gc.get_",
    "sys.remote_exec",
    "webbrowser.",
    "sqlite3.enable_load_extension",
    "sqlite3.load_extension",
)
REFUSED_IMPORTS = frozenset(
    {
        "ctypes",
        "_ctypes",
        "_posixsubprocess",
        "cffi",
        "_cffi_backend",
        "_testcapi",
        "_testinternalcapi",
        "_testmultiphase",
        "_testsinglephase",
        "_xxsubinterpreters",
        "_xxinterpchannels",
        "_interpreters",
        "_interpchannels",
    }
)
# event -> (indices of path arguments, indices of dir_fd arguments) for events that change the filesystem
PATH_EVENTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "os.remove": ((0,), (1,)),
    "os.rmdir": ((0,), (1,)),
    "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)),
    "os.link": ((0, 1), (2, 3)),
    "os.symlink": ((1,), (2,)),
    "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)),
    "os.utime": ((0,), (3,)),
    "os.truncate": ((0,), ()),
    "os.setxattr": ((0,), ()),
    "os.removexattr": ((0,), ()),
    "os.chflags": ((0,), ()),
    "os.lchflags": ((0,), ()),
    "shutil.rmtree": ((0,), (1,)),
    "shutil.copyfile": ((1,), ()),
    "shutil.copytree": ((1,), ()),
    "shutil.move": ((0, 1), ()),
    "shutil.chown": ((0,), ()),
    "shutil.make_archive": ((0,), ()),
    "shutil.unpack_archive": ((1,), ()),
    "sqlite3.connect": ((0,), ()),  # sqlite opens its files itself, without an "open" event
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
# Functions that create files but raise no audit event: removed from os and posix.
UNAUDITED = ("mkfifo", "mknod")


def make_realpath(lstat=posix.lstat, readlink=posix.readlink, getcwd=posix.getcwd, error=OSError):
    """A ``realpath`` over the C functions bound here (missing components are kept as written)."""

    def realpath(path: str) -> str:
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        todo = [p for p in path.split("/") if p and p != "."]
        done: list[str] = []
        hops = 0
        while todo:
            part = todo.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            here = "/" + "/".join([*done, part])
            try:
                mode = lstat(here).st_mode
            except error:
                done.append(part)
                continue
            if mode & 0o170000 != 0o120000:  # not a symbolic link
                done.append(part)
                continue
            hops += 1
            if hops > 40:
                raise error("too many levels of symbolic links")
            target = readlink(here)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p and p != "."] + todo
        return "/" + "/".join(done)

    return realpath


def make_hook(root: str):
    """The audit hook that keeps the code's writes inside ``root`` (see the module docstring)."""
    realpath = make_realpath()
    refuse_prefixes, refuse_imports, path_events = REFUSED_PREFIXES, REFUSED_IMPORTS, PATH_EVENTS
    write_flags, denied, fspath, stat = WRITE_FLAGS, PermissionError, posix.fspath, posix.stat
    str_, bytes_, int_, isinstance_, len_, error = str, bytes, int, isinstance, len, OSError
    inside_root = root.rstrip("/") + "/"

    def text(path):
        if isinstance_(path, bytes_):
            return path.decode("utf-8", "surrogateescape")
        if isinstance_(path, str_):
            return path
        path = fspath(path)
        return path.decode("utf-8", "surrogateescape") if isinstance_(path, bytes_) else path

    def inside(name: str) -> bool:
        real = realpath(name)
        return real == root or real.startswith(inside_root)

    def check_open(path, mode, flags) -> None:
        if isinstance_(path, int_):
            return  # an already open descriptor: opened through this check
        name = text(path)
        writes = isinstance_(flags, int_) and flags & write_flags
        if isinstance_(mode, str_) and ("w" in mode or "a" in mode or "x" in mode or "+" in mode):
            writes = True
        if writes and not inside(name):
            raise denied(f"the sandbox refuses writing outside its directory: {name!r:.200}")
        try:
            is_dir = stat(name).st_mode & 0o170000 == 0o040000
        except error:
            return
        if is_dir:
            raise denied(f"the sandbox refuses opening a directory: {name!r:.200}")

    def check_paths(event: str, args: tuple) -> None:
        paths, dir_fds = path_events[event]
        for i in dir_fds:
            if i < len_(args) and args[i] is not None and args[i] != -1:  # -1: no dir_fd given
                raise denied(f"the sandbox refuses {event} with dir_fd")
        for i in paths:
            path = args[i] if i < len_(args) else None
            if path is None or (event == "os.truncate" and isinstance_(path, int_)):
                continue
            if isinstance_(path, int_) or not inside(text(path)):
                raise denied(f"the sandbox refuses {event} outside its directory: {path!r:.200}")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            check_open(*args[:3])
        elif event in path_events:
            check_paths(event, args)
        elif event == "import":
            if args[0] in refuse_imports or args[0].partition(".")[0] in refuse_imports:
                raise denied(f"the sandbox refuses importing {args[0]}")
        elif event.startswith(refuse_prefixes):
            raise denied(f"the sandbox refuses {event}")

    return hook


def set_limits(cpu_s: int, memory_bytes: int, file_bytes: int) -> None:
    """Soft and hard limits (the hard CPU limit one second later: SIGXCPU first, then SIGKILL)."""
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def isolate_network() -> bool:
    """A new user and network namespace where the OS allows it (Python 3.12+ has ``os.unshare``)."""
    unshare = getattr(os, "unshare", None)
    if unshare is None:
        return False
    try:
        unshare(CLONE_NEWUSER | CLONE_NEWNET)
    except OSError:
        return False
    return True


def main(argv: list[str]) -> None:
    root, cpu_s, memory_bytes, file_bytes = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    root = make_realpath()(root)
    with open(os.path.join(root, SNIPPET), encoding="utf-8") as f:
        source = f.read()
    isolate_network()
    set_limits(cpu_s, memory_bytes, file_bytes)
    code = compile(source, "<python>", "exec")
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    sys.argv = ["<python>"]
    for name in UNAUDITED:
        os.__dict__.pop(name, None)
        posix.__dict__.pop(name, None)
    sys.addaudithook(make_hook(root))
    exec(code, module.__dict__)


if __name__ == "__main__":
    main(sys.argv[1:])
