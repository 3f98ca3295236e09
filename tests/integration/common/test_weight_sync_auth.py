"""The weight-sync group's store admits only token holders: a secured sender (the pipeline's, via
``WeightSender.from_config``) keeps every key of a generation under a random per-generation token, so
a client that reaches the store's port without it can neither join, nor take a receiver's rank, nor
read the rendezvous. Real TCPStore and gloo, receivers in threads."""

from __future__ import annotations

import threading

import msgpack
import pytest
import torch
from torch.distributed import TCPStore

from common.config import SyncConfig
from common.errors import SyncError
from common.weight_sync import CURRENT_KEY, SyncGroupInfo, WeightReceiver, WeightSender

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
WEIGHTS = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}


def _receive_in_thread(recv: WeightReceiver, out: dict) -> threading.Thread:
    def run():
        try:
            version, it = recv.receive()
            out["version"], out["tensors"] = version, {k: v.clone() for k, v in it}
        except SyncError as e:
            out["error"] = str(e)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def test_pipeline_sender_is_secured_and_the_token_stays_out_of_reprs():
    sender = WeightSender.from_config(SyncConfig(backend="gloo", timeout_s=5), HOST, 0, world_size=2)
    try:
        info = sender.info
        assert len(info.token) == 32
        assert info.token not in repr(info) and info.token not in sender._where()
        assert SyncGroupInfo(**info.to_dict()) == info  # travels through Ray as a plain dict
        # what the public record shows: a hash, not the token
        raw = TCPStore(HOST, info.port, None, False, timeout=sender.timeout).get(CURRENT_KEY)
        assert info.token.encode() not in raw and msgpack.unpackb(raw)["token_sha256"]
        old = info.token
        assert sender.rebuild().token not in ("", old)  # a new token per generation
    finally:
        sender.close()


def test_an_intruder_cannot_take_a_rank_and_the_group_still_syncs():
    sender = WeightSender(HOST, 0, world_size=2, backend="gloo", timeout_s=10, token=None)
    info = sender.info
    # an outsider reaching the port, without the token: claims rank 1 wherever it can guess
    intruder = TCPStore(HOST, info.port, None, False, timeout=sender.timeout)
    for prefix in (f"treepo-wsync-g{info.generation}", f"treepo-wsync-g{info.generation}-"):
        assert intruder.add(f"{prefix}/rank-1", 1) == 1
    # and as a receiver: no token, or a wrong one, is refused at once
    for token in ("", "0" * 32):
        bad = WeightReceiver(HOST, info.port, 1, 2, "gloo", 10, info.generation, token)
        with pytest.raises(SyncError, match="token"):
            bad.connect()
        bad.close()
    recv = WeightReceiver.from_info(info.to_dict(), rank=1, timeout_s=10)
    out: dict = {}
    try:
        th = _receive_in_thread(recv, out)
        sender.send(WEIGHTS.items(), version=7)
        th.join(timeout=30)
        assert "error" not in out, out.get("error")
        assert out["version"] == 7 and all(torch.equal(out["tensors"][k], v) for k, v in WEIGHTS.items())
    finally:
        recv.close()
        sender.close()


def test_a_receiver_of_an_older_generation_cannot_join_the_new_one():
    sender = WeightSender(HOST, 0, world_size=2, backend="gloo", timeout_s=5, token=None)
    try:
        old = sender.info
        new = sender.rebuild(port=0)
        # old token, new port and generation: still refused (a leaked token dies with its generation)
        stale = SyncGroupInfo(new.host, new.port, new.world_size, new.generation, new.backend, old.token)
        recv = WeightReceiver.from_info(stale, rank=1, timeout_s=5)
        with pytest.raises(SyncError, match="token"):
            recv.connect()
        recv.close()
    finally:
        sender.close()


def test_unsecured_groups_still_work_for_direct_construction():
    # WeightSender(...) without a token keeps the plain prefix (standalone tools and tests)
    sender = WeightSender(HOST, 0, world_size=2, backend="gloo", timeout_s=10)
    assert sender.info.token == ""
    recv = WeightReceiver(HOST, sender.port, rank=1, world_size=2, backend="gloo", timeout_s=10)
    out: dict = {}
    try:
        th = _receive_in_thread(recv, out)
        sender.send(WEIGHTS.items(), version=1)
        th.join(timeout=30)
        assert out.get("version") == 1
    finally:
        recv.close()
        sender.close()
