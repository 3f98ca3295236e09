"""A generator node lost mid-run and one with its resources joining again: two real Ray nodes
(``ray start`` processes, :class:`ray_nodes.RayNode`), the session's Redis, vLLM CPU engines in the
generator actors, the real learner rank; the driver runs in this process, connected to the head.

The head holds the learner (``learner_node``) and one generator, the other node the second generator
(``generator_slot``: one per node). After step 2 the second node is stopped (its process group killed,
as a spot preemption does): its generator is lost with its node, Ray keeps its restart pending for
want of a ``generator_slot``, and the run goes on with the head's generator, which takes the lost
one's prompts. After step 4 a new node with a ``generator_slot`` joins: Ray restarts the generator
there, and the supervisor takes it back with the current weights. At the end, counted from
``trained_trees.jsonl`` and the queue, every prompt was trained exactly once (dynamic sampling is
off, so none may end untrained) and none is left anywhere in the queue.
"""

from __future__ import annotations

import time

import pytest
from pipeline_runs import assert_queue_drained, audit_rows, trained_prompts
from ray_nodes import RayNode, connected, small_pipeline_overrides

from common.config import load_config

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.slow]
PW_ENV = "TREEPO_TEST_NODE_LOSS_REDIS_PASSWORD"
# 32 steps of 2. While the returned generator's engine starts, the head's generator goes on sampling
# (up to the admission bound ahead of the learner) and may take every prompt left; the returned one must
# find prompts to show that it samples again, from the weights it was given, so there must be plenty.
N_PROMPTS = 64
STOP_AFTER, JOIN_AFTER = 2, 4  # steps
REJOIN_TIMEOUT_S = 240.0


@pytest.fixture
def two_nodes():
    """A head (learner + one generator) and a worker node (one generator), this process connected;
    every node this test started is stopped at the end, a replacement node included."""
    pytest.importorskip("vllm")
    nodes = [RayNode(num_cpus=2, resources={"learner_node": 1, "generator_slot": 1})]
    try:
        nodes.append(RayNode(num_cpus=1, resources={"generator_slot": 1}, head_address=nodes[0].gcs_address))
        with connected(nodes[0]):
            yield nodes
    finally:
        for node in nodes:
            node.stop()


def _node_of(handle) -> str:
    from ray._private import state

    return state.actors(actor_id=handle._actor_id.hex())["Address"]["NodeID"]


def test_a_lost_generator_node_and_its_return_lose_no_prompt(
    tmp_path, tiny_model_dir, two_nodes, redis_server, monkeypatch, capsys
):
    from cluster.pipeline.controller import Controller, run_pipeline

    monkeypatch.setenv(PW_ENV, redis_server.password)
    run = tmp_path / "run"
    cfg = load_config(
        None,
        small_pipeline_overrides(
            run,
            tiny_model_dir,
            f"queue.url={redis_server.url}",
            f"queue.password_env={PW_ENV}",
            f"data.synthetic_train_size={N_PROMPTS}",
            "generators.num=2",
            "generators.ray_resources={generator_slot: 1}",
            "learner.ray_resources={learner_node: 1}",
            "algo.max_staleness=4",
            "checkpoint.every_steps=4",
            "learner.total_steps=100",
            "sync.timeout_s=60",
        ),
    )
    head = two_nodes[0]
    seen: dict = {"trees": []}  # (step, generator id, oldest segment version) of every trained tree
    learn, log = Controller.learn, Controller.log

    def learn_hook(self, trees):
        seen["trees"] += [(self.step + 1, t.generator_id, min(s.version for s in t.segments)) for t in trees]
        return learn(self, trees)

    def watch_until(self, done, what: str) -> None:
        """What an idle collect does, until ``done()``: watch the generators."""
        deadline = time.monotonic() + REJOIN_TIMEOUT_S
        while not done():
            assert time.monotonic() < deadline, what
            self.generators.watch()
            time.sleep(0.5)

    def log_hook(self, m, trees):
        log(self, m, trees)
        if self.step == STOP_AFTER:  # the node of the generator that is not on the head goes away
            head_node = _node_of(self.topo.learners[0])  # the learner_node
            remote = [g for g, h in enumerate(self.topo.generators) if _node_of(h) != head_node]
            assert len(remote) == 1, remote
            seen["lost"] = remote[0]
            two_nodes[1].stop()
        elif self.step == JOIN_AFTER:  # a node with a generator_slot joins; the run takes its generator back
            slot = self.generators.slots[seen["lost"]]
            watch_until(self, lambda: slot.lost, "the generator of the stopped node was not found lost")
            two_nodes.append(
                RayNode(num_cpus=1, resources={"generator_slot": 1}, head_address=head.gcs_address)
            )
            watch_until(self, lambda: slot.running, "the lost generator did not come back")
            seen["back"] = (self.step, self.publisher.published[0] if self.publisher.published else 0)

    monkeypatch.setattr(Controller, "learn", learn_hook)
    monkeypatch.setattr(Controller, "log", log_hook)
    t0 = time.time()
    assert run_pipeline(cfg) == 0
    out = capsys.readouterr().out
    lost = seen["lost"]
    assert f"generator {lost} lost with its node; going on with 1 generator(s), its " in out, out[-3000:]
    assert f"generator {lost} is back (a node with its resources joined); going on with 2 generator(s)" in out

    # the returned generator generated again, from the weights it was given when it came back
    back_step, back_version = seen["back"]
    after = [v for step, g, v in seen["trees"] if g == lost and step > back_step]
    assert after, f"generator {lost} trained nothing after it came back: {seen['trees']}"
    # a fresh engine's trees would be of version 0: it got the weights published before it came back
    assert back_version > 0 and max(after) >= back_version, (after, back_version, seen["trees"])

    rows = audit_rows(run)
    prompts = trained_prompts(rows)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert sorted(prompts) == sorted(set(prompts)), "a prompt was trained twice"
    assert len(set(prompts)) == N_PROMPTS, "a prompt was lost"
    assert_queue_drained(run, redis_server, N_PROMPTS)
    print(
        f"[node loss] {N_PROMPTS} prompts, 0 lost, 0 trained twice; generator {lost} back at step "
        f"{back_step}; {time.time() - t0:.1f} s"
    )
