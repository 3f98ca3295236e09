"""Parsing docker-compose.yml the way compose does (variable interpolation included), for the compose
tests in tests/integration/cluster/: the files themselves and the containers' commands run here."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]  # the repository
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
SECRET_VARS = ("TREEPO_REDIS_PASSWORD", "TREEPO_RAY_AUTH_TOKEN")
# Values that cannot occur in the files by accident, so finding one proves where a secret went.
TEST_ENV = {
    "TREEPO_REDIS_PASSWORD": "pw-sentinel-0123456789abcdef",
    "TREEPO_RAY_AUTH_TOKEN": "tok-sentinel-0123",
}
NODE_SERVICES = ("ray-head", "ray-worker", "submitter")
RAY_GCS_PORT = 6379

# ------------------------------------------------------------------ compose interpolation

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(ValueError):
    pass


def _interpolate_str(text: str, env: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        op, arg, value = m["op"], m["arg"], env.get(name)
        unset_or_empty = value is None or (op is not None and op.startswith(":") and value == "")
        if op in ("-", ":-") and unset_or_empty:
            return arg
        if op in ("?", ":?") and unset_or_empty:
            raise MissingVariable(f"{name}: {arg}")
        return value or ""

    return _VAR.sub(sub, text)


def interpolate(node, env: dict[str, str]):
    """Compose's interpolation of every string value: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}`` (the forms these files use)."""
    if isinstance(node, str):
        return _interpolate_str(node, env)
    if isinstance(node, list):
        return [interpolate(x, env) for x in node]
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    return node


def load_raw(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_compose(env: dict[str, str] | None = None, path: Path = COMPOSE) -> dict:
    """The compose file as compose sees it after interpolation with ``env`` (default: TEST_ENV only,
    so every ``${VAR:-default}`` takes its default)."""
    return interpolate(load_raw(path), TEST_ENV if env is None else env)


def volume_target(service: dict, volume: str) -> str:
    """Where the named ``volume`` is mounted in ``service``."""
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source == volume:
            return target
    raise AssertionError(f"volume {volume!r} is not mounted: {service.get('volumes')}")


def flag(argv: list[str], name: str) -> str:
    """The value of ``--name=value`` or ``--name value`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name:
            return argv[i + 1]
    raise AssertionError(f"{name} not in {argv}")


def redis_port(doc: dict) -> int:
    return int(flag(doc["services"]["redis"]["command"][-1].split(), "--port"))


def train_argv(doc: dict) -> list[str]:
    """The submitter's job entrypoint after ``python -m cluster``: ``train`` and its arguments."""
    entry = doc["services"]["submitter"]["entrypoint"]
    job = entry[entry.index("--") + 1 :]
    assert job[:3] == ["python", "-m", "cluster"], job
    return job[3:]


def override(argv: list[str], key: str) -> str:
    for arg in argv:
        if arg.startswith(key + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"no {key}=... in {argv}")
