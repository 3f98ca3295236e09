"""Weight publishing: learner rank 0's weights to every live generator, over the weight-sync group.

:meth:`WeightPublisher.publish` (every ``sync.every_steps``, and at a resume) broadcasts learner rank
0's current weights over the weight-sync group (:mod:`common.weight_sync`: a process group of its
own, built from a TCP store on rank 0's node; gloo on CPU, NCCL on GPU; bucketed; a timeout on every
wait) to every generator that can receive (:meth:`GeneratorSupervisor.members
<cluster.pipeline.supervision.GeneratorSupervisor.members>`), with the new policy version and the
step count (the generators' admission clock). Each generator receives in a side thread and applies
the update at its next segment boundary. With ``algo.max_staleness=0`` the admission rule makes
generation wait for each publish: the synchronous schedule, through the same code.

The group is rebuilt on a new port whenever its membership changes (a generator died, restarted or
was added: its incarnation differs) or a sync failed; after a failure, the generators that do not
answer leave the group until Ray has restarted them, and the sync is tried once more; a second
failure raises :class:`common.errors.SyncError`. A restarted generator joins through
:meth:`WeightPublisher.rejoin` and receives the current weights; nothing else restarts.

Where the receivers run (``sync.receiver``): with the vLLM engine in worker processes (the
multiprocess engine, tensor parallelism), every engine worker is a receiver rank of its own: it
receives in a background thread while the engine generates, and the generator applies the staged
update at its next segment boundary. With an in-process engine (the CPU default) or the transformers
backend, the generator's process is the one rank and hands the tensors to the engine. Each generator
says how many ranks it takes (``sync_ranks``); generator ``g`` gets the ranks after those of the
members before it, so the group's world size is 1 + the sum.

Every published version is recorded in Redis (:attr:`common.keys.RunKeys.version`), so a resume
numbers its versions past every one sent before a crash (:meth:`WeightPublisher.newest_published`).

Taken by duck typing: learner handles (``sync_open``/``sync_send`` with ``.remote``), a fleet with
``members()`` and ``unreachable(g)`` (the supervisor), a counts dict, a store with Redis's
``get``/``set``, and a runtime with ``ray``'s ``get`` (``ray`` itself unless a test passes a fake).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cluster.pipeline.supervision import STATS_TIMEOUT_S, Member, Runtime, failure_reason
from common.errors import SyncError

SETUP_TIMEOUT_S = 60.0  # asking the generators' rank counts, opening and joining the group


class Fleet(Protocol):
    """What publishing needs of the generators (:class:`cluster.pipeline.supervision.GeneratorSupervisor`)."""

    def members(self) -> list[Member]: ...

    def unreachable(self, g: int) -> None: ...


class WeightPublisher:
    """Sends learner rank 0's weights to the fleet; owns the weight-sync group's membership."""

    def __init__(
        self,
        learners: Sequence[Any],
        fleet: Fleet,
        counts: dict[str, int],
        timeout_s: float,
        store: Any,
        version_key: str,
        rt: Runtime = ray,
    ) -> None:
        self.learners, self.fleet, self.counts, self.rt = learners, fleet, counts, rt
        self.timeout_s = timeout_s  # sync.timeout_s
        self.store, self.version_key = store, version_key
        self.published: tuple[int, int] | None = None  # (version, step) of the last weights sent
        self.stats: dict[str, float] = {}  # the last sync's sync/ metrics
        # (generator id, incarnation) of the group's members, by rank - 1; None: rebuild at the next sync
        self.group: list[tuple[int, int]] | None = None

    def publish(self, version: int, step: int) -> float:
        """Broadcast learner rank 0's current weights (policy ``version``) to every live generator at
        admission clock ``step``. A failed or stuck sync (a generator died mid-update, a receiver
        never joined) rebuilds the group on a new port with the generators still alive and tries
        once more; a second failure raises :class:`SyncError`. Returns the seconds it took."""
        t0 = time.perf_counter()
        for attempt in (1, 2):
            try:
                self.stats = self._sync_once(step)
                break
            except (RayTaskError, RayActorError, GetTimeoutError) as e:
                self.group = None  # the group is dead: rebuild on the next try
                self.counts["sync_failures"] += 1
                reason = failure_reason(e)
                if attempt == 2:
                    raise SyncError(
                        f"weight sync of version {version} failed twice (sync.timeout_s="
                        f"{self.timeout_s:g}): {reason}; check the generator logs (ray logs) and that "
                        "every generator node can reach learner rank 0's node"
                    ) from None
                print(f"[pipeline] weight sync failed ({reason}); rebuilding the group", flush=True)
                self._drop_unreachable()
        self.published = (version, step)
        self.store.set(self.version_key, version)  # a resume numbers past it
        return time.perf_counter() - t0

    def rejoin(self, version: int) -> None:
        """A generator is back: the group is rebuilt with it and everyone gets the current weights
        (at the last publish's step). Nothing is sent before the first publish."""
        if self.published is not None:
            self.publish(version, step=self.published[1])

    def newest_published(self) -> int:
        """The newest version ever published in this run (0 if none), a crashed attempt's included."""
        return int(self.store.get(self.version_key) or 0)

    def _join(self) -> list[Member]:
        """The generators that take part in the next sync (alive, not restarting); the group is rebuilt
        (new port, new world size) whenever that set changed since the last sync or a sync failed."""
        members = self.fleet.members()
        if not members:  # all restarting: each gets the weights when it is back (the supervisor's rejoin)
            self.group = None
            return []
        key = [(m.gid, m.incarnation) for m in members]
        if key != self.group:
            self.group = None
            # one rank per receiver: the generator's process, or each of its engine's workers
            ranks = self.rt.get([m.handle.sync_ranks.remote() for m in members], timeout=SETUP_TIMEOUT_S)
            # member i takes ranks bases[i] .. bases[i] + ranks[i] - 1
            bases = np.cumsum([1, *ranks[:-1]]).tolist()
            info = self.rt.get(self.learners[0].sync_open.remote(1 + sum(ranks)), timeout=SETUP_TIMEOUT_S)
            self.rt.get(
                [m.handle.sync_join.remote(info, int(b)) for m, b in zip(members, bases)],
                timeout=SETUP_TIMEOUT_S,
            )
            self.group = key
        return members

    def _sync_once(self, step: int) -> dict[str, float]:
        members = self._join()
        if not members:
            return {}
        sends = [h.sync_send.remote() for h in self.learners]
        receives = [m.handle.sync_receive.remote(step) for m in members]
        # every wait inside has sync.timeout_s; this outer bound only catches an actor that hangs
        # outside the transport
        results = self.rt.get([*sends, *receives], timeout=3 * self.timeout_s + 60)
        return dict(results[0])

    def _drop_unreachable(self) -> None:
        """After a failed sync: a generator that does not answer (died, restarting) leaves the group
        until Ray has restarted it (the supervisor then re-admits it with the current weights)."""
        for m in self.fleet.members():
            try:
                self.rt.get(m.handle.ready.remote(), timeout=STATS_TIMEOUT_S)
            except GetTimeoutError:  # alive but busy: it stays a member (a second failure is reported)
                continue
            except RayActorError:  # died or restarting (ActorUnavailableError is one)
                self.fleet.unreachable(m.gid)
