"""scripts/gpu_checks.py on CPU: the ``--smoke`` run goes through every check's code path at tiny sizes
(gloo instead of NCCL), so the device run is known to work before any GPU time is spent on it; the GPU
run's budgets fit one short device call; the runner's isolation: a check that fails, hangs or is
skipped is recorded and the next one still runs."""

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
CHECKS = [
    "setup",
    "attention",
    "learner",
    "nccl_group",
    "worker_sync",
    "wsync_pack",
    "wsync_2rank",
    "sampling",
]


def _load_script():
    name = "treepo_gpu_checks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-checks")
    # --no-vendor: a .gpu-vendor built here for the GPU machine must not change what is tested
    proc = _run("--smoke", "--no-vendor", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "gpu_checks.json").read_text()), (out / "gpu_checks.md").read_text(), proc


def test_smoke_run_passes_every_check(smoke):
    report, table, proc = smoke
    checks = report["checks"]
    assert list(checks) == CHECKS
    bad = {n: c.get("reason") for n, c in checks.items() if c["status"] != "ok"}
    assert not bad
    assert report["mode"] == "smoke" and report["env"]["vendor"] == "disabled (--no-vendor)"
    for name in checks:  # one row each in the table, and progress lines on the way
        assert f"| {name} | ok |" in table
        assert f"{name}: OK" in proc.stdout


def test_gpu_budgets_fit_one_short_call_and_are_listed():
    gc = _load_script()
    gpu = gc.SIZES["gpu"]
    total = sum(gc.budget(n, gpu) for n in gc.checks())
    assert list(gc.checks()) == CHECKS and total <= gc.TOTAL_LIMIT_S <= 390
    listed = _run("--list", timeout=60)
    assert listed.returncode == 0
    for name in CHECKS:
        assert name in listed.stdout
    assert f"{total:.0f} s" in listed.stdout


def test_gpu_shapes_come_from_the_plan():
    gc = _load_script()
    from common.plan import KNOWN_ARCHS

    gpu = gc.SIZES["gpu"]
    seven_b = KNOWN_ARCHS["Qwen/Qwen2.5-7B"]
    assert gpu.attn_model == seven_b and gpu.attn_tokens == 8192
    assert {k: v for k, v in gpu.model.items() if k != "num_hidden_layers"} == {
        k: v for k, v in seven_b.items() if k != "num_hidden_layers"
    }
    assert gpu.micro_batch_tokens == 8192 and gpu.nccl_mib == (1024, 64)


def test_smoke_attention_matches_the_dense_mask_reference(smoke):
    d = smoke[0]["checks"]["attention"]["details"]
    assert max(d["relative_errors"].values()) <= d["tolerance"]
    assert d["groups"] and any(g["masked"] for g in d["groups"]) and any(not g["masked"] for g in d["groups"])
    assert len(d["forward_kernels"]) == len(d["groups"]) and all(g["kernel"] != "?" for g in d["groups"])


def test_smoke_learner_compares_packings_over_micro_batches_and_moves_weights(smoke):
    d = smoke[0]["checks"]["learner"]["details"]
    assert d["process_group"] == "gloo" and d["param_type"] == "DTensor"
    cmp = d["logprobs_tree_vs_none"]
    assert min(cmp["micro_batches"].values()) >= 2 and cmp["response_tokens"] > 0
    assert cmp["computed_tokens"]["tree"] < cmp["computed_tokens"]["none"]
    assert cmp["max_abs_diff"] < 0.1 * cmp["logprob_std"]  # the comparison can tell a wrong attention
    assert [s["version"] for s in d["steps"]] == [1, 2]
    for step in d["steps"]:
        assert all(float(v) > 0 for v in step["max_abs_weight_change"].values())
    assert d["weights_for_sync"]["dtypes"] == ["torch.bfloat16"] and d["plan"]["torch_gib"] > 0


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
    ws = checks["worker_sync"]["details"]
    assert ws["buckets"] > 2 and ws["broadcasts"] >= ws["buckets"] and ws["receive_d2h_gbps"] > 0
    group = checks["nccl_group"]["details"]
    assert group["backend"] == "gloo" and [b["mib"] for b in group["broadcasts"]] == [16, 16, 1, 1]
    assert group["after_abort"] != "hung"


def test_a_failing_hanging_or_skipped_check_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    _load_script()
    from gpucheck import runner
    from gpucheck.base import Skip

    def fake_run_check(name, ctx):  # injected failures; the checks run in forked processes
        if name == "boom":
            raise RuntimeError("injected failure")
        if name == "hang":
            time.sleep(60)
        if name == "skip":
            raise Skip("not here")
        if name == "bad":
            return {"summary": "ran", "problems": ["value off"]}
        if name == "die":
            import os

            os._exit(3)
        return {"summary": "fine", "problems": []}

    monkeypatch.setattr(runner, "run_check", fake_run_check)
    sz = dataclasses.replace(
        runner.SIZES["smoke"], budgets={n: 1.5 for n in ("boom", "hang", "skip", "bad", "die", "fine")}
    )
    t0 = time.monotonic()
    res = runner.run_checks(
        ["boom", "hang", "skip", "bad", "die", "fine"], sz, False, tmp_path, max_total_s=60
    )
    assert time.monotonic() - t0 < 30  # the hung check was killed at its budget
    assert {n: r["status"] for n, r in res.items()} == {
        "boom": "failed",
        "hang": "timeout",
        "skip": "skipped",
        "bad": "failed",
        "die": "failed",
        "fine": "ok",
    }
    assert "RuntimeError: injected failure" in res["boom"]["reason"] and "trace" in res["boom"]
    assert res["bad"]["reason"] == "value off" and res["skip"]["reason"] == "not here"
    assert "exit code 3" in res["die"]["reason"] and res["hang"]["seconds"] < 15
    table = runner.markdown_table(
        {
            "mode": "smoke",
            "started": "now",
            "total_s": 1.0,
            "env": {"python": "3", "torch": "t", "torch_cuda": None, "vendor": "absent"},
            "checks": res,
        }
    )
    assert "| hang | timeout |" in table and "| bad | failed |" in table and "value off" in table


def test_unknown_check_is_refused_with_the_list():
    proc = _run("--smoke", "--only", "nope", timeout=60)
    assert proc.returncode == 2 and "unknown check(s) ['nope']" in proc.stderr and "attention" in proc.stderr
