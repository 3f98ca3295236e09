"""A shared embedded Redis for integration tests.

``redis_server`` (session fixture; import it into a conftest): one
:class:`cluster.pipeline.redis_launcher.EmbeddedRedis` (AOF ``everysec``, 512 MiB) in a temp dir, stopped at
the end of the session. :func:`shared_redis` returns the same server to code that cannot take the
fixture (module fixtures of test files). Tests isolate themselves with a distinct run name
(:func:`unique_run`); tests that restart Redis must start their own server.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile

import pytest

_counter = itertools.count()
_shared = None


def unique_run(prefix: str = "t") -> str:
    """A run name no other test in this session uses (queue and prompt keys are per run)."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def shared_redis():
    """The process-wide test Redis, started on first use (skips the test if redis-server is missing)."""
    global _shared
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    if _shared is None or not _shared.running():
        from cluster.pipeline.redis_launcher import EmbeddedRedis

        _shared = EmbeddedRedis(tempfile.mkdtemp(prefix="treepo-test-redis-"), maxmemory_mb=512).start()
        atexit.register(stop_shared_redis)
    return _shared


def stop_shared_redis() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        shutil.rmtree(_shared.dir.parent, ignore_errors=True)
        _shared = None


@pytest.fixture(scope="session")
def redis_server():
    """A running embedded Redis shared by the whole session (``.url``, ``.password``, ``.client()``)."""
    yield shared_redis()
    stop_shared_redis()
