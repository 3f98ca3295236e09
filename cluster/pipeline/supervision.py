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
- an actor whose node is gone (e.g. a spot preemption) while no other node has the resources it
  asks for is lost with its node: Ray keeps its restart pending until a node with them joins; its
  calls wait meanwhile, or fail at once. The supervisor asks Ray's view of it (the ``probe``, every
  ``PROBE_EVERY_S`` of a restart): the run goes on with the others, which take its prompts, and a
  failed call is made again on later rounds (backing off to ``ASK_AGAIN_MAX_S``); once Ray restarted
  it on a joining node it answers, and is taken back with the current weights. While no generator
  runs at all, a status line says so every ``STATUS_EVERY_S``; past ``rejoin_timeout_s``
  (``generators.start_timeout_s``) the run fails with a :class:`common.errors.TreepoError`;
- a loop that returned means the data is used up there; when prompts come back after that (a stale
  tree's prompt re-issued by the controller, a dead generator's prompts), the finished loops run
  again to take them.

Every departure raises the generator's ``restarts`` count, which is also its incarnation: the
weight-sync group (:mod:`cluster.pipeline.publishing`) is rebuilt whenever the incarnations of its
members change, since a departed receiver is gone from the old group.

The actors are taken by duck typing: handles whose methods have ``.remote(...)`` (``run``, ``ready``,
``pid``, ``heartbeat``), a dispatcher with ``requeue_generator``/``finished``/``exhausted``, a counts dict, a
runtime with ``ray``'s ``get``/``wait``/``kill`` (``ray`` itself unless a test passes a fake), and a
``probe(handle, ran_on)`` that says what Ray holds of an actor and the node it is on: ``alive``,
``restarting``, ``lost`` (restarting while ``ran_on``, the node it last ran on, is gone) or ``dead``
(:func:`cluster.pipeline.topology.generator_state`).
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
ASK_AGAIN_MIN_S = 1.0  # a restarting generator whose call failed is asked again after this, doubling ...
ASK_AGAIN_MAX_S = 30.0  # ... up to this
PROBE_EVERY_S = 2.0  # how often Ray's view of a restarting generator is read (is its node gone?)
STATUS_EVERY_S = 30.0  # how often the console says that no generator runs


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
    lost: bool = False  # its restart waits for a node with its resources (its node is gone)
    ask_at: float | None = None  # restarting, its last call failed: asked again then
    backoff_s: float = ASK_AGAIN_MIN_S
    probe_at: float = 0.0  # when Ray's view of it is read next while it restarts
    node: str | None = None  # the node it last ran on

    @property
    def restarting(self) -> bool:
        """Waiting for Ray's restart (a call pending, or one to make again), lost with its node included."""
        return self.ready_ref is not None or self.ask_at is not None

    @property
    def running(self) -> bool:
        """Alive and answering (its loop may have finished): neither restarting nor dead."""
        return not self.restarting and not self.dead


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
        probe: Callable[[Any, str | None], tuple[str, str | None]] = lambda handle, ran_on: ("dead", None),
        rejoin_timeout_s: float = 600.0,
    ) -> None:
        self.slots = [GenSlot(h) for h in handles]
        self.dispatcher = dispatcher
        self.counts = counts
        self.hang_timeout_s = hang_timeout_s
        self.on_rejoin = on_rejoin  # a generator is back: it gets the current weights
        self.rt = rt
        self.probe = probe  # Ray's view of an actor: alive, restarting, lost (its node gone) or dead
        self.rejoin_timeout_s = rejoin_timeout_s  # how long the run waits with no generator running
        self.idle_since: float | None = None  # since when no generator runs
        self.status_at = 0.0  # when the no-generator status line is said next

    # ------------------------------------------------------------------ what the others ask
    def start_loops(self) -> None:
        for slot in self.slots:
            slot.node = self.probe(slot.handle, None)[1]
            slot.run_ref = slot.handle.run.remote()

    def members(self) -> list[Member]:
        """The generators that can take part in a weight sync: alive, not restarting."""
        return [Member(g, s.handle, s.restarts) for g, s in enumerate(self.slots) if s.running]

    def reachable(self) -> list[tuple[int, Any]]:
        """(id, handle) of every generator not restarting (one whose loop finished keeps its engine)."""
        return [(g, s.handle) for g, s in enumerate(self.slots) if not s.restarting]

    def looping(self) -> list[Any]:
        """The handles of the generators whose loop runs now."""
        return [s.handle for s in self.slots if s.running and not s.done]

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
            if slot.ask_at is not None:
                if time.monotonic() >= slot.ask_at:  # is it back (e.g. a node with its resources joined)?
                    slot.ask_at, slot.ready_ref = None, slot.handle.ready.remote()
            elif slot.ready_ref is not None:
                if self.rt.wait([slot.ready_ref], timeout=0)[0]:
                    self._restart_settled(g, slot)
                else:
                    self._check_node(g, slot)
            elif slot.run_ref is not None and not slot.done:
                if self.rt.wait([slot.run_ref], timeout=0)[0]:
                    self._loop_ended(g, slot)
                else:
                    self._check_heartbeat(g, slot)
        self._rerun_finished()
        self._check_some_run()

    def _check_some_run(self) -> None:
        """While no generator runs (lost with their nodes, restarting) and prompts remain: a status
        line every ``STATUS_EVERY_S``; past ``rejoin_timeout_s`` a clear error."""
        if any(s.running for s in self.slots) or self.dispatcher.finished():
            self.idle_since = None
            return
        now = time.monotonic()
        if self.idle_since is None:  # the first status line after STATUS_EVERY_S: a restart is quicker
            self.idle_since, self.status_at = now, now + STATUS_EVERY_S
        waited = now - self.idle_since
        lost = [g for g, s in enumerate(self.slots) if s.lost]
        restarting = [g for g, s in enumerate(self.slots) if s.restarting and not s.lost]
        if waited > self.rejoin_timeout_s:
            raise TreepoError(
                f"no generator ran for {waited:.0f} s (lost with their node: {lost}, restarting: "
                f"{restarting}): start a node with the generators' resources (generators.ray_resources, "
                "generators.gpus_per_engine) and run again with --resume, or raise generators.start_timeout_s"
            )
        if now >= self.status_at:
            self.status_at = now + STATUS_EVERY_S
            print(
                f"[pipeline] no generator is running for {waited:.0f} s (lost with their node: {lost}, "
                f"restarting: {restarting}); waiting for a node with their resources, "
                f"{self.rejoin_timeout_s - waited:.0f} s left (generators.start_timeout_s)",
                flush=True,
            )

    def _rerun_finished(self) -> None:
        """Loops that ended because the data was used up run again when prompts came back to claim."""
        idle = [g for g, s in enumerate(self.slots) if s.done and s.running]
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
        except RayActorError as e:  # out of restarts (or its constructor fails), or its node is gone
            state = self.probe(slot.handle, slot.node)[0]
            if state != "dead":  # Ray holds its restart (until a node with its resources joins)
                slot.ask_at = time.monotonic() + slot.backoff_s
                slot.backoff_s = min(2 * slot.backoff_s, ASK_AGAIN_MAX_S)
                if state == "lost":
                    self._lost(g, slot)
                return
            if slot.lost:
                print(f"[pipeline] generator {g}, lost with its node, is dead for good", flush=True)
                slot.lost = False
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
        was_lost, slot.lost, slot.backoff_s = slot.lost, False, ASK_AGAIN_MIN_S
        slot.node = self.probe(slot.handle, None)[1]  # where Ray restarted it
        self.on_rejoin()  # it joins the group and gets the current weights
        slot.run_ref = slot.handle.run.remote()
        if was_lost:
            n = sum(s.running for s in self.slots)
            print(
                f"[pipeline] generator {g} is back (a node with its resources joined); going on with "
                f"{n} generator(s)",
                flush=True,
            )
            return
        print(f"[pipeline] generator {g} restarted ({slot.restarts}x), loop resumed", flush=True)

    def _check_node(self, g: int, slot: GenSlot) -> None:
        """A restart that has not answered yet: every ``PROBE_EVERY_S``, is its node gone?"""
        now = time.monotonic()
        if slot.lost or now < slot.probe_at:
            return
        slot.probe_at = now + PROBE_EVERY_S
        if self.probe(slot.handle, slot.node)[0] == "lost":
            self._lost(g, slot)

    def _lost(self, g: int, slot: GenSlot) -> None:
        """Generator ``g``'s restart waits for a node with its resources: the others take its prompts."""
        if slot.lost:
            return
        slot.lost = True
        n = self.dispatcher.requeue_generator(g)
        running = sum(s.running for s in self.slots)
        print(
            f"[pipeline] generator {g} lost with its node; going on with {running} generator(s), its {n} "
            "prompt(s) re-issued",
            flush=True,
        )

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
