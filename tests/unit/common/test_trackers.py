"""Experiment trackers through the real client libraries: TensorBoard event files, W&B in offline mode
(the run file it writes is read back record by record), MLflow on a local file store (no server);
the run ids kept in the run directory make --resume continue the same runs."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from common.config import load_config
from common.errors import ConfigError
from common.trackers import IDS_FILE, mlflow_key, open_trackers

RECORDS = [
    {
        "tree_id": "t-1",
        "prompt_id": "p-1",
        "prompt": "What is 2+5?",
        "gold": "7",
        "generator": 0,
        "leaves": [
            {
                "text": "2+5=7 \\boxed{7}",
                "answer": "7",
                "reward": 1.0,
                "correct": True,
                "advantage": 0.75,
                "finish_reason": "finished",
                "depth": 2,
                "tokens": 9,
                "versions": [3, 4],
            }
        ],
    }
]


def _cfg(run_dir, *extra):
    return load_config(None, [f"run_dir={run_dir}", "driver=local", *extra])


def _log_two_steps(cfg, first=1):
    t = open_trackers(cfg)
    t.log(first, {"rollout/reward": 0.5, "eval/mean@4": 0.25, "nan/skipped": float("nan")})
    t.log_rollouts(first, RECORDS)
    t.log(first + 1, {"rollout/reward": 0.75})
    t.close()


def test_jsonl_always_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_two_steps(_cfg(tmp_path, "log.backends=[tensorboard]"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["rollout/reward"] == 0.75
    rollouts = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert rollouts == [{"step": 1, **RECORDS[0]}]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("rollout/reward")] == [(1, 0.5), (2, 0.75)]
    assert "nan/skipped" not in acc.Tags()["scalars"]
    assert not (tmp_path / IDS_FILE).exists()  # no tracker with a run id


def test_no_backend_writes_only_the_jsonl_logs(tmp_path):
    _log_two_steps(_cfg(tmp_path, "log.backends=[]"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "rollouts.jsonl"]


# ------------------------------------------------------------------ W&B (offline)


def _wandb_records(run_file):
    """The protobuf records of a W&B run file (a leveldb-style log: 7-byte header, 32 KiB blocks of
    checksum/length/type-framed chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = run_file.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 0:  # padding to the end of the block
            pos += (block - pos % block) % block
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def _wandb_run(run_dir, run_id):
    (run_path,) = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    records = list(_wandb_records(run_path / f"run-{run_id}.wandb"))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history = [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    return run_path, run, history


@pytest.fixture
def wandb_offline(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_offline_writes_the_run_and_resume_continues_it(tmp_path, wandb_offline):
    keys = [
        "log.backends=[wandb]",
        "log.wandb.project=treepo-test",
        "log.wandb.group=g1",
        "log.wandb.tags=[a,b]",
    ]
    _log_two_steps(_cfg(tmp_path, *keys))
    run_id = json.loads((tmp_path / IDS_FILE).read_text())["wandb"]
    run_path, run, history = _wandb_run(tmp_path, run_id)
    assert (run.run_id, run.project, run.run_group, list(run.tags)) == (
        run_id,
        "treepo-test",
        "g1",
        ["a", "b"],
    )
    steps = [(h["train/step"], h.get("rollout/reward"), "rollouts/_type" in h) for h in history]
    assert (1, 0.5, False) in steps and (2, 0.75, False) in steps and any(s == 1 and t for s, _, t in steps)
    assert any(h.get("eval/mean@4") == 0.25 for h in history)
    (table_file,) = list((run_path / "files" / "media" / "table").glob("rollouts_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"][:5] == ["step", "tree_id", "prompt", "leaf", "text"]
    assert table["data"] == [
        [1, "t-1", "What is 2+5?", 0, "2+5=7 \\boxed{7}", 1.0, True, 0.75, "finished", 2, "3,4"]
    ]

    _log_two_steps(_cfg(tmp_path, *keys, "resume=true"), first=2)  # --resume: the same W&B run
    assert json.loads((tmp_path / IDS_FILE).read_text())["wandb"] == run_id
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    _log_two_steps(_cfg(tmp_path / "fresh", *keys))  # a new run directory: a new W&B run
    assert json.loads((tmp_path / "fresh" / IDS_FILE).read_text())["wandb"] != run_id


@pytest.fixture
def wandb_online(monkeypatch, tmp_path):
    """Online W&B with no credentials anywhere: no key variables, an empty netrc file."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def test_wandb_online_without_credentials_is_refused_when_the_config_is_validated(tmp_path, wandb_online):
    with pytest.raises(ConfigError, match=r"no W&B credentials.*run `wandb login` or export WANDB_API_KEY"):
        _cfg(tmp_path, "log.backends=[wandb]")  # load_config validates: before anything starts
    assert not (tmp_path / "wandb").exists()
    _cfg(tmp_path, "log.backends=[tensorboard]")  # only a config that lists wandb looks


def test_a_wandb_login_credential_is_accepted(tmp_path, wandb_online, monkeypatch):
    """The key `wandb login` writes (a netrc entry for the server) is found by the client's own lookup,
    also for a server of WANDB_BASE_URL; a key the client would refuse is reported at once."""
    from common.trackers import wandb_credentials

    wandb_online.write_text(f"machine api.wandb.ai\n  login user\n  password {'a' * 40}\n")
    assert wandb_credentials() == "netrc"
    _cfg(tmp_path, "log.backends=[wandb]")  # validates
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert wandb_credentials() is None  # the stored key is for another server
    wandb_online.write_text(f"machine wandb.example.com\n  login user\n  password {'b' * 40}\n")
    assert wandb_credentials() == "netrc"
    monkeypatch.setenv("WANDB_API_KEY", "c" * 40)
    assert wandb_credentials() == "WANDB_API_KEY"


def test_a_missing_client_library_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'treepo\[trackers\]'"):
        open_trackers(_cfg(tmp_path, "log.backends=[mlflow]"))


# ------------------------------------------------------------------ MLflow (file store, no server)


def test_mlflow_file_store_needs_no_server_and_resume_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    run_cfg = _cfg(tmp_path, "log.backends=[mlflow]", "log.mlflow.experiment=exp1")
    _log_two_steps(run_cfg)
    run_id = json.loads((tmp_path / IDS_FILE).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "exp1"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "rollout/reward")] == [
        (1, 0.5),
        (2, 0.75),
    ]
    assert [m.value for m in client.get_metric_history(run_id, "eval/mean_at_4")] == [0.25]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "rollouts"} <= artifacts
    params = run.data.params  # the flattened config: runs filter and compare by any key
    assert (params["tree.w"], params["log.mlflow.experiment"], params["log.backends"]) == (
        "8",
        "exp1",
        '["mlflow"]',
    )
    assert params["algo.max_staleness"] == str(run_cfg.algo.max_staleness) and len(params) > 100

    _log_two_steps(
        _cfg(tmp_path, "log.backends=[mlflow]", "log.mlflow.experiment=exp1", "resume=true"), first=3
    )
    assert json.loads((tmp_path / IDS_FILE).read_text())["mlflow"] == run_id
    steps = [m.step for m in client.get_metric_history(run_id, "rollout/reward")]
    assert sorted(steps) == [1, 2, 3, 4]


def test_mlflow_keys():
    assert mlflow_key("eval/mean@4") == "eval/mean_at_4"
    assert mlflow_key("a/b c.d-e_f") == "a/b c.d-e_f"
    assert mlflow_key("x(y)") == "x_y_"


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "override, message",
    [
        ("log.tensorboard=false", "log.tensorboard .* was removed: trackers are listed in log.backends"),
        ("log.wandb_project=p", "log.wandb_project .* was removed: .*log.wandb.project"),
        (
            "log.backends=[neptune]",
            "'neptune' is not a tracker; choose from jsonl, tensorboard, wandb, mlflow",
        ),
        ("log.backends=[wandb,wandb]", "names a tracker twice"),
        ("log.level=loud", "log.level='loud' is not one of warning, info, debug"),
        ("log.rollouts_every_steps=-1", "log.rollouts_every_steps=-1 is too small"),
    ],
)
def test_log_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
