"""``treepo sample``: inference-only tree sampling over a dataset with an existing model.

One tree per prompt (``tree.*`` settings; ``tree.mode=flat`` for independent samples), many trees in
flight on one engine (``generators.trees_in_flight``). Writes one readable JSON object per tree (prompt
id, prompt text, gold answer, leaves with node path, response text, finish reason, length, reward and
extracted answer, the majority-vote answer) and optionally the binary wire form (``--wire``: each
tree as a 4-byte little-endian length followed by :func:`common.tree.encode_tree` bytes). Prints a
progress bar and a summary table; the summary is also written as JSON next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

_SCALARS = (str, int, float, bool, type(None))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="Model directory, hub id or 'tiny:<task>' (default: model.path)."
    )
    parser.add_argument(
        "--data",
        default=None,
        help="Prompts: .jsonl/.parquet with {id, prompt, answer} or 'synthetic:<task>' (default: data.eval).",
    )
    parser.add_argument("--out", required=True, help="Output .jsonl, one tree per line.")
    parser.add_argument(
        "--wire", default="", help="Also write the binary wire form of every tree to this file."
    )
    parser.add_argument(
        "--config", default=None, help="Preset name or YAML file (defaults <- preset <- overrides)."
    )
    parser.add_argument(
        "--backend",
        default=None,
        choices=["vllm", "hf"],
        help="Generation backend (default: generators.backend).",
    )
    parser.add_argument(
        "--reward",
        default=None,
        help="Score leaves: auto | math | arith | package.module:function | none (default: reward.fn).",
    )
    parser.add_argument("--limit", type=int, default=0, help="Sample only the first N prompts (0 = all).")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="key=value config overrides, e.g. tree.w=16 tree.d=8 sampling.temperature=0.8",
    )


def _load_cfg(args: argparse.Namespace):
    from common.config import load_config

    # the flags are overrides like any other, so they take part in the cross-field checks
    flags = []
    if args.model:
        flags.append(f"model.path={args.model}")
    if args.backend:
        flags.append(f"generators.backend={args.backend}")
    return load_config(args.config, list(args.overrides) + flags)


def majority(answers: list[str | None]) -> str | None:
    """Most frequent extracted answer (ties: the one seen first); None when no leaf has an answer."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def tree_record(
    tree: Any,
    tok: Any,
    prompt_text: str,
    gold: str | None,
    majority_answer: str | None,
    maj_correct: bool | None,
) -> dict:
    paths = tree.leaf_paths()
    leaves = []
    for leaf, path in zip(tree.leaves, paths):
        leaves.append(
            {
                "node_path": path,
                "finish_reason": leaf.finish_reason,
                "length": leaf.length,
                "reward": None if math.isnan(leaf.reward) else leaf.reward,
                "answer": leaf.answer,
                "response": tok.decode(tree.response_ids(leaf).tolist(), skip_special_tokens=True),
            }
        )
    return {
        "tree_id": tree.tree_id,
        "prompt_id": tree.prompt_id,
        "prompt": prompt_text,
        "gold_answer": gold,
        "majority_answer": majority_answer,
        "majority_correct": maj_correct,
        "num_leaves": len(tree.leaves),
        "num_segments": len(tree.segments),
        "distinct_tokens": tree.num_tokens(),
        "sample_s": round(tree.timings.get("sample_s", 0.0), 3),
        "leaves": leaves,
    }


def run(args: argparse.Namespace, backend: Any = None) -> int:
    """``backend``: reuse an already-open backend (tests share one engine); otherwise one is built."""
    from tqdm import tqdm

    from actors.sampler import TreeSampler
    from common.data import encode_rows, load_rows, resolve_data_path
    from common.models import eos_token_ids, load_tokenizer, resolve_model
    from common.rewards import resolve_reward
    from common.sampling_metrics import SamplingStats
    from common.tasks import extract_last_boxed
    from common.tree import encode_tree

    cfg = _load_cfg(args)
    model_dir = resolve_model(cfg.model)
    tok = load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    eos = eos_token_ids(model_dir)
    data_path, task = resolve_data_path(args.data or cfg.data.eval, "eval", cfg.data)
    rows = load_rows(data_path, bad_rows=cfg.data.bad_rows)
    if args.limit:
        rows = rows[: args.limit]
    prompts = encode_rows(
        rows, tok, cfg.data.template, cfg.data.system_prompt, cfg.data.max_prompt_tokens, cfg.data.bad_rows
    )
    reward_fn = None
    spec = args.reward or cfg.reward.fn
    if spec != "none":
        reward_fn = resolve_reward(
            spec, task, cfg=cfg.reward, max_response_tokens=cfg.tree.max_response_tokens
        )

    own_backend = backend is None
    if own_backend:
        longest = max(len(p.prompt_ids) for p in prompts)
        from actors.backends import backend_for_run

        backend = backend_for_run(cfg, model_dir, eos, longest)
    stats = SamplingStats()
    sampler = TreeSampler(backend, cfg.tree, cfg.sampling, eos, lambda ids: tok.decode(ids), stats=stats)
    by_id = {p.row.id: p for p in prompts}

    def items():
        for p in prompts:
            meta = {k: v for k, v in p.row.metadata.items() if isinstance(v, _SCALARS)}
            meta["answer"] = p.row.answer
            yield p.row.id, p.prompt_ids, meta

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wire = open(args.wire, "wb") if args.wire else None
    rewards_L: list[float] = []
    maj_hits: list[bool] = []
    t0 = time.perf_counter()
    try:
        with (
            open(out, "w") as fh,
            tqdm(
                total=len(prompts),
                desc="trees",
                disable=args.no_progress or not cfg.log.progress,
                dynamic_ncols=True,
            ) as bar,
        ):
            for tree in sampler.run(items(), max_in_flight=cfg.generators.trees_in_flight):
                row = by_id[tree.prompt_id].row
                texts = [
                    tok.decode(tree.response_ids(lf).tolist(), skip_special_tokens=True) for lf in tree.leaves
                ]
                for leaf, text in zip(tree.leaves, texts):
                    leaf.answer = extract_last_boxed(text)
                maj_correct = None
                if reward_fn is not None:
                    scores = reward_fn.score_many(
                        [(t, row.answer, tree.metadata, lf.length) for t, lf in zip(texts, tree.leaves)]
                    )
                    for leaf, r in zip(tree.leaves, scores):
                        leaf.reward = float(r)
                    rewards_L.extend(scores)
                maj = majority([lf.answer for lf in tree.leaves])
                if reward_fn is not None:
                    mid = (cfg.reward.correct + cfg.reward.wrong) / 2
                    maj_correct = maj is not None and any(
                        lf.answer == maj and lf.reward > mid for lf in tree.leaves
                    )
                    maj_hits.append(maj_correct)
                fh.write(json.dumps(tree_record(tree, tok, row.prompt, row.answer, maj, maj_correct)) + "\n")
                if wire is not None:
                    blob = encode_tree(tree)
                    wire.write(struct.pack("<I", len(blob)) + blob)
                bar.update(1)
    finally:
        if wire is not None:
            wire.close()
        if own_backend:
            backend.close()
    wall = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "model": cfg.model.path,
        "data": str(data_path),
        "prompts": len(prompts),
        "wall_s": wall,
    }
    summary.update(stats.as_dict(wall_s=wall))
    if reward_fn is not None and rewards_L:
        mid = (cfg.reward.correct + cfg.reward.wrong) / 2
        summary["reward/mean"] = sum(rewards_L) / len(rewards_L)
        summary["reward/pass_rate"] = sum(r > mid for r in rewards_L) / len(rewards_L)
        summary[f"reward/maj@{cfg.tree.w}"] = sum(maj_hits) / len(maj_hits)
    summary_path = out.with_suffix(".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, sys.stdout)
    print(f"trees: {out}  summary: {summary_path}" + (f"  wire: {args.wire}" if args.wire else ""))
    return 0


def print_summary(summary: dict[str, Any], stream: Any) -> None:
    keys = [
        ("prompts", "prompts"),
        ("wall s", "wall_s"),
        ("trees", "tree/trees"),
        ("leaves / tree", "tree/leaves_per_tree"),
        ("trajectories / s", "rollout/trajectories_per_s"),
        ("tokens / s", "rollout/tokens_per_s"),
        ("decoded tokens", "rollout/decoded_tokens"),
        ("prefill computed", "rollout/prefill_tokens_computed"),
        ("prefill cached", "rollout/prefill_tokens_cached"),
        ("cache hit rate", "rollout/prefix_cache_hit_rate"),
        ("fallbacks", "tree/fallbacks"),
        ("mean reward", "reward/mean"),
        ("pass rate", "reward/pass_rate"),
    ]
    keys += [(k.split("/", 1)[1], k) for k in summary if k.startswith("reward/maj@")]
    keys += [
        (k.replace("tree/", ""), k) for k in summary if k.startswith(("tree/finish/", "tree/leaf_depth/"))
    ]
    width = max(len(label) for label, _ in keys) + 2
    stream.write("\n")
    for label, key in keys:
        if key in summary:
            v = summary[key]
            stream.write(f"{label:<{width}}{v:.4g}\n" if isinstance(v, float) else f"{label:<{width}}{v}\n")
