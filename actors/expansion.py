"""How the sampler's tree depths reach the engine (``sampling.expansion``).

A *wave* is one depth of one tree: a request per pending segment. The sampler's rules decide what a
wave's children are once the whole wave is done (the child budget counts the siblings that finished,
fallback needs every path of the tree ended, probability-driven allocation compares the siblings),
so a wave is the unit both expansions submit and complete (:meth:`actors.sampler.TreeSampler.complete_wave`).

- ``level`` (:class:`LevelExpansion`): every tree's wave in ONE batched ``generate`` call per step; a
  tree of depth d waits for d calls, and the engine's batch drains at the end of every call.
- ``barrier_free`` (:class:`BarrierFreeExpansion`): over the backend's request stream
  (:class:`actors.backends.base.RequestStream`: one engine step at a time), a tree's next wave is
  submitted as soon as its own wave is done and a new tree's first wave as soon as it is admitted,
  while the other trees' requests keep running, so the engine's batch stays full across trees and
  depths. The barrier is per tree and depth instead of global. A backend without a step loop of its
  own streams through :class:`actors.backends.base.BatchStream` (every queued request in one call),
  which is level-synchronous again.

Both grow the same trees: a tree's choices come from its own random generator in the same order, node
ids are fixed when a segment is queued, and with ``sampling.per_request_seed`` every request samples
from its own seed, whatever else shares the engine's batch. (Without per-request seeds the engine's
one random stream is consumed in a different order, so the trees differ between the two, as they do
between two batch compositions of one expansion.)

Tools: a wave whose segments end in tool calls completes in two halves
(:meth:`actors.sampler.TreeSampler.begin_wave`, then ``finish_wave`` once the calls are done). The
level expansion starts every tree's calls before waiting for any; the barrier-free one parks the tree
while its calls run and keeps stepping the engine for the others, so a slow tool stalls only its
own tree.

Weights: a request records the policy version it was submitted under; the version must not change
while it is in the engine (``TreeSampler.drain`` first, as the generator does before an update).
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

from actors.backends.base import GenRequest, GenResult, request_stream
from common.errors import ConfigError

EXPANSIONS = ("barrier_free", "level")
_REQUEST_IDS = itertools.count()


def make_expansion(kind: str, sampler: Any) -> LevelExpansion | BarrierFreeExpansion:
    """The expansion ``kind`` (``barrier_free`` | ``level``) driving ``sampler``'s backend."""
    if kind == "level":
        return LevelExpansion(sampler)
    if kind == "barrier_free":
        return BarrierFreeExpansion(sampler)
    raise ConfigError(f"sampling.expansion={kind!r} is not one of {', '.join(EXPANSIONS)}: set one of them")


class LevelExpansion:
    """One batched backend call per step over one wave of every tree in flight."""

    in_engine = 0  # nothing is in the engine between steps

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def step(self) -> list[Any]:
        s = self.sampler
        waves = [(tree_id, s.wave_requests(tree_id)) for tree_id in s.tree_ids()]
        requests = [r for _, reqs in waves for r in reqs]
        if not requests:
            return []
        version = int(s.backend.policy_version)
        t0 = time.perf_counter()
        results = s.backend.generate(requests)
        wall = time.perf_counter() - t0
        if len(results) != len(requests):
            raise RuntimeError(f"backend returned {len(results)} results for {len(requests)} requests")
        s.stats.record_step(results, wall)
        i = 0
        for tree_id, reqs in waves:  # every tree's tool calls start before any is waited for
            s.begin_wave(tree_id, reqs, results[i : i + len(reqs)], version)
            i += len(reqs)
        finished = [s.finish_wave(tree_id) for tree_id, _ in waves]
        return [tree for tree in finished if tree is not None]

    def drain(self) -> list[Any]:
        return []


@dataclass
class _Wave:
    tree_id: str
    requests: list[GenRequest]
    version: int  # the policy version the wave was submitted under
    results: list[GenResult | None] = field(default_factory=list)
    left: int = 0


class BarrierFreeExpansion:
    """Waves submitted one by one to the backend's request stream as soon as they can be."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.stream = request_stream(sampler.backend)
        self._waves: dict[str, _Wave] = {}  # tree id -> its wave in the engine
        self._owner: dict[str, tuple[str, int]] = {}  # request id -> (tree id, index in the wave)
        self._parked: dict[str, list[Future]] = {}  # tree id -> its wave's tool calls, running

    @property
    def in_engine(self) -> int:
        return len(self._owner)

    def step(self, submit: bool = True) -> list[Any]:
        """Engine steps until some wave is done (its tree branches and, with ``submit``, its next wave
        is in the engine before this returns) or nothing is left in the engine; returns the trees that
        finished. ``submit`` also queues the first wave of every tree admitted since the last step."""
        s = self.sampler
        if submit:
            for tree_id in s.tree_ids():
                if tree_id not in self._waves and tree_id not in self._parked:
                    self._submit(tree_id)
        finished: list[Any] = []
        results: list[GenResult] = []
        t0 = time.perf_counter()
        while self._owner or self._parked:
            done = self._engine_step(results) if self._owner else []
            ready = [t for t in (self._complete(wave) for wave in done) if t is not None]  # else parked
            # wait for a tool only when nothing else can move
            ready += self._parked_done(block=not self._owner and not ready)
            for tree_id in ready:
                tree = s.finish_wave(tree_id)
                if tree is not None:
                    finished.append(tree)
                elif submit:
                    self._submit(tree_id)
            if ready:
                break
        if results:
            s.stats.record_step(results, time.perf_counter() - t0)
        return finished

    def drain(self) -> list[Any]:
        """Engine steps until nothing of this sampler is in the engine; no new wave starts (the trees
        that branched meanwhile submit theirs at the next :meth:`step`). A tree whose tool calls run
        stays parked: it has nothing in the engine."""
        finished: list[Any] = []
        while self._owner:
            finished += self.step(submit=False)
        return finished

    def _parked_done(self, block: bool) -> list[str]:
        """The parked trees whose tool calls are all done; ``block``: wait until one is."""
        if block and self._parked:
            wait([f for fs in self._parked.values() for f in fs], return_when=FIRST_COMPLETED)
        ready = [tree_id for tree_id, fs in self._parked.items() if all(f.done() for f in fs)]
        for tree_id in ready:
            del self._parked[tree_id]
        return ready

    def _submit(self, tree_id: str) -> None:
        s = self.sampler
        requests = s.wave_requests(tree_id)
        wave = _Wave(tree_id, requests, int(s.backend.policy_version), [None] * len(requests), len(requests))
        self._waves[tree_id] = wave
        for i, req in enumerate(requests):
            request_id = f"treepo-seg-{next(_REQUEST_IDS)}"  # unique among every sampler of the process
            self._owner[request_id] = (tree_id, i)
            self.stream.add_request(request_id, req)

    def _engine_step(self, results: list[GenResult]) -> list[_Wave]:
        """One step of the stream; the waves it completed (in the order their last request finished)."""
        if not self.stream.unfinished_requests:
            raise RuntimeError(
                f"{len(self._owner)} segment requests are not in the backend's stream: it lost them"
            )
        done = []
        for request_id, res in self.stream.step_requests():
            owner = self._owner.pop(request_id, None)
            if owner is None:
                raise RuntimeError(f"the backend's stream returned an unknown request {request_id!r}")
            wave = self._waves[owner[0]]
            wave.results[owner[1]] = res
            wave.left -= 1
            results.append(res)
            if wave.left == 0:
                done.append(wave)
        return done

    def _complete(self, wave: _Wave) -> str | None:
        """Add a finished wave's segments; its tree id when it can branch now, None when it is parked
        on its tool calls."""
        del self._waves[wave.tree_id]
        version = int(self.sampler.backend.policy_version)
        if version != wave.version:
            raise RuntimeError(
                f"tree {wave.tree_id}: the policy version changed from {wave.version} to {version} while "
                "its segments were in the engine: call TreeSampler.drain() before updating the weights"
            )
        calls = self.sampler.begin_wave(wave.tree_id, wave.requests, wave.results, wave.version)
        if calls and not all(f.done() for f in calls):
            self._parked[wave.tree_id] = calls
            return None
        return wave.tree_id
