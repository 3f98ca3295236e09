"""``treepo convert-bench``: public benchmark files (MATH500, AIME, AMC, Minerva, OlympiadBench; jsonl or
parquet as distributed) → our rows ``{id, prompt, answer, source, format, ...}`` for ``treepo eval``.

One output per input: ``--out`` is a file for a single input, else a directory that receives
``<stem>.jsonl`` (or ``.parquet`` with ``--parquet``). The format is detected from the columns unless
``--format`` is given; bad rows are listed (file, row, reason) and skipped, or fail the command with
``--bad-rows reject``. Conversion rules: :mod:`common.benchmarks`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

from common.config import BadRows


def add_arguments(p: argparse.ArgumentParser) -> None:
    from common.benchmarks import FORMATS

    p.add_argument("inputs", nargs="+", help="Benchmark files as distributed (.jsonl or .parquet).")
    p.add_argument(
        "--out",
        required=True,
        help="Output file (one input; .jsonl or .parquet) or directory (one <stem>.jsonl per input).",
    )
    p.add_argument("--format", choices=sorted(FORMATS), default=None, help="Input format (default: detect).")
    p.add_argument(
        "--source", default=None, help="Value of each row's 'source' field (default: the input's file stem)."
    )
    p.add_argument(
        "--bad-rows",
        choices=get_args(BadRows),
        default="skip",
        help="Skip bad rows (listed) or stop at the first one.",
    )
    p.add_argument(
        "--parquet", action="store_true", help="Write .parquet instead of .jsonl into a directory."
    )


def _target(out: Path, src: Path, single: bool, parquet: bool) -> Path:
    if single and out.suffix.lower() in (".jsonl", ".parquet", ".pq"):
        return out
    return out / f"{src.stem}.{'parquet' if parquet else 'jsonl'}"


def run(args: argparse.Namespace) -> int:
    from common.benchmarks import convert_file, write_rows
    from common.errors import ConfigError

    inputs = [Path(s) for s in args.inputs]
    out = Path(args.out)
    single = len(inputs) == 1
    if not single and out.suffix.lower() in (".jsonl", ".parquet", ".pq"):
        raise ConfigError(f"--out {out} is a file but {len(inputs)} inputs were given: pass a directory")
    if args.source and not single:
        raise ConfigError("--source names one benchmark: convert one input at a time to set it")
    targets = [_target(out, src, single, args.parquet) for src in inputs]
    if len(set(targets)) != len(targets):
        raise ConfigError("two inputs share a file stem and would write the same output: rename one")
    summary = []
    for src, dst in zip(inputs, targets):
        res = convert_file(src, format=args.format, source=args.source, bad_rows=args.bad_rows)
        write_rows(res.rows, dst)
        bad = [str(b) for b in res.report.bad]
        summary.append(
            {
                "input": str(src),
                "output": str(dst),
                "format": res.format,
                "source": res.source,
                "rows": res.report.total,
                "kept": res.report.kept,
                "bad": bad,
            }
        )
        print(f"{src} [{res.format}] -> {dst}: {res.report.kept} of {res.report.total} rows, {len(bad)} bad")
        for b in bad:
            print(f"  bad row {b}")
    print(json.dumps({"converted": summary}))
    return 0
