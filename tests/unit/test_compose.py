"""docker-compose.yml and the Dockerfile, checked by parsing (no Docker engine runs here)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def load() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_volumes():
    doc = load()
    assert {"redis", "ray-head", "ray-worker", "submitter"} <= set(doc["services"])
    assert {"redis-data", "runs", "cache"} <= set(doc["volumes"])
    redis = doc["services"]["redis"]
    assert "redis-data:/data" in redis["volumes"]
    assert "healthcheck" in redis and "ping" in " ".join(redis["healthcheck"]["test"])


def test_redis_has_password_aof_noeviction_and_avoids_rays_port():
    cmd = load()["services"]["redis"]["command"]
    assert "--requirepass" in cmd and "--appendonly yes" in cmd and "noeviction" in cmd
    assert "--port 6379" not in cmd
    env = load()["services"]["redis"]["environment"]["TREEPO_REDIS_PASSWORD"]
    assert ":?" in env, "the password must come from the environment, with no default"


def test_ray_nodes_and_submitter_commands():
    s = load()["services"]
    assert s["ray-head"]["command"].startswith("ray start --head")
    assert "--address=ray-head:6379" in s["ray-worker"]["command"]
    assert "python -m cluster train" in s["submitter"]["command"]
    assert s["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_dockerfile_variants():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in text and '".[gpu,dev]"' in text and "scripts/setup.sh" in text
