"""Small fakes of the pipeline's actors for the supervision and publishing unit tests.

A fake handle's methods have ``.remote(...)`` like a Ray actor's and return a :class:`Ref`: a value,
or an error :meth:`FakeRay.get` raises, ready at once unless it stands for a loop still running.
:class:`FakeRay` is the runtime (``get``/``wait``/``kill``) the modules take instead of ``ray``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError


@dataclass
class Ref:
    value: Any = None
    error: BaseException | None = None
    ready: bool = True


class Method:
    """``handle.name.remote(*args)``: records the call, returns what ``fn`` makes of it."""

    def __init__(self, fn: Callable[..., Ref]) -> None:
        self.fn = fn
        self.calls: list[tuple] = []

    def remote(self, *args: Any) -> Ref:
        self.calls.append(args)
        return self.fn(*args)


class FakeRay:
    """The three ``ray`` calls supervision and publishing make."""

    def __init__(self) -> None:
        self.killed: list[Any] = []

    def get(self, refs: Any, *, timeout: float | None = None) -> Any:
        if isinstance(refs, list):
            return [self.get(r) for r in refs]
        if not refs.ready:  # a call that waits (a loop still running, an actor still restarting)
            raise GetTimeoutError(f"no answer within {timeout} s")
        if refs.error is not None:
            raise refs.error
        return refs.value

    def wait(self, refs: list[Ref], *, timeout: float | None = None) -> tuple[list[Ref], list[Ref]]:
        return [r for r in refs if r.ready], [r for r in refs if not r.ready]

    def kill(self, actor: Any, *, no_restart: bool = True) -> None:
        self.killed.append(actor)
        actor.killed()


class FakeGenerator:
    """A generator actor. ``state``: ``alive``, ``restarting`` (Ray is bringing it back: a call waits
    for the new process, or, with ``unavailable``, fails with ActorUnavailableError), ``lost`` (its
    node is gone and no node has room for its restart: a call fails at once, as Ray's made just after
    the loss does, or with ``waits`` waits like a restarting one's; :meth:`ray_state` says ``lost``) or ``dead`` (out of restarts). A kill restarts it
    at once as a new process (a new pid)."""

    def __init__(self, gid: int, ranks: int = 1) -> None:
        self.gid, self.ranks = gid, ranks
        self.pid_value = 1000 + gid
        self.state = "alive"
        self.unavailable = False
        self.waits = False  # lost: its calls wait instead of failing at once
        self.waiting: list[tuple[Ref, Callable[[], Any]]] = []  # calls made while restarting
        self.silent = 0.0  # what its heartbeat says
        self.loop = Ref(ready=False)
        self.receive_errors: list[BaseException] = []  # raised by the next receives, one each
        self.joined: list[tuple[Any, int]] = []  # (group info, first rank) of every join
        self.received: list[int] = []  # the step of every weight update received
        self.run = Method(self._run)
        self.ready = Method(lambda: self._answer(lambda: 0))
        self.pid = Method(lambda: self._answer(lambda: self.pid_value))
        self.heartbeat = Method(lambda: self._answer(lambda: self.silent))
        self.sync_ranks = Method(lambda: self._answer(lambda: self.ranks))
        self.sync_join = Method(self._join)
        self.sync_receive = Method(self._receive)

    def _answer(self, value: Callable[[], Any]) -> Ref:
        if self.state == "dead" or (self.state == "lost" and not self.waits):
            return Ref(error=RayActorError())
        if self.state == "restarting" and self.unavailable:
            return Ref(error=ActorUnavailableError("restarting", None))
        if self.state in ("restarting", "lost"):
            ref = Ref(ready=False)
            self.waiting.append((ref, value))
            return ref
        return Ref(value())

    def _run(self) -> Ref:
        self.loop = Ref(ready=False)
        return self.loop

    def _join(self, info: Any, rank: int) -> Ref:
        self.joined.append((info, rank))
        return self._answer(lambda: None)

    def _receive(self, step: int) -> Ref:
        if self.receive_errors:
            error = self.receive_errors.pop(0)
            if isinstance(error, RayActorError):  # the receiving process died
                self.dies()
            return Ref(error=error)
        if self.state != "alive":
            return self._answer(lambda: None)
        self.received.append(step)
        return Ref(step)

    # ------------------------------------------------------------------ what a test does to it
    def loop_raises(self, error: BaseException) -> None:
        self.loop.error, self.loop.ready = error, True

    def loop_returns(self) -> None:
        self.loop.ready = True

    def dies(self, state: str = "restarting") -> None:
        """The process dies: its loop fails with it; Ray restarts it (``restarting``) or not (``dead``)."""
        self.state = state
        self.loop.error, self.loop.ready = RayActorError(), True
        if state == "dead":
            for ref, _value in self.waiting:
                ref.error, ref.ready = RayActorError(), True
            self.waiting = []

    def ray_state(self, ran_on: str | None) -> tuple[str, str]:
        """What ``topology.generator_state`` says of it (``lost`` only knowing the node it ran on)."""
        state = "restarting" if self.state == "lost" and ran_on is None else self.state
        return state, f"node-{self.gid}"

    def back(self) -> None:
        """Ray's restart finished: a new process; the calls made meanwhile are answered by it."""
        self.state = "alive"
        self.pid_value += 1
        for ref, value in self.waiting:
            ref.value, ref.ready = value(), True
        self.waiting = []

    def killed(self) -> None:
        self.loop.error, self.loop.ready = RayActorError(), True
        self.back()


@dataclass
class FakeLearner:
    """Learner rank 0 for publishing: opens the group (recording its world sizes) and sends."""

    send_errors: list[BaseException] = field(default_factory=list)
    worlds: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sync_open = Method(self._open)
        self.sync_send = Method(self._send)

    def _open(self, world_size: int) -> Ref:
        self.worlds.append(world_size)
        return Ref({"generation": len(self.worlds), "world_size": world_size})

    def _send(self) -> Ref:
        if self.send_errors:
            return Ref(error=self.send_errors.pop(0))
        return Ref({"sync/bucket_count": 1.0})


class FakeDispatcher:
    """The prompt dispatcher's part supervision uses."""

    def __init__(self, finished: bool = False) -> None:
        self.requeued: list[int] = []
        self.is_finished = finished
        self.is_exhausted = True  # nothing left to claim (prompts may be in flight): a test brings some back

    def requeue_generator(self, gid: int) -> int:
        self.requeued.append(gid)
        return 1

    def finished(self) -> bool:
        return self.is_finished

    def exhausted(self) -> bool:
        return self.is_exhausted


class FakeStore(dict):
    """Redis's ``get``/``set`` on a dict."""

    def set(self, key: str, value: Any) -> None:
        self[key] = value
