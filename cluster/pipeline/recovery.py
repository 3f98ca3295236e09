"""What the pipeline checks and repairs before it runs, so a resume neither loses nor repeats a tree.

- :func:`check_checkpoint`, before anything is written or started (a refused resume leaves the run
  directory as it was): the published checkpoint must be intact (no silent fall-back to an older one
  whose successors' trees were already acknowledged: :func:`cluster.rundir.check_before_writing`
  with ``fallback=False``), it must belong to this run (the Redis keys are named after the run
  directory's absolute path, so a moved directory would find no state), and the keys that define
  what a tree is (data, ``tree.w``) must equal the checkpoint's resolved config.
- :func:`check_queue_state` compares the queue's Redis with the run directory. On ``--resume``:
  Redis must still hold the run's prompt state at least as far as the checkpoint's snapshot (a wiped
  or AOF-less Redis would hand every prompt out again). On a fresh start (no checkpoint), Redis
  state left by an earlier attempt that crashed before its first checkpoint is removed, with a
  message, and so are that attempt's per-step logs.
- :func:`reconcile_window` runs after the learners loaded the checkpoint: the audit rows and the
  queue entries of the checkpoint's window (the steps since the previous checkpoint) are part of the
  checkpoint itself, so a crash between the save and the acknowledgement is finished here: rows
  missing from ``trained_trees.jsonl`` are restored and the covered entries acknowledged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import redis

from cluster.rundir import checkpoint_dir, restore_trained_rows, truncate_logs
from common.config import TrainConfig
from common.errors import ConfigError, QueueError
from common.keys import RunKeys
from common.replay import ReplayQueue
from learner.checkpoint import Checkpoint, require_checkpoint

# keys whose change would make a queued tree or a prompt position mean something else
RESUME_FIXED = (
    "data.train",
    "data.shuffle_seed",
    "data.synthetic_train_size",
    "data.synthetic_seed",
    "data.max_prompt_tokens",
    "tree.w",
    "tree.mode",
)


def config_snapshot(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as a flat JSON-able dict (``section.key`` -> value), kept in checkpoints."""
    out: dict[str, Any] = {}
    for section, value in dataclasses.asdict(cfg).items():
        if isinstance(value, dict) and section != "extra":
            out.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            out[section] = value
    return json.loads(json.dumps(out, default=str))


def check_checkpoint(cfg: TrainConfig, ckpt: Checkpoint, run_name: str) -> None:
    """Refuse a resume whose checkpoint belongs to another run directory or whose config changes a
    key that defines the run's prompts and trees. Reads the checkpoint only: made before anything is
    written, so the run directory (its ``config.yaml`` included) stays as it was."""
    extra = ckpt.extra
    owner = (extra.get("stream") or {}).get("run")
    if owner and owner != run_name:
        raise ConfigError(
            f"checkpoint {ckpt.path} belongs to run {owner!r} but run_dir={cfg.run_dir} is run {run_name!r}: "
            "the run directory moved (the queue's Redis keys are named after its absolute path); resume "
            "with run_dir set to the path the run was started at"
        )
    saved = extra.get("config") or {}
    now = config_snapshot(cfg)
    changed = [k for k in RESUME_FIXED if k in saved and saved[k] != now.get(k)]
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(
            f"resume changes {detail}, which define the run's prompts and trees: resume with the "
            f"checkpoint's values (see {Path(cfg.run_dir) / 'config.yaml'} of the first run), or start "
            "a new run_dir"
        )


def check_queue_state(
    cfg: TrainConfig, client: redis.Redis, run_name: str, where: str, ckpt: Checkpoint | None = None
) -> None:
    """Refuse a resume whose Redis state does not match its checkpoint; clear the state of an
    unfinished earlier attempt on a fresh start. ``where`` names the server in messages; ``ckpt``:
    the resumed checkpoint already checked by :func:`check_checkpoint` (found and checked here if
    None)."""
    keys = RunKeys(run_name)
    if not cfg.resume:
        _reset_unfinished_attempt(client, keys)
        truncate_logs(Path(cfg.run_dir), -1)
        return
    if ckpt is None:
        ckpt = require_checkpoint(checkpoint_dir(cfg.run_dir), fallback=False)
        check_checkpoint(cfg, ckpt, run_name)
    claimed = int(((ckpt.extra.get("prompts") or {}).get("cursor") or {}).get("claimed", 0))
    has_meta = bool(client.exists(keys.prompts_meta))
    cursor = int(client.get(keys.prompts_cursor) or 0)
    if claimed and (not has_meta or cursor < claimed):
        held = f"prompt cursor {cursor}" if has_meta else "no state"
        raise QueueError(
            f"the queue's Redis at {where} holds {held} for run {run_name!r} but checkpoint {ckpt.path.name} "
            f"was taken at prompt cursor {claimed}: Redis lost the run's data (restarted without its AOF, "
            "flushed, or queue.url names another server), and resuming would hand prompts out again. "
            "Restore Redis from its AOF (<run_dir>/redis/appendonlydir for the embedded server), or start "
            f"a new run_dir from the checkpoint's weights (model.path={ckpt.path})"
        )


def _reset_unfinished_attempt(client: redis.Redis, keys: RunKeys) -> None:
    """Delete every key of the run: they belong to an attempt that never checkpointed."""
    found = list(client.scan_iter(match=f"{keys.base}:*", count=1000))
    if not found:
        return
    cursor = int(client.get(keys.prompts_cursor) or 0)
    entries = int(client.xlen(keys.trees)) if client.exists(keys.trees) else 0
    for i in range(0, len(found), 500):
        client.delete(*found[i : i + 500])
    print(
        f"[pipeline] fresh start: removed the queue state of an earlier attempt of run {keys.run!r} that "
        f"never checkpointed ({cursor} prompt(s) handed out, {entries} queue entr(ies))",
        flush=True,
    )


def reconcile_window(run_dir: Path, queue: ReplayQueue, extra: dict[str, Any]) -> int:
    """Finish a checkpoint's window after a crash between its save and its acknowledgement: restore
    its audit rows and acknowledge its entries still pending. Returns the entries acknowledged."""
    window = extra.get("window") or {}
    restored = restore_trained_rows(run_dir, window.get("rows") or [])
    ids = list(window.get("entries") or [])
    acked = 0
    if ids:
        pending = set(queue.pending())
        acked = queue.ack([i for i in ids if i in pending])
    if restored or acked:
        print(
            f"[pipeline] the last checkpoint's window was not finished: {restored} audit row(s) restored, "
            f"{acked} queue entr(ies) it covers acknowledged",
            flush=True,
        )
    return acked
