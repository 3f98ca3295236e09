"""The generator: one engine growing segment trees for prompts claimed from Redis, pushing finished,
scored trees into the replay queue. A plain class; ``cluster/pipeline/topology.py`` makes it a Ray actor.

The loop (:meth:`Generator.step_once`, repeated by :meth:`Generator.run`):

1. Apply a pending weight update, if one arrived (segment boundaries are the only place the engine's
   weights change, so every segment is sampled under one known policy version).
2. Admission control: claim new prompts while the budget of
   :func:`common.schedule.admission_budget` is positive and
   fewer than ``generators.trees_in_flight`` trees grow here.
3. One sampler step (``sampling.expansion``: one batched engine call over every live path of every
   tree in flight, or engine steps until some tree's depth is done with the other trees' segments
   still running). Before an update is applied, the segments still in the engine finish under the
   weights they started with (:meth:`actors.sampler.TreeSampler.drain`), so every segment records the
   one version that sampled it, and the prefix cache is reset with no request in the engine.
4. Score finished trees (the reward objects live in this process) and push each with
   :meth:`common.prompts.PromptDispatcher.push_and_done`: the push and the end of the prompt's flight
   are one atomic script, and a prompt re-issued to another generator is refused (no duplicate).

Admission control follows the off-policy schedule of :mod:`common.schedule` (the budget, the
staleness bound in steps and the sync bound are defined there); the generator counts ``accepted +
running`` over all generators from Redis and reads the controller's drop count ``D``.

A generator restarted under the same id first re-issues the prompts it had in flight when it died.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from actors.engine_inputs import prompt_metadata
from common import schedule
from common.config import TrainConfig
from common.metrics import Metric

log = logging.getLogger("treepo.generator")


def tree_id_for(prompt_id: str, epoch: int) -> str:
    """One tree per prompt and epoch: ``<prompt id>@e<epoch>``."""
    return f"{prompt_id}@e{int(epoch)}"


def _faults() -> set[str]:
    """Failure injection for tests (``TREEPO_FAULTS=sync_stall,...``); empty in normal runs."""
    return {f for f in os.environ.get("TREEPO_FAULTS", "").split(",") if f}


def _take_fault(generator_id: int) -> str | None:
    """Failure injection for tests, one shot: the file ``<TREEPO_FAULT_DIR>/<kind>-<generator id>``
    (kind ``loop_error`` or ``hang``) is removed and its kind returned; None in normal runs."""
    root = os.environ.get("TREEPO_FAULT_DIR")
    if not root:
        return None
    for kind in ("loop_error", "hang"):
        path = os.path.join(root, f"{kind}-{generator_id}")
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        return kind
    return None


class _StagedInEngine:
    """Marks a pending update whose tensors are staged inside the engine's workers (per-worker receivers)."""

    def __repr__(self) -> str:
        return "<staged in the engine workers>"


STAGED_IN_ENGINE = _StagedInEngine()


class Generator:
    """One engine, a :class:`actors.sampler.TreeSampler`, a reward, a queue producer and a prompt client.

    Thread-safe for one :meth:`run` thread plus calls of :meth:`offer_weights`, :meth:`stats` and
    :meth:`stop` from other threads (the Ray actor is threaded for this).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        generator_id: int,
        queue_url: str,
        queue_password: Any,
        run_name: str,
        *,
        backend: Any = None,
    ) -> None:
        from actors.engine_inputs import EngineInputs
        from common.prompts import PromptDispatcher
        from common.replay import ReplayQueue, resolve_password
        from common.sampling_metrics import SamplingStats

        self.cfg = cfg
        self.id = int(generator_id)
        self.run_name = run_name
        # cfg.model.path is resolved by the driver; rewards hold verifier subprocess pipes, so they are
        # built here, in this process
        self.inputs = EngineInputs.load(cfg, model_path=cfg.model.path)
        train = self.inputs.training_set()
        self._prompts = {p.row.id: p for p in train.prompts}
        self.reward = train.reward
        self._held_out = self.inputs.held_out_set()
        # by reference in a Ray actor (a common.replay.SecretFile: actor arguments live in the GCS),
        # by value in-process
        self.queue = ReplayQueue.from_config(cfg.queue, queue_url, run_name, resolve_password(queue_password))
        self.dispatcher = PromptDispatcher(
            self.queue.redis, run_name, list(self._prompts), cfg.data.shuffle_seed, cfg.data.epochs
        )
        self._dropped_key = self.dispatcher.run_keys.dropped
        self.requeued_on_start = self.dispatcher.requeue_generator(self.id)
        if backend is None:
            backend = self.inputs.open_backend(train, self._held_out, seed=cfg.seed + 1000 * self.id)
        self.backend = backend
        self.sampling_stats = SamplingStats()
        self.sampler = self.inputs.sampler(backend, generator_id=self.id, stats=self.sampling_stats)
        self._init_state()
        self._init_sync(cfg, backend)

    def _init_state(self) -> None:
        """Loop, weight-offer and counter state."""
        self._epochs: dict[str, tuple[int, str]] = {}  # tree id -> (epoch, prompt id)
        self._lock = threading.Lock()
        self._pending: tuple[Mapping[str, Any] | _StagedInEngine, int, int] | None = None
        self.weights_step = 0  # controller step at which the weights held were published
        self._staleness_steps = schedule.staleness_in_steps(self.cfg)
        self._stop = threading.Event()
        # the engine is used by one thread at a time: the run loop, or an evaluation between two steps
        self._engine_lock = threading.Lock()
        self._eval_waiting = threading.Event()
        self._drained: list[Any] = []  # trees finished by a drain before an update, pushed next step
        self._exhausted = False
        self._beat = time.monotonic()  # the loop's last sign of life (heartbeat)
        self.counters = {
            "pushed": 0,
            "refused": 0,
            "steps": 0,
            "updates": 0,
            "busy_s": 0.0,
            "idle_s": 0.0,
            "sync_s": 0.0,
            "receive_s": 0.0,
        }
        # `treepo bench pipeline`'s synthetic workload: a known cost per sampler step
        self._bench_delay_s = float(os.environ.get("TREEPO_BENCH_GEN_DELAY_S", "0") or 0)
        self._t_start = time.perf_counter()

    def _init_sync(self, cfg: TrainConfig, backend: Any) -> None:
        """Weight-sync receiving: the engine's worker processes are the receiver ranks (the update is
        staged in them and applied at a segment boundary), or this process is the one rank
        (``sync.receiver``)."""
        from actors.backends.worker_sync import receives_per_worker

        self._receiver = None  # common.weight_sync.WeightReceiver, once the controller sent group info
        self._per_worker = receives_per_worker(
            cfg.sync.receiver,
            engine_in_workers=not getattr(backend, "in_process", True),
            supports_workers=callable(getattr(backend, "sync_receive_start", None)),
        )
        self._worker_joined = False
        # held while a staged update is applied, and while a refused one is dropped from the workers
        self._staged_lock = threading.Lock()

    # ------------------------------------------------------------------ control (any thread)
    def ready(self) -> int:
        """The policy version the engine samples under (also: the actor finished starting)."""
        return int(self.backend.policy_version)

    def offer_weights(
        self, weights: Mapping[str, Any] | _StagedInEngine | None, version: int, step: int
    ) -> bool:
        """Queue weights of ``version``, published at controller step ``step`` (name -> array, or
        :data:`STAGED_IN_ENGINE` for an update the engine's workers received); applied before the next
        sampler step. A newer offer replaces an older one not applied yet; an older or equal step is
        ignored."""
        with self._lock:
            newest = self._pending[2] if self._pending else self.weights_step
            if weights is None or int(step) <= newest:
                return False
            self._pending = (weights, int(version), int(step))
            return True

    def sync_ranks(self) -> int:
        """Weight-sync receiver ranks this generator takes: one per engine worker when the workers
        receive (``sync.receiver``), else 1 (this process)."""
        return int(self.backend.receiver_ranks) if self._per_worker else 1

    def sync_join(self, info: Mapping[str, Any], rank: int) -> None:
        """Target the weight-sync group ``info`` as receiver ranks ``rank .. rank + sync_ranks() - 1``
        (connects on the next receive)."""
        from common.weight_sync import WeightReceiver

        if self._per_worker:
            self.backend.sync_join(dict(info), int(rank), self.cfg.sync.timeout_s)
            self._worker_joined = True
        elif self._receiver is None:
            self._receiver = WeightReceiver.from_info(dict(info), rank, timeout_s=self.cfg.sync.timeout_s)
        else:
            self._receiver.rejoin(dict(info), rank)

    def sync_receive(self, step: int) -> int:
        """Receive one broadcast update (called while learner rank 0 sends; runs beside the loop's
        thread) and queue it for the next segment boundary as the weights of controller step ``step``.
        Returns the version received. Raises :class:`common.errors.SyncError` on a failed or stuck sync."""
        from common.errors import SyncError

        if not (self._worker_joined if self._per_worker else self._receiver is not None):
            raise SyncError(
                f"generator {self.id} has no weight-sync group: the controller must call sync_join"
            )
        if "sync_stall" in _faults():  # failure injection: a receiver that never shows up
            time.sleep(self.cfg.sync.timeout_s * 3)
            return -1
        t0 = time.perf_counter()
        if self._per_worker:
            return self._receive_in_workers(step, t0)
        version, stream = self._receiver.receive()
        weights = dict(stream)  # views into fresh per-bucket buffers: safe to keep until applied
        self.offer_weights(weights, version, step)
        with self._lock:
            self.counters["receive_s"] += time.perf_counter() - t0
        return int(version)

    def _receive_in_workers(self, step: int, t0: float) -> int:
        """The engine's workers receive in their own threads (generation goes on meanwhile); the update
        stays staged there until the next segment boundary applies it."""
        self.backend.sync_receive_start()
        version = int(self.backend.sync_receive_wait())  # bounded by the workers' sync.timeout_s waits
        with self._staged_lock:
            if not self.offer_weights(STAGED_IN_ENGINE, version, step):
                with self._lock:
                    pending = self._pending
                # a re-sync of weights already applied: drop the copy unless the pending update is it
                if pending is None or pending[0] is not STAGED_IN_ENGINE or pending[1] != version:
                    self.backend.sync_discard(version)
        with self._lock:
            self.counters["receive_s"] += time.perf_counter() - t0
        return version

    def stop(self) -> None:
        self._stop.set()

    def pid(self) -> int:
        """This actor's process id (a restart answers with a new one)."""
        return os.getpid()

    def heartbeat(self) -> float:
        """Seconds since the loop last made progress (a sampler step or an idle round): the controller
        restarts a generator whose loop is silent for ``generators.hang_timeout_s``."""
        return time.monotonic() - self._beat

    def stats(self) -> dict[str, Metric]:
        """This generator's counters, each with how the controller combines it over generators:
        counts and seconds add up; the idle fraction, the version and the weights' step average; the
        engine's ``rollout/`` work (decoded and prefill tokens, prefix-cache hit rate) since it started."""
        with self._lock:
            out = {f"generator/{k}": Metric.sum(v) for k, v in self.counters.items()}
        wall = time.perf_counter() - self._t_start
        out["generator/wall_s"] = Metric.sum(wall)
        out["generator/idle_frac"] = Metric.mean(out["generator/idle_s"].value / wall if wall > 0 else 0.0)
        out["generator/version"] = Metric.mean(self.backend.policy_version)
        out["generator/weights_step"] = Metric.mean(self.weights_step)
        out["generator/in_flight"] = Metric.sum(self.sampler.in_flight)
        out.update(self.sampling_stats.engine_metrics())  # rollout/: this engine's work since it started
        return out

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out evaluation (flat sampling, ``eval.k`` answers per problem) on this engine, between
        two sampler steps, with the newest offered weights applied first. Keys as the local driver's."""
        from actors.evaluator import run_eval

        if self._held_out is None:
            return {}
        self._eval_waiting.set()  # the run loop yields the engine at its next step boundary
        with self._engine_lock:
            self._eval_waiting.clear()
            self._drain_for_update(force=True)
            self._apply_pending()
            res = run_eval(self.backend, self.inputs, self._held_out.prompts, self._held_out.reward)
        out = res.train_metrics()
        out["eval/version"] = float(self.backend.policy_version)
        return out

    # ------------------------------------------------------------------ the loop (one thread)
    def _drain_for_update(self, force: bool = False) -> None:
        """With barrier-free expansion segments stay in the engine between sampler steps: before the
        weights change (or another user takes the engine, ``force``) they finish under the weights they
        started with. The trees that finish meanwhile are pushed by the next step."""
        with self._lock:
            due = force or self._pending is not None
        if due and self.sampler.requests_in_engine:
            t0 = time.perf_counter()
            self._drained.extend(self.sampler.drain())
            with self._lock:
                self.counters["busy_s"] += time.perf_counter() - t0

    def _apply_pending(self) -> None:
        with self._staged_lock:
            with self._lock:
                pending, self._pending = self._pending, None
            if pending is None:
                return
            weights, version, step = pending
            t0 = time.perf_counter()
            if weights is STAGED_IN_ENGINE:
                self.backend.apply_staged(version)  # resets the prefix cache per the config
            else:
                import torch

                def tensor(arr: Any) -> Any:  # numpy arrays (e.g. from Ray) are read-only: copy them
                    return (
                        arr if isinstance(arr, torch.Tensor) else torch.from_numpy(np.array(arr, copy=True))
                    )

                named = ((name, tensor(arr)) for name, arr in weights.items())
                self.backend.update_weights(named, version)  # resets the prefix cache per the config
        with self._lock:
            self.weights_step = step
            self.counters["updates"] += 1
            self.counters["sync_s"] += time.perf_counter() - t0

    def _outstanding(self) -> tuple[int, int]:
        """(prompts handed out and not waiting for re-issue, over all generators; trees dropped)."""
        d = self.dispatcher
        pipe = d.redis.pipeline(transaction=False)
        pipe.get(d.keys["cursor"])
        pipe.llen(d.keys["retry"])
        pipe.get(self._dropped_key)
        cursor, retry, dropped = pipe.execute()
        return int(cursor or 0) - int(retry or 0), int(dropped or 0)

    def _admit(self) -> int:
        room = self.cfg.generators.trees_in_flight - self.sampler.in_flight
        if room <= 0:
            return 0
        outstanding, dropped = self._outstanding()
        running = self.sampler.in_flight
        budget = schedule.admission_budget(
            self._staleness_steps,
            self.weights_step,
            self.cfg.learner.prompts_per_step,
            accepted=outstanding - running,
            running=running,
            dropped=dropped,
        )
        want = min(room, budget)
        if want <= 0:
            return 0
        self._reconcile_claims()
        claimed = self.dispatcher.claim(self.id, want)
        # re-checked every time: a dead generator's prompts can come back to the retry list
        self._exhausted = not claimed and self.dispatcher.exhausted()
        for epoch, prompt_id in claimed:
            p = self._prompts[prompt_id]
            tree_id = tree_id_for(prompt_id, epoch)
            self._epochs[tree_id] = (epoch, prompt_id)
            self.sampler.submit(prompt_id, p.prompt_ids, prompt_metadata(p.row, epoch), tree_id=tree_id)
        return len(claimed)

    def _reconcile_claims(self) -> int:
        """Re-issue prompts recorded in flight for this generator in Redis that it does not grow: a
        claim whose reply was lost and retried by the client. Returns how many were re-issued."""
        known = {self.dispatcher.position_of(e, p) for e, p in self._epochs.values()}
        return self.dispatcher.requeue_positions(self.id, exclude=known)

    def _injected_fault(self) -> None:
        kind = _take_fault(self.id)
        if kind == "loop_error":
            raise RuntimeError(f"injected loop failure in generator {self.id}")
        if kind == "hang":
            while True:  # a hung engine call: only a restart of the actor ends it
                time.sleep(3600)

    def step_once(self) -> int:
        """Apply a pending update, admit, run one sampler step, score and push; returns trees pushed
        (0 also when there was nothing to do)."""
        from actors.scoring import score_trees

        self._injected_fault()
        with self._engine_lock:
            self._drain_for_update()
            self._apply_pending()
            self._admit()
            t0 = time.perf_counter()
            done, self._drained = self._drained, []
            if not self.sampler.in_flight and not done:
                return 0
            if self.sampler.in_flight:
                done += self.sampler.step()
            if self._bench_delay_s > 0:  # `treepo bench pipeline`'s synthetic workload: known cost per step
                time.sleep(self._bench_delay_s)
        score_trees(done, self.reward, self.inputs.decode, self.inputs.stop_set)
        pushed = refused = 0
        for tree in done:
            epoch, prompt_id = self._epochs.pop(tree.tree_id)
            if self.dispatcher.push_and_done(self.queue, tree, self.id, epoch, prompt_id) is None:
                refused += 1  # re-issued to another generator meanwhile: its tree is the one kept
            else:
                pushed += 1
        with self._lock:
            self.counters["steps"] += 1
            self.counters["pushed"] += pushed
            self.counters["refused"] += refused
            self.counters["busy_s"] += time.perf_counter() - t0
        return pushed

    def run(self, max_steps: int | None = None, idle_sleep_s: float = 0.05) -> dict[str, Metric]:
        """Loop :meth:`step_once` until :meth:`stop`, ``max_steps`` sampler steps, or the data is used
        up with nothing in flight. Returns :meth:`stats`."""
        steps = 0
        while not self._stop.is_set() and (max_steps is None or steps < max_steps):
            self._beat = time.monotonic()
            if self._eval_waiting.is_set():  # let an evaluation take the engine
                time.sleep(0.01)
                continue
            before = self.counters["steps"]
            self.step_once()
            if self.counters["steps"] > before:
                steps += 1
                continue
            if (
                self._exhausted
                and not self.sampler.in_flight
                and not self._drained
                and not self._reconcile_claims()
            ):
                break
            t0 = time.perf_counter()
            self._stop.wait(idle_sleep_s)  # at the admission bound: wait for a new version or drops
            with self._lock:
                self.counters["idle_s"] += time.perf_counter() - t0
        return self.stats()

    def close(self) -> None:
        self._stop.set()
        if self._receiver is not None:
            self._receiver.close()
        if self._worker_joined:
            import contextlib

            with contextlib.suppress(Exception):  # the engine goes down next anyway
                self.backend.sync_close()
        self.backend.close()
        self.queue.close()
