"""scripts/gpu_checks.py on CPU: the ``--smoke`` run goes through the same code paths as the GPU run
(FSDP2 + bf16 learner over gloo, tree vs flat sampling, weight-sync round trips) at tiny sizes, so the
script is known to work before any GPU time is spent on it. Plus the runner's isolation: a check that
fails, hangs or is skipped is recorded and the next one still runs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import time

import pytest
from paths import REPO

SCRIPT = REPO / "scripts" / "gpu_checks.py"


def _load_script():
    name = "treepo_gpu_checks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-checks")
    # --no-vendor: a .gpu-vendor built here for the GPU machine must not change what is tested
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--no-vendor", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "gpu_checks.json").read_text()), (out / "gpu_checks.md").read_text(), proc


def test_smoke_run_passes_every_check(smoke):
    report, table, proc = smoke
    checks = report["checks"]
    assert list(checks) == ["setup", "learner", "sampling", "wsync_pack", "wsync_2rank"]
    bad = {n: c.get("reason") for n, c in checks.items() if c["status"] != "ok"}
    assert not bad
    assert report["mode"] == "smoke" and report["env"]["vendor"] == "disabled (--no-vendor)"
    for name in checks:  # one row each in the table, and progress lines on the way
        assert f"| {name} | ok |" in table
        assert f"{name}: OK" in proc.stdout


def test_smoke_learner_is_fsdp2_bf16_and_every_step_moves_weights(smoke):
    d = smoke[0]["checks"]["learner"]["details"]
    assert d["process_group"] == "gloo" and d["param_type"] == "DTensor"
    assert d["mp_param_dtype"] in (None, "torch.bfloat16")
    assert [s["version"] for s in d["steps"]] == [1, 2, 3]
    for step in d["steps"]:
        assert all(float(v) > 0 for v in step["max_abs_weight_change"].values())
    # more than one micro-batch per step: accumulation under sharding is on the path
    assert d["response_tokens_per_step"] > 0 and d["steps"][0]["sequence_tokens"] > d["micro_batch_tokens"]
    assert "lm_head.weight" not in str(d["problems"]) and d["weights_for_sync"]["tensors"] > 0


def test_smoke_sampling_decodes_the_analytic_token_counts(smoke):
    d = smoke[0]["checks"]["sampling"]["details"]
    for mode in ("tree", "flat"):
        assert d[mode]["rollout/decoded_tokens"] == d[mode]["analytic_decoded_tokens"] > 0
    assert d["decoded_tree_over_flat"] == d["analytic_tree_over_flat"] < 1.0


def test_smoke_weight_sync_round_trips_are_exact(smoke):
    checks = smoke[0]["checks"]
    pack = checks["wsync_pack"]["details"]
    assert pack["buckets"] > 2 and pack["zero_copy_bytes"] < pack["bytes"]
    two = checks["wsync_2rank"]["details"]
    assert two["backend"] == "gloo" and two["bytes"] > 0 and two["buckets"] > 2


def test_a_failing_hanging_or_skipped_check_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    gc = _load_script()

    def fake_run_check(name, sz, gpu, workdir):  # injected failures; the checks run in forked processes
        if name == "boom":
            raise RuntimeError("injected failure")
        if name == "hang":
            time.sleep(60)
        if name == "skip":
            raise gc.Skip("not here")
        if name == "bad":
            return {"summary": "ran", "problems": ["value off"]}
        return {"summary": "fine", "problems": []}

    monkeypatch.setattr(gc, "_run_check", fake_run_check)
    sz = dataclasses.replace(gc.SIZES["smoke"], budgets={"hang": 1.5})
    t0 = time.monotonic()
    res = gc.run_checks(["boom", "hang", "skip", "bad", "fine"], sz, False, tmp_path, max_total_s=60)
    assert time.monotonic() - t0 < 30  # the hung check was killed at its budget
    assert {n: r["status"] for n, r in res.items()} == {
        "boom": "failed",
        "hang": "timeout",
        "skip": "skipped",
        "bad": "failed",
        "fine": "ok",
    }
    assert "RuntimeError: injected failure" in res["boom"]["reason"] and "trace" in res["boom"]
    assert res["bad"]["reason"] == "value off" and res["skip"]["reason"] == "not here"
    assert res["hang"]["seconds"] < 15
    table = gc.markdown_table(
        {
            "mode": "smoke",
            "started": "now",
            "total_s": 1.0,
            "env": {"python": "3", "torch": "t", "torch_cuda": None, "vendor": "absent"},
            "checks": res,
        }
    )
    assert "| hang | timeout |" in table and "| bad | failed |" in table and "value off" in table
