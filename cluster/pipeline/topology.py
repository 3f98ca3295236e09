"""Topology: the ONLY module that applies ``ray.remote``, ``.options`` and placement groups.

- Learner ranks: ``learner.num_workers`` actors of :class:`LearnerHost` (a thin shell over
  :class:`learner.rank.LearnerRank`), each ``{CPU: 1, GPU: learner.gpus_per_worker}`` plus
  ``learner.ray_resources``, in ONE
  placement group packed onto as few nodes as possible (the ranks talk over NCCL/gloo every step).
  Rank 0 picks the rendezvous address (its node IP, a free port); all ranks then join.
- Generators: ``generators.num`` actors of :class:`actors.generator.Generator`, each
  ``{CPU: 1, GPU: generators.gpus_per_engine}`` plus ``generators.ray_resources`` (the GPUs are the engine's tensor-parallel group),
  with ``max_restarts`` so Ray restarts a dead one; they are threaded actors (one thread runs the
  generation loop, the others answer weight offers, stats and stop calls). Generators are not in
  the placement group: a restarted one may land on any node with room. One whose node is gone
  waits in Ray's restart until a node with its resources joins (:func:`generator_state` tells it
  from one restarting on a live node and one out of restarts; :mod:`cluster.pipeline.supervision` goes
  on without it meanwhile).
- CPU engines run vLLM in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set): one process per
  generator, a start-up of seconds instead of tens of seconds.

Every wait for an actor to come up has a timeout and names the resources it needed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.generator import Generator
from common.config import TrainConfig
from common.errors import ConfigError
from common.replay import SecretFile

GENERATOR_MAX_RESTARTS = 8  # a generator that dies this often is broken, not unlucky
GENERATOR_CONCURRENCY = 4  # the run loop + weight offers + stats + stop


class LearnerHost:
    """One learner rank as an actor: trees arrive as encoded wire bytes (no pickled trees); rank 0
    sends weights over the weight-sync group (:mod:`common.weight_sync`), not through Ray."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int) -> None:
        self.cfg, self.rank, self.world_size = cfg, int(rank), int(world_size)
        self.learner = None
        self.sender = None  # common.weight_sync.WeightSender on rank 0, once the controller opens the group

    def address(self) -> str:
        """A rendezvous address on this node (rank 0 calls it)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def setup(self, init_method: str | None) -> int:
        import torch

        from learner.rank import LearnerRank

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        cfg = self.cfg
        self.learner = LearnerRank(
            cfg.model,
            cfg.algo,
            cfg.learner,
            rank=self.rank,
            world_size=self.world_size,
            init_method=init_method,
            seed=cfg.seed,
            temperature=cfg.sampling.temperature,
        )
        return int(self.learner.version)

    def load(self, root: str) -> dict | None:
        return self.learner.load(root, required=True)

    def version(self) -> int:
        return int(self.learner.version)

    def set_version(self, version: int) -> int:
        """Number the current weights ``version`` (a resume continues past every published version)."""
        self.learner.version = int(version)
        return int(self.learner.version)

    def train_step(self, encoded_trees: list[bytes], advantages_P_L: list[np.ndarray]) -> dict[str, float]:
        from common.tree import decode_tree

        trees = [decode_tree(b) for b in encoded_trees]
        out = self.learner.train_step(trees, advantages_P_L)
        delay = float(os.environ.get("TREEPO_BENCH_TRAIN_DELAY_S", "0") or 0)
        if delay > 0:  # `treepo bench pipeline`'s synthetic workload: a training step of known cost
            time.sleep(delay)
        return out

    def sync_open(self, world_size: int) -> dict | None:
        """Rank 0: open (or rebuild, on a new port) the weight-sync group of ``world_size`` ranks
        (this rank + one per generator engine); returns the group info the generators join with."""
        if self.rank != 0:
            return None
        from common.weight_sync import WeightSender

        if self.sender is None:
            host = ray.util.get_node_ip_address()
            self.sender = WeightSender.from_config(self.cfg.sync, host, 0, world_size)
            return self.sender.info.to_dict()
        return self.sender.rebuild(port=0, world_size=world_size).to_dict()

    def sync_send(self) -> dict[str, float]:
        """Broadcast the current weights (rank 0) as the current policy version. Every rank drives the
        (collective, under FSDP) parameter iterator; only rank 0 sends, pulling it bucket by bucket
        against the learner's spec (never the whole model at once)."""
        stream = self.learner.weights_for_sync()
        if self.rank != 0:
            for _ in stream:
                pass
            return {}
        try:
            spec = self.learner.weights_spec()
            return self.sender.send(stream, int(self.learner.version), spec=spec).as_metrics()
        finally:  # a failed sync stops pulling: gather the rest, or the other ranks wait in a gather
            for _ in stream:
                pass

    def save(self, root: str, extra: dict, step: int, keep_last: int) -> str | None:
        path = self.learner.save(root, extra=extra, step=step, keep_last=keep_last)
        return str(path) if path is not None else None

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        if self.learner is not None:
            self.learner.close()


@dataclass
class Topology:
    """Handles of a running pipeline's actors."""

    learners: list[Any]
    generators: list[Any]
    placement_group: Any = None
    generator_args: list[tuple] = field(default_factory=list)
    queue_secret: SecretFile | None = None  # the password file the generators read; removed at shutdown


# Passed from the driver's environment to every actor: the model cache, offline mode, and the
# test/benchmark knobs (failure injection, synthetic delays of ``treepo bench pipeline``).
PASSTHROUGH_ENV = (
    "TREEPO_CACHE",
    "HF_HUB_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "TREEPO_FAULTS",
    "TREEPO_FAULT_DIR",
    "TREEPO_BENCH_GEN_DELAY_S",
    "TREEPO_BENCH_TRAIN_DELAY_S",
)


def _actor_env() -> dict[str, str]:
    return {key: os.environ[key] for key in PASSTHROUGH_ENV if key in os.environ}


def _generator_env(cfg: TrainConfig) -> dict[str, str]:
    env = _actor_env()
    if cfg.generators.gpus_per_engine == 0:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env


def _check_resources(cfg: TrainConfig) -> None:
    need_cpu = cfg.learner.num_workers + cfg.generators.num
    need_gpu = (
        cfg.learner.num_workers * cfg.learner.gpus_per_worker
        + cfg.generators.num * cfg.generators.gpus_per_engine
    )
    have = ray.cluster_resources()
    for key, section, count in (
        ("generators", cfg.generators.ray_resources, cfg.generators.num),
        ("learner", cfg.learner.ray_resources, cfg.learner.num_workers),
    ):
        for name, amount in section.items():
            if have.get(name, 0) < amount * count:
                raise ConfigError(
                    f"{key}.ray_resources asks for {amount:g} {name!r} x {count} but the Ray cluster has "
                    f"{have.get(name, 0):g}: start nodes with `ray start --resources='{{\"{name}\": N}}'` "
                    f"or remove {key}.ray_resources.{name}"
                )
    if have.get("CPU", 0) < need_cpu or have.get("GPU", 0) < need_gpu:
        raise ConfigError(
            f"the pipeline needs {need_cpu} CPUs and {need_gpu} GPUs (learner.num_workers="
            f"{cfg.learner.num_workers} x {cfg.learner.gpus_per_worker} GPU, generators.num={cfg.generators.num} "
            f"x {cfg.generators.gpus_per_engine} GPU, 1 CPU each) but the Ray cluster has "
            f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs: lower the counts or add nodes"
        )


def start_learners(cfg: TrainConfig, timeout_s: float | None = None) -> tuple[list[Any], Any]:
    """Create and set up the learner ranks in one placement group; returns (handles, placement group).
    Every wait is bounded by ``timeout_s`` (default ``generators.start_timeout_s``)."""
    timeout_s = cfg.generators.start_timeout_s if timeout_s is None else timeout_s
    n, gpus = cfg.learner.num_workers, cfg.learner.gpus_per_worker
    bundle: dict[str, float] = {"CPU": 1, **cfg.learner.ray_resources}
    if gpus:
        bundle["GPU"] = gpus
    pg = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise ConfigError(
            f"no room for {n} learner rank(s) of {bundle} within {timeout_s:.0f} s: free resources, lower "
            "learner.num_workers / learner.gpus_per_worker, or raise generators.start_timeout_s"
        )
    cls = ray.remote(LearnerHost)
    handles = [
        cls.options(
            num_cpus=1,
            num_gpus=gpus,
            resources=dict(cfg.learner.ray_resources),
            runtime_env={"env_vars": _actor_env()},
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
        ).remote(cfg, r, n)
        for r in range(n)
    ]
    # FSDP2 needs a process group also for one rank (a mesh of one; nothing else to shard over)
    grouped = n > 1 or cfg.learner.fsdp
    init_method = ray.get(handles[0].address.remote(), timeout=timeout_s) if grouped else None
    ray.get([h.setup.remote(init_method) for h in handles], timeout=timeout_s)
    return handles, pg


def generator_name(run_name: str, generator_id: int) -> str:
    """The Ray actor name of a generator (``ray.get_actor(name)`` finds it, e.g. to inspect or kill it)."""
    return f"treepo-{run_name}-generator-{generator_id}"


def start_generator(
    cfg: TrainConfig, generator_id: int, queue_url: str, password: SecretFile | None, run_name: str
) -> Any:
    """One generator actor (not waited for: call ``ready`` on it). The queue password goes by
    reference (:class:`common.replay.SecretFile`): Ray keeps actor arguments in the GCS."""
    if password is not None and not isinstance(password, SecretFile):
        raise TypeError("start_generator takes the queue password as a SecretFile, never its value")
    cls = ray.remote(Generator)
    return cls.options(
        name=generator_name(run_name, generator_id),
        num_cpus=1,
        num_gpus=cfg.generators.gpus_per_engine,
        resources=dict(cfg.generators.ray_resources),
        max_restarts=GENERATOR_MAX_RESTARTS,
        max_task_retries=0,  # the controller re-submits the run loop itself after a restart
        max_concurrency=GENERATOR_CONCURRENCY,
        runtime_env={"env_vars": _generator_env(cfg)},
    ).remote(cfg, generator_id, queue_url, password, run_name)


def generator_state(handle: Any, ran_on: str | None) -> tuple[str, str | None]:
    """What Ray holds of a generator actor, and the node it is on now: ``alive``, ``restarting``,
    ``lost`` (restarting while ``ran_on``, the node it last ran on, is gone: its restart waits until
    a node with its resources joins) or ``dead`` (out of restarts; also when the GCS does not answer)."""
    from ray._private import state  # the GCS's actor table: works without a dashboard, unlike ray.util.state

    try:
        info = state.actors(actor_id=handle._actor_id.hex())
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    except Exception:  # no answer from the GCS: taken as dead, as before the probe
        return "dead", None
    node = (info or {}).get("Address", {}).get("NodeID")
    if not info or info.get("State") == "DEAD":
        return "dead", node
    if info.get("State") == "ALIVE":
        return "alive", node
    return ("lost" if ran_on is not None and ran_on not in alive else "restarting"), node


def start(
    cfg: TrainConfig, queue_url: str, password: str | None, run_name: str, timeout_s: float | None = None
) -> Topology:
    """Learners and generators, all started and answering (generators start while learners load), each
    wait bounded by ``timeout_s`` (default ``generators.start_timeout_s``)."""
    timeout_s = cfg.generators.start_timeout_s if timeout_s is None else timeout_s
    _check_resources(cfg)
    # absolute: the generators' working directories differ from the driver's
    secret = SecretFile.write(Path(cfg.run_dir).resolve(), password) if password else None
    try:
        gens = [start_generator(cfg, g, queue_url, secret, run_name) for g in range(cfg.generators.num)]
        learners, pg = start_learners(cfg, timeout_s)
        ray.get([g.ready.remote() for g in gens], timeout=timeout_s)
    except BaseException as e:
        if secret is not None:
            secret.remove()
        if isinstance(e, GetTimeoutError):
            raise ConfigError(
                f"the learner ranks and generators did not all start within {timeout_s:.0f} s "
                "(generators.start_timeout_s): raise it, or point model.path at a copy on a local or shared disk"
            ) from e
        raise
    return Topology(learners, gens, pg, queue_secret=secret)


def shutdown(topo: Topology) -> None:
    """Stop the generators' loops and kill every actor; remove the placement group."""
    for g in topo.generators:
        with contextlib.suppress(Exception):  # already dead: nothing to stop
            g.stop.remote()
    for h in topo.learners:
        with contextlib.suppress(Exception):  # a dead or stuck rank is killed below anyway
            ray.get(h.close.remote(), timeout=30)
    for a in [*topo.generators, *topo.learners]:
        ray.kill(a, no_restart=True)
    if topo.placement_group is not None:
        remove_placement_group(topo.placement_group)
    if topo.queue_secret is not None:
        topo.queue_secret.remove()
