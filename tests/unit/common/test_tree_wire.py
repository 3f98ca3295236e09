"""The Tree wire type: structure helpers, msgpack round trip, and rejection of malformed entries."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from trees import wire_tree

from common.errors import WireError
from common.tree import SCHEMA_VERSION, Tree, decode_tree, encode_tree


def test_paths_and_responses():
    t = wire_tree()
    assert t.leaf_paths() == [[1, 2], [1, 3], [4]]
    assert t.response_ids(t.leaves[1]).tolist() == [10, 11, 13, 14, 15]
    np.testing.assert_allclose(t.response_logprobs(t.leaves[0]), [-0.5, -0.25, -1.0])
    assert t.response_versions(t.leaves[0]).tolist() == [0, 0, 1]
    assert t.oldest_version(t.leaves[1]) == 0
    assert t.num_tokens() == 7
    assert t.rewards_L.tolist() == [1.0, -1.0, 1.0]


def test_round_trip_is_exact():
    t = wire_tree()
    back = decode_tree(encode_tree(t))
    assert back.tree_id == t.tree_id and back.prompt_id == t.prompt_id and back.generator_id == 2
    assert back.prompt_ids.tolist() == [1, 2, 3]
    assert back.metadata == t.metadata and back.timings == t.timings
    for a, b in zip(back.segments, t.segments):
        assert (a.node_id, a.parent_id, a.depth, a.version) == (b.node_id, b.parent_id, b.depth, b.version)
        assert a.token_ids.tolist() == b.token_ids.tolist()
        assert a.logprobs.tobytes() == b.logprobs.tobytes()
    assert [(x.node_id, x.finish_reason, x.length, x.reward, x.answer, x.correct) for x in back.leaves] == [
        (x.node_id, x.finish_reason, x.length, x.reward, x.answer, x.correct) for x in t.leaves
    ]


def test_unscored_reward_survives_as_nan():
    t = wire_tree()
    t.leaves[0].reward = math.nan
    t.leaves[0].correct = None
    back = decode_tree(encode_tree(t))
    assert math.isnan(back.leaves[0].reward) and back.leaves[0].correct is None
    with pytest.raises(WireError, match="no verdict"):
        back.correct_L  # noqa: B018 - the property raises


def _payload(t: Tree) -> dict:
    return msgpack.unpackb(encode_tree(t), raw=False)


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda p: p.update(schema=99), "schema version"),
        (lambda p: p.pop("leaves"), "missing fields"),
        (lambda p: p["nodes"].update(parent=np.array([0, 1, 9, 0], "<i4").tobytes()), "unknown parent"),
        (lambda p: p["nodes"].update(depth=np.array([1, 3, 2, 1], "<i4").tobytes()), "depth"),
        (lambda p: p["nodes"].update(id=np.array([1, 2, 2, 4], "<i4").tobytes()), "duplicate node id"),
        (lambda p: p["nodes"].update(tokens=p["nodes"]["tokens"][:-4]), "nodes.tokens"),
        (lambda p: p["nodes"].update(logprobs=p["nodes"]["logprobs"][:-1]), "whole number"),
        (lambda p: p["nodes"].update(logprobs=np.full(7, np.nan, "<f4").tobytes()), "non-finite"),
        (lambda p: p["nodes"].update(logprobs=np.full(7, 3.0, "<f4").tobytes()), "logprob > 0"),
        (lambda p: p["leaves"].__setitem__(0, [2, "bored", 3, 1.0, None, True]), "finish reason"),
        (lambda p: p["leaves"].__setitem__(0, [2, "eos", 4, 1.0, None, True]), "length"),
        (lambda p: p["leaves"].__setitem__(0, [77, "eos", 3, 1.0, None, True]), "unknown node"),
        (lambda p: p["leaves"].__setitem__(1, [2, "eos", 3, 1.0, None, True]), "two leaves"),
        (lambda p: p["leaves"].__setitem__(0, [2, "eos", 3, "x", None, True]), "reward"),
        (lambda p: p["leaves"].__setitem__(0, [2, "eos", 3, 1.0, None, 1]), "correct"),
        (lambda p: p["leaves"].__setitem__(0, [2, "eos", 3, 1.0, None]), "each leaf"),
        (lambda p: p.update(schema=1), "schema version"),
        (lambda p: p.update(prompt_ids=b""), "prompt_ids"),
        (lambda p: p.update(metadata={"k": [1, 2]}), "scalar"),
        (lambda p: p.update(tree_id=""), "tree_id"),
    ],
)
def test_malformed_entries_are_rejected_with_a_reason(mutate, reason):
    p = _payload(wire_tree())
    mutate(p)
    with pytest.raises(WireError, match=reason):
        decode_tree(_pack(p))


def test_garbage_and_size_limit():
    with pytest.raises(WireError, match="msgpack"):
        decode_tree(b"\xc1\xc1\xc1")
    with pytest.raises(WireError, match="not a map"):
        decode_tree(_pack([1, 2, 3]))
    data = encode_tree(wire_tree())
    with pytest.raises(WireError, match="exceeds"):
        decode_tree(data, max_bytes=len(data) - 1)
    assert decode_tree(data, max_bytes=len(data)).tree_id == "t-1"


def test_encode_refuses_an_invalid_tree():
    t = wire_tree()
    t.leaves[0].length = 99
    with pytest.raises(WireError):
        encode_tree(t)


def test_schema_version_is_written():
    assert _payload(wire_tree())["schema"] == SCHEMA_VERSION
