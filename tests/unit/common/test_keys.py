"""Every Redis key of a run is spelled by common/keys.py."""

from __future__ import annotations

import pytest

from common.errors import QueueError
from common.keys import TREES_PATTERN, RunKeys, run_name_for
from common.replay import stream_keys


def test_the_keys_of_a_run():
    k = RunKeys("r-1")
    assert (k.trees, k.dead, k.dead_count) == ("treepo:r-1:trees", "treepo:r-1:dead", "treepo:r-1:dead_count")
    assert (
        k.prompts_cursor == "treepo:r-1:prompts:cursor"
        and k.prompts_inflight(3) == "treepo:r-1:prompts:inflight:3"
    )
    assert k.dropped == "treepo:r-1:pipeline:dropped"
    assert stream_keys("r-1") == {"trees": k.trees, "dead": k.dead, "dead_count": k.dead_count}
    assert RunKeys.of_trees_key(k.trees.encode()) == k
    assert TREES_PATTERN == "treepo:*:trees"
    with pytest.raises(QueueError, match="run name"):
        RunKeys("a b")


def test_run_name_is_stable_per_directory(tmp_path):
    a, b = run_name_for(tmp_path / "x"), run_name_for(tmp_path / "x" / ".." / "x")
    assert a == b and a.startswith("x-") and run_name_for(tmp_path / "y") != a
