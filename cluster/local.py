"""The training driver, synchronous mode in one process: sample → score → filter → advantages →
learner step → weight update → checkpoint → evaluate, with every piece the real one (vLLM or hf
backend, the segment-tree sampler, isolated reward workers, the learner rank, atomic checkpoints).

The loop (:meth:`LocalRun.loop`, one screen):

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.logs import engine_output, eval_line, nothing_trained
from cluster.pipeline.recovery import check_checkpoint, config_snapshot
from cluster.rundir import (
    append_trained,
    check_before_writing,
    checkpoint_dir,
    final_plots,
    progress_bar,
    truncate_logs,
)
from common.config import TrainConfig, save_resolved
from common.keys import run_name_for
from common.metrics import values
from common.prompts import EpochCursor
from common.rewards.failures import StepFailures
from common.rollouts import due, step_records
from common.trackers import open_trackers
from common.tree_render import write_step_pictures
from learner.selection import Selection, record_staleness, rollout_metrics

log = logging.getLogger("treepo.train")


def train(cfg: TrainConfig, backend=None, on_checked: Callable[[], None] | None = None) -> int:
    """Run the local driver. ``backend``: an open generation backend on ``model.path``'s weights to
    use instead of starting one (it is left open; the caller owns it). Every refusal that needs no
    engine comes before anything is written; then ``on_checked`` (the command starts the run's
    logging there)."""
    # One process by design: the engine runs in-process (fast start, weights handed over in memory)
    # and keeps its per-step INFO lines off the progress bar.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    run = LocalRun(cfg, backend, on_checked)
    try:
        step = run.loop()
    finally:
        run.close()
    if step == run.start_step < cfg.learner.total_steps:  # the data ran out before a step
        raise nothing_trained(cfg, run.dropped_uniform)
    final_plots(run.run_dir, run.staleness_hist)
    print(
        f"[train] done: {step} steps, metrics in {run.run_dir / 'metrics.jsonl'}, plots in {run.run_dir}",
        flush=True,
    )
    return 0


class LocalRun:
    """The engine, the sampler, the learner rank and the prompt cursor of one local run."""

    def __init__(
        self, cfg: TrainConfig, backend: Any = None, on_checked: Callable[[], None] | None = None
    ) -> None:
        import torch

        from actors.engine_inputs import EngineInputs
        from common.sampling_metrics import SamplingStats
        from learner.rank import LearnerRank

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = checkpoint_dir(self.run_dir)
        # refused before anything is written: the run directory stays as it was
        resumed = check_before_writing(cfg)
        if resumed is not None:  # a changed key that defines the run's prompts and trees
            check_checkpoint(cfg, resumed, run_name_for(cfg.run_dir))
        if on_checked is not None:
            on_checked()
        save_resolved(cfg, self.run_dir)
        torch.manual_seed(cfg.seed)
        self.inputs = EngineInputs.load(cfg)
        self.train_set = self.inputs.training_set()
        self.held_out = self.inputs.held_out_set()
        self.learner = LearnerRank(
            dataclasses.replace(cfg.model, path=self.inputs.model_path),
            cfg.algo,
            cfg.learner,
            seed=cfg.seed,
            temperature=cfg.sampling.temperature,
        )
        extra = self.learner.load(self.ckpt_dir, required=True) if cfg.resume else None
        self.start_step = int(extra["step"]) if extra else 0
        if extra:
            print(f"[train] resumed from step {self.start_step}", flush=True)
        truncate_logs(self.run_dir, self.start_step)
        self.cursor = EpochCursor(
            len(self.train_set.prompts),
            cfg.data.shuffle_seed,
            cfg.data.epochs,
            extra.get("cursor") if extra else None,
        )
        self.owns_backend = backend is None
        with engine_output():  # quiet console: the engine's start-up output goes to <run_dir>/logs/
            self.backend = (
                self.inputs.open_backend(self.train_set, self.held_out) if backend is None else backend
            )
        if self.learner.version or not self.owns_backend:  # resumed or borrowed: the learner's weights
            self.backend.update_weights(self.learner.weights_for_sync(), self.learner.version)
        self.stats = SamplingStats()
        self.sampler = self.inputs.sampler(self.backend, stats=self.stats)
        self.carried: list = []  # finished trees not offered yet (drained before an update)
        self.metrics_log = open_trackers(cfg)
        self.staleness_hist: dict[int, int] = {}
        self.failures = StepFailures.for_run(cfg)  # failed reward calls of the step being collected
        self.dropped_uniform = 0  # trees dropped by dynamic sampling over the run

    @property
    def evaluates(self) -> bool:
        return self.held_out is not None and bool(self.held_out.prompts)

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out evaluation on the engine (flat sampling, ``eval.k`` answers per problem)."""
        from actors.evaluator import run_eval

        out = run_eval(self.backend, self.inputs, self.held_out.prompts, self.held_out.reward).train_metrics()
        print(eval_line(step, out), flush=True)
        return out

    def collect(self, need: int) -> tuple[list, dict[str, float]] | None:
        """``need`` kept trees, all sampled under the current weights (fewer when the data is used up;
        None if none)."""
        from actors.engine_inputs import prompt_metadata
        from actors.generator import tree_id_for
        from actors.scoring import score_trees

        sampler, prompts = self.sampler, self.train_set.prompts
        sel = Selection(self.learner.version, dynamic_sampling=self.cfg.algo.dynamic_sampling)  # no limit
        data_left = True
        ready, self.carried = self.carried, []  # trees finished by the last drain
        while len(sel.kept) < need:
            while data_left and sampler.in_flight + len(ready) + len(sel.kept) < need:
                item = self.cursor.next()
                if item is None:
                    data_left = False
                    break
                epoch, idx = item
                p = prompts[idx]
                tree_id = tree_id_for(p.row.id, epoch)
                sampler.submit(p.row.id, p.prompt_ids, prompt_metadata(p.row, epoch), tree_id=tree_id)
            if ready:
                done, ready = ready, []
            elif not sampler.in_flight:
                break
            else:
                done = sampler.step()
            score_trees(done, self.train_set.reward, self.inputs.decode, self.inputs.stop_set)
            for tree in done:
                self.failures.add_tree(tree)
                sel.offer(tree)
            self.failures.check()  # a reward failing past reward.max_error_share stops the run
        # barrier-free expansion leaves segments in the engine: they finish under these weights before
        # the update, and their trees wait for the next step
        self.carried = ready + sampler.drain()
        self.dropped_uniform += sel.dropped_uniform
        if not sel.kept:
            return None
        return sel.kept, sel.metrics()

    def step(self, step: int, trees: list, m: dict[str, float], t0: float) -> dict[str, float]:
        """Train on ``trees`` (the ``step``-th step), push weights, evaluate and checkpoint on schedule."""
        from learner.advantages import tree_advantages

        cfg, learner = self.cfg, self.learner
        t_gen = time.perf_counter() - t0
        advantages = tree_advantages(trees, cfg.algo)
        if due(step, cfg.log.rollouts_every_steps):
            self.metrics_log.log_rollouts(step, step_records(trees, advantages, self.inputs.decode))
        record_staleness(trees, learner.version, self.staleness_hist)
        t1 = time.perf_counter()
        m.update(learner.train_step(trees, advantages))
        t_train = time.perf_counter() - t1
        if step % cfg.sync.every_steps == 0:
            t2 = time.perf_counter()
            # the backend resets its prefix cache or keeps it, per generators.reset_prefix_cache_on_update
            self.backend.update_weights(learner.weights_for_sync(), learner.version)
            m["timing/sync_s"] = time.perf_counter() - t2
        m.update(rollout_metrics(trees))
        m.update(
            {
                "timing/generate_s": t_gen,
                "timing/train_s": t_train,
                "timing/step_s": time.perf_counter() - t0,
                **values(self.stats.engine_metrics()),  # the engine's work so far; tree/: this step's
                **self.train_set.reward.stats.as_metrics(),
            }
        )
        if self.evaluates and step % cfg.eval.every_steps == 0:
            m.update(self.evaluate(step))
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
            write_step_pictures(
                self.run_dir, step, trees, advantages, self.inputs.decode, cfg.log.tree_pictures
            )
        if step % cfg.checkpoint.every_steps == 0 or step == cfg.learner.total_steps:
            extra = {"step": step, "cursor": self.cursor.state(), "config": config_snapshot(cfg)}
            learner.save(self.ckpt_dir, extra=extra, step=step, keep_last=cfg.checkpoint.keep_last)
        return m

    def loop(self) -> int:
        """Steps until ``learner.total_steps`` or the data is used up; returns the last step."""
        cfg = self.cfg
        progress = progress_bar(cfg, self.start_step, "train")
        if self.evaluates and self.start_step == 0:
            self.metrics_log.log(0, self.evaluate(0))
        step = self.start_step
        try:
            while step < cfg.learner.total_steps:
                t0 = time.perf_counter()
                got = self.collect(cfg.learner.prompts_per_step)
                line = self.failures.summary(step + 1)
                if line:
                    print(line, flush=True)
                failed = self.failures.close_step()  # stops the run past reward.max_error_share
                if got is None:
                    print(
                        f"[train] prompts exhausted after {cfg.data.epochs} epoch(s) at step {step}",
                        flush=True,
                    )
                    break
                trees, m = got
                step += 1
                m.update(failed)
                m = self.step(step, trees, m, t0)
                self.metrics_log.log(step, m)
                append_trained(
                    self.run_dir, step, self.learner.version, trees
                )  # the exactly-once audit trail
                progress.update(1)
                progress.set_postfix(
                    reward=f"{m['rollout/reward']:+.3f}",
                    acc=f"{m['rollout/accuracy']:.2f}",
                    depth=f"{m.get('tree/leaf_depth_mean', 0.0):.2f}",
                    tok=f"{m.get('tree/decoded_vs_flat', 1.0):.2f}",
                    v=self.learner.version,
                )
        finally:
            progress.close()
        return step

    def close(self) -> None:
        self.metrics_log.close()
        if self.owns_backend:
            self.backend.close()
        else:  # a borrowed engine goes back idle, also when the run stopped mid-step
            self.sampler.drain()
        self.learner.close()
