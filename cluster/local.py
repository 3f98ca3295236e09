"""The training driver, synchronous mode in one process: sample → score → filter → advantages →
learner step → weight update → checkpoint → evaluate, with every piece the real one (vLLM or hf
backend, the segment-tree sampler, isolated reward workers, the learner rank, atomic checkpoints).

The loop (one screen, :func:`train`):

- ``collect``: keeps up to ``generators.trees_in_flight`` trees growing on the engine, takes prompts
  from the seeded per-epoch cursor, scores finished trees, drops trees whose leaves all agree
  (dynamic sampling; counted) and returns ``learner.prompts_per_step`` trees. Every tree of a step is
  sampled under the current policy version (staleness 0): nothing stays in flight across an update.
- ``learner.train_step``: π_prox recompute, mini-batch PPO epochs, optimizer steps.
- ``push weights``: every ``sync.every_steps`` the learner's weights go into the engine (layerwise
  reload on vLLM), then the prefix cache is reset (or kept, per ``generators.reset_prefix_cache_on_update``).
- ``checkpoint`` every ``checkpoint.every_steps`` with the prompt cursor in ``extra``; ``--resume``
  restores weights, optimizer, RNG and cursor, so no prompt is skipped or repeated.
- ``evaluate`` every ``eval.every_steps`` on the held-out split (flat sampling, k answers).

At the end: reward-curve and eval-accuracy PNGs in the run directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from cluster.rundir import append_trained, check_run_dir, final_plots, truncate_logs
from common.config import TrainConfig, save_resolved
from common.metrics import MetricsLog
from common.prompts import EpochCursor
from learner.selection import Selection, record_staleness, rollout_metrics

log = logging.getLogger("treepo.train")


def train(cfg: TrainConfig, backend=None) -> int:
    """Run the local driver. ``backend``: an open generation backend on ``model.path``'s weights to
    use instead of starting one (it is left open; the caller owns it)."""
    # One process by design: the engine runs in-process (fast start, weights handed over in memory)
    # and keeps its per-step INFO lines off the progress bar.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import torch
    from tqdm import tqdm

    from actors.backends import backend_for_run
    from actors.evaluator import evaluate
    from actors.generator import prompt_metadata, tree_id_for
    from actors.sampler import TreeSampler
    from actors.scoring import score_trees
    from common.data import load_prompts, resolve_data_path
    from common.models import eos_token_ids, load_tokenizer, resolve_model
    from common.rewards import resolve_reward
    from common.sampling_metrics import SamplingStats
    from learner.advantages import tree_advantages
    from learner.rank import LearnerRank

    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    check_run_dir(cfg, ckpt_dir)
    save_resolved(cfg, run_dir)
    torch.manual_seed(cfg.seed)

    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    eos = eos_token_ids(model_path)
    eos_set = frozenset(eos)

    def decode(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    train_path, task = resolve_data_path(cfg.data.train, "train", cfg.data)
    prompts = load_prompts(train_path, tokenizer, cfg.data)
    eval_prompts = []
    if cfg.eval.every_steps:
        eval_path, eval_task = resolve_data_path(cfg.data.eval, "eval", cfg.data)
        eval_prompts = list(load_prompts(eval_path, tokenizer, cfg.data))
        if cfg.eval.max_problems:
            eval_prompts = eval_prompts[: cfg.eval.max_problems]
    reward = resolve_reward(
        cfg.reward.fn, task, cfg=cfg.reward, max_response_tokens=cfg.tree.max_response_tokens
    )
    eval_reward = resolve_reward(cfg.reward.fn, task, cfg=dataclasses.replace(cfg.reward, overlong_buffer=0))

    learner = LearnerRank(
        dataclasses.replace(cfg.model, path=model_path),
        cfg.algo,
        cfg.learner,
        seed=cfg.seed,
        temperature=cfg.sampling.temperature,
    )
    extra = learner.load(ckpt_dir, required=True) if cfg.resume else None
    start_step = int(extra["step"]) if extra else 0
    truncate_logs(run_dir, start_step)
    cursor = EpochCursor(
        len(prompts), cfg.data.shuffle_seed, cfg.data.epochs, extra.get("cursor") if extra else None
    )

    owns_backend = backend is None
    if owns_backend:
        backend = backend_for_run(
            cfg, model_path, eos, max(len(p.prompt_ids) for p in [*prompts, *eval_prompts])
        )
    if learner.version or not owns_backend:  # resumed or borrowed: the engine takes the learner's weights
        backend.update_weights(learner.weights_for_sync(), learner.version)
    stats = SamplingStats()
    sampler = TreeSampler(backend, cfg.tree, cfg.sampling, eos, decode, stats=stats)
    metrics_log = MetricsLog(run_dir, tensorboard=cfg.log.tensorboard)
    staleness_hist: dict[int, int] = {}

    def run_eval(step: int) -> dict[str, float]:
        res = evaluate(
            backend, eval_prompts, eval_reward, tree_cfg=cfg.tree, sampling_cfg=cfg.sampling, eos_ids=eos,
            decode=decode, k=cfg.eval.k, sampling="flat", max_in_flight=cfg.generators.trees_in_flight,
        )  # fmt: skip
        out = res.train_metrics()
        print(f"[eval] step {step}: " + "  ".join(f"{k}={v:.3f}" for k, v in out.items()), flush=True)
        return out

    def collect(need: int) -> tuple[list, dict[str, float]] | None:
        sel = Selection(learner.version, dynamic_sampling=cfg.algo.dynamic_sampling)  # no staleness limit
        data_left = True
        while len(sel.kept) < need:
            while data_left and sampler.in_flight + len(sel.kept) < need:
                item = cursor.next()
                if item is None:
                    data_left = False
                    break
                epoch, idx = item
                p = prompts[idx]
                sampler.submit(
                    p.row.id,
                    p.prompt_ids,
                    prompt_metadata(p.row, epoch),
                    tree_id=tree_id_for(p.row.id, epoch),
                )
            if not sampler.in_flight:
                break
            done = sampler.step()
            score_trees(done, reward, decode, eos_set)
            for tree in done:
                sel.offer(tree)
        if not sel.kept:
            return None
        return sel.kept, sel.metrics()

    progress = tqdm(
        total=cfg.learner.total_steps,
        initial=start_step,
        desc="train",
        disable=not cfg.log.progress,
        dynamic_ncols=True,
    )
    if eval_prompts and start_step == 0:
        metrics_log.log(0, run_eval(0))
    step = start_step
    try:
        while step < cfg.learner.total_steps:
            t0 = time.perf_counter()
            got = collect(cfg.learner.prompts_per_step)
            if got is None:
                print(
                    f"[train] prompts exhausted after {cfg.data.epochs} epoch(s) at step {step}", flush=True
                )
                break
            trees, m = got
            t_gen = time.perf_counter() - t0
            advantages = tree_advantages(trees, cfg.algo)
            record_staleness(trees, learner.version, staleness_hist)
            t1 = time.perf_counter()
            m.update(learner.train_step(trees, advantages))
            t_train = time.perf_counter() - t1
            step += 1
            if step % cfg.sync.every_steps == 0:
                t2 = time.perf_counter()
                # the backend resets its prefix cache or keeps it, per generators.reset_prefix_cache_on_update
                backend.update_weights(learner.weights_for_sync(), learner.version)
                m["timing/sync_s"] = time.perf_counter() - t2
            m.update(rollout_metrics(trees))
            m.update(
                {
                    "timing/generate_s": t_gen,
                    "timing/train_s": t_train,
                    "timing/step_s": time.perf_counter() - t0,
                    **{k: v.value for k, v in stats.metrics().items() if isinstance(v.value, (int, float))},
                    **reward.stats.as_metrics(),
                }
            )
            if eval_prompts and cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                m.update(run_eval(step))
            if step % cfg.checkpoint.every_steps == 0 or step == cfg.learner.total_steps:
                learner.save(
                    ckpt_dir,
                    extra={"step": step, "cursor": cursor.state()},
                    step=step,
                    keep_last=cfg.checkpoint.keep_last,
                )
            metrics_log.log(step, m)
            append_trained(run_dir, step, learner.version, trees)  # the exactly-once audit trail
            progress.update(1)
            progress.set_postfix(
                reward=f"{m['rollout/reward']:+.3f}", acc=f"{m['rollout/accuracy']:.2f}", v=learner.version
            )
    finally:
        progress.close()
        metrics_log.close()
        if owns_backend:
            backend.close()
        learner.close()
    final_plots(run_dir, staleness_hist)
    print(
        f"[train] done: {step} steps, metrics in {run_dir / 'metrics.jsonl'}, plots in {run_dir}", flush=True
    )
    return 0
