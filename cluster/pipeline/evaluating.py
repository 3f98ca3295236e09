"""Held-out evaluation beside training (``driver=ray``): the controller starts it and goes on.

When an evaluation is due, :meth:`Evaluations.submit` asks the first reachable generator to evaluate
(``Generator.evaluate``: between two of its own sampler steps, on its engine, with the newest weights
it was offered applied first) and returns at once; the learner trains on meanwhile. Each step the
controller calls :meth:`Evaluations.poll`, which hands back the finished results: logged at the step
the evaluation was asked for, with ``eval/version`` (the policy version it evaluated) and
``timing/eval_s`` (how long it took beside training, not added to any step's time). At most one runs
at a time: one that comes due while another is still running is skipped, with a line. A generator
lost during its evaluation passes it to the next one. At the end of the run :meth:`finish` waits for
the last one (bounded), so the final evaluation is in the log.

``driver=local`` keeps its synchronous evaluation: it has one engine and one thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError

Reachable = Callable[[], list[tuple[int, Any]]]


class _Running:
    def __init__(self, step: int, generator: int, ref: Any, started: float) -> None:
        self.step, self.generator, self.ref, self.started = step, generator, ref, started


class Evaluations:
    """The evaluations in flight (at most one). ``reachable``: the generators that can take one, as
    ``(id, handle)``; ``rt``: ray's ``wait``/``get`` (tests drive it with fakes)."""

    def __init__(self, reachable: Reachable, rt: Any = ray) -> None:
        self.reachable, self.rt = reachable, rt
        self.running: _Running | None = None
        self.skipped = 0

    def submit(self, step: int) -> bool:
        """Start the evaluation of ``step``'s weights; False if it was skipped (one still runs, or no
        generator can take it)."""
        if self.running is not None:
            self.skipped += 1
            print(
                f"[eval] step {step}: skipped, the evaluation of step {self.running.step} still runs "
                "(evaluations are taking longer than eval.every_steps steps)",
                flush=True,
            )
            return False
        return self._start(step, time.perf_counter(), skip=())

    def _start(self, step: int, started: float, skip: tuple[int, ...]) -> bool:
        for g, handle in self.reachable():
            if g not in skip:
                self.running = _Running(step, g, handle.evaluate.remote(step), started)
                return True
        print(f"[eval] step {step}: no generator can evaluate now; skipped", flush=True)
        self.skipped += 1
        return False

    def poll(self, timeout_s: float = 0.0) -> list[tuple[int, dict[str, float]]]:
        """The evaluations finished by now (waiting at most ``timeout_s``): ``(step, metrics)``."""
        run = self.running
        if run is None:
            return []
        ready, _ = self.rt.wait([run.ref], timeout=timeout_s)
        if not ready:
            return []
        self.running = None
        try:
            out = dict(self.rt.get(run.ref))
        except RayActorError:  # the generator went away: the next one evaluates the same step
            print(
                f"[eval] step {run.step}: generator {run.generator} is gone; the next one evaluates",
                flush=True,
            )
            self._start(run.step, run.started, skip=(run.generator,))
            return []
        if not out:
            return []
        out["timing/eval_s"] = time.perf_counter() - run.started
        return [(run.step, out)]

    def finish(self, timeout_s: float) -> list[tuple[int, dict[str, float]]]:
        """At the end of the run: the evaluation still running, waited for up to ``timeout_s``."""
        done: list[tuple[int, dict[str, float]]] = []
        deadline = time.perf_counter() + timeout_s
        while self.running is not None and time.perf_counter() < deadline:
            done += self.poll(timeout_s=min(5.0, max(0.0, deadline - time.perf_counter())))
        if self.running is not None:
            print(
                f"[eval] step {self.running.step}: not finished after {timeout_s:.0f} s; not logged",
                flush=True,
            )
            self.running = None
        return done
