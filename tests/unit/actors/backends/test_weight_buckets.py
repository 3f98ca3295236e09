"""A multiprocess vLLM engine's ``update_weights`` stages the weights on disk bucket by bucket
(:func:`actors.backends.vllm_backend.write_buckets`): the host copies alive at once stay within one
bucket (plus the tensor in hand), where one file for the whole model held a copy of all of it.

Liveness is measured exactly: every tensor the stream yields is a fresh host copy (as a learner's cast
to ``model.dtype`` makes) whose storage reports when it is freed.
"""

from __future__ import annotations

import gc
import weakref

import torch
from safetensors import safe_open

from actors.backends.vllm_backend import write_buckets


def _weights():
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32)] * 24 + [(128, 32), (32,), (8, 4)]
    return [(f"w{i}", torch.randn(s, generator=g)) for i, s in enumerate(shapes)]


class Tracked:
    """Yields a fresh copy of each weight and records the bytes of copies alive at once."""

    def __init__(self, weights):
        self.weights, self.live, self.peak = weights, 0, 0

    def _freed(self, n):
        self.live -= n

    def __iter__(self):
        for name, w in self.weights:
            t = w.clone()
            self.live += t.nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t.untyped_storage(), self._freed, t.nbytes)
            yield name, t
            del t


def test_buckets_bound_the_host_copies_and_keep_every_tensor(tmp_path):
    weights = _weights()
    total = sum(w.nbytes for _, w in weights)
    biggest = max(w.nbytes for _, w in weights)
    bucket = total // 8
    stream = Tracked(weights)
    paths = write_buckets(stream, str(tmp_path), bucket)
    gc.collect()
    assert stream.live == 0
    assert stream.peak <= bucket + 2 * biggest < total // 2, (stream.peak, bucket, biggest, total)
    assert len(paths) >= 8
    back = {}
    for p in paths:
        with safe_open(p, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                back[name] = f.get_tensor(name)
    assert sorted(back) == sorted(n for n, _ in weights)
    assert all(torch.equal(back[n], w) for n, w in weights)
    # one bucket for everything (what a single file did): every copy alive at once
    whole = Tracked(weights)
    (tmp_path / "one").mkdir()
    assert len(write_buckets(whole, str(tmp_path / "one"), 1 << 40)) == 1
    assert whole.peak >= total


def test_tied_and_partial_views_are_written(tmp_path):
    emb = torch.randn(16, 8)
    big = torch.randn(100)
    named = [("embed", emb), ("lm_head", emb), ("part", big[10:20]), ("bias", torch.zeros(8))]
    paths = write_buckets(iter(named), str(tmp_path), 1 << 20)
    with safe_open(paths[0], framework="pt") as f:
        assert torch.equal(f.get_tensor("lm_head"), emb) and torch.equal(f.get_tensor("part"), big[10:20])
