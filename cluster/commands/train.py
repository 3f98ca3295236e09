"""``treepo train``: resolve the config (defaults <- preset <- key=value overrides), refuse what would
fail before anything is written (a refused run leaves its directory as it was), write the config
into the run directory, then run training. With no arguments it runs the CPU demo on the embedded
defaults."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", default=None, help="Preset YAML: a path or a name in configs/ (e.g. demo)."
    )
    p.add_argument("--print-config", action="store_true", help="Print the resolved config as YAML and exit.")
    p.add_argument(
        "--help-config", action="store_true", help="List every config key with its default and meaning."
    )
    p.add_argument(
        "--resume", action="store_true", help="Continue the run directory's last checkpoint (= resume=true)."
    )
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="Engine and Ray logs on the console too (= log.level=info); by default they go to <run_dir>/logs/.",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="Config overrides, e.g. tree.w=16 learner.lr=1e-6."
    )


def run(args: argparse.Namespace) -> int:
    from common.config import help_table, load_config, to_yaml

    if args.help_config:
        for key, default, text in help_table():
            print(f"{key} = {default}\n    {text}")
        return 0
    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    overrides += ["log.level=info"] if args.verbose else []
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from common.plan import check_fits

    check_fits(cfg)  # a GPU config whose memory plan does not fit is refused before anything starts
    if cfg.learner.lora.rank > 0:  # refused here, not later inside a learner actor
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            from common.errors import ConfigError

            raise ConfigError(
                "learner.lora.rank > 0 needs peft: pip install -e '.[lora]' (or pip install peft), or set "
                "learner.lora.rank=0"
            )
    if cfg.tools:  # a tool spec that does not resolve is refused before anything starts
        from common.tools import resolve_tools

        resolve_tools(list(cfg.tools), timeout_s=cfg.tool_use.timeout_s)
    from cluster.logs import RunLogging

    logs = RunLogging(cfg)

    def start_logging() -> None:  # called by the driver once its refusals are behind it
        logs.start()
        if logs.quiet:
            print(f"[train] engine and Ray logs: {logs.dir}/ (--verbose shows them here)", flush=True)

    try:
        if cfg.driver == "ray":
            from cluster.pipeline.controller import run_pipeline

            return run_pipeline(cfg, on_checked=start_logging)
        from cluster.local import train

        return train(cfg, on_checked=start_logging)
    finally:
        logs.close()
