"""Generator supervision: the controller's view of its generator actors, and what it does when one
fails.

:class:`GeneratorSupervisor` starts every generator's loop and, each time :meth:`~GeneratorSupervisor.watch`
runs (the controller calls it while it waits for trees), looks at each one:

- a loop that failed because its actor died waits for Ray's restart (``max_restarts``); once the
  new actor answers it receives the current weights (the ``on_rejoin`` callback: the publisher
  rebuilds the weight-sync group with it) and its loop starts again. The new actor re-issues the
  prompts its predecessor had in flight (:class:`common.prompts.PromptDispatcher`);
- a loop that raised while its actor lives (a dead engine core, a Redis outage past
  ``queue.outage_s``), or whose heartbeat says it made no progress for ``generators.hang_timeout_s``,
  has its actor killed for Ray to restart, then is waited for like one that died;
- an actor out of restarts is dead for good: the other generators take its prompts, and when every
  generator is dead while prompts remain, the run fails with :class:`common.errors.TreepoError`;
- a loop that returned means the data is used up there; when prompts come back after that (a stale
  tree's prompt re-issued by the controller, a dead generator's prompts), the finished loops run
  again to take them.

Every departure raises the generator's ``restarts`` count, which is also its incarnation: the
weight-sync group (:mod:`cluster.pipeline.publishing`) is rebuilt whenever the incarnations of its
members change, since a departed receiver is gone from the old group.

The actors are taken by duck typing: handles whose methods have ``.remote(...)`` (``run``, ``ready``,
``pid``, ``heartbeat``), a dispatcher with ``requeue_generator``/``finished``/``exhausted``, a counts dict, and a
runtime with ``ray``'s ``get``/``wait``/``kill`` (``ray`` itself unless a test passes a fake).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from common.errors import TreepoError

STATS_TIMEOUT_S = 10.0  # a question to a generator that should answer at once (pid, ready, heartbeat)
KILL_WAIT_S = 60.0  # how long a deliberate restart waits for the killed process to be gone


class Runtime(Protocol):
    """The three calls of ``ray`` supervision and publishing make (``ray`` itself satisfies it)."""

    def get(self, refs: Any, *, timeout: float | None = None) -> Any: ...

    def wait(self, refs: list[Any], *, timeout: float | None = None) -> tuple[list[Any], list[Any]]: ...

    def kill(self, actor: Any, *, no_restart: bool = True) -> None: ...


def failure_reason(e: BaseException) -> str:
    """The last line of an error (a remote traceback's is the cause), at most 400 characters."""
    text = str(e).strip()
    return text.splitlines()[-1][:400] if text else type(e).__name__


class Member(NamedTuple):
    """A generator that can receive weights now: its id, its actor handle and its incarnation."""

    gid: int
    handle: Any
    incarnation: int


@dataclasses.dataclass
class GenSlot:
    """The controller's view of one generator actor."""

    handle: Any
    run_ref: Any = None  # the running loop
    ready_ref: Any = None  # waiting for a restart to finish
    done: bool = False  # its loop returned (data used up) or it is dead for good
    dead: bool = False  # out of restarts: no engine any more
    restarts: int = 0
    old_pid: int | None = None  # the process a deliberate restart killed (its answers are ignored)
    beat_at: float = 0.0  # when the heartbeat is asked next


class GeneratorSupervisor:
    """Watches the generators' loops; restarts, re-admits or gives up on the ones that fail."""

    def __init__(
        self,
        handles: Sequence[Any],
        dispatcher: Any,
        counts: dict[str, int],
        hang_timeout_s: float,
        on_rejoin: Callable[[], None] = lambda: None,
        rt: Runtime = ray,
    ) -> None:
        self.slots = [GenSlot(h) for h in handles]
        self.dispatcher = dispatcher
        self.counts = counts
        self.hang_timeout_s = hang_timeout_s
        self.on_rejoin = on_rejoin  # a generator is back: it gets the current weights
        self.rt = rt

    # ------------------------------------------------------------------ what the others ask
    def start_loops(self) -> None:
        for slot in self.slots:
            slot.run_ref = slot.handle.run.remote()

    def members(self) -> list[Member]:
        """The generators that can take part in a weight sync: alive, not restarting."""
        return [
            Member(g, s.handle, s.restarts)
            for g, s in enumerate(self.slots)
            if s.ready_ref is None and not s.dead
        ]

    def reachable(self) -> list[tuple[int, Any]]:
        """(id, handle) of every generator not restarting (one whose loop finished keeps its engine)."""
        return [(g, s.handle) for g, s in enumerate(self.slots) if s.ready_ref is None]

    def looping(self) -> list[Any]:
        """The handles of the generators whose loop runs now."""
        return [s.handle for s in self.slots if s.ready_ref is None and not s.done]

    def unreachable(self, g: int) -> None:
        """Generator ``g`` did not answer (died or restarting): it leaves the sync group until Ray
        has restarted it; :meth:`watch` then re-admits it with the current weights."""
        slot = self.slots[g]
        slot.run_ref = None  # its loop died with it: resubmitted after the restart
        self._gone(slot)
        slot.ready_ref = slot.handle.ready.remote()
        print(f"[pipeline] generator {g} is unreachable; it rejoins after its restart", flush=True)

    # ------------------------------------------------------------------ one round
    def watch(self) -> None:
        """One look at every generator: a restart that settled, a loop that ended, a silent loop."""
        for g, slot in enumerate(self.slots):
            if slot.ready_ref is not None:
                if self.rt.wait([slot.ready_ref], timeout=0)[0]:
                    self._restart_settled(g, slot)
            elif slot.run_ref is not None and not slot.done:
                if self.rt.wait([slot.run_ref], timeout=0)[0]:
                    self._loop_ended(g, slot)
                else:
                    self._check_heartbeat(g, slot)
        self._rerun_finished()

    def _rerun_finished(self) -> None:
        """Loops that ended because the data was used up run again when prompts came back to claim."""
        idle = [g for g, s in enumerate(self.slots) if s.done and not s.dead and s.ready_ref is None]
        if not idle or self.dispatcher.exhausted():
            return
        for g in idle:
            slot = self.slots[g]
            slot.done, slot.run_ref = False, slot.handle.run.remote()
        print(
            f"[pipeline] prompts were re-issued after the data ran out: generator(s) {idle} loop again",
            flush=True,
        )

    def _gone(self, slot: GenSlot) -> None:
        slot.restarts += 1  # a new incarnation: the weight-sync group is rebuilt without the old one
        self.counts["restarts"] += 1

    def _check_heartbeat(self, g: int, slot: GenSlot) -> None:
        """Restart a generator whose loop made no progress for ``generators.hang_timeout_s`` (or whose
        actor does not answer at all)."""
        now, limit = time.monotonic(), self.hang_timeout_s
        if now < slot.beat_at:
            return
        slot.beat_at = now + min(5.0, limit / 4)
        try:
            silent = float(self.rt.get(slot.handle.heartbeat.remote(), timeout=min(STATS_TIMEOUT_S, limit)))
        except GetTimeoutError:
            silent = float("inf")
        except RayActorError:  # dying: its loop's failure is handled on the next round
            return
        if silent > limit:
            self.counts["hangs"] += 1
            why = f"its loop made no progress for {silent:.0f} s (generators.hang_timeout_s={limit:g})"
            self._restart(g, slot, why)

    def _restart(self, g: int, slot: GenSlot, why: str) -> None:
        """Kill a live generator's actor for Ray to restart (a fresh engine; the new actor re-issues the
        prompts the old one had in flight), then wait for it like for one that died."""
        print(f"[pipeline] generator {g} restarts: {why}", flush=True)
        try:
            slot.old_pid = int(self.rt.get(slot.handle.pid.remote(), timeout=STATS_TIMEOUT_S))
        except (GetTimeoutError, RayActorError):
            slot.old_pid = None
        self.rt.kill(slot.handle, no_restart=False)
        deadline = time.monotonic() + KILL_WAIT_S
        while slot.old_pid is not None and time.monotonic() < deadline:  # until the old process is gone
            try:
                if self.rt.get(slot.handle.pid.remote(), timeout=5) != slot.old_pid:
                    break
            except (GetTimeoutError, RayActorError):
                break
            time.sleep(0.2)
        slot.run_ref = None
        self._gone(slot)
        slot.ready_ref = slot.handle.pid.remote()

    def _restart_settled(self, g: int, slot: GenSlot) -> None:
        """A restarting generator answered: resume its loop with the current weights, ask again, or
        give it up for good."""
        ref, slot.ready_ref = slot.ready_ref, None
        try:
            answer = self.rt.get(ref)
        except ActorUnavailableError:  # still restarting: ask again on the next round
            slot.ready_ref = slot.handle.ready.remote()
            return
        except RayActorError as e:  # out of restarts (or its constructor fails)
            self.dispatcher.requeue_generator(g)  # for good: others take its prompts
            slot.done = slot.dead = True
            if all(s.done for s in self.slots) and not self.dispatcher.finished():
                raise TreepoError(
                    f"every generator is dead (generator {g}: {e}): see the generator logs (ray logs)"
                ) from None
            return
        if slot.old_pid is not None and answer == slot.old_pid:  # the killed process, still answering
            slot.ready_ref = slot.handle.pid.remote()
            return
        slot.old_pid = None
        self.on_rejoin()  # it joins the group and gets the current weights
        slot.run_ref = slot.handle.run.remote()
        print(f"[pipeline] generator {g} restarted ({slot.restarts}x), loop resumed", flush=True)

    def _loop_ended(self, g: int, slot: GenSlot) -> None:
        """A generator's loop returned (the data is used up there) or died with its actor."""
        ref, slot.run_ref = slot.run_ref, None
        try:
            self.rt.get(ref)
            slot.done = True
        except RayActorError:
            self._gone(slot)
            print(f"[pipeline] generator {g} died; waiting for its restart", flush=True)
            slot.ready_ref = slot.handle.ready.remote()
        except Exception as e:  # the loop raised while the actor lives (a dead engine core, Redis gone)
            self.counts["loop_failures"] += 1
            self._restart(g, slot, f"its loop failed: {failure_reason(e)}")
