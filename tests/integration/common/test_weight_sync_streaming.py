"""Learner rank 0 streams its weights into the sync group bucket by bucket: what it holds of the
gathered tensors during a send, and what the FSDP gather moves.

- ``LearnerHost.sync_send`` (the pipeline's path) hands the sender the learner's spec, so at most two
  buckets plus the largest tensor of the iterator's tensors are alive at once (measured with tensors
  whose memory is a numpy array each: a weak reference to the array lives exactly as long as any view
  of its bytes, the sender's included); the receiver gets every byte.
- A failed send still drives the rest of the iterator (the other ranks' gathers).
- ``LearnerRank.weights_for_sync`` under FSDP2 (a group of one, gloo) gathers in ``model.dtype``
  (bf16), not the fp32 master's dtype, and ``weights_spec`` lists exactly what it yields; with LoRA the
  spec lists the merged weights.
"""

from __future__ import annotations

import json
import socket
import threading
import weakref

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from common.errors import SyncError
from common.weight_sync import WeightReceiver, WeightSender

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
BUCKET_MB = 1 / 64  # 16 KiB buckets: the stream spans dozens of them


class TrackedLearner:
    """A learner rank 0 whose every yielded tensor is its own numpy allocation, tracked weakly."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        self.shapes = shapes
        self.version = 5
        self.live: list[tuple[weakref.ref, int]] = []
        self.peak = 0
        self.sent: dict[str, torch.Tensor] = {}  # a copy of each value, for the receiver's check

    def weights_spec(self):
        return [(n, dtype, shape) for n, shape, dtype in self.shapes]

    def held(self) -> int:
        return sum(nbytes for ref, nbytes in self.live if ref() is not None)

    def weights_for_sync(self):
        g = torch.Generator().manual_seed(0)
        for name, shape, dtype in self.shapes:
            value = torch.randn(shape, generator=g).to(dtype)
            self.sent[name] = value.clone()
            arr = np.empty(value.numel() * value.element_size(), dtype=np.uint8)
            t = torch.from_numpy(arr).view(dtype).view(shape)
            t.copy_(value)
            self.live.append((weakref.ref(arr), arr.nbytes))
            del arr, value
            self.peak = max(self.peak, self.held())
            yield name, t
            del t


def _receive(info, out: dict) -> None:
    recv = WeightReceiver.from_info(info, 1, timeout_s=30)
    try:
        version, it = recv.receive()
        out["version"] = version
        out["got"] = {n: t.clone() for n, t in it}
    except Exception as e:  # reported to the test's thread
        out["error"] = e
    finally:
        recv.close()


def test_rank0_holds_at_most_two_buckets_plus_the_largest_tensor():
    from cluster.pipeline.topology import LearnerHost

    kib = 1024
    shapes = [(f"layers.{k}.small", (kib,), torch.float32) for k in range(24)]  # 4 KiB each, packed
    # three consecutive tensors larger than a bucket (40 KiB each, sent from the tensor itself)
    shapes[8:8] = [(f"layers.big.{k}", (10 * kib,), torch.float32) for k in range(3)]
    shapes.append(("lm_head.weight", (16, kib), torch.bfloat16))  # 32 KiB, the last
    learner = TrackedLearner(shapes)
    host = LearnerHost(None, 0, 1)
    host.learner = learner
    host.sender = WeightSender(HOST, 0, world_size=2, backend="gloo", timeout_s=30, bucket_mb=BUCKET_MB)
    out: dict = {}
    th = threading.Thread(target=_receive, args=(host.sender.info.to_dict(), out), daemon=True)
    th.start()
    try:
        metrics = host.sync_send()
        th.join(timeout=60)
    finally:
        host.sender.close()
    assert "error" not in out, out.get("error")
    assert out["version"] == 5 and metrics["sync/buckets"] >= 10
    assert list(out["got"]) == [n for n, _, _ in shapes]
    assert all(torch.equal(out["got"][n], learner.sent[n]) for n in learner.sent)
    bucket = host.sender.bucket_bytes
    largest = max(t.numel() * t.element_size() for t in learner.sent.values())
    total = sum(t.numel() * t.element_size() for t in learner.sent.values())
    print(f"rank 0 held at most {learner.peak} B of {total} B (bucket {bucket} B, largest {largest} B)")
    assert learner.peak <= 2 * bucket + largest, (learner.peak, bucket, largest)


def test_a_failed_send_still_drives_every_gather():
    """Under FSDP every rank gathers each parameter in turn (rank 0 as it sends): when rank 0's sync
    fails (here: its receiver never joins), it still gathers the rest, or the other ranks would wait
    in a gather rank 0 never reaches."""
    from cluster.pipeline.topology import LearnerHost

    shapes = [(f"layers.{k}.w", (256,), torch.float32) for k in range(6)]
    learner = TrackedLearner(shapes)
    host = LearnerHost(None, 0, 1)
    host.learner = learner
    host.sender = WeightSender(HOST, 0, world_size=2, backend="gloo", timeout_s=0.5, bucket_mb=BUCKET_MB)
    try:
        with pytest.raises(SyncError, match=r"waiting for receiver ranks \[1\]"):
            host.sync_send()
    finally:
        host.sender.close()
    assert list(learner.sent) == [n for n, _, _ in shapes]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, port: int, model_dir: str, out_path: str) -> None:
    from torch.distributed.tensor import DTensor

    from common.config import AlgoConfig, LearnerConfig, ModelConfig
    from learner.rank import LearnerRank

    torch.set_num_threads(1)
    learner_cfg = LearnerConfig(fsdp=True, param_dtype="float32", mixed_precision="bf16", packing="none")
    r = LearnerRank(
        ModelConfig(path=model_dir, dtype="bfloat16"),
        AlgoConfig(),
        learner_cfg,
        rank=rank,
        world_size=1,
        init_method=f"tcp://{HOST}:{port}",
        timeout_s=120,
    )
    gathered: list[str] = []
    full_tensor = DTensor.full_tensor

    def recording(self, *args, **kwargs):
        gathered.append(str(self.dtype))
        return full_tensor(self, *args, **kwargs)

    DTensor.full_tensor = recording
    try:
        sent = [(n, str(t.dtype), list(t.shape)) for n, t in r.weights_for_sync()]
    finally:
        DTensor.full_tensor = full_tensor
    spec = [(n, str(d), list(s)) for n, d, s in r.weights_spec()]
    master = sorted({str(p.dtype) for p in r.module.parameters()})
    with open(out_path, "w") as f:
        json.dump({"gathered": gathered, "sent": sent, "spec": spec, "master": master}, f)
    r.close()


def test_fsdp_gather_moves_model_dtype_and_the_spec_lists_what_is_sent(tiny_model_dir, tmp_path):
    out = tmp_path / "out.json"
    before = torch.get_num_threads()
    mp.start_processes(
        _fsdp_worker,
        args=(_free_port(), str(tiny_model_dir), str(out)),
        nprocs=1,
        start_method="spawn",
    )
    torch.set_num_threads(before)
    got = json.loads(out.read_text())
    assert got["master"] == ["torch.float32"]
    assert got["gathered"] and set(got["gathered"]) == {"torch.bfloat16"}, got["gathered"]
    assert got["sent"] == got["spec"] and {d for _, d, _ in got["sent"]} == {"torch.bfloat16"}


def test_lora_spec_lists_the_merged_weights(tiny_model_dir):
    pytest.importorskip("peft")
    from common.config import load_config
    from learner.rank import LearnerRank

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "learner.lora.rank=4", "learner.lora.alpha=8"])
    r = LearnerRank(cfg.model, cfg.algo, cfg.learner, temperature=1.0)
    try:
        sent = [(n, t.dtype, tuple(t.shape)) for n, t in r.weights_for_sync()]
        assert r.weights_spec() == sent and not any("lora_" in n for n, _, _ in sent)
    finally:
        r.close()
