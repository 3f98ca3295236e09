"""The asynchronous pipeline's driver (``driver=ray``): generators stream trees through Redis, the
learner group trains on them, new weights flow back. :func:`run_pipeline` is ``treepo train``'s entry.

Set-up: first every refusal that needs no server (nothing is written before it: a refused run leaves
its directory as it was), then the resolved config into the run directory, the run's Redis
(``queue.url`` or the embedded server in the run directory), Ray (:mod:`cluster.pipeline.ray_session`:
a local ``ray.init()`` unless already connected, e.g. inside ``ray job submit``), the learner ranks and the
generators (:mod:`cluster.pipeline.topology`). Then :meth:`Controller.run`, one step after another,
each loop one named method of :class:`Controller`:

- ``collect`` — the step's trees from the replay queue (:mod:`cluster.pipeline.consuming`: checked,
  deduplicated, filtered by staleness and dynamic sampling, bad ones quarantined); unblocked by
  generators pushing. While it waits the generators are watched (:mod:`cluster.pipeline.supervision`:
  a dead, failed or silent generator is restarted, rejoins with the current weights, and its prompts
  are re-issued).
- ``learn`` — tree advantages over the whole batch, each rank's share (rank ``r`` gets
  ``shard_for_rank``), one learner step on every rank (``ray.get`` with a timeout).
- ``publish`` — every ``sync.every_steps``: learner rank 0's weights to every live generator over the
  weight-sync group, rebuilt when its membership changes (:mod:`cluster.pipeline.publishing`).
- ``checkpoint`` — every ``checkpoint.every_steps`` (and at the end): the learner checkpoint with
  the step, dropped-tree count, prompt-dispatch state, stream state, the resolved config and the
  window (the entries consumed and the audit rows written since the previous checkpoint) in
  ``extra``, THEN the acknowledgement of the window's entries, then trimming of acknowledged entries.
  A crash before the publish re-delivers the window; a crash after it is finished on resume
  (:mod:`cluster.pipeline.recovery`: the window's entries are acknowledged, its rows restored).
  A resume checks Redis against the checkpoint and continues the policy version numbering past every
  version published before the crash.
- ``log`` — metrics JSONL (+ TensorBoard) with the local driver's keys plus staleness, queue depth,
  generator and learner idle fractions; the audit trail ``trained_trees.jsonl``; a progress bar.

Run name: the run's Redis keys (:class:`common.keys.RunKeys`) are named after the run directory's
absolute path, so a resume must use the same ``run_dir`` (an absolute path on clusters: ``ray job
submit`` unpacks the working directory somewhere new for every job).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from cluster.logs import copy_ray_worker_logs, eval_line, nothing_trained
from cluster.pipeline import topology
from cluster.pipeline.consuming import CONSUMER, TreeConsumer, encoded_prompt_ids, run_limits
from cluster.pipeline.evaluating import Evaluations
from cluster.pipeline.publishing import WeightPublisher
from cluster.pipeline.ray_session import connect_ray, shutdown_ray
from cluster.pipeline.recovery import check_checkpoint, check_queue_state, config_snapshot, reconcile_window
from cluster.pipeline.redis_launcher import queue_endpoint
from cluster.pipeline.supervision import STATS_TIMEOUT_S, GeneratorSupervisor
from cluster.rundir import (
    append_row,
    check_before_writing,
    final_plots,
    progress_bar,
    trained_row,
    trained_tree_ids,
    truncate_logs,
)
from cluster.signals import cleanup_scope
from common.config import TrainConfig, save_resolved
from common.errors import ConfigError
from common.keys import RunKeys, run_name_for
from common.metrics import Reducer
from common.models import load_tokenizer, resolve_model
from common.prompts import PromptDispatcher
from common.replay import ReplayQueue, connect, describe
from common.rollouts import due, step_records
from common.schedule import check_sync_every
from common.trackers import Trackers, open_trackers
from common.tree import Tree, encode_tree
from common.tree_render import write_step_pictures
from learner import advantages  # looked up per call: tests swap advantages.tree_advantages
from learner.checkpoint import Checkpoint
from learner.rank import shard_for_rank
from learner.selection import PLAIN, VersionLineage, record_staleness, rollout_metrics, staleness_metrics

log = logging.getLogger("treepo.controller")

STEP_TIMEOUT_S = 3600.0  # one learner step; generous: a 7B step on a slow node takes minutes
COUNTS = ("duplicates", "dropped_stale", "dropped_uniform", "restarts", "sync_failures", "quarantined")
COUNTS += ("loop_failures", "hangs", "orphans")  # the pipeline/ counters, from the loops and the supervisor


def run_pipeline(cfg: TrainConfig, on_checked: Callable[[], None] | None = None) -> int:
    """``treepo train driver=ray``: the asynchronous pipeline; returns the exit code. Every refusal
    that needs no server comes before anything is written; then ``on_checked`` (the command starts
    the run's logging there)."""
    check_sync_every(cfg)  # config validation refuses it already; a cfg built another way is checked here
    run_dir, run_name = Path(cfg.run_dir), run_name_for(cfg.run_dir)
    resumed = check_before_writing(cfg, fallback=False)
    if resumed is not None:
        check_checkpoint(cfg, resumed, run_name)
    if on_checked is not None:
        on_checked()
    save_resolved(cfg, run_dir)
    # resolved once here: a 'tiny:' model is built once, not by every actor
    model_path = resolve_model(cfg.model)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=model_path))
    with cleanup_scope() as hold, queue_endpoint(cfg.queue, run_dir) as (url, password):
        _check_queue_state(cfg, url, password, run_name, resumed)
        started, session_dir = connect_ray(cfg)
        try:
            if not cfg.queue.url and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
                raise ConfigError(
                    "the embedded Redis listens on 127.0.0.1 of the driver's node, which generators on other "
                    "nodes cannot reach: set queue.url to a Redis every node can reach (e.g. on the head node)"
                )
            controller = Controller(cfg, url, password, run_name)
            try:
                return controller.run()
            finally:
                hold()  # from here the cleanup runs to its end, Redis's stop included (cluster/signals.py)
                controller.close()
        finally:
            hold()
            if started:
                copy_ray_worker_logs(run_dir, session_dir, ray.get_runtime_context().get_job_id())
                shutdown_ray()


def _check_queue_state(
    cfg: TrainConfig, url: str, password: str | None, run_name: str, resumed: Checkpoint | None
) -> None:
    """The resume's Redis-against-checkpoint check, or a fresh start's reset (see recovery.py)."""
    client = connect(url, password)
    try:
        check_queue_state(cfg, client, run_name, describe(url), resumed)
    finally:
        client.close()


class Controller:
    """Owns the queue consumer, the prompt dispatcher view, the actors and the loop state."""

    def __init__(self, cfg: TrainConfig, queue_url: str, password: str | None, run_name: str) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.run_name = run_name
        self.queue = ReplayQueue.from_config(cfg.queue, queue_url, run_name, password)
        # the dispatcher here only reads state (for checkpoints and the end-of-data test): the
        # generators claim; the prompt id list must be the one the generators use
        prompt_ids = encoded_prompt_ids(cfg)
        self.dispatcher = PromptDispatcher(
            self.queue.redis, run_name, prompt_ids, cfg.data.shuffle_seed, cfg.data.epochs
        )
        self.metrics_log: Trackers | None = None  # opened by run(), after a resume truncated the logs
        self.topo = topology.start(cfg, queue_url, password, run_name)
        self.world = cfg.learner.num_workers
        self.step, self.version = 0, 0  # optimizer steps taken, the learner's policy version
        self.lineage = PLAIN  # version numbers -> optimizer steps across resumes (learner.selection)
        self.staleness_hist: dict[int, int] = {}
        self.wait_s = 0.0  # time spent collecting trees (the learner's idle time)
        self.trained_here = 0  # trees trained by this process (throughput)
        self.t_start = time.perf_counter()
        self.counts = dict.fromkeys(COUNTS, 0)
        self.window_rows: list[dict] = []  # audit rows since the last checkpoint (kept in the next one)
        self._tokenizer: Any = None  # loaded on first use (rollout records, tree pictures)
        self.generators = GeneratorSupervisor(
            self.topo.generators,
            self.dispatcher,
            self.counts,
            cfg.generators.hang_timeout_s,
            on_rejoin=lambda: self.publisher.rejoin(self.version),
            probe=topology.generator_state,  # a generator lost with its node: the run goes on without it
            rejoin_timeout_s=cfg.generators.start_timeout_s,
        )
        self.publisher = WeightPublisher(
            self.topo.learners,
            self.generators,
            self.counts,
            cfg.sync.timeout_s,
            self.queue.redis,
            RunKeys(run_name).version,
        )
        self.consumer = TreeConsumer(
            cfg,
            self.queue,
            run_name,
            self.dispatcher,
            run_limits(cfg, prompt_ids),
            policy=self,
            counts=self.counts,
            on_idle=self.generators.watch,
        )
        self.evals = Evaluations(self.generators.reachable)  # held-out evaluation beside training

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        """Set-up (:meth:`_start`), then one step after another until ``learner.total_steps`` or the
        end of the data: ``collect`` (waits for trees, watching the generators) → ``learn`` →
        ``publish`` → ``checkpoint`` → ``evaluate`` (started beside training, evaluating.py) → ``log``; then the last
        checkpoint (:meth:`_finish`) and the final plots."""
        cfg = self.cfg
        self._start()
        last_ckpt = start = self.step
        progress = progress_bar(cfg, self.step, "train[ray]")
        try:
            while self.step < cfg.learner.total_steps:
                t0 = time.perf_counter()
                got = self.consumer.collect(cfg.learner.prompts_per_step)
                if got is None:
                    print(f"[pipeline] prompts exhausted at step {self.step}", flush=True)
                    break
                trees, m = got
                if self._train_step(trees, m, t0):
                    last_ckpt = self.step
                self.log(m, trees)
                self.log_evals(self.evals.poll())
                progress.update(1)
                progress.set_postfix(**_postfix(m, self.version))
            self._finish(last_ckpt)
        finally:
            progress.close()
        if self.step == start < cfg.learner.total_steps:  # the data ran out before a step
            raise nothing_trained(cfg, self.counts["dropped_uniform"])
        final_plots(self.run_dir, self.staleness_hist)
        wall = time.perf_counter() - self.t_start
        print(
            f"[pipeline] done: {self.step} steps in {wall:.1f} s, metrics in {self.run_dir / 'metrics.jsonl'}",
            flush=True,
        )
        return 0

    def _start(self) -> None:
        """Before the first step: the resume, the resumed weights to the generators, the step-0
        evaluation, then every generator's loop."""
        if self.cfg.resume:
            self._resume()
        self.metrics_log = open_trackers(self.cfg)
        self.version = ray.get(self.topo.learners[0].version.remote(), timeout=60)
        self.consumer.set_dropped()
        if self.step or self.version:  # resumed: generators start from the checkpoint's weights
            self.publish()
        if self.step == 0 and self.cfg.eval.every_steps:
            self.evals.submit(0)  # beside training, like every evaluation (evaluating.py)
        self.generators.start_loops()
        self.t_start, self.wait_s = time.perf_counter(), 0.0  # idle fractions count from here

    def _train_step(self, trees: list[Tree], m: dict[str, float], t0: float) -> bool:
        """One step on ``trees`` (collected since ``t0``): learn, then publish, checkpoint and evaluate
        when due; the metrics go into ``m``. True if it checkpointed."""
        cfg = self.cfg
        t_gen = time.perf_counter() - t0
        self.wait_s += t_gen  # the learner group has nothing to do while trees are collected
        t1 = time.perf_counter()
        m.update(self.learn(trees))
        t_train = time.perf_counter() - t1
        self.step += 1
        # the audit row is written before the checkpoint that covers it (and kept in it)
        self.window_rows.append(trained_row(self.step, self.version, trees))
        append_row(self.run_dir, self.window_rows[-1])
        if self.step % cfg.sync.every_steps == 0:
            m["timing/sync_s"] = self.publish()
            m.update(self.publisher.stats)
        saved = self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.learner.total_steps
        if saved:
            m["timing/checkpoint_s"] = self.checkpoint()
        if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
            self.evals.submit(self.step)
            self.tree_pictures(trees)
        m.update({"timing/generate_s": t_gen, "timing/train_s": t_train})
        m["timing/step_s"] = time.perf_counter() - t0
        return saved

    def _resume(self) -> None:
        """Load the checkpoint on every rank, finish its window, continue the version numbering,
        re-issue the prompts of generators this run no longer has, and re-deliver pending entries."""
        cfg = self.cfg
        extras = ray.get([h.load.remote(str(self.ckpt_dir)) for h in self.topo.learners], timeout=600)
        extra = extras[0] or {}
        self.step = int(extra.get("step", 0))
        self.consumer.dropped = int(extra.get("dropped", 0))
        truncate_logs(self.run_dir, self.step)
        reconcile_window(self.run_dir, self.queue, extra)
        self.consumer.trained_ids = trained_tree_ids(self.run_dir)
        self.version = ray.get(self.topo.learners[0].version.remote(), timeout=60)
        newest = self.publisher.newest_published()
        self.lineage = VersionLineage.from_json(extra.get("version_lineage"))
        if newest > self.version:  # versions published after the checkpoint: never reuse their numbers
            self.lineage = self.lineage.after_resume(self.version, newest + 1)
            self.version = newest + 1
            ray.get([h.set_version.remote(self.version) for h in self.topo.learners], timeout=60)
        for gid in self.dispatcher.generator_ids():
            if not gid.isdigit() or int(gid) >= cfg.generators.num:  # a generator this run does not have
                n = self.dispatcher.requeue_generator(gid)
                if n:
                    print(f"[pipeline] re-issued {n} prompt(s) of retired generator {gid}", flush=True)
        redelivered, kept, reissued = self.consumer.reclaim()
        print(
            f"[pipeline] resumed from step {self.step} (policy version {self.version}): {redelivered} "
            f"unacknowledged tree(s) re-delivered, {kept} kept, {reissued} too stale (prompts re-issued)",
            flush=True,
        )

    def _finish(self, last_ckpt: int) -> None:
        """The end of the run: a checkpoint of the steps since the last one; entries consumed after
        it without training (duplicates, drops: their twins and drops are covered) acknowledged."""
        if self.step > last_ckpt:
            self.checkpoint()
        self.consumer.finish()
        self.log_evals(self.evals.finish(STEP_TIMEOUT_S))

    # ------------------------------------------------------------------ learn / publish / checkpoint
    def learn(self, trees: list[Tree]) -> dict[str, float]:
        advantages_P = advantages.tree_advantages(trees, self.cfg.algo)
        stale_L = record_staleness(trees, self.version, self.staleness_hist, self.lineage)
        encoded = [encode_tree(t) for t in trees]
        idx = list(range(len(trees)))
        refs = []
        for r, h in enumerate(self.topo.learners):
            mine = (
                shard_for_rank(idx, r, self.world, self.cfg.learner.mini_batch_prompts)
                if self.world > 1
                else idx
            )
            refs.append(h.train_step.remote([encoded[i] for i in mine], [advantages_P[i] for i in mine]))
        metrics = ray.get(refs, timeout=STEP_TIMEOUT_S)[0]
        self.version = ray.get(self.topo.learners[0].version.remote(), timeout=60)
        self.consumer.trained_ids.update(t.tree_id for t in trees)
        self.trained_here += len(trees)
        m = dict(metrics)
        m.update(rollout_metrics(trees))
        m.update(staleness_metrics(trees, stale_L))
        return m

    def publish(self) -> float:
        """The current weights to every live generator (:mod:`cluster.pipeline.publishing`); seconds."""
        return self.publisher.publish(self.version, self.step)

    def checkpoint(self) -> float:
        """Checkpoint, THEN acknowledge what it covers, then trim acknowledged entries."""
        t0 = time.perf_counter()
        extra = {
            "step": self.step,
            "dropped": self.consumer.dropped,
            "prompts": self.dispatcher.state(),
            "stream": {
                "run": self.run_name,
                "consumer": CONSUMER,
                "acked_at_checkpoint": len(self.consumer.unacked),
                "depth": self.queue.depth(),
            },
            "config": config_snapshot(self.cfg),
            "version_lineage": self.lineage.to_json(),  # staleness across resumes
            # acknowledged only after the publish: a resume finishes a window whose ack was lost
            "window": {"entries": list(self.consumer.unacked), "rows": list(self.window_rows)},
        }
        ray.get(
            [
                h.save.remote(str(self.ckpt_dir), extra, self.step, self.cfg.checkpoint.keep_last)
                for h in self.topo.learners
            ],
            timeout=STEP_TIMEOUT_S,
        )
        self.consumer.ack_consumed()
        self.window_rows = []
        return time.perf_counter() - t0

    def log_evals(self, done: list[tuple[int, dict[str, float]]]) -> None:
        """Evaluations finished beside training: logged at the step they were asked for."""
        for step, out in done:
            print(eval_line(step, out), flush=True)
            self.metrics_log.log(step, out)

    # ------------------------------------------------------------------ metrics
    def generator_stats(self) -> dict[str, float]:
        """The live generators' counters, each combined by the reduction it carries."""
        red = Reducer()
        refs = [h.stats.remote() for h in self.generators.looping()]
        for ref in refs:
            try:
                stats = ray.get(ref, timeout=STATS_TIMEOUT_S)
            except Exception:  # a generator dying right now: its numbers are missing this step
                continue
            red.update(stats)
        return red.result()

    def log(self, m: dict[str, float], trees: list[Tree]) -> None:
        wall = time.perf_counter() - self.t_start
        m.update(self.generator_stats())
        m["learner/idle_frac"] = self.wait_s / wall if wall > 0 else 0.0
        m["learner/version"] = float(self.version)
        m["queue/depth"] = float(self.queue.depth())
        m["queue/undelivered"] = float(self.queue.undelivered())
        m["queue/dead_count"] = float(self.queue.dead_count())
        m["pipeline/dropped_total"] = float(self.consumer.dropped)
        m["pipeline/duplicates"] = float(self.counts["duplicates"])
        m["pipeline/generator_restarts"] = float(self.counts["restarts"])
        m["pipeline/sync_failures"] = float(self.counts["sync_failures"])
        for key in ("quarantined", "loop_failures", "hangs", "orphans"):
            m[f"pipeline/{key}"] = float(self.counts[key])
        m["pipeline/trees_per_s"] = self.trained_here / wall if wall > 0 else 0.0
        for s, n in sorted(self.staleness_hist.items()):
            m[f"staleness/hist/{s}"] = float(n)
        self.metrics_log.log(self.step, m)
        if due(self.step, self.cfg.log.rollouts_every_steps):
            records = step_records(trees, advantages.tree_advantages(trees, self.cfg.algo), self._decode)
            self.metrics_log.log_rollouts(self.step, records)

    def tree_pictures(self, trees: list[Tree]) -> None:
        """An eval step's page of ``log.tree_pictures`` trained trees in ``<run_dir>/trees/``."""
        cfg = self.cfg
        if cfg.log.tree_pictures <= 0:
            return
        advantages_P = advantages.tree_advantages(trees, cfg.algo)  # as trained: the same batch and whitening
        write_step_pictures(self.run_dir, self.step, trees, advantages_P, self._decode, cfg.log.tree_pictures)

    def _decode(self, ids: list[int]) -> str:
        """Token ids as text, for rollout records and tree pictures."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(
                self.cfg.model.path, trust_remote_code=self.cfg.model.trust_remote_code
            )
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def close(self) -> None:
        try:
            topology.shutdown(self.topo)
        finally:
            if self.metrics_log is not None:
                self.metrics_log.close()
            self.queue.close()


def _postfix(m: dict[str, float], version: int) -> dict[str, Any]:
    """The progress bar's line of one step."""
    return {
        "reward": f"{m['rollout/reward']:+.3f}",
        "depth": f"{m.get('tree/leaf_depth_mean', 0.0):.2f}",
        "tok": f"{m.get('tree/decoded_vs_flat', 1.0):.2f}",
        "v": version,
        "q": int(m.get("queue/depth", 0)),
        "stale": f"{m['staleness/mean']:.2f}",
        "trees_s": f"{m['pipeline/trees_per_s']:.2f}",
    }
