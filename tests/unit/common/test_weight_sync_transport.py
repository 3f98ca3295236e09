"""The sender and the receiver move bytes only through the transport interface
(:mod:`common.weight_sync.transport`): an in-process queue channel, no gloo, carries a whole update
bit-exactly, and a wait that fails on it kills the group with the stage named. The rendezvous is the
real store on 127.0.0.1."""

from __future__ import annotations

import queue

import pytest
import torch

import common.weight_sync.receiver as receiver_module
from common.errors import SyncError
from common.weight_sync import SyncGroupInfo, WeightReceiver, WeightSender

HOST = "127.0.0.1"


class Done:
    def wait(self, timeout) -> None:
        return None


class TimedOut:
    def wait(self, timeout) -> None:
        raise RuntimeError(f"operation timed out after {timeout}")


class QueueChannel:
    """Rank 0's broadcasts go into a queue (cloned: the sender reuses its staging buffers); the other
    end's broadcasts take them in order."""

    device = torch.device("cpu")

    def __init__(self, wire: queue.Queue, root: bool, fail: bool = False) -> None:
        self.wire, self.root, self.fail, self.dropped = wire, root, fail, False

    def broadcast(self, tensor: torch.Tensor):
        if self.fail:
            return TimedOut()
        if self.root:
            self.wire.put(tensor.clone())
        else:
            src = self.wire.get(timeout=10)
            assert src.dtype == tensor.dtype and src.numel() == tensor.numel()
            tensor.copy_(src)
        return Done()

    def barrier(self):
        return Done()

    def drop(self) -> None:
        self.dropped = True


class QueueTransport:
    backend = "gloo"  # the name in the group's record (this stands in for it)

    def __init__(self, channel: QueueChannel) -> None:
        self.channel = channel
        self.connected: list[tuple[int, int]] = []

    def connect(self, store, rank: int, world_size: int, timeout) -> QueueChannel:
        self.connected.append((rank, world_size))
        return self.channel


@pytest.fixture
def pair(monkeypatch):
    """A sender and a receiver over one queue; the receiver's factory hands out the queue transport."""
    wire: queue.Queue = queue.Queue()
    sender = WeightSender(HOST, 0, world_size=2, backend="gloo", timeout_s=5, bucket_mb=1 / 16, token=None)
    sender.transport = QueueTransport(QueueChannel(wire, root=True))
    recv_transport = QueueTransport(QueueChannel(wire, root=False))
    monkeypatch.setattr(receiver_module, "transport_for", lambda backend: recv_transport)
    receiver = WeightReceiver.from_info(sender.info, 1, timeout_s=5)
    yield sender, receiver, recv_transport
    receiver.close()
    sender.close()


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "norm.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "big.weight": torch.randn(130, 130, generator=g),  # > the 64 KiB bucket: a bucket of its own
        "mask": torch.rand(7, generator=g) > 0.5,
    }


def test_an_update_crosses_a_transport_of_its_own_bit_exact(pair):
    sender, receiver, recv_transport = pair
    receiver.connect()  # claims rank 1 in the real store, then asks the transport for its channel
    want = tensors()
    stats = sender.send(want.items(), version=4)
    version, stream = receiver.receive()
    got = [(name, t.clone()) for name, t in stream]
    assert version == 4 and [n for n, _ in got] == list(want)
    for name, t in got:
        assert t.dtype == want[name].dtype and torch.equal(t, want[name]), name
    assert recv_transport.connected == [(1, 2)] and sender.transport.connected == [(0, 2)]
    assert stats.params == 4 and stats.buckets == receiver.last_stats.buckets >= 2
    sender.barrier()
    receiver.barrier()


def test_a_failed_wait_on_the_channel_kills_the_group(pair):
    sender, receiver, _ = pair
    channel = sender.transport.channel
    channel.fail = True
    receiver.connect()
    with pytest.raises(SyncError, match=r"timed out after 5 s at metadata; the group is dead"):
        sender.send(tensors().items(), version=1)
    assert channel.dropped and sender.channel is None
    with pytest.raises(SyncError, match="this weight-sync group is dead"):
        sender.send(tensors().items(), version=1)
    info = sender.rebuild()  # a new generation on a new port: usable again
    assert isinstance(info, SyncGroupInfo) and info.generation == 1 and not sender.broken
