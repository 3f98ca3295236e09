"""The Ray cluster-launcher configs (``cluster/*.yaml``) and the head node's Redis script, offline.

Ray's own checks first: each YAML goes through ``prepare_config`` (fills in the provider's defaults
from Ray's bundled defaults file, merges the setup commands, checks the docker block and the worker
counts) and ``validate_config`` (Ray's JSON schema ``ray-schema.json`` plus its cross-field rules),
the same steps ``ray up`` takes before it talks to the cloud. The cloud clients (boto3, the Google
API client) are made unimportable during the call, so a cloud call would fail the test.

Then the properties the deployment relies on: the head runs no work, the replay Redis is started on
the head (not on Ray's port 6379, bound to a private address, password never in the YAML, AOF on a
persistent volume), nothing is opened to the internet, worker counts are consistent and can host the
presets, the setup installs the ``gpu`` extra with the image's Ray, the image is pinned, and every
shell command parses (``bash -n``). ``cluster/head_redis.sh`` is also run for real against a local
``redis-server`` (when one >= 7.0 is installed): it is the part of the deployment that can be.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from paths import REPO

ROOT = REPO
CLUSTER_YAMLS = sorted((ROOT / "cluster").glob("*.yaml"))
HEAD_REDIS = ROOT / "cluster" / "head_redis.sh"
RAY_GCS_PORT = 6379
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
ids = [p.name for p in CLUSTER_YAMLS]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def commands(cfg: dict) -> list[str]:
    """Every shell command string: the global lists and each node type's own lists."""
    out = [c for key in COMMAND_LISTS for c in cfg.get(key) or []]
    for node_type in cfg["available_node_types"].values():
        for key in ("initialization_commands", "worker_setup_commands"):
            out += node_type.get(key) or []
    return out


def strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in strings(k) + strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in strings(v)]
    return []


def workers(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def provider(cfg: dict) -> str:
    return cfg["provider"]["type"]


@pytest.fixture(scope="module")
def ray_checks():
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    return prepare_config, validate_config


@pytest.fixture
def no_cloud(monkeypatch):
    for mod in ("boto3", "botocore", "googleapiclient", "google.cloud"):
        monkeypatch.setitem(sys.modules, mod, None)  # importing it now raises ImportError


def test_there_are_cluster_yamls():
    assert {p.name for p in CLUSTER_YAMLS} >= {"a100.yaml", "gcp-a100.yaml"}


# ------------------------------------------------------------------ Ray's own validation
@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=ids)
def test_ray_accepts_the_config(path, ray_checks, no_cloud):
    prepare_config, validate_config = ray_checks
    raw = load(path)
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    # what the user wrote survives the defaults (Ray fills in, never replaces, these)
    assert prepared["head_node_type"] == raw["head_node_type"]
    assert prepared["setup_commands"] == raw["setup_commands"]
    assert prepared["available_node_types"][raw["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["available_node_types"][c["head_node_type"]]["resources"].update(GPU=-1),
        lambda c: c["available_node_types"][c["head_node_type"]].update(min_worker=1),  # a typo
        lambda c: c.update(max_workers=0),  # below the sum of min_workers
    ],
    ids=["negative-resource", "unknown-key", "min-above-max"],
)
def test_ray_validation_catches_broken_copies(breakage, ray_checks, no_cloud):
    prepare_config, validate_config = ray_checks
    cfg = load(ROOT / "cluster" / "a100.yaml")
    breakage(cfg)
    with pytest.raises(Exception) as info:
        validate_config(prepare_config(cfg))
    assert type(info.value).__name__ in ("ValidationError", "ValueError")


# ------------------------------------------------------------------ layout
@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=ids)
def test_head_runs_no_work(path):
    cfg = load(path)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    # CPU 0 and GPU 0 override what Ray would detect from the instance type: no actor, rank or
    # task is ever scheduled on the head; and no custom resource invites one either
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU") == 0
    assert all(v == 0 for v in head["resources"].values())
    machine = head["node_config"].get("InstanceType") or head["node_config"].get("machineType")
    assert not re.match(r"(p\d|g\d|a2-|a3-|g2-)", machine), f"the head is a GPU machine: {machine}"


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=ids)
def test_worker_counts_and_roles(path):
    cfg = load(path)
    total_min = 0
    for name, node in workers(cfg).items():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= cfg["max_workers"], name
        total_min += node["min_workers"]
        res = node["resources"]
        roles = {"generator_node", "learner_node"} & set(res)
        assert len(roles) == 1, f"{name}: a worker type is either a generator or a learner node type"
        # one unit of the role per GPU: the presets ask 1 unit per actor of 1 GPU
        assert res["GPU"] >= 1 and res[roles.pop()] == res["GPU"], name
    assert total_min <= cfg["max_workers"]


def preset_files() -> list[Path]:
    return sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=ids)
def test_cluster_hosts_the_presets(path, monkeypatch):
    """Each Ray preset fits the cluster: its custom resources exist on worker types with enough
    GPUs, and the 7B presets fit the min_workers (the job never waits for the autoscaler)."""
    from common.config import load_config

    monkeypatch.delenv("TREEPO_QUEUE_URL", raising=False)
    cfg = load(path)
    types = workers(cfg)
    checked = 0
    for preset in preset_files():
        run = load_config(preset)
        if run.driver != "ray" or run.generators.gpus_per_engine == 0:  # GPU presets only
            continue
        checked += 1
        sides = (
            (run.generators.ray_resources, run.generators.num, run.generators.gpus_per_engine),
            (run.learner.ray_resources, run.learner.num_workers, run.learner.gpus_per_worker),
        )
        for resources, count, gpus in sides:
            hosts = [t for t in types.values() if all(k in t["resources"] for k in resources)]
            assert hosts, f"{preset.name}: no worker type offers {resources}"
            at_min = sum(t["min_workers"] * t["resources"]["GPU"] for t in hosts)
            at_max = sum(t["max_workers"] * t["resources"]["GPU"] for t in hosts)
            assert count * gpus <= at_max, (
                f"{preset.name} needs {count * gpus} GPUs, {path.name} has {at_max}"
            )
            for name, amount in resources.items():
                assert count * amount <= sum(t["min_workers"] * t["resources"][name] for t in hosts)
            if resources:  # a multi-node preset: its GPUs are up from `ray up` on
                assert count * gpus <= at_min, f"{preset.name}: raise min_workers in {path.name}"
        if not run.generators.ray_resources and not run.learner.ray_resources:  # a one-node preset
            need = run.generators.num * run.generators.gpus_per_engine
            need += run.learner.num_workers * run.learner.gpus_per_worker
            assert need <= max(t["resources"]["GPU"] for t in types.values())
    assert checked >= 3


# ------------------------------------------------------------------ the replay Redis on the head
def redis_start_command(cfg: dict) -> tuple[dict[str, str], list[str]]:
    """(environment assignments, argv) of the head command that starts the replay Redis."""
    found = [c for c in cfg["head_start_ray_commands"] if "head_redis.sh" in c]
    assert len(found) == 1, "the head must start the replay Redis (cluster/head_redis.sh) exactly once"
    words = shlex.split(found[0])
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        k, _, v = words.pop(0).partition("=")
        env[k] = v
    return env, words


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=ids)
def test_replay_redis_on_the_head(path):
    cfg = load(path)
    env, argv = redis_start_command(cfg)
    assert argv[0] == "bash" and argv[1].endswith("/treepo/cluster/head_redis.sh") and argv[2:] == ["start"]
    # the file mount puts the repository where the command looks for the script
    (remote, local) = next(iter(cfg["file_mounts"].items()))
    assert local == "." and argv[1] == f"{remote}/cluster/head_redis.sh"
    assert int(env["TREEPO_REDIS_PORT"]) != RAY_GCS_PORT
    assert f"--port={RAY_GCS_PORT}" in " ".join(cfg["head_start_ray_commands"])  # ... which Ray owns
    assert env.get("TREEPO_REDIS_APPENDFSYNC", "everysec") in ("everysec", "always")
    assert "TREEPO_REDIS_BIND" not in env  # the script binds the head's private address itself
    # the data dir is on the head's persistent volume, mounted into the container, and the script
    # refuses to start unless the host's initialization created the marker on that volume
    volume = "/mnt/treepo"
    assert env["TREEPO_REDIS_DIR"].startswith(volume + "/")
    assert f"-v {volume}:{volume}" in cfg["docker"]["head_run_options"]
    marker = env["TREEPO_REDIS_REQUIRE_FILE"]
    assert marker.startswith(volume + "/") and any(
        f"touch {marker}" in c for c in cfg["initialization_commands"]
    )
    head = cfg["available_node_types"][cfg["head_node_type"]]["node_config"]
    if provider(cfg) == "aws":
        data = [
            d for d in head["BlockDeviceMappings"] if d["DeviceName"] != "/dev/sda1"
        ]  # the root volume is /dev/sda1
        assert data and data[0]["Ebs"]["DeleteOnTermination"] is False
        assert cfg["provider"]["cache_stopped_nodes"] is True  # `ray down` stops: the volume stays
    else:
        data = [d for d in head["disks"] if not d.get("boot")]
        assert data and data[0]["autoDelete"] is False and data[0]["deviceName"] == "treepo-data"
        assert any("/dev/disk/by-id/google-treepo-data" in c for c in cfg["initialization_commands"])


def keys(obj) -> list[str]:
    if isinstance(obj, dict):
        return [str(k) for k in obj] + [k for v in obj.values() for k in keys(v)]
    if isinstance(obj, list):
        return [k for v in obj for k in keys(v)]
    return []


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=ids)
def test_no_password_in_the_yaml(path):
    text = path.read_text()
    assert "requirepass" not in text
    assert not re.search(r"TREEPO_REDIS_PASSWORD\s*=", text), "a literal password assignment"
    assert not re.search(r"redis-cli[^\n]*\s-a\s", text), "a password on a redis-cli command line"
    assert not [k for k in keys(load(path)) if "password" in k.lower()]


# ------------------------------------------------------------------ Ray token authentication
TOKEN_DEST = "/home/ray/.ray/auth_token"


def ray_start_commands(cfg: dict) -> list[str]:
    cmds = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    found = [c for c in cmds if re.search(r"\bray start\b", c)]
    assert len(found) == 2, "one `ray start` on the head, one on the workers"
    return found


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=ids)
def test_ray_token_auth_on_every_node(path):
    """Every `ray start` (head and workers) runs with RAY_AUTH_MODE=token and the token file that
    file_mounts copies from the operator's machine; the token itself is in neither the YAML nor the
    repository."""
    cfg = load(path)
    assert cfg["file_mounts"].get(TOKEN_DEST) == "~/.ray/auth_token"  # a path, never the token
    for cmd in ray_start_commands(cfg):
        before = cmd[: re.search(r"\bray start\b", cmd).start()]
        assert re.search(r"\bRAY_AUTH_MODE=token\b", before), cmd
        assert f"RAY_AUTH_TOKEN_PATH={TOKEN_DEST}" in before, cmd
        assert "RAY_AUTH_MODE=disabled" not in cmd
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        cmds = cfg[key]
        check = [i for i, c in enumerate(cmds) if f"test -s {TOKEN_DEST}" in c]
        start = [i for i, c in enumerate(cmds) if re.search(r"\bray start\b", c)]
        assert check and check[0] < start[0], f"{key}: the token check must come before `ray start`"
    text = path.read_text()
    assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]", text), "a literal token"
    assert not re.search(r"\b[0-9a-f]{32,}\b", text), "something that looks like a token"


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=ids)
def test_ray_start_commands_run_with_the_token(path, tmp_path):
    """The YAML's start commands, run by bash with `ray` replaced by a recorder: `ray start` sees
    token mode and a readable 0600 token; without a token file the node refuses to start."""
    cfg = load(path)
    token = tmp_path / "auth_token"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "ray-env"
    fake = bin_dir / "ray"
    fake.write_text(
        "#!/bin/sh\n"
        f'printf "%s|%s|%s\\n" "$*" "$RAY_AUTH_MODE" "$RAY_AUTH_TOKEN_PATH" >> {record}\n'
        '[ -n "$RAY_AUTH_TOKEN_PATH" ] && cat "$RAY_AUTH_TOKEN_PATH" > /dev/null || true\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_HEAD_IP": "10.0.0.1"}
    env.pop("RAY_AUTH_MODE", None)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        cmds = [c.replace(TOKEN_DEST, str(token)) for c in cfg[key] if "head_redis.sh" not in c]
        token.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
        results = [subprocess.run(["bash", "-c", c], env=env, capture_output=True, text=True) for c in cmds]
        check = next(r for c, r in zip(cmds, results, strict=True) if f"test -s {token}" in c)
        assert check.returncode != 0 and "ray get-auth-token --generate" in check.stderr

        token.write_text("0123456789abcdef" * 2)
        token.chmod(0o644)  # as rsync may copy it
        record.unlink(missing_ok=True)
        for c in cmds:  # `ray up` runs them in order and stops at the first failure
            res = subprocess.run(["bash", "-c", c], env=env, capture_output=True, text=True)
            assert res.returncode == 0, f"{key}: {res.stderr}\n{c}"
        starts = [line.split("|") for line in record.read_text().splitlines() if line.startswith("start")]
        assert len(starts) == 1 and starts[0][1:] == ["token", str(token)], starts
        assert token.stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------------ network exposure
@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=ids)
def test_nothing_open_to_the_world(path):
    cfg = load(path)
    for s in strings(cfg):
        assert "0.0.0.0" not in s, f"world-open address in {path.name}: {s[:80]!r}"
        assert "::/0" not in s
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start  # reached through `ray dashboard`'s SSH tunnel
    assert cfg["provider"]["use_internal_ips"] is True  # SSH over private addresses
    for name, node in cfg["available_node_types"].items():
        nc = node["node_config"]
        if provider(cfg) == "aws":
            # naming the group keeps Ray from creating its default one, whose SSH rule is 0.0.0.0/0
            assert nc.get("SecurityGroupIds"), f"{name}: no SecurityGroupIds"
        else:
            for nic in nc["networkInterfaces"]:
                assert "accessConfigs" not in nic, f"{name}: an external IP"
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        assert all(r.get("CidrIp") != "0.0.0.0/0" for r in rule.get("IpRanges", []))


# ------------------------------------------------------------------ software
@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=ids)
def test_setup_installs_the_gpu_extra_with_the_images_ray(path):
    import ray

    cfg = load(path)
    installs = [c for c in cfg["setup_commands"] if "pip install" in c]
    assert installs, "setup_commands must install the project"
    cmd = shlex.split(installs[0])
    project = [w for w in cmd if w.startswith(".[")]
    assert len(project) == 1 and cmd[cmd.index(project[0]) - 1] == "-e"
    assert "gpu" in install_extras(project[0])
    assert f"ray[default]=={ray.__version__}" in cmd  # pip fails instead of swapping Ray
    assert cmd[:3] == ["cd", next(iter(cfg["file_mounts"])), "&&"]


def install_extras(word: str) -> set[str]:
    """The extras of an editable install's target: ".[gpu,lora]" -> {"gpu", "lora"}."""
    found = re.fullmatch(r"\.\[([a-z0-9_,-]+)\]", word)
    assert found, f"not a project install target: {word!r}"
    return set(found.group(1).split(","))


def test_gpu_images_carry_every_runtime_extra():
    """The Dockerfile's GPU image and every cluster YAML install each extra the code imports at run
    time (every extra but the CPU build and the dev tools): without `lora` a learner.lora.rank > 0
    run, without `trackers` a log.backends=[wandb] run fails at start on the cluster."""
    # the names of pyproject.toml's [project.optional-dependencies] table (no tomllib on Python 3.10)
    table = (
        (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]\n")[1].split("\n[")[0]
    )
    extras = set(re.findall(r"^([a-z0-9_-]+) = \[", table, re.M))
    runtime = extras - {"cpu", "dev"}
    assert {"gpu", "lora", "trackers"} <= runtime
    gpu_step = re.search(r'gpu\)[^;]*pip"? install -q -e "(\.\[[^\]]*\])"', (ROOT / "Dockerfile").read_text())
    assert gpu_step, "the Dockerfile's gpu variant must pip install the project"
    targets = {"Dockerfile": gpu_step.group(1)}
    for path in CLUSTER_YAMLS:
        cmd = shlex.split(next(c for c in load(path)["setup_commands"] if "pip install" in c))
        targets[path.name] = next(w for w in cmd if w.startswith(".["))
    for where, target in targets.items():
        have = install_extras(target)
        assert have <= extras, f"{where}: unknown extras {sorted(have - extras)}"
        assert runtime <= have, f"{where} installs {target}: add {sorted(runtime - have)}"
    assert len(targets) == 1 + len(CLUSTER_YAMLS) >= 3


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=ids)
def test_image_is_pinned(path):
    import ray

    cfg = load(path)
    docker = cfg["docker"]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-{py}-(gpu|cu\d+)", docker["image"])
    for key in ("head_image", "worker_image"):
        assert key not in docker  # one image everywhere: same Ray and Python on every node
    for node in cfg["available_node_types"].values():
        assert "worker_image" not in node.get("docker", {})
    for s in strings(docker):
        assert not re.search(r":(latest|nightly)\b", s)
    for node in cfg["available_node_types"].values():
        nc = node["node_config"]
        if provider(cfg) == "aws":
            # the host only brings the NVIDIA driver and the container runtime: a pinned AMI id, or
            # the Deep Learning Base OSS NVIDIA driver AMI's public parameter (documented in the YAML)
            assert re.fullmatch(r"ami-[0-9a-f]{8,17}", nc["ImageId"]) or nc["ImageId"] == (
                "resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                "base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
            )
        else:
            image = nc["disks"][0]["initializeParams"]["sourceImage"]
            driver = re.search(r"nvidia-(\d+)", image)
            assert image.startswith("projects/deeplearning-platform-release/") and driver
            assert int(driver.group(1)) >= 580  # CUDA 13 capable driver


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=ids)
def test_every_shell_command_parses(path):
    cmds = commands(load(path))
    assert len(cmds) >= 6
    assert subprocess.run(["bash", "-n", "-c", "( if true; then\n)"], capture_output=True).returncode != 0
    # one bash for all (a syntax error anywhere fails the whole parse), then name the culprit
    res = subprocess.run(
        ["bash", "-n", "-c", "\n".join(f"( {c}\n)" for c in cmds)], capture_output=True, text=True
    )
    if res.returncode != 0:
        for cmd in cmds:
            one = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert one.returncode == 0, f"{path.name}: {one.stderr.strip()}\n{cmd}"
    assert res.returncode == 0, res.stderr
    res = subprocess.run(["bash", "-n", str(HEAD_REDIS)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def unquoted_password_expansions(text: str) -> list[str]:
    """Lines expanding $TREEPO_REDIS_PASSWORD outside double quotes (word splitting, globbing),
    unless it is the right-hand side of a plain assignment (which does not split)."""
    bad = []
    for line in text.splitlines():
        code = line.split(" #", 1)[0]
        for m in re.finditer(r"\$\{?TREEPO_REDIS_PASSWORD\b", code):
            before = code[: m.start()]
            quoted = (before.count('"') - before.count('\\"')) % 2 == 1
            assignment = re.search(r"(^|\s)[A-Za-z_][A-Za-z0-9_]*=$", before)
            if not (quoted or assignment):
                bad.append(line.strip())
    return bad


def test_password_expansions_are_quoted():
    assert unquoted_password_expansions('x=$TREEPO_REDIS_PASSWORD; echo "${TREEPO_REDIS_PASSWORD:-}"') == []
    assert unquoted_password_expansions("redis-cli -a $TREEPO_REDIS_PASSWORD ping") != []  # the check bites
    texts = [HEAD_REDIS.read_text()] + ["\n".join(commands(load(p))) for p in CLUSTER_YAMLS]
    for text in texts:
        assert unquoted_password_expansions(text) == []
    script = HEAD_REDIS.read_text()
    assert not re.search(r"redis-cli[^\n]*\s-a\b", script) and "--requirepass" not in script


# ------------------------------------------------------------------ head_redis.sh, for real
def _redis_major() -> int:
    exe = shutil.which("redis-server")
    if not exe:
        return 0
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"v=(\d+)\.", out)
    return int(m.group(1)) if m else 0


needs_redis7 = pytest.mark.skipif(_redis_major() < 7, reason="needs redis-server >= 7.0 on PATH")


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != RAY_GCS_PORT:
            return port


def _script(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(HEAD_REDIS), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"TREEPO_REDIS_PORT": "6379"}, "GCS port"),
        ({"TREEPO_REDIS_BIND": "0.0.0.0"}, "refusing to listen"),
        ({"TREEPO_REDIS_BIND": "8.8.8.8"}, "refusing to listen"),
        ({"TREEPO_REDIS_REQUIRE_FILE": "/nonexistent/.treepo-volume"}, "not mounted"),
        ({"TREEPO_REDIS_PASSWORD": "short"}, "16-512 characters"),
    ],
)
@needs_redis7
def test_head_redis_refuses_unsafe_settings(tmp_path, setting, message):
    env = {
        "TREEPO_REDIS_DIR": str(tmp_path / "redis"),
        "TREEPO_REDIS_BIND": "127.0.0.1",
        "TREEPO_REDIS_PORT": str(_free_port()),
        **setting,
    }
    res = _script(["start"], env)
    assert res.returncode != 0 and message in res.stderr
    assert not (tmp_path / "redis" / "redis.pid").exists()  # nothing was started


@needs_redis7
def test_head_redis_start_exec_restart_stop(tmp_path, monkeypatch):
    import redis

    monkeypatch.delenv("TREEPO_REDIS_PASSWORD", raising=False)
    data = tmp_path / "redis"
    port = _free_port()
    env = {
        "TREEPO_REDIS_DIR": str(data),
        "TREEPO_REDIS_BIND": "127.0.0.1",
        "TREEPO_REDIS_PORT": str(port),
        "TREEPO_REDIS_MAXMEMORY": "64mb",
        "TREEPO_REDIS_REQUIRE_FILE": str(tmp_path / ".treepo-volume"),
    }
    (tmp_path / ".treepo-volume").touch()
    res = _script(["start"], env)
    assert res.returncode == 0, res.stderr
    try:
        password = (data / "password").read_text().strip()  # the job's (ACL user treepo)
        admin = (data / "admin_password").read_text().strip()  # the script's (default user)
        assert len(password) >= 32 and len(admin) >= 32 and admin != password
        for name in ("password", "admin_password", "redis.conf"):  # all hold a secret
            assert (data / name).stat().st_mode & 0o777 == 0o600
        assert data.stat().st_mode & 0o777 == 0o700
        assert password not in (data / "redis.conf").read_text()  # only its SHA-256
        pid = int((data / "redis.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert password not in cmdline and admin not in cmdline  # in the 0600 config file, not argv

        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).ping()
        # the job's user runs the queue and nothing that reconfigures, wipes or stops the server
        job = redis.Redis(host="127.0.0.1", port=port, username="treepo", password=password, socket_timeout=5)
        job.xadd("treepo:t:probe", {"data": b"x"})
        for command in (("CONFIG", "SET", "maxmemory", "1mb"), ("FLUSHALL",), ("FLUSHDB",), ("SHUTDOWN",)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                job.execute_command(*command)
        with pytest.raises(redis.exceptions.NoPermissionError):
            job.set("not-treepo", "x")
        with pytest.raises(redis.AuthenticationError):  # the job's password is not the admin's
            redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=5).ping()
        client = redis.Redis(host="127.0.0.1", port=port, password=admin, socket_timeout=5)
        conf = {
            k: client.config_get(k)[k] for k in ("appendonly", "bind", "protected-mode", "maxmemory-policy")
        }
        assert conf == {
            "appendonly": "yes",
            "bind": "127.0.0.1",
            "protected-mode": "yes",
            "maxmemory-policy": "noeviction",
        }
        assert client.config_get("save")["save"] == ""  # AOF only: no fork-and-dump snapshots
        assert (data / "appendonlydir").is_dir()
        client.xadd("treepo:t:trees", {"data": b"x" * 100})

        # exec: the job's environment gets the URL and the stored password
        probe = 'printf "%s\\n%s\\n" "$TREEPO_QUEUE_URL" "$TREEPO_REDIS_PASSWORD"'
        res = _script(["exec", "sh", "-c", probe], env)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == [f"redis://treepo@127.0.0.1:{port}/0", password]

        # a restart (what `ray up` does) keeps the data (AOF) and the password
        res = _script(["start"], env)
        assert res.returncode == 0, res.stderr
        assert int((data / "redis.pid").read_text()) != pid
        client = redis.Redis(
            host="127.0.0.1", port=port, username="treepo", password=password, socket_timeout=5
        )
        assert client.xlen("treepo:t:trees") == 1
        assert (data / "admin_password").read_text().strip() == admin

        # a password chosen by the operator replaces the generated one
        chosen = "operator-chosen-password-0123456789"
        res = _script(["start"], {**env, "TREEPO_REDIS_PASSWORD": chosen})
        assert res.returncode == 0, res.stderr
        assert (data / "password").read_text().strip() == chosen
        client = redis.Redis(
            host="127.0.0.1", port=port, username="treepo", password=chosen, socket_timeout=5
        )
        assert client.xlen("treepo:t:trees") == 1
        pid = int((data / "redis.pid").read_text())
    finally:
        res = _script(["stop"], env)
    assert res.returncode == 0, res.stderr
    assert f"stopped (pid {pid})" in res.stdout
    res = _script(["exec", "true"], env)  # a job cannot start against a stopped queue
    assert res.returncode != 0 and "does not answer" in res.stderr
