"""Readable rollouts: a tree, its advantages and a decode function as one record; rollouts.jsonl is
truncated with the other per-step logs on resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from trees import small_tree

from common.rollouts import due, step_records, tree_record
from common.tree import Leaf, Tree


def _tree() -> Tree:
    return small_tree(Leaf(4, "finished", 1, math.nan, None, None))


def _decode(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def test_a_tree_becomes_one_readable_record():
    rec = tree_record(_tree(), np.array([0.5, -1.25, 0.0]), _decode)
    assert rec["tree_id"] == "t-1" and rec["prompt_id"] == "p-1" and rec["generator"] == 2
    assert rec["prompt"] == "w1 w2 w3" and rec["gold"] == "7"
    a, b, c = rec["leaves"]
    assert a == {
        "text": "w10 w11 w12",
        "answer": "7",
        "reward": 1.0,
        "correct": True,
        "advantage": 0.5,
        "finish_reason": "eos",
        "depth": 2,
        "tokens": 3,
        "versions": [0, 1],  # the path spans a weight update
    }
    assert (
        b["text"] == "w10 w11 w13 w14 w15" and b["finish_reason"] == "max_depth" and b["advantage"] == -1.25
    )
    assert c["depth"] == 1 and c["versions"] == [0] and c["reward"] is None and c["correct"] is None
    json.dumps(rec, allow_nan=False)  # strict JSON: no NaN left


def test_untrained_trees_and_mismatched_advantages():
    assert all(leaf["advantage"] is None for leaf in tree_record(_tree(), None, _decode)["leaves"])
    with pytest.raises(ValueError, match="2 advantages for 3 leaves"):
        tree_record(_tree(), [0.1, 0.2], _decode)
    assert len(step_records([_tree(), _tree()], [np.zeros(3), np.ones(3)], _decode)) == 2


def test_schedule():
    assert [s for s in range(1, 31) if due(s, 10)] == [10, 20, 30]
    assert not any(due(s, 0) for s in range(1, 31))


def test_rollouts_are_truncated_on_resume(tmp_path):
    from cluster.rundir import truncate_logs

    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps({"step": s, "tree_id": f"t{s}"}) + "\n" for s in (2, 2, 4, 6)))
    truncate_logs(tmp_path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 2, 4]
