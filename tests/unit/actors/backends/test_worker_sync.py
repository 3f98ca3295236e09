"""``WorkerSync`` (one engine worker's receiver rank) against a real gloo ``WeightSender`` in this
process: the receive runs in the class's own thread, the sender on the test's thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from actors.backends.worker_sync import WorkerSync, receives_per_worker
from common.errors import ConfigError, SyncError
from common.weight_sync import WeightSender

HOST = "127.0.0.1"


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "layers.0.norm.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "layers.0.q.weight": torch.randn(16, 16, generator=g),
        "big.weight": torch.randn(130, 130, generator=g),  # > the 64 KiB bucket: a bucket of its own
    }


def assert_same(got: list[tuple[str, torch.Tensor]], want: dict[str, torch.Tensor]) -> None:
    assert [n for n, _ in got] == list(want)
    for name, t in got:
        assert t.dtype == want[name].dtype and t.shape == want[name].shape
        assert torch.equal(t, want[name]), name


def connect(sender: WeightSender) -> None:
    """The sender's half of the rendezvous, beside the receiver's thread."""
    th = threading.Thread(target=sender.connect)
    th.start()
    th.join(timeout=30)
    assert not th.is_alive()


def wait_state(sync: WorkerSync, state: str, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (st := sync.poll())["state"] != state:
        assert time.monotonic() < deadline, st
        time.sleep(0.01)
    return st


@pytest.fixture
def sender():
    s = WeightSender(HOST, 0, world_size=2, backend="gloo", timeout_s=20, bucket_mb=1 / 16)
    yield s
    s.close()


def test_receive_in_background_then_take_bit_exact(sender):
    sync = WorkerSync()
    assert sync.join(sender.info.to_dict(), 1, timeout_s=20) == 1
    sync.start()  # returns at once: nothing has been sent yet
    connect(sender)
    st = sync.poll()
    assert st["state"] == "receiving" and st["version"] is None and st["staged"] == []
    with pytest.raises(SyncError, match="already running"):
        sync.start()
    want = tensors(1)
    stats = sender.send(want.items(), version=5)
    assert stats.buckets >= 2
    assert sync.wait(timeout_s=20) == 5
    assert sync.poll()["staged"] == [5]
    assert_same(sync.take(5), want)
    assert sync.poll()["staged"] == []
    with pytest.raises(SyncError, match="no staged update of version 5"):
        sync.take(5)
    sync.close()


def receiving(sender: WeightSender) -> WorkerSync:
    """A WorkerSync joined to ``sender``'s group as rank 1, with a receive running."""
    sync = WorkerSync()
    sync.join(sender.info.to_dict(), 1, timeout_s=20)
    sync.start()
    connect(sender)
    return sync


def test_newer_update_replaces_older_unapplied_one(sender):
    sync = receiving(sender)
    sender.send(tensors(1).items(), version=3)
    assert sync.wait(20) == 3
    sync.start()
    newer = tensors(2)
    sender.send(newer.items(), version=4)
    assert sync.wait(20) == 4
    assert sync.poll()["staged"] == [3, 4]  # both kept until one is taken
    assert_same(sync.take(4), newer)
    assert sync.poll()["staged"] == []  # taking 4 dropped the older 3
    sync.start()  # a re-sync of the same version replaces the staged copy
    sender.send(newer.items(), version=4)
    assert sync.wait(20) == 4
    sync.discard(4)
    assert sync.poll()["staged"] == []
    sync.close()


def test_sender_that_never_sends_times_out_naming_the_setting():
    sender = WeightSender(HOST, 0, world_size=2, backend="gloo", timeout_s=1.5)
    sync = WorkerSync()
    try:
        sync.join(sender.info.to_dict(), 1, timeout_s=1.5)
        t0 = time.monotonic()
        sync.start()
        connect(sender)
        with pytest.raises(SyncError, match=r"timed out after 1.5 s at metadata.*sync.timeout_s=1.5"):
            sync.wait(timeout_s=30)
        assert time.monotonic() - t0 < 10
        st = sync.poll()
        assert st["state"] == "failed" and "timed out" in st["error"]
        sync._thread.join(timeout=5)
        assert not sync._thread.is_alive()  # the thread ended: nothing hangs
    finally:
        sync.close()
        sender.close()


def test_join_supersedes_a_running_receive_and_the_rebuilt_group_works(sender):
    sync = receiving(sender)
    old_thread = sync._thread
    info = sender.rebuild()  # membership changed: new port, generation + 1
    sync.join(info.to_dict(), 1, timeout_s=20)
    assert sync.poll()["state"] == "idle"
    with pytest.raises(SyncError, match="no receive was started"):
        sync.wait(1)
    old_thread.join(timeout=25)  # the dropped group makes the old receive end (fail fast or time out)
    assert not old_thread.is_alive()
    assert sync.poll()["state"] == "idle"  # its outcome did not count
    sync.start()
    want = tensors(3)
    connect(sender)
    sender.send(want.items(), version=9)
    assert wait_state(sync, "done")["version"] == 9
    assert_same(sync.take(9), want)
    sync.close()


def test_start_without_a_group_fails():
    with pytest.raises(SyncError, match="no weight-sync group"):
        WorkerSync().start()


def test_receiver_mode_resolution():
    assert receives_per_worker("auto", engine_in_workers=True, supports_workers=True)
    assert not receives_per_worker("auto", engine_in_workers=False, supports_workers=True)
    assert not receives_per_worker("auto", engine_in_workers=True, supports_workers=False)
    assert not receives_per_worker("generator", engine_in_workers=True, supports_workers=True)
    assert receives_per_worker("engine_workers", engine_in_workers=False, supports_workers=True)
    with pytest.raises(ConfigError, match="generators.backend=vllm"):
        receives_per_worker("engine_workers", engine_in_workers=False, supports_workers=False)
    with pytest.raises(ConfigError, match="sync.receiver"):
        receives_per_worker("workers", engine_in_workers=True, supports_workers=True)


def test_config_validates_the_receiver_key():
    from common.config import load_config

    assert load_config(None, []).sync.receiver == "auto"
    with pytest.raises(
        ConfigError, match="sync.receiver='workers' is not one of auto, generator, engine_workers"
    ):
        load_config(None, ["sync.receiver=workers"])
    with pytest.raises(ConfigError, match="sync.receiver=engine_workers needs generators.backend=vllm"):
        load_config(None, ["sync.receiver=engine_workers", "generators.backend=hf"])
