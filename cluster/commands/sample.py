"""``treepo sample``: inference-only tree sampling over a dataset with an existing model.

One tree per prompt (``tree.*`` settings; ``tree.mode=flat`` for independent samples), many trees in
flight on one engine (``generators.trees_in_flight``). Writes one readable JSON object per tree (prompt
id, prompt text, gold answer, leaves with node path, response text, finish reason, length, reward, verdict and
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
from pathlib import Path
from typing import Any

from cluster.config_args import add_config_arguments, load_args_config
from common.config import TrainConfig


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
    parser.add_argument(
        "--render",
        default="",
        help="Also draw trees into this self-contained HTML page (segments with their text, leaf rewards, "
        "verdicts, finish reasons and the advantages algo.* would train with).",
    )
    parser.add_argument(
        "--render-trees", type=int, default=8, help="With --render: draw the first N trees (default 8)."
    )
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    add_config_arguments(
        parser,
        config_help="Preset name or YAML file (defaults <- preset <- overrides).",
        overrides_help="key=value config overrides, e.g. tree.w=16 tree.d=8 sampling.temperature=0.8",
    )


def _load_cfg(args: argparse.Namespace) -> TrainConfig:
    # the flags are overrides like any other, so they take part in the cross-field checks
    flags = []
    if args.model:
        flags.append(f"model.path={args.model}")
    if args.backend:
        flags.append(f"generators.backend={args.backend}")
    return load_args_config(args, after=flags)


def tree_record(
    tree: Any,
    decode: Any,
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
                "correct": leaf.correct,
                "answer": leaf.answer,
                "response": decode(tree.response_ids(leaf).tolist()),
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
    from actors.engine_inputs import EngineInputs, train_reward
    from common.sampling_metrics import SamplingStats

    cfg = _load_cfg(args)
    inputs = EngineInputs.load(cfg)
    data = inputs.prompt_set(args.data or cfg.data.eval, "eval", reward=None, first_rows=args.limit)
    spec = args.reward or cfg.reward.fn
    if spec != "none":
        data.reward = train_reward(cfg, data.task, spec)
    own_backend = backend is None
    if own_backend:
        backend = inputs.open_backend(data)
    stats = SamplingStats()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        drawn: list = []
        scores = _sample_to_files(args, cfg, inputs, data, inputs.sampler(backend, stats=stats), out, drawn)
    finally:
        if own_backend:
            backend.close()
    wall = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "model": cfg.model.path,
        "data": str(data.path),
        "prompts": len(data.prompts),
        "wall_s": wall,
    }
    summary.update(stats.as_dict(wall_s=wall))
    summary.update(scores)
    summary_path = out.with_suffix(".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, sys.stdout)
    if args.render:
        _render(args, cfg, inputs, drawn, data.reward is not None)
    print(f"trees: {out}  summary: {summary_path}" + (f"  wire: {args.wire}" if args.wire else ""))
    return 0


def _render(args: argparse.Namespace, cfg: TrainConfig, inputs: Any, trees: list, scored: bool) -> None:
    """``--render``: the drawn trees as one HTML page, with the advantages ``algo.*`` gives them
    (over these trees as one batch) when they were scored."""
    from common.tree_render import write_tree_page
    from learner.advantages import tree_advantages

    advantages = tree_advantages(trees, cfg.algo) if scored and trees else None
    page = write_tree_page(
        args.render, trees, advantages, inputs.decode, f"treepo sample: {len(trees)} trees"
    )
    print(f"tree pictures: {page}")


def _sample_to_files(
    args: argparse.Namespace, cfg: TrainConfig, inputs: Any, data: Any, sampler: Any, out: Path, drawn: list
) -> dict:
    """Sample one tree per prompt, score it, write it (readable jsonl, optionally the wire form);
    returns the reward summary (empty without a reward). The first ``--render-trees`` trees go into
    ``drawn`` when ``--render`` is set."""
    from tqdm import tqdm

    from actors.engine_inputs import prompt_metadata
    from actors.scoring import majority_verdict, score_trees
    from common.tree import encode_tree

    by_id = {p.row.id: p for p in data.prompts}
    items = [(p.row.id, p.prompt_ids, prompt_metadata(p.row)) for p in data.prompts]
    reward = data.reward
    rewards_L: list[float] = []
    correct_L: list[bool] = []
    maj_hits: list[bool] = []
    wire = open(args.wire, "wb") if args.wire else None
    bar = tqdm(
        total=len(items), desc="trees", disable=args.no_progress or not cfg.log.progress, dynamic_ncols=True
    )
    try:
        with open(out, "w") as fh, bar:
            for tree in sampler.run(items, max_in_flight=cfg.generators.trees_in_flight):
                row = by_id[tree.prompt_id].row
                score_trees([tree], reward, inputs.decode, inputs.stop_set)
                answers = [lf.answer for lf in tree.leaves]
                maj, maj_correct = majority_verdict(answers, [bool(lf.correct) for lf in tree.leaves])
                if reward is None:
                    maj_correct = None
                else:
                    rewards_L.extend(lf.reward for lf in tree.leaves)
                    correct_L.extend(bool(lf.correct) for lf in tree.leaves)
                    maj_hits.append(maj_correct)
                fh.write(
                    json.dumps(tree_record(tree, inputs.decode, row.prompt, row.answer, maj, maj_correct))
                    + "\n"
                )
                if args.render and len(drawn) < args.render_trees:
                    drawn.append(tree)
                if wire is not None:
                    blob = encode_tree(tree)
                    wire.write(struct.pack("<I", len(blob)) + blob)
                bar.update(1)
    finally:
        if wire is not None:
            wire.close()
    if not rewards_L:
        return {}
    return {
        "reward/mean": sum(rewards_L) / len(rewards_L),
        "reward/pass_rate": sum(correct_L) / len(correct_L),
        f"reward/maj@{cfg.tree.w}": sum(maj_hits) / len(maj_hits),
    }


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
