"""``treepo bench eval``: test-time compute of flat vs tree sampling (b ∈ {2, 4, 8}) on the same model,
benchmark, engine and k, in one run — the paper's Table 2 experiment on whatever model is given.

For each mode the same problems get k answers each (flat: k independent samples of at most Lmax
tokens; tree: a segment tree with w = k leaves, depth d, segment length l, branching b), scored with the
task's reward. Printed per mode: mean@k, maj@k, pass@k, decoded tokens, prefill tokens computed, wall
time and trajectories/s, and the ratios tree/flat of tokens and wall time. The paper reports similar
accuracy at 22-43 % fewer GPU-hours; on small models and short answers expect a smaller saving,
since early EOS stops cut flat sampling's cost too.

A warm-up of every mode on other problems runs first (not timed), and the prefix cache is reset before
each timed mode so no mode profits from another's cache. Default on CPU: the warm-started ``tiny:arith``
model on the synthetic held-out split (a few minutes on 2 cores). Tree shape: ``--d``/``--l`` or
``tree.*`` overrides; ``Lmax`` = d·l for both modes unless ``tree.max_response_tokens`` is given. The
default shape, 8 segments × 16 tokens, splits the tiny model's 30-60-token answers into several
segments so the trees branch before the answer (with 32-token segments they mostly finish inside the
first one and the tree degenerates to flat sampling); 16 is below the CPU engine's 32-token KV block,
so segment alignment is off there. The paper's setting on GPU: ``--d 8 --l 2048``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny:arith", help="Model, checkpoint directory or tiny:<task>.")
    p.add_argument("--data", default="synthetic:arith", help="Benchmark file or synthetic:<task>.")
    p.add_argument("--k", type=int, default=16, help="Answers per problem (= tree leaves w).")
    p.add_argument("--max-problems", type=int, default=32, help="Problems evaluated (0 = all).")
    p.add_argument("--warmup-problems", type=int, default=2, help="Problems of the untimed warm-up.")
    p.add_argument(
        "--branching", default="2,4,8", help="Comma-separated branching factors b of the tree runs."
    )
    p.add_argument("--d", type=int, default=8, help="Segments per trajectory (tree depth).")
    p.add_argument(
        "--l",
        type=int,
        default=16,
        help="Segment length; not a multiple of the KV block size turns segment alignment off.",
    )
    p.add_argument("--root-divergence", type=int, default=0, help="Children of the root (0 = b).")
    p.add_argument("--json", default="", help="Also write the JSON result to this file.")
    p.add_argument("--config", "-c", default=None, help="Preset YAML (tree/sampling/generators/reward).")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="Config overrides, e.g. sampling.temperature=0.8."
    )


def _modes(branching: list[int]) -> list[tuple[str, int]]:
    return [("flat", 0)] + [("tree", b) for b in branching]


def run(args: argparse.Namespace, backend: Any = None) -> int:
    """``backend``: reuse an already-open backend (tests share one engine); otherwise one is built."""
    from common.config import load_config
    from common.errors import ConfigError
    from common.models import resolve_eval_model

    try:
        branching = [int(b) for b in args.branching.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(
            f"--branching {args.branching!r}: pass comma-separated integers, e.g. 2,4,8"
        ) from None
    if not branching or min(branching) < 2 or args.k < 2:
        raise ConfigError("tree runs need b >= 2 and --k >= 2")
    user = [*args.overrides, f"model.path={resolve_eval_model(args.model)}"]
    shape = [f"tree.d={args.d}", f"tree.l={args.l}"]
    if not any(o.startswith("tree.max_response_tokens=") for o in args.overrides):
        shape.append(f"tree.max_response_tokens={args.d * args.l}")
    base = load_config(args.config, [*shape, "tree.align_segments_to_blocks=false", *user])
    if args.l % base.generators.block_size and not any(o.startswith("tree.align_segments") for o in user):
        # alignment needs whole KV blocks per segment; below a block each child re-prefills < 1 block
        shape.append("tree.align_segments_to_blocks=false")
    cfg = load_config(args.config, [*shape, *user])

    from actors.backends import backend_for_run
    from actors.evaluator import evaluate
    from common.data import load_prompts, resolve_data_path
    from common.models import eos_token_ids, load_tokenizer, resolve_model
    from common.rewards import resolve_reward

    model = resolve_model(cfg.model)
    tok = load_tokenizer(model, trust_remote_code=cfg.model.trust_remote_code)
    eos = eos_token_ids(model)
    path, task = resolve_data_path(args.data, "eval", cfg.data)
    prompts = list(load_prompts(path, tok, cfg.data))
    warm = prompts[: args.warmup_problems]
    timed = prompts[args.warmup_problems :]
    if args.max_problems:
        timed = timed[: args.max_problems]
    if not timed:
        raise ConfigError(f"{path} has no problems left after {args.warmup_problems} warm-up problems")
    reward = resolve_reward(cfg.reward.fn, task, cfg=dataclasses.replace(cfg.reward, overlong_buffer=0))

    def decode(ids):
        return tok.decode(list(ids), skip_special_tokens=True)

    own_backend = backend is None
    if own_backend:
        longest = max(len(p.prompt_ids) for p in prompts[: len(warm) + len(timed)])
        backend = backend_for_run(cfg, model, eos, longest)

    def tree_cfg(b: int):
        if not b:  # flat: evaluate() turns it into k independent samples
            return cfg.tree
        rd = args.root_divergence or b
        return dataclasses.replace(cfg.tree, b=b, root_divergence_min=rd, root_divergence_max=rd)

    results: dict[str, dict[str, float]] = {}
    try:
        for sampling, b in _modes(branching):  # warm-up, not timed
            if warm:
                evaluate(
                    backend, warm, reward, tree_cfg=tree_cfg(b), sampling_cfg=cfg.sampling, eos_ids=eos,
                    decode=decode, k=args.k, sampling=sampling, max_in_flight=cfg.generators.trees_in_flight,
                )  # fmt: skip
        for sampling, b in _modes(branching):
            backend.reset_prefix_cache()
            res = evaluate(
                backend, timed, reward, tree_cfg=tree_cfg(b), sampling_cfg=cfg.sampling, eos_ids=eos,
                decode=decode, k=args.k, sampling=sampling, max_in_flight=cfg.generators.trees_in_flight,
            )  # fmt: skip
            name = "flat" if sampling == "flat" else f"tree_b{b}"
            results[name] = s = res.summary()
            print(
                f"[bench eval] {name}: mean@{args.k}={s[f'mean@{args.k}']:.3f} "
                f"decoded={s['decoded_tokens']:.0f} wall={s['wall_s']:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if own_backend:
            backend.close()

    k = args.k
    flat = results["flat"]
    ratio = lambda s, key: s[key] / flat[key] if flat[key] else float("nan")  # noqa: E731
    ratios = {
        name: {
            "decoded_tokens": ratio(s, "decoded_tokens"),
            "prefill_tokens_computed": ratio(s, "prefill_tokens_computed"),
            "wall_s": ratio(s, "wall_s"),
            "trajectories_per_s": ratio(s, "trajectories_per_s"),
            f"mean@{k}_minus_flat": s[f"mean@{k}"] - flat[f"mean@{k}"],
            f"maj@{k}_minus_flat": s[f"maj@{k}"] - flat[f"maj@{k}"],
            f"pass@{k}_minus_flat": s[f"pass@{k}"] - flat[f"pass@{k}"],
        }
        for name, s in results.items()
        if name != "flat"
    }
    result = {
        "config": {
            "model": model,
            "data": str(path),
            "problems": len(timed),
            "k": k,
            "d": cfg.tree.d,
            "l": cfg.tree.l,
            "max_response_tokens": cfg.tree.max_response_tokens,
            "root_divergence": args.root_divergence or "b",
            "branching": branching,
            "backend": cfg.generators.backend,
            "block_size": backend.block_size,
            "temperature": cfg.sampling.temperature,
            "seed": cfg.seed,
        },
        "results": results,
        "ratios_vs_flat": ratios,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    w = sys.stdout.write
    cols = [
        (f"mean@{k}", "{:.3f}"),
        (f"maj@{k}", "{:.3f}"),
        (f"pass@{k}", "{:.3f}"),
        ("decoded_tokens", "{:.0f}"),
        ("prefill_tokens_computed", "{:.0f}"),
        ("wall_s", "{:.2f}"),
        ("trajectories_per_s", "{:.1f}"),
    ]
    w(f"\n{'mode':<10}" + "".join(f"{c:>14}" for c, _ in cols[:3]) + f"{'decoded':>12}{'prefill':>12}")
    w(f"{'wall s':>10}{'traj/s':>10}{'tokens/flat':>13}{'wall/flat':>11}\n")
    for name, s in results.items():
        r = ratios.get(name, {"decoded_tokens": 1.0, "wall_s": 1.0})
        w(f"{name:<10}" + "".join(f"{fmt.format(s[c]):>14}" for c, fmt in cols[:3]))
        w(f"{s['decoded_tokens']:>12.0f}{s['prefill_tokens_computed']:>12.0f}{s['wall_s']:>10.2f}")
        w(f"{s['trajectories_per_s']:>10.1f}{r['decoded_tokens']:>13.3f}{r['wall_s']:>11.3f}\n")
    return 0
