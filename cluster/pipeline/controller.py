"""The asynchronous pipeline's driver (``driver=ray``): generators stream trees through Redis, the
learner group trains on them, new weights flow back. :func:`run_pipeline` is ``treepo train``'s entry.

Set-up: the run's Redis (``queue.url`` or the embedded server in the run directory), Ray (a local
``ray.init()`` unless already connected, e.g. inside ``ray job submit``), the learner ranks and the
generators (``cluster/pipeline/topology.py``). Then the loops, each one named method of :class:`Controller`:

- ``collect`` — consumes queue entries (``XREADGROUP``; on resume the unacknowledged ones first),
  drops duplicates (by tree id), trees with a leaf past ``algo.max_staleness`` and, with dynamic
  sampling, trees whose leaves all agree; waits until ``learner.prompts_per_step`` trees are kept.
  Unblocked by generators pushing. Every drop raises the Redis counter ``D`` the generators' admission
  rule adds (:mod:`common.schedule`), so a dropped tree is replaced instead of stalling the step.
  While it waits it also watches the generators: a dead one is restarted by Ray (``max_restarts``),
  receives the current weights and starts its loop again; its in-flight prompts are re-issued. A
  generator whose loop raised while its actor lives (a dead engine core, a Redis outage past
  ``queue.outage_s``) or whose loop is silent for ``generators.hang_timeout_s`` (its heartbeat) is
  restarted the same way. Every tree is checked against the run (:func:`common.tree.check_for_run`:
  vocabulary, length caps, leaf count, finite rewards, no version from the future, a known prompt)
  and run through what training does to it (advantages, encoding); one that fails is quarantined in
  the dead-letter stream with the reason, and the run goes on. Entries delivered by a read whose
  reply was lost (the client retried it) are found in the pending list and taken in.
- ``learn`` — tree advantages over the whole batch, each rank's share (rank ``r`` gets
  ``shard_for_rank``), one learner step on every rank (``ray.get`` with a timeout).
- ``publish`` — every ``sync.every_steps``: learner rank 0 broadcasts its weights over the
  weight-sync group (:mod:`common.weight_sync`: a process group of its own, built from a TCP store on
  rank 0's node; gloo on CPU, NCCL on GPU; bucketed; a timeout on every wait) to every live generator,
  with the new policy version and the step count (the generators' admission clock). Each generator
  receives in a side thread and applies the update at its next segment boundary. The group is rebuilt
  on a new port whenever its membership changes (a generator died, restarted or was added) or a sync
  failed; a restarted generator joins and receives the current weights, nothing else restarts.
  With ``algo.max_staleness=0`` the admission rule makes generation wait for each publish: the
  synchronous schedule, through the same code.
- ``checkpoint`` — every ``checkpoint.every_steps`` (and at the end): the learner checkpoint with
  the step, dropped-tree count, prompt-dispatch state, stream state, the resolved config and the
  window (the entries consumed and the audit rows written since the previous checkpoint) in
  ``extra``, THEN the acknowledgement of the window's entries, then trimming of acknowledged entries.
  A crash before the publish re-delivers the window; a crash after it is finished on resume
  (:mod:`cluster.pipeline.recovery`: the window's entries are acknowledged, its rows restored).
  With several ranks, trees short of a mini-batch at the end of the data stay pending (never
  acknowledged untrained). A resume checks Redis against the checkpoint and continues the policy
  version numbering past every version published before the crash.
- ``log`` — metrics JSONL (+ TensorBoard) with the local driver's keys plus staleness, queue depth,
  generator and learner idle fractions; the audit trail ``trained_trees.jsonl``; a progress bar.

Where the receivers run (``sync.receiver``): with the vLLM engine in worker processes (the
multiprocess engine, tensor parallelism), every engine worker is a receiver rank of its own: it
receives in a background thread while the engine generates, and the generator applies the staged
update at its next segment boundary. With an in-process engine (the CPU default) or the transformers
backend, the generator's process is the one rank and hands the tensors to the engine. Each generator
says how many ranks it takes (``sync_ranks``); generator ``g`` gets the ranks after those of the
members before it, so the group's world size is 1 + the sum.

Run name: the run's Redis keys (:class:`common.keys.RunKeys`) are named after the run directory's
absolute path, so a resume must use the same ``run_dir`` (an absolute path on clusters: ``ray job
submit`` unpacks the working directory somewhere new for every job).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.config import TrainConfig, save_resolved
from common.errors import ConfigError, QueueError, SyncError, TreepoError
from common.rollouts import due
from common.trackers import open_trackers
from learner.selection import PLAIN, VersionLineage

log = logging.getLogger("treepo.controller")

CONSUMER = "controller"
STEP_TIMEOUT_S = 3600.0  # one learner step; generous: a 7B step on a slow node takes minutes
STALL_TIMEOUT_S = 1800.0  # no tree at all for this long while generators live: something is wrong
STATS_TIMEOUT_S = 10.0
ORPHAN_CHECK_S = 10.0  # how often an idle collect compares the pending list with what it consumed


def _connect_ray(cfg: TrainConfig) -> tuple[bool, str | None]:
    """Connect to the Ray cluster named by ``RAY_ADDRESS`` (set inside ``ray job submit``, or by the
    user) or start a private local one; (True if we connected, the session directory of a Ray we
    started). Never attaches to some other cluster
    that happens to run on this machine (plain ``ray.init()`` would join the last ``ray start``)."""
    import os

    import ray

    if ray.is_initialized():
        return False, None
    address = os.environ.get("RAY_ADDRESS") or "local"
    # quiet (log.level=warning): the actors' output stays in Ray's log files, off the console
    # (cluster/logs.py copies a local Ray's into the run directory)
    verbose = cfg.log.level != "warning"
    ctx = ray.init(address=address, include_dashboard=False, log_to_driver=verbose, configure_logging=verbose)
    return True, (ctx.address_info.get("session_dir") if address == "local" else None)


def run_pipeline(cfg: TrainConfig) -> int:
    """``treepo train driver=ray``: the asynchronous pipeline; returns the exit code."""
    from cluster.pipeline.redis_launcher import queue_endpoint
    from cluster.rundir import check_run_dir
    from common.keys import run_name_for
    from common.models import resolve_model
    from common.schedule import check_sync_every

    check_sync_every(cfg)  # config validation refuses it already; a cfg built another way is checked here
    run_dir = Path(cfg.run_dir)
    check_run_dir(cfg, run_dir / "checkpoints")
    save_resolved(cfg, run_dir)
    # resolved once here: a 'tiny:' model is built once, not by every actor
    model_path = resolve_model(cfg.model)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=model_path))
    import ray

    with queue_endpoint(cfg.queue, run_dir) as (url, password):
        _check_queue_state(cfg, url, password, run_name_for(run_dir))
        started, session_dir = _connect_ray(cfg)
        try:
            if not cfg.queue.url and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
                raise ConfigError(
                    "the embedded Redis listens on 127.0.0.1 of the driver's node, which generators on other "
                    "nodes cannot reach: set queue.url to a Redis every node can reach (e.g. on the head node)"
                )
            controller = Controller(cfg, url, password, run_name_for(run_dir))
            try:
                return controller.run()
            finally:
                controller.close()
        finally:
            if started:
                from cluster.logs import copy_ray_worker_logs

                copy_ray_worker_logs(run_dir, session_dir, ray.get_runtime_context().get_job_id())
                ray.shutdown()


def _check_queue_state(cfg: TrainConfig, url: str, password: str | None, run_name: str) -> None:
    """The resume's Redis-against-checkpoint check, or a fresh start's reset (see recovery.py)."""
    from cluster.pipeline.recovery import check_queue_state
    from common.replay import connect, describe

    client = connect(url, password)
    try:
        check_queue_state(cfg, client, run_name, describe(url))
    finally:
        client.close()


@dataclasses.dataclass
class _GenSlot:
    """The controller's view of one generator actor."""

    handle: Any
    run_ref: Any = None  # the running loop
    ready_ref: Any = None  # waiting for a restart to finish
    done: bool = False  # its loop returned (data used up) or it is dead for good
    dead: bool = False  # out of restarts: no engine any more
    restarts: int = 0
    old_pid: int | None = None  # the process a deliberate restart killed (its answers are ignored)
    beat_at: float = 0.0  # when the heartbeat is asked next


class Controller:
    """Owns the queue consumer, the prompt dispatcher view, the actors and the loop state."""

    def __init__(self, cfg: TrainConfig, queue_url: str, password: str | None, run_name: str) -> None:
        from cluster.pipeline import topology
        from common.keys import RunKeys
        from common.prompts import PromptDispatcher
        from common.replay import ReplayQueue

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.run_name = run_name
        self.queue = ReplayQueue.from_config(cfg.queue, queue_url, run_name, password)
        # the dispatcher here only reads state (for checkpoints and the end-of-data test): the
        # generators claim; the prompt id list must be the one the generators use
        self._prompt_ids = self._encoded_prompt_ids(cfg)
        self.dispatcher = PromptDispatcher(
            self.queue.redis, run_name, self._prompt_ids, cfg.data.shuffle_seed, cfg.data.epochs
        )
        self._dropped_key = RunKeys(run_name).dropped
        self.metrics_log: Any = None  # the trackers: opened by run(), after a resume truncated the logs
        self.topo = topology.start(cfg, queue_url, password, run_name)
        self.gens = [_GenSlot(h) for h in self.topo.generators]
        self.world = cfg.learner.num_workers
        self.step = 0
        self.version = 0
        self.lineage = PLAIN  # version numbers -> optimizer steps across resumes (learner.selection)
        self.dropped = 0  # trees consumed without training (staleness, dynamic sampling)
        self.trained_ids: set[str] = set()
        self.unacked: list[str] = []  # entries consumed since the last checkpoint
        self.backlog: list[tuple[str, Any]] = []  # reclaimed on resume: consumed first
        self.staleness_hist: dict[int, int] = {}
        self.published: tuple[int, int] | None = None  # (version, step) of the last weights sent
        self.sync_members: list[int] | None = None  # generator ids in the weight-sync group, by rank - 1
        self.wait_s = 0.0  # time spent collecting trees (the learner's idle time)
        self.trained_here = 0  # trees trained by this process (throughput)
        self.t_start = time.perf_counter()
        self.counts = {
            "duplicates": 0,
            "dropped_stale": 0,
            "dropped_uniform": 0,
            "restarts": 0,
            "sync_failures": 0,
            "quarantined": 0,
            "loop_failures": 0,
            "hangs": 0,
            "orphans": 0,
        }
        self.sync_stats: dict[str, float] = {}
        self.window_rows: list[dict] = []  # audit rows since the last checkpoint (kept in the next one)
        self.held: list[str] = []  # trees short of a mini-batch: pending, neither trained nor acked
        self._orphans_at = 0.0  # when the pending list is compared with what was consumed next
        self._version_key = RunKeys(run_name).version
        self.queue.check = self._check_tree
        self._limits = self._run_limits(cfg, self._prompt_ids)

    @staticmethod
    def _encoded_prompt_ids(cfg: TrainConfig) -> list[str]:
        """The ids of the prompts the generators will use, in their order (the same loader: too-long
        prompts are skipped there, so they must be skipped here too; a mixture is built the same way)."""
        from common.data import load_prompt_set
        from common.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        return [p.row.id for p in load_prompt_set(cfg.data.train, "train", tokenizer, cfg.data)[0]]

    @staticmethod
    def _run_limits(cfg: TrainConfig, prompt_ids: list[str]) -> Any:
        """What every tree of this run must satisfy (:class:`common.tree.RunLimits`)."""
        from transformers import AutoConfig

        from common.tree import RunLimits

        mcfg = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        vocab = getattr(mcfg, "vocab_size", None) or mcfg.get_text_config().vocab_size
        return RunLimits(
            vocab_size=int(vocab),
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            max_response_tokens=cfg.tree.max_response_tokens,
            leaves=cfg.tree.w,
            epochs=cfg.data.epochs,
            prompt_ids=frozenset(prompt_ids),
        )

    def _check_tree(self, tree: Any) -> None:
        """The queue's run-level check of a decoded tree (WireError quarantines it)."""
        from common.tree import check_for_run

        check_for_run(tree, dataclasses.replace(self._limits, max_version=lambda: self.version))

    # ------------------------------------------------------------------ the run
    def _resume(self) -> None:
        """Load the checkpoint on every rank, finish its window, continue the version numbering,
        re-issue the prompts of generators this run no longer has, and re-deliver pending entries."""
        import ray

        from cluster.pipeline.recovery import reconcile_window
        from cluster.rundir import trained_tree_ids, truncate_logs

        cfg = self.cfg
        extras = ray.get([h.load.remote(str(self.ckpt_dir)) for h in self.topo.learners], timeout=600)
        extra = extras[0] or {}
        self.step = int(extra.get("step", 0))
        self.dropped = int(extra.get("dropped", 0))
        truncate_logs(self.run_dir, self.step)
        reconcile_window(self.run_dir, self.queue, extra)
        self.trained_ids = trained_tree_ids(self.run_dir)
        self.version = ray.get(self.topo.learners[0].version.remote(), timeout=60)
        newest = int(self.queue.redis.get(self._version_key) or 0)
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
        self.backlog = self.queue.reclaim(CONSUMER, min_idle_ms=0)
        print(
            f"[pipeline] resumed at step {self.step} (policy version {self.version}): "
            f"{len(self.backlog)} unacknowledged tree(s) re-delivered",
            flush=True,
        )

    def _finish(self, last_ckpt: int) -> None:
        """The end of the run: a checkpoint of the steps since the last one; entries consumed after
        it without training (duplicates, drops: their twins and drops are covered) acknowledged."""
        if self.step > last_ckpt:
            self.checkpoint()
        elif self.unacked:
            self.queue.ack(self.unacked)
            self.unacked = []
            self.queue.trim_acked()
        if self.held:
            print(
                f"[pipeline] {len(self.held)} tree(s) short of a mini-batch "
                f"(learner.mini_batch_prompts={self.cfg.learner.mini_batch_prompts} x "
                f"{self.world} ranks) stay pending, untrained: a resume with more data or steps trains them",
                flush=True,
            )

    def run(self) -> int:
        import ray

        from cluster.rundir import append_row, final_plots, progress_bar, trained_row

        cfg = self.cfg
        if cfg.resume:
            self._resume()
        self.metrics_log = open_trackers(cfg)
        self.version = ray.get(self.topo.learners[0].version.remote(), timeout=60)
        self.queue.redis.set(self._dropped_key, self.dropped)
        if self.step or self.version:  # resumed: generators start from the checkpoint's weights
            self.publish()
        if self.step == 0 and cfg.eval.every_steps:
            self.metrics_log.log(0, self.evaluate())
        for slot in self.gens:
            slot.run_ref = slot.handle.run.remote()
        self.t_start, self.wait_s = time.perf_counter(), 0.0  # idle fractions count from here
        last_ckpt = self.step
        progress = progress_bar(cfg, self.step, "train[ray]")
        try:
            while self.step < cfg.learner.total_steps:
                t0 = time.perf_counter()
                got = self.collect(cfg.learner.prompts_per_step)
                if got is None:
                    print(f"[pipeline] prompts exhausted at step {self.step}", flush=True)
                    break
                trees, m = got
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
                    m.update(self.sync_stats)
                if self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.learner.total_steps:
                    m["timing/checkpoint_s"] = self.checkpoint()
                    last_ckpt = self.step
                if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                    m.update(self.evaluate())
                    self.tree_pictures(trees)
                m.update({"timing/generate_s": t_gen, "timing/train_s": t_train})
                m["timing/step_s"] = time.perf_counter() - t0
                self.log(m, trees)
                progress.update(1)
                progress.set_postfix(
                    reward=f"{m['rollout/reward']:+.3f}",
                    depth=f"{m.get('tree/leaf_depth_mean', 0.0):.2f}",
                    tok=f"{m.get('tree/decoded_vs_flat', 1.0):.2f}",
                    v=self.version,
                    q=int(m.get("queue/depth", 0)),
                    stale=f"{m['staleness/mean']:.2f}",
                    trees_s=f"{m['pipeline/trees_per_s']:.2f}",
                )
            self._finish(last_ckpt)
        finally:
            progress.close()
        final_plots(self.run_dir, self.staleness_hist)
        wall = time.perf_counter() - self.t_start
        print(
            f"[pipeline] done: {self.step} steps in {wall:.1f} s, metrics in {self.run_dir / 'metrics.jsonl'}",
            flush=True,
        )
        return 0

    # ------------------------------------------------------------------ consume
    def _set_dropped(self) -> None:
        self.queue.redis.set(self._dropped_key, self.dropped)

    def collect(self, need: int) -> tuple[list, dict[str, float]] | None:
        """``need`` kept trees from the queue (fewer only when the data is used up; None if none)."""
        from learner.selection import Selection

        cfg = self.cfg
        sel = Selection(self.version, cfg.algo.max_staleness, cfg.algo.dynamic_sampling, lineage=self.lineage)
        last_tree = time.perf_counter()
        entry_of: dict[str, str] = {}  # tree id -> entry id of the kept trees
        while len(sel.kept) < need:
            entries = self._next_entries(need - len(sel.kept))
            before = self.dropped
            for entry_id, tree in entries:
                if self._take(entry_id, tree, sel, entry_of) == "dropped":
                    self.dropped += 1
            if self.dropped != before:
                self._set_dropped()
            if entries:
                last_tree = time.perf_counter()
                continue
            self.watch_generators()
            if self._recover_orphans():
                continue
            if self._data_finished() and not self._recover_orphans(force=True):
                break
            if time.perf_counter() - last_tree > STALL_TIMEOUT_S:
                raise QueueError(
                    f"no tree arrived for {STALL_TIMEOUT_S:.0f} s while generators are alive: check the "
                    "generator logs (ray logs) and queue state (`treepo queue inspect`)"
                )
        kept = sel.kept
        if len(kept) < need and self.world > 1:  # every rank needs the same share: the rest stays pending
            keep = len(kept) - len(kept) % cfg.learner.mini_batch_prompts
            short = {entry_of[t.tree_id] for t in kept[keep:]}
            self.unacked = [i for i in self.unacked if i not in short]
            self.held += sorted(short)
            kept = kept[:keep]
        if not kept:
            return None
        self.counts["dropped_stale"] += sel.dropped_stale
        self.counts["dropped_uniform"] += sel.dropped_uniform
        return kept, {**sel.metrics(), "staleness/trees_dropped": sel.dropped_stale}

    def _take(self, entry_id: str, tree: Any, sel: Any, entry_of: dict[str, str]) -> str:
        """One delivered tree: ``quarantined`` when checking or preparing it raises (it goes to the
        dead-letter stream with the reason), else ``duplicate``, ``dropped`` or ``kept``."""
        from learner.selection import KEPT

        try:
            self._prepare(tree)
            duplicate = tree.tree_id in self.trained_ids or tree.tree_id in entry_of
            verdict = None if duplicate else sel.offer(tree)
        except Exception as e:  # one bad tree must not stop (nor, re-delivered, crash-loop) the run
            reason = f"{type(e).__name__}: {e}"
            self.queue.quarantine(entry_id, reason, CONSUMER)
            self.counts["quarantined"] += 1
            print(f"[pipeline] entry {entry_id} quarantined in the dead-letter stream: {reason}", flush=True)
            return "quarantined"
        self.unacked.append(entry_id)
        if duplicate:
            sel.skip_duplicate()
            self.counts["duplicates"] += 1  # at-least-once delivery: a retried XADD
            return "duplicate"
        if verdict != KEPT:
            return "dropped"
        entry_of[tree.tree_id] = entry_id
        return "kept"

    def _prepare(self, tree: Any) -> None:
        """What training does to one tree alone: its advantages (finite) and its wire encoding."""
        from common.errors import WireError
        from common.tree import encode_tree
        from learner.advantages import tree_advantages

        adv = tree_advantages([tree], self.cfg.algo)
        if not all(np.isfinite(a).all() for a in adv):
            raise WireError("non-finite advantages")
        encode_tree(tree)

    def _recover_orphans(self, force: bool = False) -> int:
        """Entries delivered to this consumer by a read whose reply was lost (the client retried it):
        pending in Redis, never seen here. They join the backlog; returns how many."""
        now = time.monotonic()
        if not force and now < self._orphans_at:
            return 0
        self._orphans_at = now + ORPHAN_CHECK_S
        known = {*self.unacked, *self.held, *(i for i, _ in self.backlog)}
        orphans = [i for i in self.queue.pending(CONSUMER) if i not in known]
        if orphans:
            self.counts["orphans"] += len(orphans)
            self.backlog += self.queue.entries(orphans, CONSUMER)
            print(f"[pipeline] {len(orphans)} entr(ies) delivered by a lost read taken in", flush=True)
        return len(orphans)

    def _next_entries(self, n: int) -> list[tuple[str, Any]]:
        """Up to ``n`` queue entries: the ones re-delivered on resume first, then new ones."""
        if self.backlog:
            entries, self.backlog = self.backlog[:n], self.backlog[n:]
            return entries
        return self.queue.read(n, block_ms=min(self.cfg.queue.block_ms, 500), consumer=CONSUMER)

    def _data_finished(self) -> bool:
        """No prompt left anywhere: none to claim, none in flight, nothing undelivered in the stream."""
        return not self.backlog and self.dispatcher.finished() and self.queue.undelivered() == 0

    def watch_generators(self) -> None:
        """Restart handling: a loop that failed because its actor died waits for Ray's restart, gets
        the current weights and runs again; a loop that raised, or is silent for
        ``generators.hang_timeout_s``, gets its actor restarted the same way; a loop that returned
        means the data is used up there."""
        import ray

        for g, slot in enumerate(self.gens):
            if slot.ready_ref is not None:
                if ray.wait([slot.ready_ref], timeout=0)[0]:
                    self._restart_settled(g, slot)
            elif slot.run_ref is not None and not slot.done:
                if ray.wait([slot.run_ref], timeout=0)[0]:
                    self._loop_ended(g, slot)
                else:
                    self._check_heartbeat(g, slot)

    def _check_heartbeat(self, g: int, slot: _GenSlot) -> None:
        """Restart a generator whose loop made no progress for ``generators.hang_timeout_s`` (or whose
        actor does not answer at all)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        now, limit = time.monotonic(), self.cfg.generators.hang_timeout_s
        if now < slot.beat_at:
            return
        slot.beat_at = now + min(5.0, limit / 4)
        try:
            silent = float(ray.get(slot.handle.heartbeat.remote(), timeout=min(STATS_TIMEOUT_S, limit)))
        except GetTimeoutError:
            silent = float("inf")
        except RayActorError:  # dying: its loop's failure is handled on the next round
            return
        if silent > limit:
            self.counts["hangs"] += 1
            why = f"its loop made no progress for {silent:.0f} s (generators.hang_timeout_s={limit:g})"
            self._restart(g, slot, why)

    def _restart(self, g: int, slot: _GenSlot, why: str) -> None:
        """Kill a live generator's actor for Ray to restart (a fresh engine; the new actor re-issues the
        prompts the old one had in flight), then wait for it like for one that died."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        print(f"[pipeline] generator {g} restarts: {why}", flush=True)
        try:
            slot.old_pid = int(ray.get(slot.handle.pid.remote(), timeout=STATS_TIMEOUT_S))
        except (GetTimeoutError, RayActorError):
            slot.old_pid = None
        ray.kill(slot.handle, no_restart=False)
        deadline = time.monotonic() + 60
        while slot.old_pid is not None and time.monotonic() < deadline:  # until the old process is gone
            try:
                if ray.get(slot.handle.pid.remote(), timeout=5) != slot.old_pid:
                    break
            except (GetTimeoutError, RayActorError):
                break
            time.sleep(0.2)
        slot.run_ref = None
        slot.restarts += 1
        self.counts["restarts"] += 1
        self.sync_members = None  # its receiver is gone: the next sync rebuilds the group
        slot.ready_ref = slot.handle.pid.remote()

    def _restart_settled(self, g: int, slot: _GenSlot) -> None:
        """A restarting generator answered: resume its loop with the current weights, ask again, or
        give it up for good."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        ref, slot.ready_ref = slot.ready_ref, None
        try:
            answer = ray.get(ref)
        except ActorUnavailableError:  # still restarting: ask again on the next round
            slot.ready_ref = slot.handle.ready.remote()
            return
        except RayActorError as e:  # out of restarts (or its constructor fails)
            self.dispatcher.requeue_generator(g)  # for good: others take its prompts
            slot.done = slot.dead = True
            if all(s.done for s in self.gens) and not self.dispatcher.finished():
                raise TreepoError(
                    f"every generator is dead (generator {g}: {e}): see the generator logs (ray logs)"
                ) from None
            return
        if slot.old_pid is not None and answer == slot.old_pid:  # the killed process, still answering
            slot.ready_ref = slot.handle.pid.remote()
            return
        slot.old_pid = None
        if self.published is not None:  # it joins the group and gets the current weights
            self.publish(step=self.published[1])
        slot.run_ref = slot.handle.run.remote()
        print(f"[pipeline] generator {g} restarted ({slot.restarts}x), loop resumed", flush=True)

    def _loop_ended(self, g: int, slot: _GenSlot) -> None:
        """A generator's loop returned (the data is used up there) or died with its actor."""
        import ray
        from ray.exceptions import RayActorError

        ref, slot.run_ref = slot.run_ref, None
        try:
            ray.get(ref)
            slot.done = True
        except RayActorError:
            slot.restarts += 1
            self.counts["restarts"] += 1
            self.sync_members = None  # its receiver is gone: the next sync rebuilds the group
            print(f"[pipeline] generator {g} died; waiting for its restart", flush=True)
            slot.ready_ref = slot.handle.ready.remote()
        except Exception as e:  # the loop raised while the actor lives (a dead engine core, Redis gone)
            self.counts["loop_failures"] += 1
            reason = str(e).strip().splitlines()[-1][:400] if str(e).strip() else type(e).__name__
            self._restart(g, slot, f"its loop failed: {reason}")

    # ------------------------------------------------------------------ learn / publish / checkpoint
    def learn(self, trees: list) -> dict[str, float]:
        import ray

        from common.tree import encode_tree
        from learner.advantages import tree_advantages
        from learner.rank import shard_for_rank
        from learner.selection import record_staleness, rollout_metrics, staleness_metrics

        advantages = tree_advantages(trees, self.cfg.algo)
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
            refs.append(h.train_step.remote([encoded[i] for i in mine], [advantages[i] for i in mine]))
        metrics = ray.get(refs, timeout=STEP_TIMEOUT_S)[0]
        self.version = ray.get(self.topo.learners[0].version.remote(), timeout=60)
        self.trained_ids.update(t.tree_id for t in trees)
        self.trained_here += len(trees)
        m = dict(metrics)
        m.update(rollout_metrics(trees))
        m.update(staleness_metrics(trees, stale_L))
        return m

    def _sync_group(self) -> list[int]:
        """The generators that take part in the next sync (alive, not restarting); the group is rebuilt
        (new port, new world size) whenever that set changed since the last sync or a sync failed."""
        import ray

        members = [g for g, s in enumerate(self.gens) if s.ready_ref is None and not s.dead]
        if not members:  # all restarting: each gets the weights when it is back (watch_generators)
            self.sync_members = None
            return []
        if members != self.sync_members:
            self.sync_members = None
            # one rank per receiver: the generator's process, or each of its engine's workers
            ranks = ray.get([self.gens[g].handle.sync_ranks.remote() for g in members], timeout=60)
            # member i takes ranks bases[i] .. bases[i] + ranks[i] - 1
            bases = np.cumsum([1, *ranks[:-1]]).tolist()
            info = ray.get(self.topo.learners[0].sync_open.remote(1 + sum(ranks)), timeout=60)
            ray.get(
                [self.gens[g].handle.sync_join.remote(info, int(b)) for g, b in zip(members, bases)],
                timeout=60,
            )
            self.sync_members = members
        return members

    def _sync_once(self, step: int) -> dict[str, float]:
        import ray

        members = self._sync_group()
        if not members:
            return {}
        sends = [h.sync_send.remote() for h in self.topo.learners]
        receives = [self.gens[g].handle.sync_receive.remote(step) for g in members]
        # every wait inside has sync.timeout_s; this outer bound only catches an actor that hangs
        # outside the transport
        results = ray.get([*sends, *receives], timeout=3 * self.cfg.sync.timeout_s + 60)
        return dict(results[0])

    def _drop_unreachable_generators(self) -> None:
        """After a failed sync: a generator that does not answer (died, restarting) leaves the group
        until Ray has restarted it (``watch_generators`` then re-admits it with the current weights)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        for g, slot in enumerate(self.gens):
            if slot.ready_ref is not None or slot.dead:
                continue
            try:
                ray.get(slot.handle.ready.remote(), timeout=STATS_TIMEOUT_S)
            except GetTimeoutError:  # alive but busy: it stays a member (a second failure is reported)
                continue
            except RayActorError:  # died or restarting (ActorUnavailableError is one)
                slot.run_ref = None  # its loop died with it: resubmitted after the restart
                slot.restarts += 1
                self.counts["restarts"] += 1
                slot.ready_ref = slot.handle.ready.remote()
                print(f"[pipeline] generator {g} is unreachable; it rejoins after its restart", flush=True)

    def publish(self, step: int | None = None) -> float:
        """Broadcast learner rank 0's current weights to every live generator over the weight-sync
        group (:mod:`common.weight_sync`: gloo on CPU, NCCL on GPU, bucketed, timeouts on every wait);
        generators apply them at their next segment boundary. A failed or stuck sync (a generator died
        mid-update, a receiver never joined) rebuilds the group on a new port with the generators
        still alive and tries once more; a second failure raises :class:`SyncError`.
        Returns the seconds it took."""
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        step = self.step if step is None else step
        t0 = time.perf_counter()
        for attempt in (1, 2):
            try:
                self.sync_stats = self._sync_once(step)
                break
            except (RayTaskError, RayActorError, GetTimeoutError) as e:
                self.sync_members = None  # the group is dead: rebuild on the next try
                self.counts["sync_failures"] += 1
                reason = str(e).strip().splitlines()[-1][:400] if str(e).strip() else type(e).__name__
                if attempt == 2:
                    raise SyncError(
                        f"weight sync of version {self.version} failed twice (sync.timeout_s="
                        f"{self.cfg.sync.timeout_s:g}): {reason}; check the generator logs (ray logs) and that "
                        "every generator node can reach learner rank 0's node"
                    ) from None
                print(f"[pipeline] weight sync failed ({reason}); rebuilding the group", flush=True)
                self._drop_unreachable_generators()
        self.published = (self.version, step)
        self.queue.redis.set(self._version_key, self.version)  # a resume numbers past it
        return time.perf_counter() - t0

    def checkpoint(self) -> float:
        """Checkpoint, THEN acknowledge what it covers, then trim acknowledged entries."""
        import ray

        from cluster.pipeline.recovery import config_snapshot

        t0 = time.perf_counter()
        extra = {
            "step": self.step,
            "dropped": self.dropped,
            "prompts": self.dispatcher.state(),
            "stream": {
                "run": self.run_name,
                "consumer": CONSUMER,
                "acked_at_checkpoint": len(self.unacked),
                "depth": self.queue.depth(),
            },
            "config": config_snapshot(self.cfg),
            "version_lineage": self.lineage.to_json(),  # staleness across resumes
            # acknowledged only after the publish: a resume finishes a window whose ack was lost
            "window": {"entries": list(self.unacked), "rows": list(self.window_rows)},
        }
        ray.get(
            [
                h.save.remote(str(self.ckpt_dir), extra, self.step, self.cfg.checkpoint.keep_last)
                for h in self.topo.learners
            ],
            timeout=STEP_TIMEOUT_S,
        )
        self.queue.ack(self.unacked)
        self.unacked, self.window_rows = [], []
        self.queue.trim_acked()
        return time.perf_counter() - t0

    def evaluate(self) -> dict[str, float]:
        """Held-out evaluation on the first live generator's engine (its newest weights: the last
        publish, i.e. the learner's when ``sync.every_steps`` divides ``eval.every_steps``)."""
        import ray
        from ray.exceptions import RayActorError

        t0 = time.perf_counter()
        out: dict[str, float] = {}
        for g, slot in enumerate(self.gens):
            if slot.ready_ref is not None:  # restarting
                continue
            try:  # a generator whose loop finished (data used up) still has its engine
                out = ray.get(slot.handle.evaluate.remote(self.step), timeout=STEP_TIMEOUT_S)
                break
            except RayActorError:
                print(f"[eval] generator {g} is gone; trying the next one", flush=True)
        if out:
            out["timing/eval_s"] = time.perf_counter() - t0
            print(
                f"[eval] step {self.step}: "
                + "  ".join(f"{k}={v:.3f}" for k, v in out.items() if k.startswith("eval/") and "@" in k),
                flush=True,
            )
        return out

    # ------------------------------------------------------------------ metrics
    def generator_stats(self) -> dict[str, float]:
        """The live generators' counters, each combined by the reduction it carries."""
        import ray

        from common.metrics import Reducer

        red = Reducer()
        live = [s for s in self.gens if s.ready_ref is None and not s.done]
        refs = [s.handle.stats.remote() for s in live]
        for ref in refs:
            try:
                stats = ray.get(ref, timeout=STATS_TIMEOUT_S)
            except Exception:  # a generator dying right now: its numbers are missing this step
                continue
            red.update(stats)
        return red.result()

    def log(self, m: dict[str, float], trees: list) -> None:
        wall = time.perf_counter() - self.t_start
        m.update(self.generator_stats())
        m["learner/idle_frac"] = self.wait_s / wall if wall > 0 else 0.0
        m["learner/version"] = float(self.version)
        m["queue/depth"] = float(self.queue.depth())
        m["queue/undelivered"] = float(self.queue.undelivered())
        m["queue/dead_count"] = float(self.queue.dead_count())
        m["pipeline/dropped_total"] = float(self.dropped)
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
            self.metrics_log.log_rollouts(self.step, self._rollout_records(trees))

    def tree_pictures(self, trees: list) -> None:
        """An eval step's page of ``log.tree_pictures`` trained trees in ``<run_dir>/trees/``."""
        from common.models import load_tokenizer
        from common.tree_render import write_step_pictures
        from learner.advantages import tree_advantages

        cfg = self.cfg
        if cfg.log.tree_pictures <= 0:
            return
        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        tok = self._tokenizer
        advantages = tree_advantages(trees, cfg.algo)  # as trained: the same batch, the same whitening
        decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        write_step_pictures(self.run_dir, self.step, trees, advantages, decode, cfg.log.tree_pictures)

    def _rollout_records(self, trees: list) -> list[dict]:
        """``rollouts.jsonl`` records of a step's trees, with the advantages they were trained with."""
        from common.models import load_tokenizer
        from common.rollouts import step_records
        from learner.advantages import tree_advantages

        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = load_tokenizer(
                self.cfg.model.path, trust_remote_code=self.cfg.model.trust_remote_code
            )
        tok = self._tokenizer
        return step_records(
            trees,
            tree_advantages(trees, self.cfg.algo),
            lambda ids: tok.decode(ids, skip_special_tokens=True),
        )

    def close(self) -> None:
        from cluster.pipeline import topology

        try:
            topology.shutdown(self.topo)
        finally:
            if self.metrics_log is not None:
                self.metrics_log.close()
            self.queue.close()
