"""A verifier worker, the subprocess side of :mod:`common.rewards.pool`: one JSON request per line in,
one reply out. It runs math-verify and user reward functions; nothing it does can hang or kill the
process that asked (the pool enforces the deadline).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from common.rewards.pool import MEMORY_ENV
from common.rewards.user_fns import handle_request
from common.rewards.verify import load_math_verify, verify_boxed


def handle(req: dict, user_fns: dict[str, Callable]) -> Any:
    op = req["op"]
    if op == "math":
        return verify_boxed(req["pred"], req["gold"])
    if op in ("user", "user_batch"):  # the caller's import path travels with the request
        return handle_request(req, user_fns)
    if op == "ping":
        return True
    raise ValueError(f"unknown op {op!r}")


def worker_main() -> None:
    """Entry point of a verifier subprocess. Protocol: one JSON request per line in, one reply out."""
    # Keep the protocol on private copies of stdin/stdout: anything user code prints goes to stderr,
    # and nothing it reads can steal a request.
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    cap_mb = int(os.environ.get(MEMORY_ENV, "0") or 0)
    if cap_mb > 0:  # a runaway answer (\\boxed{9^{9^{9^{9}}}}) fails with MemoryError, not the node's RAM
        resource.setrlimit(resource.RLIMIT_AS, (cap_mb << 20, cap_mb << 20))
    parent = os.getppid()

    def watchdog() -> None:  # a worker stuck in a loop must not outlive a killed parent
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    load_math_verify()  # import sympy once, before "ready", so no call's deadline pays for it
    user_fns: dict[str, Callable] = {}
    proto_out.write(b'{"ready": true}\n')
    for line in proto_in:
        try:
            reply = {"ok": True, "value": handle(json.loads(line), user_fns)}
        except BaseException as e:  # noqa: BLE001 - any failure of user code is a scored error
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        proto_out.write(json.dumps(reply).encode() + b"\n")


__all__ = [
    "handle",
    "worker_main",
]
