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
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from common.config import TrainConfig, save_resolved
from common.errors import ConfigError
from common.metrics import MetricsLog, plot_histogram, plot_series, read_metrics

log = logging.getLogger("treepo.train")


class EpochCursor:
    """Deterministic prompt order: epoch ``e`` visits a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int, epochs: int, state: dict | None = None) -> None:
        self.n, self.seed, self.epochs = n, seed, epochs
        self.epoch, self.index = (int(state["epoch"]), int(state["index"])) if state else (0, 0)
        self._perm = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next(self) -> tuple[int, int] | None:
        """``(epoch, prompt index)`` or None when every epoch is used up."""
        if self.index >= self.n:
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        if self.epoch >= self.epochs:
            return None
        item = (self.epoch, int(self._perm[self.index]))
        self.index += 1
        return item

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


def check_run_dir(cfg: TrainConfig, ckpt_dir: Path) -> None:
    has_ckpt = ckpt_dir.exists() and any(ckpt_dir.glob("ckpt-*"))
    if has_ckpt and not cfg.resume:
        raise ConfigError(
            f"run_dir={cfg.run_dir} already holds checkpoints: pass --resume to continue it, or choose another run_dir"
        )


def truncate_after(path: Path, step: int) -> None:
    """Drop log rows past ``step`` (a resumed run redoes the steps after its checkpoint)."""
    if not path.exists():
        return
    keep = [row for row in read_metrics(path) if row.get("step", 0) <= step]  # torn lines are dropped
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))
    tmp.replace(path)


def record_staleness(trees, version: int, hist: dict[int, int]) -> list[int]:
    """Versions behind ``version`` of every leaf (oldest segment on its path); counted into ``hist``."""
    out = []
    for t in trees:
        for lf in t.leaves:
            s = int(version) - t.oldest_version(lf)
            hist[s] = hist.get(s, 0) + 1
            out.append(s)
    return out


def sampled_reward_metrics(rewards_T_L: list[np.ndarray]) -> dict[str, float]:
    """Reward and accuracy over EVERY tree sampled this step (before any filter: what the policy does)."""
    rewards = np.concatenate(rewards_T_L) if rewards_T_L else np.zeros(0)
    if not len(rewards):
        return {}
    return {"rollout/reward": float(rewards.mean()), "rollout/accuracy": float((rewards > 0).mean())}


def rollout_metrics(trees) -> dict[str, float]:
    """Reward of the trees trained on (after filtering), response length and leaves per tree."""
    rewards = np.concatenate([t.rewards_L for t in trees])
    lengths = [lf.length for t in trees for lf in t.leaves]
    return {
        "rollout/trained_reward": float(rewards.mean()),
        "rollout/response_len": float(np.mean(lengths)),
        "tree/leaves_per_tree": float(np.mean([len(t.leaves) for t in trees])),
    }


def append_trained(run_dir: Path, step: int, version: int, trees) -> None:
    """One line of the exactly-once audit trail: the tree ids trained at ``step``."""
    with open(run_dir / "trained_trees.jsonl", "a") as fh:
        fh.write(json.dumps({"step": step, "version": version, "trees": [t.tree_id for t in trees]}) + "\n")


def trained_tree_ids(run_dir: Path) -> set[str]:
    """Every tree id in the audit trail (a resumed run truncates it to its checkpoint first)."""
    path = run_dir / "trained_trees.jsonl"
    if not path.exists():
        return set()
    return {tree_id for row in read_metrics(path) for tree_id in row.get("trees", [])}


def final_plots(run_dir: Path, staleness_hist: dict[int, int]) -> None:
    """The reward-curve and staleness PNGs of a finished run."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    plot_series(
        rows,
        ["rollout/reward", "rollout/accuracy", "rollout/trained_reward", "eval/accuracy"],
        run_dir / "reward_curve.png",
        "reward and accuracy",
    )
    plot_histogram(
        staleness_hist, run_dir / "staleness.png", "leaf staleness at training time", "policy versions behind"
    )


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
    from learner.advantages import dynamic_sampling_keep, tree_advantages
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
    for name in ("metrics.jsonl", "trained_trees.jsonl"):
        truncate_after(run_dir / name, start_step)
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
        kept, dropped, sampled, rewards_T_L = [], 0, 0, []
        data_left = True
        while len(kept) < need:
            while data_left and sampler.in_flight + len(kept) < need:
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
                sampled += 1
                rewards_T_L.append(tree.rewards_L)
                if cfg.algo.dynamic_sampling and not dynamic_sampling_keep(tree.rewards_L):
                    dropped += 1
                else:
                    kept.append(tree)
        if not kept:
            return None
        return kept, {
            "rollout/trees_sampled": sampled,
            "rollout/trees_dropped_uniform": dropped,
            **sampled_reward_metrics(rewards_T_L),
        }

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
