"""A generator lost with its node (driven with fake actors): Ray holds its restart until a node with its
resources joins, and its calls fail at once meanwhile. The run goes on with the others (they take its
prompts), asks it again with a growing wait, and takes it back with the current weights; with no
generator running it says so and, past the rejoin timeout, fails with a clear error."""

from __future__ import annotations

import pytest
from fake_actors import FakeDispatcher, FakeGenerator, FakeRay

from cluster.pipeline import supervision
from cluster.pipeline.supervision import GeneratorSupervisor
from common.errors import TreepoError

COUNTS = ("restarts", "loop_failures", "hangs")


def _supervisor(n: int = 2, rejoin_timeout_s: float = 600.0):
    gens = [FakeGenerator(g) for g in range(n)]
    dispatcher, rejoins = FakeDispatcher(), []
    dispatcher.is_exhausted = False  # prompts left to claim
    sup = GeneratorSupervisor(
        gens,
        dispatcher,
        dict.fromkeys(COUNTS, 0),
        60.0,
        on_rejoin=lambda: rejoins.append(1),
        rt=FakeRay(),
        probe=lambda handle, ran_on: handle.ray_state(ran_on),
        rejoin_timeout_s=rejoin_timeout_s,
    )
    sup.start_loops()
    return sup, gens, dispatcher, rejoins


def _retry_due(sup: GeneratorSupervisor, g: int) -> None:
    sup.slots[g].ask_at = 0.0  # as if its back-off wait had passed


def test_a_generator_lost_with_its_node_gives_its_prompts_to_the_others_and_comes_back(capsys):
    sup, gens, dispatcher, rejoins = _supervisor()
    gens[1].dies("lost")
    sup.watch()  # its loop failed with its actor: asked whether it is back
    sup.watch()  # the ask failed at once while Ray still holds it: lost with its node
    out = capsys.readouterr().out
    assert "generator 1 lost with its node; going on with 1 generator(s), its 1 prompt(s) re-issued" in out
    assert dispatcher.requeued == [1] and rejoins == []
    assert [m.gid for m in sup.members()] == [0] and sup.looping() == [gens[0]]
    assert [g for g, _ in sup.reachable()] == [0] and not sup.slots[1].dead

    asks = len(gens[1].ready.calls)
    sup.watch()  # its back-off wait has not passed: not asked
    assert len(gens[1].ready.calls) == asks
    _retry_due(sup, 1)
    sup.watch()  # asked again: still lost; its prompts are not re-issued twice, the wait doubles
    sup.watch()
    assert len(gens[1].ready.calls) == asks + 1 and dispatcher.requeued == [1]
    assert sup.slots[1].backoff_s == 4 * supervision.ASK_AGAIN_MIN_S

    gens[1].back()  # a node with its resources joined; Ray restarted it there
    _retry_due(sup, 1)
    sup.watch()
    sup.watch()
    assert rejoins == [1] and len(gens[1].run.calls) == 2  # the current weights first, then its loop
    assert [(m.gid, m.incarnation) for m in sup.members()] == [(0, 0), (1, 1)]
    out = capsys.readouterr().out
    assert "generator 1 is back (a node with its resources joined); going on with 2 generator(s)" in out
    assert sup.slots[1].backoff_s == supervision.ASK_AGAIN_MIN_S


def test_a_lost_generator_whose_calls_wait_is_found_by_the_probe_and_comes_back(capsys):
    """Ray queues the calls of an actor whose restart waits for resources: the supervisor reads Ray's
    view while the restart has not answered, and a node gone makes the generator lost."""
    sup, gens, dispatcher, rejoins = _supervisor()
    gens[1].waits = True
    gens[1].dies("lost")
    sup.watch()  # its loop failed with its actor: asked whether it is back (the call waits)
    sup.watch()  # the probe says its node is gone
    assert "generator 1 lost with its node; going on with 1 generator(s)" in capsys.readouterr().out
    assert dispatcher.requeued == [1] and len(gens[1].ready.calls) == 1
    sup.slots[1].probe_at = 0.0
    sup.watch()  # still lost: said and re-issued once
    assert dispatcher.requeued == [1] and "lost" not in capsys.readouterr().out
    gens[1].back()  # Ray restarted it on a joining node: the waiting call is answered
    sup.watch()
    assert rejoins == [1] and len(gens[1].run.calls) == 2 and sup.slots[1].running
    assert "generator 1 is back" in capsys.readouterr().out


def test_a_restart_on_a_live_node_is_not_lost():
    sup, gens, dispatcher, _ = _supervisor()
    gens[1].dies()  # restarting, its node alive
    for _ in range(3):
        sup.slots[1].probe_at = 0.0
        sup.watch()
    assert dispatcher.requeued == [] and not sup.slots[1].lost


def test_a_lost_generator_that_ray_gives_up_on_is_dead_for_good(capsys):
    sup, gens, dispatcher, _ = _supervisor()
    gens[1].dies("lost")
    sup.watch()
    sup.watch()
    gens[1].state = "dead"
    _retry_due(sup, 1)
    sup.watch()
    sup.watch()
    assert sup.slots[1].dead and not sup.slots[1].lost and dispatcher.requeued == [1, 1]
    assert "generator 1, lost with its node, is dead for good" in capsys.readouterr().out


def test_with_no_generator_running_the_run_waits_with_a_status_line_then_fails(capsys):
    sup, gens, dispatcher, _ = _supervisor(n=1, rejoin_timeout_s=120.0)
    gens[0].dies("lost")
    sup.watch()
    sup.watch()  # lost: nothing runs, no error yet; the first status line after STATUS_EVERY_S
    assert "no generator is running" not in capsys.readouterr().out
    sup.idle_since -= supervision.STATUS_EVERY_S
    sup.status_at -= supervision.STATUS_EVERY_S
    sup.watch()
    out = capsys.readouterr().out
    assert "no generator is running for 30 s (lost with their node: [0], restarting: []); waiting" in out
    assert "90 s left (generators.start_timeout_s)" in out
    sup.idle_since -= 91.0  # the rejoin timeout passed
    with pytest.raises(TreepoError, match=r"no generator ran for \d+ s \(lost with their node: \[0\]"):
        sup.watch()


def test_no_generator_running_is_no_error_once_the_data_is_finished():
    sup, gens, dispatcher, _ = _supervisor(n=1, rejoin_timeout_s=0.0)
    dispatcher.is_finished = True
    gens[0].dies("lost")
    for _ in range(3):
        sup.watch()
    assert sup.idle_since is None


def test_a_lost_generator_back_before_the_timeout_clears_the_wait():
    sup, gens, _, rejoins = _supervisor(n=1, rejoin_timeout_s=120.0)
    gens[0].dies("lost")
    sup.watch()
    sup.watch()
    assert sup.idle_since is not None
    gens[0].back()
    _retry_due(sup, 0)
    sup.watch()
    sup.watch()
    assert sup.idle_since is None and rejoins == [1] and sup.looping() == [gens[0]]


def test_the_weight_sync_group_goes_on_without_a_lost_generator_and_takes_it_back_with_the_weights():
    """Publishing with a generator lost with its node: the group is rebuilt without it (one rank
    fewer), and when it is back the group is rebuilt with it and it receives the current weights
    before its loop runs again."""
    from fake_actors import FakeLearner, FakeStore

    from cluster.pipeline.publishing import WeightPublisher

    gens = [FakeGenerator(0), FakeGenerator(1)]
    rt, counts = FakeRay(), dict.fromkeys((*COUNTS, "sync_failures"), 0)
    learner = FakeLearner()
    dispatcher = FakeDispatcher()
    dispatcher.is_exhausted = False
    sup = GeneratorSupervisor(
        gens,
        dispatcher,
        counts,
        60.0,
        on_rejoin=lambda: pub.rejoin(7),
        rt=rt,
        probe=lambda handle, ran_on: handle.ray_state(ran_on),
    )
    pub = WeightPublisher([learner], sup, counts, 30.0, FakeStore(), "v", rt=rt)
    sup.start_loops()
    pub.publish(version=5, step=5)
    assert learner.worlds == [3] and gens[1].received == [5]

    gens[1].dies("lost")
    sup.watch()
    sup.watch()
    pub.publish(version=6, step=6)
    assert learner.worlds == [3, 2] and gens[0].received == [5, 6] and gens[1].received == [5]

    gens[1].back()
    sup.slots[1].ask_at = 0.0
    sup.watch()
    runs_before = len(gens[1].run.calls)
    sup.watch()  # back: the group is rebuilt with it and the current weights go out, then its loop
    assert learner.worlds == [3, 2, 3] and gens[1].received == [5, 6]
    assert pub.published == (7, 6) and len(gens[1].run.calls) == runs_before + 1
