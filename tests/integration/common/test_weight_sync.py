"""The weight-sync transport over real gloo groups between real processes (spawned receivers), and
one end-to-end sync into the session's vLLM CPU engine checked against a transformers forward pass.

Receivers run :func:`_receiver_main`, driven by commands over a multiprocessing queue; they report
plain data (names, dtypes, shapes, SHA-256 of the bytes), so bit-exactness is checked by digest.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import multiprocessing as mp
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

import common.weight_sync.receiver as receiver_module
from common.errors import SyncError, WireError
from common.weight_sync import (
    ALIGN,
    MAGIC,
    SyncMetadata,
    WeightReceiver,
    WeightSender,
    decode_metadata,
    encode_metadata,
    plan_buckets,
    torch_dist,
)

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
SLACK_S = 1.5  # allowed time past a timeout before SyncError surfaces (process scheduling on 2 cores)


# --------------------------------------------------------------------------- helpers


def digest(t: torch.Tensor) -> tuple[str, str, tuple[int, ...], str]:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return str(t.dtype), tuple(t.shape), hashlib.sha256(raw).hexdigest()


def expected(named: dict[str, torch.Tensor]) -> list:
    return [(n, *digest(t)) for n, t in named.items()]


def mixed_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Mixed dtypes, odd shapes, a scalar, an empty tensor, a non-contiguous one, one > a 64 KiB bucket."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(97, 33, generator=g).to(torch.bfloat16),
        "layers.0.q.weight": torch.randn(33, 33, generator=g),
        "layers.0.norm.weight": torch.randn(33, generator=g).to(torch.bfloat16),
        "big.weight": torch.randn(181, 127, generator=g),  # 92 KB > 64 KiB bucket
        "scalar": torch.tensor(float(seed) + 0.25),
        "empty": torch.zeros(0, 5),
        "transposed": torch.randn(13, 7, generator=g).t(),
        "half": torch.randn(3, 5, 7, generator=g).to(torch.float16),
        "ids": torch.randint(-(2**40), 2**40, (19,), generator=g),
        "mask": torch.rand(23, generator=g) > 0.5,
        "tail.bias": torch.randn(1, generator=g),
    }


def _killing_transport(backend: str):
    """A transport whose connect kills the process (the receiver has just claimed its rank)."""

    class Killing:
        def connect(self, *args):
            os.kill(os.getpid(), signal.SIGKILL)

    return Killing()


def _receiver_main(cmd_q, res_q) -> None:
    """Commands: (token, op, *args); every reply starts with (token, status, rank)."""
    torch.set_num_threads(1)
    recv = None
    while True:
        token, op, *args = cmd_q.get(timeout=600)
        if op == "exit":
            return
        if op == "join":  # (info dict, rank, timeout_s)
            info, rank, timeout_s = args
            if recv is None:
                recv = WeightReceiver.from_info(info, rank, timeout_s=timeout_s)
            else:
                recv.rejoin(info, rank, timeout_s)
            res_q.put((token, "joined", rank))
        elif op == "die_after_claim":  # SIGKILLed once its rank is claimed, before the group is built
            receiver_module.transport_for = _killing_transport
            recv.connect()
        elif op == "die_after_connect":  # SIGKILLed once the group is built, before the first update
            recv.connect()
            res_q.put((token, "connected", recv.rank))
            res_q.close()
            res_q.join_thread()  # the reply is written before the process dies
            os.kill(os.getpid(), signal.SIGKILL)
        elif op == "idle":  # connect, then take part in no broadcast for a while
            recv.connect()
            res_q.put((token, "connected", recv.rank))
            time.sleep(args[0])
        elif op == "receive":  # (die after this many tensors, or None)
            die_after = args[0]
            t0 = time.monotonic()
            try:
                version, it = recv.receive()
                got = []
                for i, (name, t) in enumerate(it):
                    if die_after is not None and i == die_after:
                        os._exit(3)  # a generator dying mid-stream
                    got.append((name, *digest(t)))
                res_q.put((token, "ok", recv.rank, version, got, recv.last_stats.buckets))
            except SyncError as e:
                res_q.put((token, "error", recv.rank, str(e), time.monotonic() - t0))


class Receivers:
    """A pool of spawned receiver processes shared by this module's tests (each test rejoins them to
    its own group); stops only the processes it started. Replies of earlier tests are discarded."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.res_q = self.ctx.Queue()
        self.procs: list = []
        self.cmd_qs: list = []
        self.token = 0
        self.used: set[int] = set()

    def new_test(self) -> None:
        self.token += 1
        self.used = set()

    def spawn(self, n: int) -> list[int]:
        """``n`` live processes not used yet by this test (reusing idle ones, spawning the rest)."""
        idx = [i for i, p in enumerate(self.procs) if p.is_alive() and i not in self.used][:n]
        while len(idx) < n:
            q = self.ctx.Queue()
            p = self.ctx.Process(target=_receiver_main, args=(q, self.res_q), daemon=True)
            p.start()
            self.procs.append(p)
            self.cmd_qs.append(q)
            idx.append(len(self.procs) - 1)
        self.used.update(idx)
        return idx

    def tell(self, i: int, *cmd) -> None:
        self.cmd_qs[i].put((self.token, *cmd))

    def results(self, n: int, timeout: float = 60.0) -> list[tuple]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            r = self.res_q.get(timeout=max(deadline - time.monotonic(), 0.1))
            if r[0] == self.token:
                out.append(r[1:])
        return out

    def join_all(self, info, ranks: dict[int, int], timeout_s: float) -> None:
        for i, rank in ranks.items():
            self.tell(i, "join", info.to_dict(), rank, timeout_s)
        assert sorted(r[1] for r in self.results(len(ranks))) == sorted(ranks.values())

    def close(self) -> None:
        for i, p in enumerate(self.procs):
            if p.is_alive():
                self.tell(i, "exit")
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


@pytest.fixture(scope="module")
def receiver_pool():
    r = Receivers()
    yield r
    r.close()


@pytest.fixture
def receivers(receiver_pool):
    receiver_pool.new_test()
    return receiver_pool


def by_rank(results: list[tuple]) -> dict[int, tuple]:
    return {r[1]: r for r in results}


# --------------------------------------------------------------------------- metadata (in-process)


def test_bucket_plan_boundaries_and_roundtrip():
    named = mixed_tensors(0)
    bucket = 64 << 10
    meta = plan_buckets([(n, t.dtype, t.shape) for n, t in named.items()], bucket, version=5)
    assert [p.name for p in meta.params] == list(named)  # send order kept
    for p in meta.params:
        assert p.offset % ALIGN == 0
        assert p.offset + p.nbytes <= meta.bucket_nbytes[p.bucket]
    big = next(p for p in meta.params if p.name == "big.weight")
    alone = [p for p in meta.params if p.bucket == big.bucket]
    assert alone == [big] and meta.bucket_nbytes[big.bucket] == big.nbytes > bucket
    others = [b for b in range(len(meta.bucket_nbytes)) if b != big.bucket]
    assert all(meta.bucket_nbytes[b] <= bucket for b in others)
    # a new bucket starts only where the next parameter would not fit into the open one
    for b in others[:-1]:
        first_next = next(p for p in meta.params if p.bucket == b + 1)
        if b + 1 != big.bucket:
            start = -(-meta.bucket_nbytes[b] // ALIGN) * ALIGN
            assert start + first_next.nbytes > bucket
    assert meta.total_bytes >= sum(t.numel() * t.element_size() for t in named.values())
    assert decode_metadata(encode_metadata(meta)) == meta


def _blob(**over) -> bytes:
    import msgpack

    obj = {
        "schema": 1,
        "version": 3,
        "buckets": [8 + ALIGN],
        "params": [["a", "float32", [2], 0, 0], ["b", "bfloat16", [4], 0, ALIGN]],
    }
    obj.update(over)
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(
    "blob, reason",
    [
        (b"\xc1garbage", "not valid msgpack"),
        (b"", "not valid msgpack"),
        (_blob()[:-3], "not valid msgpack"),
        (b"\x93\x01\x02\x03", "must be a map"),
        (_blob(schema=2), "schema 2"),
        (_blob(version=-1), "version"),
        (_blob(params=[]), "non-empty"),
        (_blob(params=[["a", "float32", [2], 0, 0], ["a", "bfloat16", [4], 0, ALIGN]]), "appears twice"),
        (_blob(params=[["a", "complex32", [2], 0, 0]], buckets=[8]), "unknown dtype"),
        (_blob(params=[["a", "float32", [-2], 0, 0]], buckets=[8]), "bad shape"),
        (_blob(params=[["a", "float32", [2], 1, 0]], buckets=[8]), "bucket 1 of 1"),
        (_blob(buckets=[8 + ALIGN - 1]), "past bucket"),
        (_blob(buckets=[8 + ALIGN + 4]), "parameters end at"),
        (_blob(params=[["a", "float32", [2], 0, 0], ["b", "bfloat16", [4], 0, 4]]), "overlaps"),
        (_blob(params=[["a", "float32", [2], 0, 2]], buckets=[10]), "misaligned"),
        (
            _blob(params=[["a", "float32", [2], 1, 0], ["b", "float32", [2], 0, 0]], buckets=[8, 8]),
            "goes back",
        ),
        (_blob(params=[["a", "float32", [2], 0]]), "must be"),
    ],
)
def test_metadata_validation_rejects_garbage(blob, reason):
    with pytest.raises(WireError, match=reason):
        decode_metadata(blob)


def test_valid_blob_decodes():
    meta = decode_metadata(_blob())
    assert (
        isinstance(meta, SyncMetadata) and meta.version == 3 and [p.name for p in meta.params] == ["a", "b"]
    )


def test_stale_group_info_fails_fast():
    sender = WeightSender(HOST, 0, world_size=3, backend="gloo", timeout_s=5)
    try:
        t0 = time.monotonic()
        stale = WeightReceiver(HOST, sender.info.port, rank=1, world_size=2, backend="gloo", timeout_s=5)
        with pytest.raises(SyncError, match="world size 2.*ask the controller"):
            stale.connect()
        assert time.monotonic() - t0 < 2.0  # fails on the published group info, not on a timeout
        with pytest.raises(SyncError, match="rank 0 is the sender"):
            WeightReceiver(HOST, sender.info.port, rank=0, world_size=3)
    finally:
        sender.close()


def test_receiver_rejects_foreign_header_and_garbage_metadata():
    """Failure injection: rank 0 puts bytes that are not ours on the wire (receiver in a thread)."""
    import threading

    sender = WeightSender(HOST, 0, world_size=2, backend="gloo", timeout_s=10)
    recv = WeightReceiver.from_info(sender.info, rank=1, timeout_s=10)
    try:
        for payload, reason in [
            ([torch.tensor([1, 2, 3, 4])], "not a treepo weight-sync header"),
            (
                [torch.tensor([MAGIC, 1, 3, 5]), torch.tensor(list(b"\xc1junk"), dtype=torch.uint8)],
                "rejected the update's metadata",
            ),
        ]:
            errors = []

            def run(errors=errors):
                try:
                    recv.receive()
                except SyncError as e:
                    errors.append(str(e))

            th = threading.Thread(target=run)
            th.start()
            sender.connect()
            for t in payload:
                sender._wait(sender._bcast(t), "metadata", "test")
            th.join(timeout=10)
            assert len(errors) == 1 and reason in errors[0] and "rebuild" in errors[0]
            recv.rejoin(sender.rebuild(), rank=1)
    finally:
        recv.close()
        sender.close()


# --------------------------------------------------------------------------- real processes


def test_bit_exact_versions_and_buckets_to_two_receivers(receivers):
    sender = WeightSender(HOST, 0, world_size=3, backend="gloo", timeout_s=30, bucket_mb=1 / 16)
    try:
        idx = receivers.spawn(2)
        receivers.join_all(sender.info, {idx[0]: 1, idx[1]: 2}, timeout_s=30)
        for version in (3, 4):  # two updates through one group, different values
            named = mixed_tensors(version)
            for i in idx:
                receivers.tell(i, "receive", None)
            stats = sender.send(named.items(), version)
            res = by_rank(receivers.results(2))
            meta = plan_buckets(
                [(n, t.dtype, t.shape) for n, t in named.items()], sender.bucket_bytes, version
            )
            assert stats.version == version and stats.buckets == len(meta.bucket_nbytes) >= 3
            assert stats.bytes == meta.total_bytes and stats.receivers == 2 and stats.gbps > 0
            for rank in (1, 2):
                status, _, got_version, got, n_buckets = res[rank]
                assert status == "ok" and got_version == version and n_buckets == stats.buckets
                assert got == expected(named)
        # the spec path: tensors pulled lazily from a generator, checked against the spec
        named = mixed_tensors(9)
        spec = [(n, t.dtype, t.shape) for n, t in named.items()]
        for i in idx:
            receivers.tell(i, "receive", None)
        sender.send((item for item in named.items()), 9, spec=spec)
        assert all(r[0] == "ok" and r[3] == expected(named) for r in receivers.results(2))
    finally:
        sender.close()


def test_receiver_never_joins_times_out(receivers):
    timeout_s = 2.0
    sender = WeightSender(HOST, 0, world_size=3, backend="gloo", timeout_s=timeout_s)
    try:
        (i,) = receivers.spawn(1)
        receivers.join_all(sender.info, {i: 1}, timeout_s=timeout_s)
        receivers.tell(i, "receive", None)
        t0 = time.monotonic()
        with pytest.raises(SyncError, match=r"timed out .* waiting for receiver ranks \[2\]") as err:
            sender.send(mixed_tensors(0).items(), 1)
        elapsed = time.monotonic() - t0
        print(f"never-joined receiver: sender raised after {elapsed:.2f} s (timeout {timeout_s} s)")
        assert timeout_s - 0.1 <= elapsed <= timeout_s + SLACK_S, elapsed
        assert "rebuild" in str(err.value)
        (status, rank, msg, r_elapsed) = receivers.results(1)[0]
        assert status == "error" and rank == 1 and "rebuild" in msg and r_elapsed <= timeout_s + SLACK_S + 1
        with pytest.raises(SyncError, match="dead"):  # no silent reuse of a failed group
            sender.send(mixed_tensors(0).items(), 1)
    finally:
        sender.close()


def test_receiver_that_never_broadcasts_times_out(receivers):
    timeout_s = 2.0
    sender = WeightSender(HOST, 0, world_size=2, backend="gloo", timeout_s=timeout_s)
    try:
        (i,) = receivers.spawn(1)
        receivers.join_all(sender.info, {i: 1}, timeout_s=timeout_s)
        receivers.tell(i, "idle", timeout_s + 0.5)
        sender.connect()
        assert receivers.results(1)[0][0] == "connected"
        t0 = time.monotonic()
        with pytest.raises(SyncError, match=r"weight sync to 1 receivers .* timed out after 2 s at metadata"):
            sender.send(mixed_tensors(0).items(), 1)
        elapsed = time.monotonic() - t0
        print(f"stuck receiver: sender raised after {elapsed:.2f} s (timeout {timeout_s} s)")
        assert timeout_s - 0.1 <= elapsed <= timeout_s + SLACK_S, elapsed
    finally:
        sender.close()


def test_receiver_dies_mid_stream_then_rebuilt_group_works(receivers):
    timeout_s = 5.0
    sender = WeightSender(HOST, 0, world_size=3, backend="gloo", timeout_s=timeout_s, bucket_mb=1 / 16)
    g = torch.Generator().manual_seed(1)
    named = {f"layers.{k}.w": torch.randn(128, 128, generator=g) for k in range(24)}  # 24 buckets
    try:
        survivor, victim = receivers.spawn(2)
        receivers.join_all(sender.info, {survivor: 1, victim: 2}, timeout_s=timeout_s)
        receivers.tell(survivor, "receive", None)
        receivers.tell(victim, "receive", 2)  # exits while consuming the third tensor
        t0 = time.monotonic()
        with pytest.raises(
            SyncError, match=r"weight sync to 2 receivers .* at bucket \d+/24; .*rebuild"
        ) as err:
            sender.send(named.items(), 1)
        elapsed = time.monotonic() - t0
        print(f"receiver died mid-stream: sender raised after {elapsed:.2f} s: {err.value}")
        assert elapsed <= timeout_s + SLACK_S
        status, rank, msg, _ = receivers.results(1, timeout=timeout_s + 10)[0]
        assert (status, rank) == ("error", 1) and "rebuild" in msg
        receivers.procs[victim].join(timeout=5)
        assert receivers.procs[victim].exitcode == 3

        old_port = sender.info.port
        info = sender.rebuild(port=0, world_size=2)
        assert info.port != old_port and info.generation == 1 and info.world_size == 2
        receivers.join_all(info, {survivor: 1}, timeout_s=timeout_s)
        receivers.tell(survivor, "receive", None)
        sender.send(named.items(), 2)
        status, rank, version, got, _ = receivers.results(1)[0]
        assert (status, rank, version) == ("ok", 1, 2) and got == expected(named)
    finally:
        sender.close()


class LazyGroup:
    """NCCL's shape on gloo: building the group returns at once and the communicator is built inside
    the first collective, which waits for every rank with no deadline of its own (here 120 s, far past
    any sync timeout of these tests)."""

    def __init__(self, store, rank: int, world_size: int, backend: str, timeout) -> None:
        self.args = (store, rank, world_size)
        self.pg = None

    def _group(self):
        if self.pg is None:
            self.pg = torch.distributed.ProcessGroupGloo(*self.args, datetime.timedelta(seconds=120))
        return self.pg

    def broadcast(self, *args):
        return self._group().broadcast(*args)

    def allreduce(self, *args):
        return self._group().allreduce(*args)

    def abort(self) -> None:
        pass


def _send_in_thread(sender: WeightSender, named: dict, bound_s: float) -> tuple[BaseException | None, float]:
    """``sender.send`` on a thread, joined with ``bound_s``: a hang fails the test, not the suite."""
    out: dict = {}

    def send() -> None:
        t0 = time.monotonic()
        try:
            sender.send(named.items(), 1)
        except BaseException as e:  # the test inspects it
            out["error"] = e
        out["elapsed"] = time.monotonic() - t0

    th = threading.Thread(target=send, daemon=True)
    th.start()
    th.join(bound_s)
    assert not th.is_alive(), f"the sender still waits after {bound_s:g} s: a receiver's death hangs it"
    return out.get("error"), out["elapsed"]


@pytest.mark.parametrize(
    "when, lazy",
    [("die_after_claim", False), ("die_after_claim", True), ("die_after_connect", False)],
    ids=["after-claim", "after-claim-lazy-communicator", "after-connect"],
)
def test_receiver_killed_after_claiming_its_rank_fails_the_sender_in_time(receivers, monkeypatch, when, lazy):
    """A receiver SIGKILLed after it claimed its rank (before the group is built, or before the first
    update): the sender raises SyncError within the sync timeout (+ slack) instead of waiting on it,
    also where the communicator is built lazily inside the first collective (NCCL's shape), and the
    rebuilt group without it works."""
    timeout_s = 3.0
    if lazy:
        monkeypatch.setattr(torch_dist, "new_backend_pg", LazyGroup)
    sender = WeightSender(HOST, 0, world_size=3, backend="gloo", timeout_s=timeout_s, bucket_mb=1 / 16)
    named = mixed_tensors(4)
    try:
        survivor, victim = receivers.spawn(2)
        receivers.join_all(sender.info, {survivor: 1, victim: 2}, timeout_s=timeout_s)
        receivers.tell(victim, when)
        receivers.tell(survivor, "receive", None)
        if when == "die_after_connect":
            sender.connect()  # with both receivers; then the victim dies
        receivers.procs[victim].join(timeout=30)
        assert receivers.procs[victim].exitcode == -signal.SIGKILL
        error, elapsed = _send_in_thread(sender, named, timeout_s + SLACK_S + 10)
        print(f"receiver killed ({when}, lazy={lazy}): sender raised after {elapsed:.2f} s: {error}")
        assert isinstance(error, SyncError) and "rebuild" in str(error), error
        assert elapsed <= timeout_s + SLACK_S, elapsed
        replies = by_rank(receivers.results(2 if when == "die_after_connect" else 1, timeout=timeout_s + 30))
        assert replies[1][0] == "error"  # the survivor's update failed too: it rejoins below
        assert when == "die_after_claim" or replies[2][0] == "connected"

        monkeypatch.undo()
        receivers.join_all(sender.rebuild(world_size=2), {survivor: 1}, timeout_s=timeout_s)
        receivers.tell(survivor, "receive", None)
        sender.send(named.items(), 2)
        status, rank, version, got, _ = receivers.results(1)[0]
        assert (status, rank, version) == ("ok", 1, 2) and got == expected(named)
    finally:
        sender.close()


def test_sender_iterator_failure_fails_receivers_fast(receivers):
    timeout_s = 20.0
    sender = WeightSender(HOST, 0, world_size=2, backend="gloo", timeout_s=timeout_s, bucket_mb=1 / 16)
    g = torch.Generator().manual_seed(2)
    named = {f"layers.{k}.w": torch.randn(128, 128, generator=g) for k in range(8)}

    def gathered():  # a learner whose parameter gather fails part-way
        for k, item in enumerate(named.items()):
            if k == 3:
                raise RuntimeError("gather failed")
            yield item

    try:
        (i,) = receivers.spawn(1)
        receivers.join_all(sender.info, {i: 1}, timeout_s=timeout_s)
        receivers.tell(i, "receive", None)
        spec = [(n, t.dtype, t.shape) for n, t in named.items()]
        with pytest.raises(SyncError, match="iterator raised RuntimeError: gather failed"):
            sender.send(gathered(), 1, spec=spec)
        status, rank, msg, r_elapsed = receivers.results(1)[0]
        assert status == "error" and r_elapsed < timeout_s / 2  # the closed group, not the timeout
        info = sender.rebuild()
        receivers.join_all(info, {i: 1}, timeout_s=timeout_s)
        receivers.tell(i, "receive", None)
        sender.send(named.items(), 2)
        status, _, version, got, _ = receivers.results(1)[0]
        assert (status, version) == ("ok", 2) and got == expected(named)
    finally:
        sender.close()


def test_late_receiver_joins_via_rebuild_and_gets_current_weights(receivers):
    timeout_s = 20.0
    sender = WeightSender(HOST, 0, world_size=3, backend="gloo", timeout_s=timeout_s, bucket_mb=1 / 16)
    try:
        a, b = receivers.spawn(2)
        receivers.join_all(sender.info, {a: 1, b: 2}, timeout_s=timeout_s)
        current = mixed_tensors(7)
        for i in (a, b):
            receivers.tell(i, "receive", None)
        sender.send(current.items(), 7)
        assert all(r[0] == "ok" and r[2] == 7 for r in receivers.results(2))

        (late,) = receivers.spawn(1)  # a generator added while the job runs
        info = sender.rebuild(world_size=4)
        receivers.join_all(info, {a: 1, b: 2, late: 3}, timeout_s=timeout_s)
        for i in (a, b, late):
            receivers.tell(i, "receive", None)
        sender.send(current.items(), 7)  # the controller re-sends the current version
        res = by_rank(receivers.results(3))
        assert sorted(res) == [1, 2, 3]
        for rank in (1, 2, 3):
            assert res[rank][0] == "ok" and res[rank][2] == 7 and res[rank][3] == expected(current)
    finally:
        sender.close()


def test_bench_sync_smoke(capsys):
    import argparse

    from cluster.bench import sync as bench_sync

    parser = argparse.ArgumentParser()
    bench_sync.add_arguments(parser)
    args = parser.parse_args(["--sizes-mb", "2", "--receivers", "1", "--repeats", "1", "sync.bucket_mb=0.5"])
    assert bench_sync.run(args) == 0
    out = capsys.readouterr().out
    row = json.loads(next(line for line in out.splitlines() if line.startswith('{"size_mb"')))
    assert row["receivers"] == 1 and row["buckets"] >= 2 and row["ours_gbps"] > 0 and row["raw_gbps"] > 0
    assert "ours_vs_raw" in out and "ours_vs_shm" in out


# --------------------------------------------------------------------------- into the vLLM engine


def _learner_sender_main(model_dir: str, version: int, seed: int, res_q, timeout_s: float) -> None:
    """Learner side: the tiny model with perturbed weights, sent as (HF name, tensor) pairs."""
    torch.set_num_threads(1)
    from common.models import load_model

    model = load_model(model_dir, dtype="float32")
    perturb(model, seed)
    sender = WeightSender(HOST, 0, world_size=2, backend="gloo", timeout_s=timeout_s, bucket_mb=1.0)
    res_q.put(("info", sender.info.to_dict()))
    try:
        named = model.named_parameters(remove_duplicate=False)  # tied lm_head.weight too: see the report
        stats = sender.send(((n, p.detach()) for n, p in named), version)
        res_q.put(("sent", stats.bytes, stats.buckets))
    except SyncError as e:
        res_q.put(("error", str(e)))
    finally:
        sender.close()


def perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.2 * p.std() * torch.randn(p.shape, generator=g))


def test_sync_into_vllm_engine_matches_transformers(vllm_backend, tiny_model_dir):
    from actors.backends.base import GenRequest
    from common.models import load_model, load_tokenizer
    from tests.integration.conftest import restored

    model_dir = str(tiny_model_dir)
    original = load_model(model_dir, dtype="float32")
    new_model = load_model(model_dir, dtype="float32")
    perturb(new_model, seed=3)
    tok = load_tokenizer(model_dir)
    reqs = [GenRequest(tok(t)["input_ids"], 16) for t in ("12+7=", "3*4+5*6=")]

    def ref_logprobs(model, req, token_ids):
        ids = torch.tensor([list(req.prompt_ids) + list(token_ids)])
        with torch.inference_mode():
            lp = torch.log_softmax(model(ids).logits[0].float()[len(req.prompt_ids) - 1 : -1], dim=-1)
        return lp.gather(-1, torch.tensor(token_ids)[:, None]).squeeze(-1).numpy()

    ctx = mp.get_context("spawn")
    res_q = ctx.Queue()
    proc = ctx.Process(target=_learner_sender_main, args=(model_dir, 11, 3, res_q, 60.0), daemon=True)
    proc.start()
    with restored(vllm_backend):
        try:
            kind, info = res_q.get(timeout=120)
            assert kind == "info"
            receiver = WeightReceiver.from_info(info, rank=1, timeout_s=60)
            version, it = receiver.receive()
            vllm_backend.update_weights(it, version)
            assert res_q.get(timeout=60)[0] == "sent"
            assert version == 11 and vllm_backend.policy_version == 11
            results = vllm_backend.generate(reqs)
            for req, res in zip(reqs, results):
                new_ref = ref_logprobs(new_model, req, res.token_ids)
                np.testing.assert_allclose(np.array(res.logprobs), new_ref, atol=2e-3)
                old_ref = ref_logprobs(original, req, res.token_ids)
                assert np.abs(np.array(res.logprobs) - old_ref).max() > 2e-2  # the sync took effect
            receiver.close()
        finally:
            vllm_backend.update_weights(original.state_dict().items(), version=0)
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
