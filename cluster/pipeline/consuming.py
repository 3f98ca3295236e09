"""The controller's side of the replay queue: which delivered trees a step trains on, and which
entries are still to be acknowledged.

:meth:`TreeConsumer.collect` consumes queue entries (``XREADGROUP``; on resume the unacknowledged
ones first), drops duplicates (by tree id), trees with a leaf past ``algo.max_staleness`` and, with
dynamic sampling, trees whose leaves all agree (:class:`learner.selection.Selection`); it waits until
``learner.prompts_per_step`` trees are kept, unblocked by generators pushing. While it waits it calls
``on_idle`` (the controller's: the generators are watched, :mod:`cluster.pipeline.supervision`).

No prompt is lost to staleness: a tree dropped as stale has its prompt re-issued to a generator
(:meth:`common.prompts.PromptDispatcher.reissue`, counted in ``pipeline/reissued_stale``); its new
tree has the same tree id and is no duplicate (only trained and kept trees are). The re-issue is
recorded per queue entry, so the stale entry re-delivered after a crash before the next checkpoint
re-issues nothing twice, and the record goes when the checkpoint's acknowledgement does. On resume
(:meth:`TreeConsumer.reclaim`) the re-delivered trees already too stale for the resumed learner are
dropped at once, their prompts re-issued. A re-issued prompt takes its own place in the admission
budget again (it leaves the handed-out count while it waits); a dynamic-sampling drop, whose prompt
is used up, raises the Redis counter ``D`` the generators' admission rule adds (:mod:`common.schedule`),
so the dropped tree is replaced instead of stalling the step.

Every tree is checked against the run (:func:`common.tree.check_for_run` with :func:`run_limits`:
vocabulary, length caps, leaf count, finite rewards within what ``reward.*`` can give, no version from
the future, a known prompt) and run through what training does to it (advantages, encoding); one
that fails is quarantined in the dead-letter stream with the reason, and the run goes on: its prompt
counts as used up, so admission replaces it as it does a drop; ``QUARANTINE_STREAK`` (or two steps'
worth) in a row stop the run with the first one's reason, since nothing can be trained. Every
quarantined entry (refused by the queue's decoder, the run's check or training's preparation) is
counted in ``pipeline/quarantined`` and said on the console with its reason (the first
``QUARANTINE_LINES`` of a step, then one line saying that more are only counted). Entries delivered
by a read whose reply was lost (the client retried it) are found in the pending list and taken in.

Consumed entries stay pending until the checkpoint that covers them is published
(:meth:`TreeConsumer.ack_consumed`, called after the save). With several ranks, trees short of a
mini-batch at the end of the data are held: pending, never acknowledged untrained.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
from transformers import AutoConfig

from common.config import TrainConfig
from common.data import load_prompt_set
from common.errors import QueueError, WireError
from common.keys import RunKeys
from common.models import load_tokenizer
from common.prompts import PromptDispatcher
from common.replay import ReplayQueue
from common.rewards.failures import StepFailures
from common.rewards.resolve import reward_range
from common.tree import RunLimits, Tree, check_for_run, encode_tree
from learner import advantages  # looked up per call: tests swap advantages.tree_advantages
from learner.selection import KEPT, STALE, Selection, VersionLineage, is_stale

CONSUMER = "controller"  # the consumer name in the queue's group (the pending list is per consumer)
STALL_TIMEOUT_S = 1800.0  # no tree at all for this long while generators live: something is wrong
ORPHAN_CHECK_S = 10.0  # how often an idle collect compares the pending list with what it consumed
QUARANTINE_LINES = 20  # console lines of quarantined entries per step; the rest are only counted
QUARANTINE_STREAK = 16  # quarantined trees in a row (at least 2 steps' worth) that stop the run


def encoded_prompt_ids(cfg: TrainConfig) -> list[str]:
    """The ids of the prompts the generators will use, in their order (the same loader: too-long
    prompts are skipped there, so they must be skipped here too; a mixture is built the same way)."""
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    return [p.row.id for p in load_prompt_set(cfg.data.train, "train", tokenizer, cfg.data)[0]]


def run_limits(cfg: TrainConfig, prompt_ids: list[str]) -> RunLimits:
    """What every tree of this run must satisfy (:class:`common.tree.RunLimits`)."""
    mcfg = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    vocab = getattr(mcfg, "vocab_size", None) or mcfg.get_text_config().vocab_size
    return RunLimits(
        vocab_size=int(vocab),
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_response_tokens=cfg.tree.max_response_tokens,
        leaves=cfg.tree.w,
        epochs=cfg.data.epochs,
        rewards=reward_range(cfg.reward),
        prompt_ids=frozenset(prompt_ids),
    )


class Policy(Protocol):
    """The learner's current policy version, its lineage and the steps trained (the controller has them)."""

    version: int
    lineage: VersionLineage
    step: int


class TreeConsumer:
    """Reads, checks, deduplicates and selects the trees of each step; tracks what is unacknowledged.

    ``policy`` holds the learner's current ``version`` and ``lineage``: the controller. ``counts`` is the controller's
    counter dict (``duplicates``, ``dropped_stale``, ``dropped_uniform``, ``quarantined``, ``orphans``)."""

    def __init__(
        self,
        cfg: TrainConfig,
        queue: ReplayQueue,
        run_name: str,
        dispatcher: PromptDispatcher,
        limits: RunLimits,
        policy: Policy,
        counts: dict[str, int],
        on_idle: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg, self.queue, self.dispatcher, self.limits = cfg, queue, dispatcher, limits
        self.policy, self.counts, self.on_idle = policy, counts, on_idle
        self.world = cfg.learner.num_workers
        self.dropped = (
            0  # trees dropped whose prompt is used up (dynamic sampling, quarantine): admission's D
        )
        self.trained_ids: set[str] = set()
        self.unacked: list[str] = []  # entries consumed since the last checkpoint
        self.backlog: list[tuple[str, Tree]] = []  # reclaimed on resume: consumed first
        self.held: list[str] = []  # trees short of a mini-batch: pending, neither trained nor acked
        self._orphans_at = 0.0  # when the pending list is compared with what was consumed next
        self._dropped_key = RunKeys(run_name).dropped
        queue.check = self._check_tree
        queue.on_dead_letter = self._quarantined  # every dead letter, whoever refused the entry
        self._lines_left = QUARANTINE_LINES  # console lines left for quarantined entries this step
        self._streak, self._first_reason = 0, ""  # quarantined trees in a row, and why the first was
        self.failures = StepFailures.for_run(cfg)  # failed reward calls of the trees of this step

    def _check_tree(self, tree: Tree) -> None:
        """The queue's run-level check of a decoded tree (WireError quarantines it)."""
        check_for_run(tree, dataclasses.replace(self.limits, max_version=lambda: self.policy.version))

    def set_dropped(self) -> None:
        """The drop count into Redis, where the generators' admission rule reads it."""
        self.queue.redis.set(self._dropped_key, self.dropped)

    def reclaim(self) -> tuple[int, int, int]:
        """On resume: the entries delivered before the stop and never acknowledged are consumed first;
        those already past ``algo.max_staleness`` for the resumed learner (not trained before: those
        are duplicates) are dropped now, their prompts re-issued. Returns (re-delivered, kept, re-issued)."""
        backlog = self.queue.reclaim(CONSUMER, min_idle_ms=0)
        self.dispatcher.prune_reissued({i for i, _ in backlog})
        version, limit, lineage = self.policy.version, self.cfg.algo.max_staleness, self.policy.lineage
        self.backlog = []
        for entry_id, tree in backlog:
            if tree.tree_id not in self.trained_ids and is_stale(tree, version, limit, lineage):
                self._reissue(entry_id, tree)
                self.unacked.append(entry_id)
                self.counts["dropped_stale"] += 1
            else:
                self.backlog.append((entry_id, tree))
        return len(backlog), len(self.backlog), len(backlog) - len(self.backlog)

    def _reissue(self, entry_id: str, tree: Tree) -> None:
        """The prompt of a tree dropped for staleness back to the generators (once per entry)."""
        epoch = int(tree.tree_id.rpartition("@e")[2])  # '<prompt id>@e<epoch>': checked on read
        self.dispatcher.reissue(entry_id, epoch, tree.prompt_id)

    def ack_consumed(self) -> None:
        """Acknowledge every entry consumed so far (a checkpoint covering them is published), forget
        their re-issue records (they are never delivered again), then trim."""
        self.queue.ack(self.unacked)
        self.dispatcher.forget_reissued(self.unacked)
        self.unacked = []
        self.queue.trim_acked()

    def finish(self) -> None:
        """The end of the run, after its last checkpoint: entries consumed since without training
        (duplicates, drops: their twins and drops are covered) are acknowledged; held ones stay."""
        if self.unacked:
            self.ack_consumed()
        if self.held:
            print(
                f"[pipeline] {len(self.held)} tree(s) short of a mini-batch "
                f"(learner.mini_batch_prompts={self.cfg.learner.mini_batch_prompts} x "
                f"{self.world} ranks) stay pending, untrained: a resume with more data or steps trains them",
                flush=True,
            )

    def collect(self, need: int) -> tuple[list[Tree], dict[str, float]] | None:
        """``need`` kept trees from the queue (fewer only when the data is used up; None if none)."""
        self._lines_left = QUARANTINE_LINES
        cfg = self.cfg
        sel = Selection(
            self.policy.version,
            cfg.algo.max_staleness,
            cfg.algo.dynamic_sampling,
            lineage=self.policy.lineage,
        )
        last_tree = time.perf_counter()
        entry_of: dict[str, str] = {}  # tree id -> entry id of the kept trees
        while len(sel.kept) < need:
            before = self.dropped  # quarantines while reading count too
            entries = self._next_entries(need - len(sel.kept))
            for entry_id, tree in entries:
                taken = self._take(entry_id, tree, sel, entry_of)
                if taken == "dropped":
                    self.dropped += 1
                if taken not in ("quarantined", "duplicate"):
                    self.failures.add_tree(tree)
                    self._streak = 0
            if self.dropped != before:
                self.set_dropped()
            self._check_streak()
            self.failures.check()  # a reward failing past reward.max_error_share stops the run
            if entries:
                last_tree = time.perf_counter()
                continue
            self.on_idle()
            if self._recover_orphans():
                continue
            if self._data_finished() and not self._recover_orphans(force=True):
                break
            if time.perf_counter() - last_tree > STALL_TIMEOUT_S:
                raise QueueError(
                    f"no tree arrived for {STALL_TIMEOUT_S:.0f} s while generators are alive: check the "
                    "generator logs (ray logs) and queue state (`treepo queue inspect`)"
                )
        failed = self._close_step()
        kept = sel.kept
        self.counts["dropped_stale"] += sel.dropped_stale
        self.counts["dropped_uniform"] += sel.dropped_uniform
        if len(kept) < need and self.world > 1:  # every rank needs the same share: the rest stays pending
            keep = len(kept) - len(kept) % cfg.learner.mini_batch_prompts
            short = {entry_of[t.tree_id] for t in kept[keep:]}
            self.unacked = [i for i in self.unacked if i not in short]
            self.held += sorted(short)
            kept = kept[:keep]
        if not kept:
            return None
        reissued = float(self.dispatcher.reissued_total())
        return kept, {
            **sel.metrics(),
            **failed,
            "staleness/trees_dropped": sel.dropped_stale,
            "pipeline/reissued_stale": reissued,
        }

    def _close_step(self) -> dict[str, float]:
        """The step's one line about failed reward calls, if any; the bound over all of its calls
        (RewardError past it); its reward/failed_* metrics."""
        if self.failures.failed:
            print(self.failures.summary(self.policy.step + 1), flush=True)
        return self.failures.close_step()

    def _take(self, entry_id: str, tree: Tree, sel: Selection, entry_of: dict[str, str]) -> str:
        """One delivered tree: ``quarantined`` when checking or preparing it raises (it goes to the
        dead-letter stream with the reason), else ``duplicate``, ``stale`` (its prompt re-issued),
        ``dropped`` (dynamic sampling) or ``kept``."""
        try:
            self._prepare(tree)
            duplicate = tree.tree_id in self.trained_ids or tree.tree_id in entry_of
            verdict = None if duplicate else sel.offer(tree)
        except Exception as e:  # one bad tree must not stop (nor, re-delivered, crash-loop) the run
            self.queue.quarantine(entry_id, f"{type(e).__name__}: {e}", CONSUMER)  # -> _quarantined
            return "quarantined"
        self.unacked.append(entry_id)
        if duplicate:
            sel.skip_duplicate()
            self.counts["duplicates"] += 1  # at-least-once delivery: a retried XADD
            return "duplicate"
        if verdict == STALE:
            self._reissue(entry_id, tree)
            return "stale"
        if verdict != KEPT:
            return "dropped"
        entry_of[tree.tree_id] = entry_id
        return "kept"

    def _quarantined(self, entry_id: str, reason: str) -> None:
        """An entry moved to the dead-letter stream (the queue's hook): counted, and said on the console
        (the first QUARANTINE_LINES of a step, then once that more are only counted)."""
        self.counts["quarantined"] += 1
        # its prompt is used up: admission replaces it as it does a drop (else every quarantined tree
        # holds an admission place for good, and a run whose trees are all refused waits forever)
        self.dropped += 1
        self._streak += 1
        self._first_reason = self._first_reason if self._streak > 1 else reason
        self._lines_left -= 1
        if self._lines_left >= 0:
            print(f"[pipeline] entry {entry_id} quarantined in the dead-letter stream: {reason}", flush=True)
        elif self._lines_left == -1:
            print(
                "[pipeline] more entries quarantined this step: counted in pipeline/quarantined, not "
                "printed (reasons: `treepo queue inspect`)",
                flush=True,
            )

    def _check_streak(self) -> None:
        """A run whose trees are all quarantined trains nothing: stop it, naming the first reason."""
        limit = max(QUARANTINE_STREAK, 2 * self.cfg.learner.prompts_per_step)
        if self._streak >= limit:
            raise QueueError(
                f"the last {self._streak} trees were all quarantined, the first for: {self._first_reason}. "
                "Nothing can be trained: fix what the reason names (a reward outside reward.max_abs, "
                "a model or tokenizer that does not match the run...); `treepo queue inspect` lists "
                "the dead letters; the entries stay there"
            )

    def _prepare(self, tree: Tree) -> None:
        """What training does to one tree alone: its advantages (finite) and its wire encoding."""
        adv = advantages.tree_advantages([tree], self.cfg.algo)
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

    def _next_entries(self, n: int) -> list[tuple[str, Tree]]:
        """Up to ``n`` queue entries: the ones re-delivered on resume first, then new ones."""
        if self.backlog:
            entries, self.backlog = self.backlog[:n], self.backlog[n:]
            return entries
        return self.queue.read(n, block_ms=min(self.cfg.queue.block_ms, 500), consumer=CONSUMER)

    def _data_finished(self) -> bool:
        """No prompt left anywhere: none to claim, none in flight, nothing undelivered in the stream."""
        return not self.backlog and self.dispatcher.finished() and self.queue.undelivered() == 0
