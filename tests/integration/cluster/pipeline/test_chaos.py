"""The pipeline under faults: real Ray (two ``ray start`` nodes, the driver in this process), a
restartable embedded Redis, vLLM CPU engines in generator actors, the learner in its actor. Failures
are injected (generator actor kills, one-shot fault files the generator's loop reads:
``TREEPO_FAULT_DIR``, Redis restarts, poison entries, the generator node stopped and a new one
started, controller crashes raised from patched controller methods); everything else is the real code.

- ``test_generator_loop_failure_and_hang_restart_the_generator``: a generator whose loop raises while
  its actor lives, then one whose loop hangs, is restarted; its prompts are re-issued; the data ends.
- ``test_crash_between_checkpoint_and_ack_trains_nothing_twice``: the controller dies after a
  checkpoint is published and before its entries are acknowledged; the resume trains each prompt once.
- ``test_chaos``: the small pipeline runs to the end of its data while a seeded schedule injects, at
  random steps, every fault above plus a short and a long Redis restart, poison entries of every
  kind and the loss of the generator node (a new node joins seconds later: its generator comes
  back), then kills the controller and resumes with one generator fewer and a small
  ``algo.max_staleness`` (the stale resume: re-delivered trees of lost weights are dropped and their
  prompts re-issued), and kills and resumes once more. At the end, from the audit trail and the
  queue: every prompt trained exactly once, the poison in the dead-letter stream with its reason,
  nothing pending or in flight, the stream trimmed. It prints one line "F faults, P prompts, 0 lost,
  0 trained twice". ``TREEPO_CHAOS_SEEDS=0,1,2`` runs several seeds (default: seed 0).
"""

from __future__ import annotations

import os
import random
import re
import threading
import time

import pytest
from pipeline_runs import audit_rows, finish, metrics_rows, run_in_thread, trained_prompts, wait_for_step
from poison import poison_entries
from ray_nodes import RayNode, connected, small_pipeline_overrides

from common.config import load_config

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.slow]
PW_ENV = "TREEPO_TEST_CHAOS_REDIS_PASSWORD"
GENERATOR_NODE = {"generator_slot": 1}  # one generator per node: the learner's node holds the other
SEEDS = [int(s) for s in os.environ.get("TREEPO_CHAOS_SEEDS", "0").split(",") if s.strip()]


@pytest.fixture(scope="module")
def ray_chaos():
    """Two Ray nodes for the module, this process connected: the head (the learner and a generator)
    and a generator node (one generator), which the node-loss fault stops and replaces; every node
    started is stopped at the end (the list the fault appends to)."""
    pytest.importorskip("vllm")
    nodes = [RayNode(num_cpus=2, resources={"learner_node": 1, "generator_slot": 1})]
    try:
        nodes.append(RayNode(num_cpus=1, resources=GENERATOR_NODE, head_address=nodes[0].gcs_address))
        with connected(nodes[0]):
            yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def redis_aof(tmp_path, monkeypatch):
    """A Redis of this test (restarted by it): AOF, appendfsync always."""
    from cluster.pipeline.redis_launcher import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis", appendfsync="always", maxmemory_mb=256).start()
    monkeypatch.setenv(PW_ENV, server.password)
    yield server
    server.stop()


@pytest.fixture
def fault_dir(tmp_path, monkeypatch):
    path = tmp_path / "faults"
    path.mkdir()
    monkeypatch.setenv("TREEPO_FAULT_DIR", str(path))
    return path


def _cfg(run_dir, model_dir, server, *extra):
    return load_config(
        None,
        small_pipeline_overrides(
            run_dir,
            model_dir,
            f"queue.url={server.url}",
            f"queue.password_env={PW_ENV}",
            "checkpoint.every_steps=1",
            "generators.hang_timeout_s=8",
            "generators.ray_resources={generator_slot: 1}",
            "learner.ray_resources={learner_node: 1}",
            *extra,
        ),
    )


def _trained_once(run_dir, n_prompts: int) -> tuple[int, int]:
    """(prompts lost, prompts trained twice) by the audit trail; its steps are 1..N, versions rise."""
    rows = audit_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    versions = [r["version"] for r in rows]
    assert versions == sorted(set(versions)), f"a policy version was reused: {versions}"
    prompts = trained_prompts(rows)
    twice = len(prompts) - len(set(prompts))
    return n_prompts - len(set(prompts)), twice


def _queue_is_clean(server, run_dir, n_prompts: int) -> None:
    """Nothing pending, undelivered or in flight; every prompt handed out; the stream trimmed."""
    from common.keys import RunKeys, run_name_for
    from common.replay import ReplayQueue

    q = ReplayQueue(server.url, run_name_for(run_dir), password=server.password)
    keys = RunKeys(q.run_name)
    try:
        assert q.pending() == [] and q.undelivered() == 0
        assert q.redis.xlen(q.keys["trees"]) == 0, "acknowledged entries were not trimmed"
        inflight = list(q.redis.scan_iter(match=keys.prompts_inflight("*")))  # KEYS is not the queue user's
        assert all(q.redis.hlen(k) == 0 for k in inflight), "a prompt is still in flight"
        assert q.redis.llen(keys.prompts_retry) == 0
        assert int(q.redis.get(keys.prompts_cursor)) == n_prompts
    finally:
        q.close()


def test_generator_loop_failure_and_hang_restart_the_generator(
    tmp_path, tiny_model_dir, ray_chaos, redis_aof, fault_dir
):
    """Hole 2: the loop raises at its first step (the actor lives), later it hangs; each time the
    controller restarts the generator, its prompts are re-issued, and the data ends without a stall."""
    from cluster.pipeline.controller import run_pipeline

    run = tmp_path / "run"
    (fault_dir / "loop_error-0").touch()
    th, result = run_in_thread(
        run_pipeline,
        _cfg(run, tiny_model_dir, redis_aof, "learner.total_steps=4", "data.synthetic_train_size=8"),
    )
    wait_for_step(run, 1, th)
    (fault_dir / "hang-0").touch()
    finish(th, result)
    lost, twice = _trained_once(run, 8)
    assert (lost, twice) == (0, 0)
    m = metrics_rows(run)[-1]
    assert m["pipeline/loop_failures"] >= 1 and m["pipeline/hangs"] >= 1, m
    assert not list(fault_dir.iterdir()), "a fault was not injected"
    _queue_is_clean(redis_aof, run, 8)


def test_crash_between_checkpoint_and_ack_trains_nothing_twice(
    tmp_path, tiny_model_dir, ray_chaos, redis_aof, monkeypatch
):
    """Hole 3: the controller dies after step 2's checkpoint is published and before its entries are
    acknowledged; the resume acknowledges them from the checkpoint instead of training them again."""
    from cluster.pipeline.controller import Controller, run_pipeline

    run = tmp_path / "run"
    original = Controller.checkpoint

    def dies_before_ack(self):
        if self.step == 2:

            def ack(ids):
                raise RuntimeError("injected crash between the checkpoint and its acknowledgement")

            self.queue.ack = ack
        return original(self)

    monkeypatch.setattr(Controller, "checkpoint", dies_before_ack)
    with pytest.raises(RuntimeError, match="between the checkpoint and its acknowledgement"):
        run_pipeline(
            _cfg(run, tiny_model_dir, redis_aof, "learner.total_steps=4", "data.synthetic_train_size=8")
        )
    monkeypatch.setattr(Controller, "checkpoint", original)
    assert (
        run_pipeline(
            _cfg(
                run,
                tiny_model_dir,
                redis_aof,
                "learner.total_steps=4",
                "data.synthetic_train_size=8",
                "resume=true",
            )
        )
        == 0
    )
    assert _trained_once(run, 8) == (0, 0)
    _queue_is_clean(redis_aof, run, 8)


# ------------------------------------------------------------------ the chaos test

N_PROMPTS = 20  # 10 steps of 2


def _node_of(handle) -> str:
    """The id of the node an actor runs on (the GCS's actor table)."""
    from ray._private import state

    return state.actors(actor_id=handle._actor_id.hex())["Address"]["NodeID"]


def _watch_until(c, done, what: str, timeout_s: float = 240.0) -> None:
    """What an idle collect does, until ``done()``: watch the generators."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, what
        c.generators.watch()
        time.sleep(0.5)


class Chaos:
    """A seeded schedule of faults, fired from the controller's per-step hook (``Controller.log``)."""

    def __init__(self, seed: int, server, fault_dir, run_dir, nodes) -> None:
        self.rng = random.Random(seed)
        self.server, self.fault_dir, self.run_dir, self.nodes = server, fault_dir, run_dir, nodes
        self.kill_step = self.rng.randint(5, 7)
        self.kill_mode = self.rng.choice(["in_learn", "before_save", "after_save"])
        self.resume_staleness = self.rng.choice([0, 1])  # the stale resume's algo.max_staleness
        kinds = ["gen_kill", "loop_error", "hang", "redis_restart", "redis_outage", "poison", "node_loss"]
        self.schedule = {k: self.rng.randint(1, self.kill_step - 1) for k in kinds}
        self.fired: list[str] = []
        self.lost_gid, self.returned = -1, False  # the generator of the stopped node; taken back
        self.threads: list[threading.Thread] = []
        self.poisoned: list = []
        from cluster.pipeline.controller import Controller

        self.originals = (Controller.learn, Controller.checkpoint, Controller.log)

    def fire(self, controller) -> None:
        for kind, step in sorted(self.schedule.items()):
            if step == controller.step and kind not in self.fired:
                self.fired.append(kind)
                getattr(self, kind)(controller)
        if "node_loss" in self.fired and not self.returned and controller.step >= self.kill_step - 1:
            self.node_return(controller)  # before the controller kill, which takes every actor

    def gen_kill(self, c) -> None:
        from cluster.pipeline.topology import generator_name

        ray.kill(ray.get_actor(generator_name(c.run_name, self.rng.randrange(2))), no_restart=False)

    def loop_error(self, c) -> None:
        (self.fault_dir / f"loop_error-{self.rng.randrange(2)}").touch()

    def hang(self, c) -> None:
        (self.fault_dir / f"hang-{self.rng.randrange(2)}").touch()

    def _in_background(self, fn) -> None:
        th = threading.Thread(target=fn, daemon=True)
        th.start()
        self.threads.append(th)

    def redis_restart(self, c) -> None:
        self._in_background(self.server.restart)

    def redis_outage(self, c) -> None:
        def outage():  # longer than the ~10 s a client's retries used to span
            self.server.stop()
            time.sleep(12)
            self.server.start()

        self._in_background(outage)

    def node_loss(self, c) -> None:
        """The generator node goes away (its process group killed, as a spot preemption does); the run
        goes on with the head's generator until :meth:`node_return`."""
        head_node = _node_of(c.topo.learners[0])  # the learner_node
        # where each generator last ran (a restarting actor's own record names where Ray offers it next)
        remote = [g for g, slot in enumerate(c.generators.slots) if slot.node != head_node]
        assert len(remote) == 1, f"one generator on the generator node, not {remote}"
        self.lost_gid = remote[0]
        self.nodes.pop().stop()

    def node_return(self, c) -> None:
        """Once the run found the generator lost, a node with the same resources joins; the run waits,
        watching its generators as an idle collect does, until it took that generator back."""
        self.settle()  # a Redis outage in progress ends first: taking the generator back publishes
        slot = c.generators.slots[self.lost_gid]
        _watch_until(c, lambda: slot.lost, "the generator of the stopped node was not found lost")
        self.nodes.append(
            RayNode(num_cpus=1, resources=GENERATOR_NODE, head_address=self.nodes[0].gcs_address)
        )
        _watch_until(c, lambda: slot.running, "the lost generator did not come back")
        self.returned = True

    def poison(self, c) -> None:
        from common.replay import FIELD_SCHEMA, FIELD_TREE, SCHEMA_VERSION, connect

        lim = c.consumer.limits
        self.poisoned = poison_entries(
            lim.vocab_size, lim.max_prompt_tokens, lim.max_response_tokens, lim.leaves
        )
        client = connect(self.server.url, self.server.password)
        for _, data, _ in self.poisoned:
            client.xadd(c.queue.keys["trees"], {FIELD_TREE: data, FIELD_SCHEMA: SCHEMA_VERSION})
        client.close()

    def settle(self) -> None:
        for th in self.threads:
            th.join(timeout=120)
        self.threads = []


def _install(monkeypatch, chaos: Chaos, kill_step: int | None, kill_mode: str) -> None:
    """The per-step hook and the controller kill of one phase (None: no kill)."""
    from cluster.pipeline.controller import Controller

    learn, checkpoint, log = chaos.originals  # the real methods, not the previous phase's hooks

    def killed(where: str):
        return RuntimeError(f"injected controller kill {where}")

    def learn_hook(self, trees):
        out = learn(self, trees)
        if kill_mode == "in_learn" and self.step + 1 == kill_step:
            raise killed("after a learner step")
        return out

    def checkpoint_hook(self):
        if self.step == kill_step and kill_mode == "before_save":
            raise killed("before the checkpoint")
        if self.step == kill_step and kill_mode == "after_save":

            def ack(ids):
                raise killed("between the checkpoint and its acknowledgement")

            self.queue.ack = ack
        return checkpoint(self)

    def log_hook(self, m, trees):
        log(self, m, trees)
        chaos.fire(self)

    monkeypatch.setattr(Controller, "learn", learn_hook)
    monkeypatch.setattr(Controller, "checkpoint", checkpoint_hook)
    monkeypatch.setattr(Controller, "log", log_hook)


@pytest.mark.parametrize("seed", SEEDS)
def test_chaos(seed, tmp_path, tiny_model_dir, ray_chaos, redis_aof, fault_dir, monkeypatch, capsys):
    from cluster.pipeline.controller import run_pipeline

    run = tmp_path / "run"
    chaos = Chaos(seed, redis_aof, fault_dir, run, ray_chaos)
    base = ("learner.total_steps=100", f"data.synthetic_train_size={N_PROMPTS}")
    phases = [  # (generators, kill step, kill mode, algo.max_staleness)
        (2, chaos.kill_step, chaos.kill_mode, 1000),
        (
            1,
            chaos.kill_step + chaos.rng.randint(1, 2),
            chaos.rng.choice(["in_learn", "after_save"]),
            chaos.resume_staleness,  # the stale resume
        ),
        (2, None, "", 1000),
    ]
    kills, console = 0, []
    for i, (gens, kill_step, kill_mode, staleness) in enumerate(phases):
        _install(monkeypatch, chaos, kill_step, kill_mode)
        extra = (
            *base,
            f"generators.num={gens}",
            f"algo.max_staleness={staleness}",
            *(["resume=true"] if i else []),
        )
        try:
            rc = run_pipeline(_cfg(run, tiny_model_dir, redis_aof, *extra))
        except RuntimeError as e:
            assert "injected controller kill" in str(e), e
            kills += 1
            chaos.settle()  # a Redis restart in progress ends before the resume
            continue
        finally:
            console.append(capsys.readouterr().out)
            print(console[-1], end="")  # the phase's console, for a failure's report
        assert rc == 0
        break
    chaos.settle()
    assert set(chaos.fired) == set(chaos.schedule), (chaos.fired, chaos.schedule)
    assert chaos.returned, "the node loss was not followed by the generator's return"
    lost, twice = _trained_once(run, N_PROMPTS)
    # a fault file a generator never read (its loop had ended, or it was not in the phase) did nothing
    unread = [p.name for p in fault_dir.iterdir()]
    out = "".join(console)
    # the node loss took a generator with it, which came back; the stale resume said what it re-issued
    assert re.search(r"generator \d lost with its node; going on with \d generator\(s\)", out), out[-3000:]
    assert re.search(r"generator \d is back \(a node with its resources joined\)", out), out[-3000:]
    stale = re.findall(r"(\d+) unacknowledged tree\(s\) re-delivered, (\d+) kept, (\d+) too stale", out)
    assert stale, out[-3000:]
    faults = len(chaos.fired) - len(unread) + kills + 1  # + the stale resume
    print(
        f"chaos seed {seed}: {faults} faults, {N_PROMPTS} prompts, {lost} lost, {twice} trained twice "
        f"(fired {sorted(chaos.fired)}, controller kills {kills}, stale resume with algo.max_staleness="
        f"{chaos.resume_staleness}: re-delivered/kept/re-issued {stale[0]}, unread fault files {unread})",
        flush=True,
    )
    assert (lost, twice) == (0, 0)
    assert kills >= 1
    rows = audit_rows(run)
    assert not any(t.startswith("poison-") for r in rows for t in r["trees"])
    from common.keys import run_name_for
    from common.replay import ReplayQueue

    q = ReplayQueue(redis_aof.url, run_name_for(run), password=redis_aof.password)
    dead = [d["reason"] for d in q.dead_entries(count=100)]
    assert q.dead_count() == len(chaos.poisoned) == len(dead), dead
    for kind, _, reason in chaos.poisoned:
        assert any(re.search(reason, r) for r in dead), (kind, dead)
    q.close()
    _queue_is_clean(redis_aof, run, N_PROMPTS)
