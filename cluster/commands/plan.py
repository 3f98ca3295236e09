"""``treepo plan``: the memory plan of a config (``common/plan.py``): per-GPU memory of an engine and of
a learner rank, the weight sync's peak, checkpoint size and resume read time; a table, or JSON.
Exit status 0 when every GPU side fits, 1 when one does not (the line names the key to change)."""

from __future__ import annotations

import argparse
import json

from common.plan import DEFAULT_READ_GBPS, gpu_sides, make_plan, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        default=None,
        help="Preset YAML: a path or a name in configs/ (e.g. qwen2.5-7b-treepo).",
    )
    p.add_argument("--json", action="store_true", help="Print the plan as JSON instead of the table.")
    p.add_argument(
        "--read-gbps",
        type=float,
        default=DEFAULT_READ_GBPS,
        help=f"Read bandwidth of the checkpoint file system in GB/s for the resume time (default {DEFAULT_READ_GBPS:g}).",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="Config overrides, as for `treepo train`."
    )


def run(args: argparse.Namespace) -> int:
    from common.config import load_config
    from common.errors import ConfigError

    if not args.read_gbps > 0:
        raise ConfigError(
            f"--read-gbps={args.read_gbps} must be > 0: give the file system's read bandwidth in GB/s"
        )
    cfg = load_config(args.config, list(args.overrides))
    plan = make_plan(cfg, read_gbps=args.read_gbps)
    checked = gpu_sides(cfg)
    misfits = plan.refusals(checked)
    if args.json:
        print(
            json.dumps({**plan.as_dict(), "checked": checked, "refused": misfits}, indent=1, sort_keys=True)
        )
    else:
        print(table(plan))
        print()
        if not checked:
            print("verdict: no side runs on a GPU (CPU run): nothing to check")
        elif misfits:
            for fix in misfits:
                print(f"verdict: does not fit: {fix}")
        else:
            sizes = {cfg.generators.gpu_memory_gib, cfg.learner.gpu_memory_gib}
            a100 = " (A100-80GB)" if sizes == {80.0} else ""
            gib = " / ".join(f"{s:g}" for s in sorted(sizes))
            print(f"verdict: fits on {gib} GiB GPUs{a100}: {', '.join(checked)} checked")
    return 1 if misfits else 0
