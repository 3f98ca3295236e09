"""Weight publishing driven with fake actors: the group and its ranks, a rebuild only when the
membership changed, one retry after a failed sync (without the generators that no longer answer),
SyncError after a second failure, and a restarted generator rejoining with the current weights."""

from __future__ import annotations

import pytest
from fake_actors import FakeDispatcher, FakeGenerator, FakeLearner, FakeRay, FakeStore
from ray.exceptions import GetTimeoutError, RayActorError

from cluster.pipeline.publishing import WeightPublisher
from cluster.pipeline.supervision import GeneratorSupervisor
from common.errors import SyncError

KEY = "treepo:run:version"


def _pipeline(ranks=(1, 1)):
    """Generators under a supervisor, learner rank 0 and a second rank, and the publisher; the
    supervisor's rejoin publishes the current weights, as the controller wires it."""
    gens = [FakeGenerator(g, r) for g, r in enumerate(ranks)]
    rt, counts, store = (
        FakeRay(),
        dict.fromkeys(("restarts", "loop_failures", "hangs", "sync_failures"), 0),
        FakeStore(),
    )
    learners = [FakeLearner(), FakeLearner()]
    current = {"version": 0}
    sup = GeneratorSupervisor(
        gens, FakeDispatcher(), counts, 60.0, on_rejoin=lambda: pub.rejoin(current["version"]), rt=rt
    )
    pub = WeightPublisher(learners, sup, counts, 30.0, store, KEY, rt=rt)
    sup.start_loops()
    return pub, sup, gens, learners, counts, store, current


def test_a_publish_builds_the_group_and_every_member_receives():
    pub, _, gens, learners, _, store, _ = _pipeline(ranks=(2, 1))
    pub.publish(version=3, step=5)
    assert learners[0].worlds == [4]  # rank 0 + 2 engine workers + 1
    assert [rank for _info, rank in gens[0].joined] == [1] and [rank for _i, rank in gens[1].joined] == [3]
    assert gens[0].joined[0][0] == {"generation": 1, "world_size": 4}
    assert gens[0].received == [5] == gens[1].received
    assert len(learners[1].sync_send.calls) == 1  # every rank drives the parameter stream
    assert pub.published == (3, 5) and store[KEY] == 3 and pub.newest_published() == 3
    assert pub.stats == {"sync/bucket_count": 1.0}


def test_the_group_is_rebuilt_only_when_its_membership_changed():
    pub, sup, gens, learners, _, _, _ = _pipeline()
    pub.publish(1, 1)
    pub.publish(2, 2)
    assert learners[0].worlds == [3] and len(gens[0].joined) == 1  # same members: same group
    gens[1].dies()
    sup.watch()  # generator 1 is restarting: it leaves
    pub.publish(3, 3)
    assert learners[0].worlds == [3, 2] and len(gens[0].joined) == 2
    assert gens[0].received == [1, 2, 3] and gens[1].received == [1, 2]


def test_a_restarted_generator_rejoins_with_the_current_weights():
    pub, sup, gens, learners, counts, _, current = _pipeline()
    pub.publish(1, 1)
    gens[0].loop_raises(RuntimeError("engine core died"))
    sup.watch()  # killed for Ray to restart: it leaves the group
    current["version"] = 2  # the learner stepped on meanwhile (no publish due yet)
    sup.watch()  # the new process answers: the group is rebuilt with it and everyone gets version 2
    assert learners[0].worlds == [3, 3] and len(gens[0].joined) == 2 and len(gens[1].joined) == 2
    assert gens[0].received == [1, 1] and gens[1].received == [1, 1]  # the last publish's step
    assert pub.published == (2, 1) and counts["restarts"] == 1
    assert len(gens[0].run.calls) == 2  # its loop runs again after it has the weights


def test_nothing_is_sent_to_a_rejoining_generator_before_the_first_publish():
    pub, sup, gens, learners, _, _, _ = _pipeline()
    gens[0].loop_raises(RuntimeError("engine core died"))
    sup.watch()
    sup.watch()
    assert learners[0].worlds == [] and pub.published is None and len(gens[0].run.calls) == 2


def test_a_failed_sync_rebuilds_the_group_and_retries_once(capsys):
    pub, _, gens, learners, counts, store, _ = _pipeline()
    gens[1].receive_errors = [GetTimeoutError("receive timed out")]
    pub.publish(1, 4)
    assert counts["sync_failures"] == 1 and learners[0].worlds == [3, 3]  # a new group, same members
    assert gens[0].received == [4, 4] and gens[1].received == [4]  # the first attempt reached one
    assert pub.published == (1, 4) and store[KEY] == 1
    assert "weight sync failed (receive timed out); rebuilding the group" in capsys.readouterr().out


def test_a_generator_that_died_mid_sync_leaves_and_the_rest_receive():
    pub, sup, gens, learners, counts, _, _ = _pipeline()
    gens[1].receive_errors = [RayActorError()]  # it dies while it receives
    gens[1].unavailable = True  # and does not answer the reachability check while Ray restarts it
    pub.publish(1, 1)
    assert learners[0].worlds == [3, 2] and gens[0].received == [1, 1] and gens[1].received == []
    assert counts == {"restarts": 1, "loop_failures": 0, "hangs": 0, "sync_failures": 1}
    assert [m.gid for m in sup.members()] == [0]
    gens[1].unavailable = False
    sup.watch()  # still restarting: asked again
    gens[1].back()
    sup.watch()  # back: rejoins with the current weights
    assert learners[0].worlds == [3, 2, 3] and gens[1].received == [1]


def test_a_second_failure_raises_sync_error():
    pub, _, gens, learners, counts, store, _ = _pipeline()
    learners[0].send_errors = [GetTimeoutError("stuck"), GetTimeoutError("still stuck")]
    with pytest.raises(SyncError, match=r"version 7 failed twice \(sync.timeout_s=30\): still stuck"):
        pub.publish(7, 2)
    assert counts["sync_failures"] == 2 and pub.published is None and KEY not in store
    assert pub.group is None  # the next publish builds a new group
    assert gens[0].received == [2, 2]  # both attempts reached the receivers


def test_no_member_means_nothing_to_send():
    pub, sup, gens, learners, _, store, _ = _pipeline(ranks=(1,))
    gens[0].dies()
    sup.watch()
    assert pub.publish(1, 1) >= 0 and learners[0].worlds == [] and pub.stats == {}
    assert pub.published == (1, 1) and store[KEY] == 1
