"""The Tree wire type: structure helpers, msgpack round trip, and rejection of malformed entries."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from trees import wire_tree

from common.errors import WireError
from common.sampling_metrics import tree_metrics
from common.tree import SCHEMA_VERSION, Leaf, Segment, Tree, decode_tree, encode_tree


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


# ------------------------------------------------------------------ observation tokens (tool results)
def tool_tree() -> Tree:
    """root -> 1 (2 sampled + 3 observed, shared by leaves 2 and 3) -> {2 (sampled), 3 (1 sampled + 2
    observed: a tool turn in one leaf only)}; root -> 4 (sampled) -> 5 (an observation-only segment)."""
    segs = [
        Segment.with_observation(1, 0, 1, [10, 11], [-0.5, -0.25], 0, [30, 31, 32]),
        Segment(2, 1, 2, [12], [-1.0], 1),
        Segment(3, 1, 2, [13, 33, 34], [-0.1, 0.0, 0.0], 1, np.array([0, 1, 1], dtype=np.uint8)),
        Segment(4, 0, 1, [16], [-2.0], 0),
        Segment(5, 4, 2, [35, 36], [0.0, 0.0], 0, [True, True]),
    ]
    leaves = [
        Leaf(2, "eos", 6, 1.0, "7", True),
        Leaf(3, "max_depth", 8, -1.0, None, False),
        Leaf(5, "max_tokens", 3, 0.0, None, False),
    ]
    return Tree("t-1", "p-1", [1, 2, 3], segs, leaves, metadata={"answer": "7", "epoch": 0})


def test_observation_tokens_in_paths_and_counts():
    t = tool_tree()
    t.validate()
    assert t.segments[0].observed.tolist() == [False, False, True, True, True]
    assert t.segments[0].logprobs.tolist() == [-0.5, -0.25, 0.0, 0.0, 0.0]
    assert t.segments[1].observed is None and t.segments[2].observed.dtype == bool
    assert t.response_ids(t.leaves[1]).tolist() == [10, 11, 30, 31, 32, 13, 33, 34]
    assert t.response_observed(t.leaves[1]).tolist() == [0, 0, 1, 1, 1, 0, 1, 1]
    assert t.response_observed(t.leaves[0]).tolist() == [0, 0, 1, 1, 1, 0]
    assert [t.sampled_length(lf) for lf in t.leaves] == [3, 3, 1]
    assert [lf.length for lf in t.leaves] == [6, 8, 3]  # positions: observation tokens included
    assert t.num_tokens() == 2 + 1 + 1 + 1  # sampled (decoded) tokens only, shared ones once
    assert t.num_observation_tokens() == 3 + 2 + 2
    assert (
        wire_tree().num_observation_tokens() == 0
        and wire_tree().response_observed(wire_tree().leaves[0]).tolist() == [False] * 3
    )


def test_observation_masks_round_trip_and_are_omitted_when_absent():
    t = tool_tree()
    p = _payload(t)
    assert p["schema"] == 3 and p["nodes"]["observed"] == bytes([0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1])
    back = decode_tree(encode_tree(t))
    for a, b in zip(back.segments, t.segments):
        assert a.token_ids.tolist() == b.token_ids.tolist() and a.logprobs.tobytes() == b.logprobs.tobytes()
        assert (a.observed is None) == (b.observed is None)
        assert a.observed_mask().tolist() == b.observed_mask().tolist()
    assert back.num_tokens() == t.num_tokens() and back.num_observation_tokens() == 7
    assert "observed" not in _payload(wire_tree())["nodes"]  # no observation: entries stay as small
    plain = _payload(wire_tree())
    plain["nodes"]["observed"] = b""  # empty reads as none
    assert all(s.observed is None for s in decode_tree(_pack(plain)).segments)


def _set_observed(p: dict, values) -> None:
    p["nodes"]["observed"] = bytes(values)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda p: _set_observed(p, [0] * 11), "nodes.observed: 11 items, expected 12"),
        (lambda p: _set_observed(p, [0, 0, 2, 1, 1, 0, 0, 1, 1, 0, 1, 1]), "only 0 and 1"),
        (lambda p: p["nodes"].update(observed=[0, 1]), "nodes.observed must be bytes"),
        (  # an observation token with a logprob: it was not sampled
            lambda p: p["nodes"].update(logprobs=np.full(12, -0.5, "<f4").tobytes()),
            "observation tokens must carry logprob 0.0",
        ),
        (  # leaf 5's path made of observations only (node 4 too)
            lambda p: (
                _set_observed(p, [0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1]),
                p["nodes"].update(logprobs=p["nodes"]["logprobs"][:36] + bytes(12)),
            ),
            "leaf 5: every token of its path is an observation",
        ),
        (lambda p: p.update(schema=2), "schema version 2, expected 3"),
    ],
)
def test_malformed_observation_masks_are_rejected_with_a_reason(mutate, reason):
    p = _payload(tool_tree())
    mutate(p)
    with pytest.raises(WireError, match=reason):
        decode_tree(_pack(p))


def test_observation_flags_are_checked_in_memory():
    t = tool_tree()
    t.segments[1].observed = np.array([True, False])
    with pytest.raises(WireError, match="node 2: 1 tokens but 2 observation flags"):
        encode_tree(t)
    t = tool_tree()
    t.segments[1] = Segment(2, 1, 2, [12], [-1.0], 1, [2])
    with pytest.raises(WireError, match="node 2: observed must be a 1-D mask of 0/1"):
        t.validate()
    t = tool_tree()
    t.segments[0].logprobs[1] = np.nan  # sampled tokens keep their checks
    with pytest.raises(WireError, match="non-finite"):
        t.validate()


def test_decode_metrics_count_sampled_tokens_only():
    """``tree/distinct_tokens`` and ``tree/leaf_tokens`` are what was decoded: observation tokens are
    prefilled from the tool's result, never decoded, so neither counts them."""
    m = tree_metrics([tool_tree()])
    assert m["tree/distinct_tokens"] == 5 and m["tree/leaf_tokens"] == 3 + 3 + 1
    assert m["tree/decoded_vs_flat"] == pytest.approx(5 / 7)
