"""Runs the checks: one forked process per check with its own time budget (killed past it, recorded as
``timeout``; the next check still runs), then one summary table and one JSON.

Status per check: ok | failed | timeout | skipped. Exit code 1 when a check failed or timed out, 2 when
none could run (no CUDA), else 0. The GPU run's budgets add up to at most :data:`TOTAL_LIMIT_S`, so the
whole run fits one short device call with time left to rerun a failed part (``--only NAME``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from gpucheck.base import Context, Skip, log
from gpucheck.envinfo import nvidia_smi, package_report, preload, use_vendor
from gpucheck.sizes import SIZES, Sizes

# in the order they run: the model first, then what needs torch alone, the loaders last
MODULES = (
    "check_setup",
    "check_attention",
    "check_learner",
    "check_nccl_group",
    "check_worker_sync",
    "check_wsync_pack",
    "check_wsync_2rank",
    "check_sampling",
)
TOTAL_LIMIT_S = 390.0  # the GPU run's budgets add up to at most this
SMOKE_BUDGET_S = 60.0  # each check's budget in the smoke run
SMOKE_TOTAL_S = 300.0


def checks() -> dict:
    """name -> check module, in run order."""
    mods = [importlib.import_module(f"gpucheck.{m}") for m in MODULES]
    return {m.NAME: m for m in mods}


def budget(name: str, sz: Sizes) -> float:
    """A check's budget in seconds: the sizes' own, else the module's (GPU) or the smoke budget."""
    if name in sz.budgets:
        return float(sz.budgets[name])
    return float(checks()[name].BUDGET_S) if sz.name == "gpu" else SMOKE_BUDGET_S


def run_check(name: str, ctx: Context) -> dict:
    """In the check's process: the check's details (``summary``, ``problems``)."""
    import torch

    torch.set_num_threads(min(8, os.cpu_count() or 1) if ctx.gpu else 1)
    module = checks()[name]
    if module.NEEDS_MODEL and not (ctx.model_dir / "config.json").is_file():
        raise Skip("no model: the setup check did not finish")
    return module.run(ctx)


def _child(name: str, ctx: Context, result_path: str) -> None:
    os.setsid()  # its own process group: a timeout kills the check and whatever it started
    try:
        details = run_check(name, ctx)
        problems = details.get("problems", [])
        out = {"status": "failed" if problems else "ok", "details": details}
        if problems:
            out["reason"] = "; ".join(problems)[:2000]
    except Skip as e:
        out = {"status": "skipped", "reason": str(e)}
    except BaseException as e:  # recorded; the runner goes on with the next check
        out = {
            "status": "failed",
            "reason": f"{type(e).__name__}: {e}"[:2000],
            "trace": traceback.format_exc()[-4000:],
        }
    Path(result_path).write_text(json.dumps(out, default=str))


def _run_one(ctx_mp, name: str, ctx: Context, limit: float) -> dict:
    result_path = ctx.workdir / f"result-{name}.json"
    t0 = time.monotonic()
    p = ctx_mp.Process(target=_child, args=(name, ctx, str(result_path)), name=name)
    p.start()
    p.join(limit)
    timed_out = p.is_alive()
    if timed_out:
        with contextlib.suppress(ProcessLookupError):  # it may have ended just now
            os.killpg(p.pid, signal.SIGKILL)
        p.join()
    if timed_out:
        res = {"status": "timeout", "reason": f"killed after its budget of {limit:.0f} s"}
    elif result_path.is_file():
        res = json.loads(result_path.read_text())
    else:
        res = {"status": "failed", "reason": f"check process died (exit code {p.exitcode}) without a result"}
    res["seconds"] = round(time.monotonic() - t0, 2)
    res["budget_s"] = round(limit)
    return res


def run_checks(names: list[str], sz: Sizes, gpu: bool, workdir: Path, max_total_s: float) -> dict:
    import multiprocessing as mp

    import torch

    # Forked checks share the imports already done here; that is safe while this process has not
    # initialised CUDA (it never does itself; spawn is the fallback should an import have done it).
    ctx_mp = mp.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    ctx = Context(sz, gpu, workdir)
    results: dict[str, dict] = {}
    t_start = time.monotonic()
    for name in names:
        left = max_total_s - (time.monotonic() - t_start)
        if left < 5:
            results[name] = {"status": "skipped", "reason": "out of total time", "seconds": 0.0}
            log(f"{name}: skipped (out of total time)")
            continue
        limit = min(budget(name, sz), left)
        log(f"{name}: start (budget {limit:.0f} s)")
        res = results[name] = _run_one(ctx_mp, name, ctx, limit)
        line = res.get("details", {}).get("summary") or res.get("reason", "")
        log(f"{name}: {res['status'].upper()} in {res['seconds']:.1f} s: {line}")
        if res["status"] == "failed" and "trace" in res:
            print(res["trace"], file=sys.stderr, flush=True)
    return results


def markdown_table(report: dict) -> str:
    env = report["env"]
    lines = [
        f"# GPU checks ({report['mode']})",
        "",
        f"- when: {report['started']}  total {report['total_s']:.1f} s",
        f"- python {env['python']}, torch {env['torch']}, CUDA {env['torch_cuda']}, GPU: {env.get('gpu') or '-'}",
        f"- vendor: {env['vendor']}",
        "",
        "| check | status | seconds | budget s | result |",
        "|---|---|---:|---:|---|",
    ]
    for name, r in report["checks"].items():
        text = r.get("details", {}).get("summary") or r.get("reason", "")
        if r["status"] == "failed" and r.get("reason"):
            text = r["reason"]
        text = text.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {name} | {r['status']} | {r['seconds']:.1f} | {r.get('budget_s', '')} | {text} |")
    return "\n".join(lines) + "\n"


def listing() -> str:
    """``--list``: every check with its GPU budget and what it checks."""
    gpu = SIZES["gpu"]
    rows = [f"{name:<12} {budget(name, gpu):4.0f} s  {m.ABOUT}" for name, m in checks().items()]
    total = sum(budget(n, gpu) for n in checks())
    return "\n".join(rows + [f"{'total':<12} {total:4.0f} s  (GPU budgets; at most {TOTAL_LIMIT_S:.0f})"])


def _parser() -> argparse.ArgumentParser:
    from gpucheck import __doc__ as doc

    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="", help="Directory for gpu_checks.json and gpu_checks.md.")
    p.add_argument(
        "--smoke", action="store_true", help="CPU stand-ins: tiny sizes, gloo, the same code paths."
    )
    p.add_argument(
        "--only", default="", help="Comma-separated checks to run (see --list); setup is added where needed."
    )
    p.add_argument("--list", action="store_true", help="List the checks with their budgets and exit.")
    p.add_argument(
        "--max-total-s",
        type=float,
        default=0.0,
        help=f"Overall limit (default {TOTAL_LIMIT_S:.0f} on GPU, {SMOKE_TOTAL_S:.0f} smoke).",
    )
    p.add_argument("--no-vendor", action="store_true", help="Do not put .gpu-vendor on sys.path.")
    p.add_argument("--keep", action="store_true", help="Keep the work directory (model, results).")
    return p


def _names(parser, only: str) -> list[str]:
    known = checks()
    names = [n.strip() for n in only.split(",") if n.strip()] or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown check(s) {unknown}: choose from {', '.join(known)}")
    if any(known[n].NEEDS_MODEL for n in names) and "setup" not in names:
        names.insert(0, "setup")  # they need its model
    return [n for n in known if n in names]  # run order


def _environment(vendor: str) -> dict:
    packages = package_report()
    preload_error = preload()  # imported once here so that the forked checks share it; no CUDA touched
    import torch

    env = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": nvidia_smi(),
        "cpu_count": os.cpu_count(),
        "vendor": vendor,
        "packages": packages,
        "preload_error": preload_error,
    }
    log(f"python {env['python']} torch {env['torch']} (CUDA {env['torch_cuda']}); vendor: {vendor}")
    log(f"GPU: {env['gpu'] or 'none seen by nvidia-smi'}")
    log("packages: " + ", ".join(f"{k} {v}" for k, v in packages.items()))
    return env


def _write(report: dict, out: str) -> None:
    text = json.dumps(report, indent=1, default=str)
    table = markdown_table(report)
    print(text, flush=True)
    print("\n" + table, flush=True)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_checks.json").write_text(text + "\n")
        (Path(out) / "gpu_checks.md").write_text(table)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        print(listing())
        return 0
    names = _names(parser, args.only)
    gpu = not args.smoke
    sz = SIZES["gpu" if gpu else "smoke"]
    max_total = args.max_total_s or (TOTAL_LIMIT_S if gpu else SMOKE_TOTAL_S)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: a hub lookup fails at once
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not gpu:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    # torch.cuda.is_available() through NVML, not the CUDA runtime: a runtime call here would leave the
    # forked checks unable to initialise CUDA
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    vendor = use_vendor(not args.no_vendor)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    t0 = time.monotonic()
    env = _environment(vendor)
    log(f"mode {'gpu' if gpu else 'smoke'}: checks {', '.join(names)}; total limit {max_total:.0f} s")
    workdir = Path(tempfile.mkdtemp(prefix="treepo-gpu-checks-"))
    try:
        results = run_checks(names, sz, gpu, workdir, max_total)
    finally:
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    setup_env = results.get("setup", {}).get("details", {}).get("torch")
    if setup_env:
        env["torch_device"] = setup_env
    report = {
        "mode": "gpu" if gpu else "smoke",
        "started": started,
        "total_s": round(time.monotonic() - t0, 1),
        "sizes": dataclasses.asdict(sz),
        "budgets_s": {n: budget(n, sz) for n in names},
        "env": env,
        "checks": results,
    }
    _write(report, args.out)
    if any(r["status"] in ("failed", "timeout") for r in results.values()):
        return 1
    return 0 if any(r["status"] == "ok" for r in results.values()) else 2  # 2: nothing could run here
