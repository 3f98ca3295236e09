"""The run-level check of a decoded tree (common.tree.check_for_run): every kind of tree that decodes
but does not fit the run is refused with its reason; a tree that fits passes."""

from __future__ import annotations

import pytest
from poison import poison_entries, valid_tree

from common.errors import WireError
from common.tree import RunLimits, check_for_run, decode_tree

LIMITS = dict(vocab_size=64, max_prompt_tokens=16, max_response_tokens=12, leaves=4, epochs=2)


def limits(version: int = 3, prompts=("p-1",)) -> RunLimits:
    return RunLimits(**LIMITS, max_version=lambda: version, prompt_ids=frozenset(prompts))


def test_a_tree_that_fits_the_run_passes():
    tree = valid_tree("p-1@e1", "p-1", w=4, seg_tokens=4, version=3)
    check_for_run(tree, limits())


@pytest.mark.parametrize(
    "kind,data,reason", poison_entries(64, 16, 12, 4), ids=lambda x: x if isinstance(x, str) else ""
)
def test_each_kind_of_bad_tree_is_refused_with_its_reason(kind, data, reason):
    with pytest.raises(WireError, match=reason):  # a string timing fails decode_tree already
        check_for_run(decode_tree(data), limits())


def test_tree_ids_must_name_their_prompt_and_a_run_epoch():
    with pytest.raises(WireError, match="is not '<prompt id>@e<epoch>'"):
        check_for_run(valid_tree("p-1@e2", "p-1"), limits())  # data.epochs=2: epochs 0 and 1
    with pytest.raises(WireError, match="is not '<prompt id>@e<epoch>'"):
        check_for_run(valid_tree("p-2@e0", "p-1"), limits())
