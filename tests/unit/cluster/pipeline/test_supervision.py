"""Generator supervision driven with fake actors: restarts after a loop failure, a hang or a death,
prompts of a generator dead for good going to the others, and the end when every generator is dead."""

from __future__ import annotations

import pytest
from fake_actors import FakeDispatcher, FakeGenerator, FakeRay, Ref
from ray.exceptions import GetTimeoutError

from cluster.pipeline.supervision import GeneratorSupervisor, failure_reason
from common.errors import TreepoError

COUNTS = ("restarts", "loop_failures", "hangs")


def _supervisor(n: int = 2, hang_timeout_s: float = 60.0, finished: bool = False):
    gens = [FakeGenerator(g) for g in range(n)]
    rt, dispatcher, counts, rejoins = FakeRay(), FakeDispatcher(finished), dict.fromkeys(COUNTS, 0), []
    sup = GeneratorSupervisor(
        gens, dispatcher, counts, hang_timeout_s, on_rejoin=lambda: rejoins.append(1), rt=rt
    )
    sup.start_loops()
    return sup, gens, rt, dispatcher, counts, rejoins


def test_a_generator_whose_loop_raises_is_restarted_and_its_loop_resumed(capsys):
    sup, gens, rt, _, counts, rejoins = _supervisor()
    gens[0].loop_raises(RuntimeError("Traceback ...\nEngineDeadError: engine core died"))
    old_pid = gens[0].pid_value
    sup.watch()
    assert rt.killed == [gens[0]] and gens[0].pid_value != old_pid  # Ray restarts it: a fresh engine
    assert counts == {"restarts": 1, "loop_failures": 1, "hangs": 0}
    assert [m.gid for m in sup.members()] == [1]  # out of the sync group until it is back
    assert "its loop failed: EngineDeadError: engine core died" in capsys.readouterr().out
    sup.watch()  # the new process answers: it gets the current weights, then its loop runs again
    assert rejoins == [1] and len(gens[0].run.calls) == 2 and len(gens[1].run.calls) == 1
    assert [(m.gid, m.incarnation) for m in sup.members()] == [(0, 1), (1, 0)]
    assert "generator 0 restarted (1x), loop resumed" in capsys.readouterr().out


def test_a_silent_loop_is_restarted_and_a_busy_one_is_not():
    sup, gens, rt, _, counts, rejoins = _supervisor(hang_timeout_s=30.0)
    gens[0].silent, gens[1].silent = 31.0, 29.0
    sup.watch()
    assert rt.killed == [gens[0]] and counts["hangs"] == 1 and counts["restarts"] == 1
    sup.watch()  # the restarted one rejoins; the busy one is left alone
    assert rejoins == [1] and counts["hangs"] == 1 and rt.killed == [gens[0]]


def test_a_heartbeat_that_times_out_counts_as_a_hang():
    sup, gens, rt, _, counts, _ = _supervisor(n=1)
    gens[0].heartbeat.fn = lambda: Ref(error=GetTimeoutError("no answer"))
    sup.watch()
    assert rt.killed == [gens[0]] and counts["hangs"] == 1


def test_a_generator_that_died_waits_for_its_restart_then_rejoins():
    sup, gens, rt, dispatcher, counts, rejoins = _supervisor()
    gens[1].dies()
    sup.watch()
    assert counts["restarts"] == 1 and rt.killed == [] and [m.gid for m in sup.members()] == [0]
    sup.watch()  # Ray is still restarting it: nothing happens
    assert rejoins == [] and len(gens[1].run.calls) == 1 and dispatcher.requeued == []
    gens[1].back()
    sup.watch()
    assert rejoins == [1] and len(gens[1].run.calls) == 2 and counts["restarts"] == 1


def test_a_generator_unavailable_while_it_restarts_is_asked_again():
    sup, gens, _, dispatcher, _, rejoins = _supervisor(n=1)
    gens[0].unavailable = True
    gens[0].dies()
    sup.watch()
    sup.watch()  # ActorUnavailableError: not given up, asked again
    assert len(gens[0].ready.calls) == 2 and dispatcher.requeued == [] and rejoins == []
    gens[0].unavailable = False
    sup.watch()  # the new ask waits for the new process
    gens[0].back()
    sup.watch()
    assert rejoins == [1] and len(gens[0].run.calls) == 2


def test_a_dead_for_good_generator_gives_its_prompts_to_the_others_and_all_dead_raises():
    sup, gens, _, dispatcher, _, rejoins = _supervisor()
    gens[0].dies("dead")
    sup.watch()  # its loop failed with its actor: wait for the restart
    sup.watch()  # Ray gave up on it
    assert dispatcher.requeued == [0] and rejoins == []
    assert [m.gid for m in sup.members()] == [1] and sup.looping() == [gens[1]]
    gens[1].dies("dead")
    sup.watch()
    with pytest.raises(TreepoError, match="every generator is dead \\(generator 1"):
        sup.watch()
    assert dispatcher.requeued == [0, 1]


def test_all_dead_is_no_error_once_the_data_is_finished():
    sup, gens, _, dispatcher, _, _ = _supervisor(n=1, finished=True)
    gens[0].dies("dead")
    sup.watch()
    sup.watch()
    assert dispatcher.requeued == [0] and sup.members() == []


def test_a_loop_that_returns_is_done_and_not_restarted():
    sup, gens, rt, _, counts, _ = _supervisor()
    gens[0].loop_returns()
    sup.watch()
    assert sup.looping() == [gens[1]] and rt.killed == [] and counts["restarts"] == 0
    assert [g for g, _h in sup.reachable()] == [0, 1]  # its engine still evaluates
    assert [m.gid for m in sup.members()] == [0, 1]  # and still receives weights


def test_finished_loops_run_again_when_prompts_come_back(capsys):
    """The data ran out (every loop returned), then a stale tree's prompt is re-issued: the finished
    generators loop again to take it; nothing restarts."""
    sup, gens, rt, dispatcher, counts, _ = _supervisor()
    gens[0].loop_returns()
    gens[1].loop_returns()
    sup.watch()
    assert sup.looping() == [] and all(len(g.run.calls) == 1 for g in gens)
    dispatcher.is_exhausted = False  # a prompt back on the retry list
    sup.watch()
    assert sup.looping() == gens and all(len(g.run.calls) == 2 for g in gens)
    assert rt.killed == [] and counts["restarts"] == 0
    assert "generator(s) [0, 1] loop again" in capsys.readouterr().out
    sup.watch()  # looping: not started twice
    assert all(len(g.run.calls) == 2 for g in gens)


def test_an_unreachable_generator_leaves_until_its_restart():
    sup, gens, _, _, counts, rejoins = _supervisor()
    gens[1].state = "restarting"
    sup.unreachable(1)
    assert [m.gid for m in sup.members()] == [0] and counts["restarts"] == 1
    gens[1].back()
    sup.watch()
    assert rejoins == [1] and len(gens[1].run.calls) == 2


def test_failure_reason_is_the_last_line():
    assert failure_reason(RuntimeError("a\nb\nValueError: x\n")) == "ValueError: x"
    assert failure_reason(RuntimeError("y" * 500)) == "y" * 400
    assert failure_reason(RuntimeError("")) == "RuntimeError"
