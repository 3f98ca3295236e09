"""docker-compose.yml, docker-compose.gpu.yml, the Dockerfile and .dockerignore, checked without a Docker
engine: the files are parsed (YAML, Dockerfile instructions), compose's variable interpolation is applied
the way compose applies it, the submitter's train arguments go through the real config loader, and the
Dockerfile's install step runs with stub installers for each VARIANT. ``docker compose config`` is used
as well where a compose client is installed.

The parsing (``load_compose``, ``interpolate``) is tests/support/compose_files.py, shared with
test_compose_commands.py, which runs the containers' commands on this machine.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from compose_files import (
    COMPOSE_GPU,
    NODE_SERVICES,
    RAY_GCS_PORT,
    ROOT,
    SECRET_VARS,
    TEST_ENV,
    MissingVariable,
    flag,
    free_port,
    interpolate,
    load_compose,
    load_raw,
    override,
    redis_port,
    train_argv,
    volume_target,
)

from cluster.pipeline.redis_launcher import QUEUE_ACL

# ------------------------------------------------------------------ services, volumes, secrets


def test_services_and_volumes():
    doc = load_compose()
    assert set(doc["services"]) == {"redis", "ray-head", "ray-worker", "submitter"}
    assert set(doc["volumes"]) == {"redis-data", "runs", "cache"}
    s = doc["services"]
    assert volume_target(s["redis"], "redis-data") == "/data"
    for name in ("ray-head", "ray-worker"):
        # checkpoints are written by the learner ranks, wherever they run; models are loaded anywhere
        assert volume_target(s[name], "runs") == "/runs"
        assert volume_target(s[name], "cache") == s[name]["environment"]["TREEPO_CACHE"] == "/cache"
    for name in ("redis", "ray-head", "ray-worker"):
        assert s[name]["restart"] == "unless-stopped"


def test_secrets_come_from_the_environment_with_no_default():
    raw = load_raw()
    found = 0
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("PASSWORD", "TOKEN", "SECRET")):
                found += 1
                var = re.fullmatch(r"\$\{([A-Z_]+):\?[^}]+\}", str(value))
                assert var and var[1] in SECRET_VARS, f"{name}.{key}={value!r}: use ${{VAR:?message}}"
    assert found >= 5  # redis + head password; head, worker, submitter token
    for var in SECRET_VARS:
        env = {k: v for k, v in TEST_ENV.items() if k != var}
        with pytest.raises(MissingVariable, match=var):
            load_compose(env)
        with pytest.raises(MissingVariable, match=var):  # empty counts as missing with ':?'
            load_compose({**env, var: ""})


def test_secrets_stay_out_of_commands_and_reach_only_who_needs_them():
    doc = load_compose()
    s = doc["services"]
    pw, token = TEST_ENV["TREEPO_REDIS_PASSWORD"], TEST_ENV["TREEPO_RAY_AUTH_TOKEN"]
    for name, service in s.items():
        argv_like = yaml.safe_dump([service.get(k) for k in ("command", "entrypoint", "healthcheck")])
        assert pw not in argv_like and token not in argv_like, f"{name}: a secret in argv"
        has_pw = pw in yaml.safe_dump(service.get("environment", {}))
        # the job driver runs on the head and reads queue.password_env there; generators get the
        # password from the driver, the submitter does not need it
        assert has_pw == (name in ("redis", "ray-head")), name
    for name in NODE_SERVICES:
        env = s[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == token, name
    assert s["redis"].get("user") not in (None, "root", "0")


# ------------------------------------------------------------------ redis


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_service_script_serves_the_queue_user_only(tmp_path):
    """The redis service's own script, run here against a real redis-server (port and data dir
    swapped for free ones): the queue works as `treepo`, admin commands and the default user do not."""
    import redis as redis_lib

    from common.replay import ReplayQueue

    script = load_compose()["services"]["redis"]["command"][2]
    port = free_port()
    script = script.replace(f"--port {redis_port(load_compose())}", f"--port {port}")
    script = script.replace("--bind 0.0.0.0", "--bind 127.0.0.1").replace("--dir /data", f"--dir {tmp_path}")
    password = "p" * 24
    proc = subprocess.Popen(["sh", "-ec", script], env={**os.environ, "TREEPO_REDIS_PASSWORD": password})
    try:
        user = redis_lib.Redis(port=port, username="treepo", password=password, socket_timeout=5)
        for _ in range(100):
            try:
                user.ping()
                break
            except redis_lib.ConnectionError:
                time.sleep(0.1)
        q = ReplayQueue(f"redis://treepo@127.0.0.1:{port}/0", "compose-run", password=password, block_ms=100)
        assert q.depth() == 0 and q.read(1, block_ms=10, consumer="c") == []
        assert user.xadd("treepo:probe", {"k": "v"}) and user.xlen("treepo:probe") == 1
        with pytest.raises(redis_lib.exceptions.NoPermissionError):
            user.set("other:key", "v")  # keys outside the queue's prefix
        for cmd in (("CONFIG", "SET", "maxmemory", "1"), ("FLUSHALL",), ("SHUTDOWN",)):
            with pytest.raises(redis_lib.exceptions.NoPermissionError):
                user.execute_command(*cmd)
        with pytest.raises(redis_lib.exceptions.AuthenticationError):
            redis_lib.Redis(port=port, password=password, socket_timeout=5).ping()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_redis_password_aof_noeviction_and_not_rays_port():
    doc = load_compose()
    redis = doc["services"]["redis"]
    shell, flags, script = redis["command"]
    assert (shell, flags) == ("sh", "-ec")
    argv = script.split()
    port = redis_port(doc)
    assert port != RAY_GCS_PORT
    assert flag(argv, "--appendonly") == "yes"
    assert flag(argv, "--appendfsync") in ("everysec", "always")
    assert flag(argv, "--maxmemory-policy") == "noeviction"
    assert flag(argv, "--dir") == volume_target(redis, "redis-data")
    # the password goes in through the config on stdin ("-"), read from the environment
    assert "redis-server -" in script
    assert re.search(r"^user default off$", script, re.M)  # no user with admin rights
    assert re.search(rf"^user treepo on >\$TREEPO_REDIS_PASSWORD {re.escape(QUEUE_ACL)}$", script, re.M)
    hc = redis["healthcheck"]
    assert hc["test"][0] == "CMD-SHELL" and f"--user treepo -p {port} ping" in hc["test"][1]
    assert "REDISCLI_AUTH=" in hc["test"][1] and " -a " not in hc["test"][1]
    assert "ports" not in redis  # reached on the compose network only


# ------------------------------------------------------------------ ray head, workers, submitter


def test_ray_head():
    doc = load_compose()
    head = doc["services"]["ray-head"]
    cmd = head["command"]
    assert cmd[:4] == ["ray", "start", "--head", "--block"]
    assert int(flag(cmd, "--port")) == RAY_GCS_PORT
    assert flag(cmd, "--dashboard-host") == "0.0.0.0"  # the submitter container must reach it
    assert flag(cmd, "--include-dashboard") == "true"
    assert flag(cmd, "--num-cpus") == "0" and flag(cmd, "--num-gpus") == "0"
    dash = int(flag(cmd, "--dashboard-port"))
    # published on the host's loopback only
    assert head["ports"] == [f"127.0.0.1:8265:{dash}"]
    hc = head["healthcheck"]
    assert hc["test"][:3] == ["CMD", "python", "-c"]
    assert f"http://127.0.0.1:{dash}" in hc["test"][3] and "/api/version" in hc["test"][3]
    assert head["depends_on"] == {"redis": {"condition": "service_healthy"}}
    shm = head["shm_size"]
    assert int(flag(cmd, "--object-store-memory")) < _bytes(shm), "object store must fit in /dev/shm"


def _bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)([kmg]?)b?", size.lower())
    assert m, size
    return int(m[1]) * 1024 ** " kmg".index(m[2] or " ")


def test_ray_worker_joins_the_head_and_scales():
    doc = load_compose()
    s = doc["services"]
    worker = s["ray-worker"]
    # `--scale ray-worker=N` needs replicas that differ in nothing fixed on the host
    for key in ("container_name", "ports", "hostname"):
        assert key not in worker, key
    assert not any("container_name" in service for service in s.values())
    cmd = worker["command"]
    assert cmd[:2] == ["ray", "start"] and "--block" in cmd and "--head" not in cmd
    assert flag(cmd, "--address") == f"ray-head:{flag(s['ray-head']['command'], '--port')}"
    assert int(flag(cmd, "--num-cpus")) >= 2  # one generator + one learner rank fit on one worker
    assert int(flag(cmd, "--object-store-memory")) < _bytes(worker["shm_size"])
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert worker["init"] is True


def test_one_image_for_every_ray_node():
    s = load_compose()["services"]
    images = {s[name]["image"] for name in NODE_SERVICES}
    assert images == {"treepo:cpu"}
    builders = [name for name in s if "build" in s[name]]
    assert builders == ["ray-head"], "build the image once; the others use it"
    assert s["ray-head"]["build"]["args"]["VARIANT"] == "cpu"
    # not "build"/"always": `docker compose run submitter` must not rebuild and recreate a running head
    assert s["ray-head"]["pull_policy"] == "missing"
    assert all(s[name]["pull_policy"] == "never" for name in ("ray-worker", "submitter"))


def test_submitter_submits_train_to_the_head():
    doc = load_compose()
    s = doc["services"]
    sub = s["submitter"]
    assert sub["profiles"] == ["job"] and sub["restart"] == "no"
    entry = sub["entrypoint"]
    submit = entry[: entry.index("--")]
    assert submit[:3] == ["ray", "job", "submit"]
    dash = flag(s["ray-head"]["command"], "--dashboard-port")
    assert flag(submit, "--address") == f"http://ray-head:{dash}"
    assert flag(submit, "--working-dir") == "/app"  # the image's code (Dockerfile: WORKDIR /app)
    argv = train_argv(doc)
    assert argv[0] == "train"
    assert override(argv, "driver") == "ray"
    assert override(argv, "queue.url") == f"redis://treepo@redis:{redis_port(doc)}/0"
    assert override(argv, "run_dir").startswith(volume_target(s["ray-head"], "runs") + "/")
    # extra `docker compose run` arguments replace this and are appended to the train command
    assert sub["command"] == []
    assert {k: v["condition"] for k, v in sub["depends_on"].items()} == {
        "redis": "service_healthy",
        "ray-head": "service_healthy",
    }


def _print_config(argv: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "cluster", *argv, "--print-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_submitter_train_arguments_are_a_valid_config_and_resume():
    """The job's arguments through the real config loader, as given and with ``--resume`` appended
    (what `docker compose run --rm submitter --resume` runs)."""
    doc = load_compose()
    argv = train_argv(doc)
    cfg = _print_config(argv)
    assert cfg["driver"] == "ray" and cfg["resume"] is False
    assert cfg["queue"]["url"] == f"redis://treepo@redis:{redis_port(doc)}/0"
    # the variable the head's environment provides is the one the driver reads
    assert cfg["queue"]["password_env"] == "TREEPO_REDIS_PASSWORD"
    assert cfg["queue"]["password_env"] in doc["services"]["ray-head"]["environment"]
    assert cfg["run_dir"] == "/runs/demo"
    resumed = _print_config([*argv, "--resume"])
    assert resumed["resume"] is True and resumed["run_dir"] == cfg["run_dir"]
    custom = load_compose({**TEST_ENV, "TREEPO_RUN": "exp1", "TREEPO_CONFIG": "configs/demo.yaml"})
    assert override(train_argv(custom), "run_dir") == "/runs/exp1"


# ------------------------------------------------------------------ GPU override


def test_gpu_override_switches_every_node_and_reserves_gpus():
    raw = yaml.safe_load(COMPOSE_GPU.read_text())
    gpu = interpolate(raw, TEST_ENV)["services"]
    base = load_compose()["services"]
    assert set(gpu) <= set(base)
    # one image for the whole cluster: every service that runs the CPU image gets the GPU one
    assert {name for name in base if base[name].get("image") == "treepo:cpu"} == set(NODE_SERVICES)
    assert all(gpu[name]["image"] == "treepo:gpu" for name in NODE_SERVICES)
    assert gpu["ray-head"]["build"]["args"]["VARIANT"] == "gpu"
    devices = gpu["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in gpu["ray-head"]  # the head runs no GPU work
    assert _bytes(gpu["ray-worker"]["shm_size"]) > _bytes(base["ray-worker"]["shm_size"])


# ------------------------------------------------------------------ Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined as Docker joins them, comments dropped."""
    out, buf = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1]  # Docker drops the backslash and the newline
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def test_dockerfile_variants_and_stages():
    ins = dockerfile_instructions()
    first_from = next(i for i, (w, _) in enumerate(ins) if w == "FROM")
    assert ("ARG", "VARIANT=cpu") in ins[:first_from]
    froms = [a for w, a in ins if w == "FROM"]
    stages = {a.split(" AS ")[1]: a.split(" AS ")[0] for a in froms if " AS " in a}
    assert set(stages) == {"base-cpu", "base-gpu"}
    assert froms[-1] == "base-${VARIANT}"
    assert re.fullmatch(r"python:3\.\d+-slim-\w+", stages["base-cpu"])
    # the GPU base is pinned to a full CUDA version, not a moving tag
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", stages["base-gpu"])
    assert ("WORKDIR", "/app") in ins
    # dependencies are installed before the code is copied (cache), and the code ends up in /app
    run_i = next(i for i, (w, a) in enumerate(ins) if w == "RUN" and "case" in a)
    copy_all = next(i for i, (w, a) in enumerate(ins) if w == "COPY" and a.startswith(". "))
    assert run_i < copy_all
    for w, a in ins[first_from:run_i]:
        if w == "COPY":
            for src in a.split()[:-1]:
                assert (ROOT / src).is_file() and not _dockerignored(src), src


def _dockerfile_args() -> dict[str, str]:
    return dict(a.split("=", 1) for w, a in dockerfile_instructions() if w == "ARG" and "=" in a)


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run_install_step(tmp_path: Path, variant: str) -> tuple[subprocess.CompletedProcess, str, Path]:
    """Run the Dockerfile's install RUN with this VARIANT; python3/pip/bash are stubs that log."""
    script = next(a for w, a in dockerfile_instructions() if w == "RUN" and "case" in a)
    script = re.sub(r"^--mount=\S+\s*", "", script)
    stubs, work, log = tmp_path / "bin", tmp_path / "app", tmp_path / "log"
    stubs.mkdir(parents=True)
    work.mkdir()
    record = 'echo "$(basename "$0") $* | TREEPO_TORCH_INDEX=$TREEPO_TORCH_INDEX' + (
        ' constraints=$(cat "$PIP_CONSTRAINT" 2>/dev/null) venv_link=$(readlink .venv)" >> ' + f"{log}\n"
    )
    _stub(
        stubs / "python3",
        record + f'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp {stubs}/pip "$3/bin/pip"; fi\n',
    )
    _stub(stubs / "pip", record)
    _stub(stubs / "bash", record)
    args = _dockerfile_args()
    env = {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "VARIANT": variant,
        "VIRTUAL_ENV": str(tmp_path / "venv"),
        "TORCH_INDEX": args["TORCH_INDEX"],
        "RAY_VERSION": args["RAY_VERSION"],
    }
    proc = subprocess.run(["sh", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=30)
    return proc, log.read_text() if log.exists() else "", work


def test_dockerfile_install_step_per_variant(tmp_path):
    args = _dockerfile_args()
    pinned_ray = f"constraints=ray=={args['RAY_VERSION']}"

    proc, log, work = _run_install_step(tmp_path / "gpu", "gpu")
    assert proc.returncode == 0, proc.stderr
    pip = [line for line in log.splitlines() if line.startswith("pip ")]
    assert len(pip) == 1 and "install -q -e .[gpu,dev,lora,trackers]" in pip[0] and pinned_ray in pip[0]
    assert "setup.sh" not in log
    assert all((work / pkg / "__init__.py").exists() for pkg in ("common", "actors", "learner", "cluster"))

    proc, log, work = _run_install_step(tmp_path / "cpu", "cpu")
    assert proc.returncode == 0, proc.stderr
    setup = [line for line in log.splitlines() if line.startswith("bash ")]
    assert len(setup) == 1 and setup[0].startswith("bash scripts/setup.sh |")
    assert f"TREEPO_TORCH_INDEX={args['TORCH_INDEX']}" in setup[0] and pinned_ray in setup[0]
    # setup.sh installs into .venv: it is the image's venv during the step, and gone afterwards
    assert f"venv_link={tmp_path / 'cpu' / 'venv'}" in setup[0]
    assert not (work / ".venv").exists() and not (work / ".venv").is_symlink()
    assert "[gpu" not in log

    proc, _, _ = _run_install_step(tmp_path / "bad", "tpu")
    assert proc.returncode != 0 and "VARIANT must be cpu or gpu, not 'tpu'" in proc.stderr


# ------------------------------------------------------------------ .dockerignore


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#")]


def _dockerignored(path: str) -> bool:
    """Whether ``path`` (relative) or a folder above it matches a .dockerignore pattern (no ! rules)."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in _dockerignore_patterns():
        assert not pattern.startswith("!"), "exceptions are not handled here"
        pats = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in pats):
            return True
    return False


def test_dockerignore():
    pats = set(_dockerignore_patterns())
    assert {".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", ".ruff_cache", ".env"} <= pats
    for path in (
        ".venv/bin/python",
        "runs/demo/metrics.jsonl",
        ".git/HEAD",
        "common/__pycache__/x.pyc",
        ".env",
    ):
        assert _dockerignored(path), path
    # what the image needs stays in the context
    for path in ("pyproject.toml", "scripts/setup.sh", "configs/demo.yaml", "cluster/cli.py", "tests/data"):
        assert (ROOT / path).exists() and not _dockerignored(path), path


# ------------------------------------------------------------------ docker compose config (client only)


def _compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]])
def test_docker_compose_config(files):
    """Compose's own validation and merge (needs only the client, no engine)."""
    client = _compose_client()
    if client is None:
        pytest.skip("no docker compose client installed")
    cmd = [*client, *(x for f in files for x in ("-f", f)), "--profile", "job", "config", "--format", "json"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **TEST_ENV}, capture_output=True, text=True)
    if proc.returncode and re.search(r"Cannot connect to the Docker daemon|docker daemon", proc.stderr, re.I):
        pytest.skip(f"compose needed an engine: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    import json

    merged = json.loads(proc.stdout)["services"]
    assert merged["ray-worker"]["command"] == load_compose()["services"]["ray-worker"]["command"]
    if "docker-compose.gpu.yml" in files:
        assert merged["ray-head"]["build"]["args"]["VARIANT"] == "gpu"
        assert {merged[n]["image"] for n in NODE_SERVICES} == {"treepo:gpu"}
        assert merged["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    missing = subprocess.run(
        [*client, "-f", files[0], "config"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k not in SECRET_VARS},
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "TREEPO_" in missing.stderr
