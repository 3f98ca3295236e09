"""Tree pictures (common/tree_render.py) on hand-built trees: every segment and every leaf of the tree
is in the page, the structure nests as the tree does, per-segment figures are the leaves' means, and
text is escaped (a segment's text comes back intact through an HTML parser, never as markup)."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from trees import deep_tree, wire_tree

from common.tree import Leaf, Segment, Tree
from common.tree_render import pick_trees, render_page, segment_nodes, write_tree_page

EVIL = '<script>alert("x")</script> & \\boxed{7}'


def decode(ids):
    return EVIL if list(ids) == [12] else " ".join(f"t{i}" for i in ids)


class Outline(HTMLParser):
    """Collects sections, segment nodes (with their nesting depth in <ul>s), leaves, tags and text."""

    def __init__(self):
        super().__init__()
        self.trees, self.nodes, self.leaves, self.tags, self.pre = [], [], [], set(), []
        self.ul, self._in_pre = 0, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "ul":
            self.ul += 1
        if tag == "section":
            self.trees.append(a["data-tree"])
        if "data-node" in a:
            self.nodes.append((self.trees[-1], int(a["data-node"]), int(a["data-depth"]), self.ul))
        if "data-leaf" in a:
            self.leaves.append((self.trees[-1], int(a["data-leaf"])))
        if tag == "pre":
            self._in_pre, self._buf = True, ""

    def handle_endtag(self, tag):
        if tag == "ul":
            self.ul -= 1
        if tag == "pre":
            self._in_pre = False
            self.pre.append(self._buf)

    def handle_data(self, data):
        if self._in_pre:
            self._buf += data


def parse(page: str) -> Outline:
    p = Outline()
    p.feed(page)
    return p


def test_every_segment_and_every_leaf_is_drawn_where_the_tree_has_it():
    trees = [wire_tree(), deep_tree()]
    page = render_page(trees, [[1.0, -2.0, 0.5], None], decode, "step 3")
    p = parse(page)
    assert p.trees == ["t-1", "t-deep"]
    for t in trees:
        drawn = [(n, d, ul) for tid, n, d, ul in p.nodes if tid == t.tree_id]
        assert sorted(n for n, _, _ in drawn) == sorted(s.node_id for s in t.segments)
        assert all(ul == d for _, d, ul in drawn), "a segment of depth d sits in d nested lists"
        assert sorted(i for tid, i in p.leaves if tid == t.tree_id) == list(range(len(t.leaves)))
    assert "script" not in p.tags and "<script>" not in page  # text is never markup
    assert EVIL in p.pre  # ... and comes back intact
    assert page.startswith("<!doctype html>") and "http" not in page  # self-contained


def test_segment_figures_are_the_means_of_the_leaves_below():
    t = wire_tree()  # leaves 2, 3 under node 1 (rewards 1, -1), leaf 4 alone (reward 1)
    view = segment_nodes(t, [0.5, -1.5, 2.0], decode)
    (n1, n4) = view["children"][0]
    assert (n1["id"], n1["below"], n1["mean_reward"], n1["mean_advantage"]) == (1, [0, 1], 0.0, -0.5)
    assert (n4["mean_reward"], n4["mean_advantage"], n4["leaves"][0]["finish_reason"]) == (
        1.0,
        2.0,
        "finished",
    )
    assert [k["id"] for k in view["children"][1]] == [2, 3] and n1["leaves"] == []
    assert segment_nodes(t, None, decode)["children"][0][0]["mean_advantage"] is None
    with pytest.raises(ValueError, match="advantage"):
        render_page([t], [], decode, "x")


def test_the_most_branched_trees_are_picked_and_written(tmp_path):
    trees = [wire_tree(), deep_tree(), wire_tree()]
    assert pick_trees(trees, 1) == [1] and pick_trees(trees, 2) == [0, 1] and pick_trees(trees, 0) == []
    out = write_tree_page(tmp_path / "trees" / "step-2.html", trees, None, decode, "step 2", n=1)
    assert parse(out.read_text()).trees == ["t-deep"]


class Spans(HTMLParser):
    """Text inside <span class="obs"> (observation runs) and the rest of each <pre>."""

    def __init__(self):
        super().__init__()
        self.obs, self.plain, self._depth, self._pre = [], [], 0, False

    def handle_starttag(self, tag, attrs):
        if tag == "pre":
            self._pre = True
        if tag == "span" and ("class", "obs") in attrs and self._pre:
            self._depth += 1

    def handle_endtag(self, tag):
        if tag == "pre":
            self._pre = False
        if tag == "span" and self._depth:
            self._depth -= 1

    def handle_data(self, data):
        if self._pre:
            (self.obs if self._depth else self.plain).append(data)


def test_observation_tokens_are_drawn_apart():
    """A tool's observation tokens are shaded spans of their own; sampled text around them is not;
    headers count them, and the decoded/flat ratio counts sampled tokens only."""
    segs = [
        Segment.with_observation(1, 0, 1, [10, 11], [-0.5, -0.5], 0, [12, 20]),
        Segment(2, 1, 2, [21], [-1.0], 0),
        Segment(3, 1, 2, [22], [-1.0], 0),
    ]
    leaves = [Leaf(2, "eos", 5, 1.0, None, True), Leaf(3, "eos", 5, -1.0, None, False)]
    tree = Tree("t-tool", "p", [1], segs, leaves)
    page = render_page([tree], None, decode, "tools")
    p = Spans()
    p.feed(page)
    assert p.obs == ["t12 t20"]  # the observation run, on its own
    assert "t10 t11" in p.plain and "t21" in p.plain and "t22" in p.plain
    assert "2 observed" in page and "2 observation tokens" in page
    assert "decoded/flat tokens 0.67" in page  # (2 + 1 + 1) / (3 + 3)
    assert "<script>" not in page
    node = segment_nodes(tree, None, decode)["children"][0][0]
    assert node["parts"] == [("t10 t11", False), (decode([12, 20]), True)] and node["observed"] == 2
