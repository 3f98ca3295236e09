"""``treepo queue inspect``: the replay queue's streams at a glance.

For every run on the server (or the one named by ``--run-name``): length of the run's tree stream,
undelivered and pending entries, pending per consumer, the oldest pending entry's age, the
dead-letter stream's length and count, and the reasons of its last few entries; then the prompt
cursor when dispatch state exists. ``--run-dir`` reads the embedded Redis's endpoint and password
from ``<run_dir>/redis/``; if that server is not running it is started for the inspection and
stopped again (its AOF is the data).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    p = sub.add_parser("inspect", help="Show both streams of the replay queue.", description=__doc__)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="Redis URL (redis:// or rediss://); password from --password-env.")
    where.add_argument("--run-dir", help="Run directory of a run that used the embedded Redis.")
    p.add_argument(
        "--password-env", default="TREEPO_REDIS_PASSWORD", help="Env var with the password for --url."
    )
    p.add_argument("--run-name", default="", help="Only this run (default: every treepo run on the server).")
    p.add_argument("--dead", type=int, default=5, help="Dead-letter entries to show per run.")
    p.add_argument("--json", action="store_true", help="Print JSON instead of a table.")


def _runs(client) -> list[str]:
    from common.keys import TREES_PATTERN, RunKeys

    return sorted(
        {RunKeys.of_trees_key(key).run for key in client.scan_iter(match=TREES_PATTERN, count=1000)}
    )


def inspect(url: str, password: str | None, run_name: str = "", dead: int = 5) -> list[dict[str, Any]]:
    """One report dict per run: :meth:`ReplayQueue.stats` plus the last dead entries and the prompt cursor."""
    from common.keys import RunKeys
    from common.replay import ReplayQueue, connect, guarded

    client = connect(url, password)
    runs = [run_name] if run_name else guarded(client, url, _runs, client)
    out = []
    for run in runs:
        keys = RunKeys(run)
        if not client.exists(keys.trees):
            out.append({"run": run, "missing": True})
            continue
        q = ReplayQueue(url, run, client=client)
        s = q.stats()
        s["dead_last"] = [{k: v for k, v in d.items() if k != "data"} for d in q.dead_entries(dead)]
        cursor = client.get(keys.prompts_cursor)
        meta = client.hgetall(keys.prompts_meta)
        if meta:
            n, epochs = int(meta[b"n"]), int(meta[b"epochs"])
            c = int(cursor or 0)
            inflight = 0
            for g in client.smembers(keys.prompts_generators):
                inflight += client.hlen(keys.prompts_inflight(g.decode()))
            s["prompts"] = {
                "n": n,
                "epochs": epochs,
                "epoch": c // n,
                "position": c % n,
                "claimed": c,
                "retry": client.llen(keys.prompts_retry),
                "in_flight": inflight,
            }
        out.append(s)
    client.close()
    return out


def _print(reports: list[dict[str, Any]], where: str) -> None:
    from common.keys import RunKeys

    print(f"replay queue at {where}")
    if not reports:
        print("  no treepo streams on this server")
    for r in reports:
        if r.get("missing"):
            print(f"\nrun {r['run']}: no stream {RunKeys(r['run']).trees}")
            continue
        age = r["oldest_pending_age_s"]
        print(f"\nrun {r['run']}")
        print(
            f"  {r['stream']:<40} length {r['length']:>7}  undelivered {r['undelivered']:>6}  "
            f"pending {r['pending']:>6}  depth {r['depth']:>6}  oldest pending "
            f"{'-' if age is None else f'{age:.1f} s'}"
        )
        for consumer, n in sorted(r["pending_per_consumer"].items()):
            print(f"    consumer {consumer:<28} pending {n:>6}")
        print(
            f"  {RunKeys(r['run']).dead:<40} length {r['dead_length']:>7}  dead-lettered {r['dead_count']:>6}"
        )
        for d in r["dead_last"]:
            print(f"    {d['id']} (source {d['source_id']}, {d['bytes']} B): {d['reason']}")
        if "prompts" in r:
            p = r["prompts"]
            print(
                f"  prompts: epoch {p['epoch']}/{p['epochs']} position {p['position']}/{p['n']}  "
                f"retry {p['retry']}  in flight {p['in_flight']}"
            )
        print(f"  memory {r['used_memory_mb']} MB of {r['maxmemory_mb'] or 'unlimited'} MB")


def run(args: argparse.Namespace) -> int:
    from common.replay import describe

    if args.url:
        reports = inspect(args.url, os.environ.get(args.password_env) or None, args.run_name, args.dead)
        where = describe(args.url)
    else:
        from cluster.pipeline.redis_launcher import EmbeddedRedis, find_running
        from common.errors import QueueError

        if not os.path.isdir(os.path.join(args.run_dir, "redis")):
            raise QueueError(f"{args.run_dir} has no embedded Redis data (no redis/ folder); use --url")
        found = find_running(args.run_dir)
        if found:
            reports = inspect(found[0], found[1], args.run_name, args.dead)
            where = f"{describe(found[0])} (running)"
        else:
            with EmbeddedRedis(args.run_dir) as server:
                reports = inspect(server.url, server.password, args.run_name, args.dead)
                where = (
                    f"{describe(server.url)} (started from {server.aof_dir} for this inspection, now stopped)"
                )
    if args.json:
        print(json.dumps(reports, indent=1, default=str))
    else:
        _print(reports, where)
    return 0
