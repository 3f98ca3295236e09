"""Held-out evaluation beside training (cluster/pipeline/evaluating.py), driven with fake generators:
submitting returns at once, a result comes back with the step it was asked for and the version it
evaluated, one at a time (a due one is skipped while another runs), a generator lost meanwhile hands
it to the next, and the end of the run waits for the last one."""

from __future__ import annotations

from types import SimpleNamespace

from fake_actors import FakeRay, Method, Ref
from ray.exceptions import RayActorError

from cluster.pipeline.evaluating import Evaluations


def _generator(refs: list[Ref]):
    """A generator whose evaluations return the refs of ``refs`` in turn (a test sets them ready)."""
    return SimpleNamespace(evaluate=Method(lambda step: refs.pop(0)))


def test_an_evaluation_runs_beside_training_and_comes_back_with_its_step_and_version(capsys):
    ref = Ref(value={"eval/accuracy": 0.5, "eval/version": 10.0}, ready=False)
    gen = _generator([ref])
    ev = Evaluations(lambda: [(0, gen)], rt=FakeRay())
    assert ev.submit(10) and gen.evaluate.calls == [(10,)]
    assert ev.poll() == []  # still running: the controller trains on
    assert not ev.submit(12), "a second one while the first runs is skipped"
    assert "step 12: skipped, the evaluation of step 10 still runs" in capsys.readouterr().out
    ref.ready = True
    [(step, out)] = ev.poll()
    assert step == 10 and out["eval/version"] == 10.0 and out["timing/eval_s"] >= 0
    assert ev.running is None and ev.skipped == 1


def test_a_generator_lost_during_its_evaluation_hands_it_to_the_next(capsys):
    lost = _generator([Ref(error=RayActorError())])
    ok = _generator([Ref(value={"eval/accuracy": 0.25, "eval/version": 3.0})])
    ev = Evaluations(lambda: [(0, lost), (1, ok)], rt=FakeRay())
    ev.submit(4)
    assert ev.poll() == [] and ok.evaluate.calls == [(4,)]
    assert "generator 0 is gone; the next one evaluates" in capsys.readouterr().out
    assert [s for s, _ in ev.poll()] == [4]


def test_the_end_of_the_run_waits_for_the_last_evaluation_bounded(capsys):
    done = Ref(value={"eval/accuracy": 1.0, "eval/version": 8.0})
    ev = Evaluations(lambda: [(0, _generator([done]))], rt=FakeRay())
    ev.submit(8)
    assert [s for s, _ in ev.finish(timeout_s=5)] == [8]
    ev = Evaluations(lambda: [(0, _generator([Ref(ready=False)]))], rt=FakeRay())
    ev.submit(9)
    assert ev.finish(timeout_s=0.01) == [] and ev.running is None
    assert "step 9: not finished" in capsys.readouterr().out
