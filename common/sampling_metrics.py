"""Typed sampling metrics with an explicit reduction per key, namespaced ``rollout/`` and ``tree/``.

``rollout/`` keys describe engine work (decoded tokens, prefill tokens computed vs served from the
prefix cache as the engine reports them, throughput); ``tree/`` keys describe the trees
(:class:`TreeTally`):

- ``tree/leaf_depth/<k>`` leaves ending at depth ``k`` (segments), ``tree/leaf_depth_mean``;
- ``tree/branching/<k>`` mean children of a node at depth ``k`` that has children (``0`` = the
  root: its children are the root divergence, plus any restart's);
- ``tree/fallbacks`` (a tree with no live path re-seeded from a kept prefix) and ``tree/restarts``
  (no candidate: re-seeded from the root), read from the tree's metadata (:data:`FALLBACKS_KEY`,
  :data:`RESTARTS_KEY`, written by the sampler) so they survive the replay queue;
- ``tree/distinct_tokens`` (response tokens stored in the trees: shared prefixes once, what the
  tree decoded) against ``tree/leaf_tokens`` (the flat equivalent: the same leaves sampled
  independently, every leaf's full response); both count sampled tokens only (a tool's
  observation tokens are not decoded); ``tree/decoded_vs_flat`` is their ratio and
  ``tree/decoded_per_leaf`` / ``tree/flat_per_leaf`` the per-leaf figures;
- ``tree/finish/<reason>`` leaves per finish reason;
- with tools (trees carrying :data:`TOOL_CALLS_KEY`): ``tree/tool_calls`` and ``tree/tool_errors``
  (calls run and those answered ``error: ...``, from the tree's metadata), ``tree/tool_calls_per_leaf``
  (calls on each leaf's path), ``tree/observation_tokens`` (tool-result tokens stored in the trees)
  and ``tree/tool_branching`` (mean children of a node that ends in a tool call and has children:
  the branching at tool boundaries).

:meth:`SamplingStats.metrics` and :meth:`TreeTally.metrics` return ``{key: common.metrics.Metric}``;
a logger combining several sources reduces each key with its own ``reduce`` (sum, mean or max),
means weighted by what they average over (trees, leaves, nodes, tokens).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.metrics import Metric, values

FALLBACKS_KEY = "sampler_fallbacks"
RESTARTS_KEY = "sampler_restarts"
TOOL_CALLS_KEY = "tool_calls"
TOOL_ERRORS_KEY = "tool_errors"


@dataclass
class TreeTally:
    """Structure counts over a set of finished trees (pure: reads segments, leaves and metadata)."""

    trees: int = 0
    leaves: int = 0
    leaf_tokens: int = 0  # sampled response tokens over all trajectories (shared prefixes per leaf)
    tree_tokens: int = 0  # distinct sampled response tokens stored in the trees
    fallbacks: int = 0
    restarts: int = 0
    finish_reasons: Counter = field(default_factory=Counter)
    depth_hist: Counter = field(default_factory=Counter)  # leaf depth -> leaves
    children: Counter = field(default_factory=Counter)  # parent depth -> children of such parents
    parents: Counter = field(default_factory=Counter)  # depth -> nodes with at least one child
    tool_trees: int = 0  # trees sampled with tools
    tool_calls: int = 0
    tool_errors: int = 0
    tool_leaf_calls: int = 0  # calls summed over every leaf's path
    tool_leaves: int = 0
    observation_tokens: int = 0
    tool_children: int = 0  # children of nodes that end in a tool call
    tool_parents: int = 0

    def add(self, tree: Any) -> None:
        self.trees += 1
        self.leaves += len(tree.leaves)
        self.tree_tokens += tree.num_tokens()
        self.fallbacks += int(tree.metadata.get(FALLBACKS_KEY, 0))
        self.restarts += int(tree.metadata.get(RESTARTS_KEY, 0))
        depth = {0: 0, **{s.node_id: s.depth for s in tree.segments}}
        kids = Counter(s.parent_id for s in tree.segments)
        for parent, n in kids.items():
            self.children[depth[parent]] += n
            self.parents[depth[parent]] += 1
        for leaf in tree.leaves:
            self.leaf_tokens += tree.sampled_length(leaf)
            self.finish_reasons[leaf.finish_reason] += 1
            self.depth_hist[depth[leaf.node_id]] += 1
        if TOOL_CALLS_KEY in tree.metadata:
            self._add_tools(tree, kids)

    def _add_tools(self, tree: Any, kids: Counter) -> None:
        calling = {s.node_id for s in tree.segments if s.num_observed}
        self.tool_trees += 1
        self.tool_calls += int(tree.metadata.get(TOOL_CALLS_KEY, 0))
        self.tool_errors += int(tree.metadata.get(TOOL_ERRORS_KEY, 0))
        self.observation_tokens += tree.num_observation_tokens()
        for leaf in tree.leaves:
            self.tool_leaves += 1
            self.tool_leaf_calls += sum(s.node_id in calling for s in tree.path(leaf.node_id))
        for node_id in calling & set(kids):
            self.tool_children += kids[node_id]
            self.tool_parents += 1

    def update(self, trees: Iterable[Any]) -> TreeTally:
        for tree in trees:
            self.add(tree)
        return self

    def metrics(self) -> dict[str, Metric]:
        """The ``tree/`` keys (empty when no tree was added)."""
        if not self.trees:
            return {}
        leaves = max(self.leaves, 1)
        depth_sum = sum(d * n for d, n in self.depth_hist.items())
        out = {
            "tree/trees": Metric.sum(self.trees),
            "tree/leaves": Metric.sum(self.leaves),
            "tree/leaves_per_tree": Metric.mean(self.leaves / self.trees, self.trees),
            "tree/leaf_depth_mean": Metric.mean(depth_sum / leaves, self.leaves),
            "tree/fallbacks": Metric.sum(self.fallbacks),
            "tree/restarts": Metric.sum(self.restarts),
            "tree/leaf_tokens": Metric.sum(self.leaf_tokens),
            "tree/distinct_tokens": Metric.sum(self.tree_tokens),
            "tree/decoded_vs_flat": Metric.mean(
                self.tree_tokens / self.leaf_tokens if self.leaf_tokens else 1.0, max(self.leaf_tokens, 1)
            ),
            "tree/decoded_per_leaf": Metric.mean(self.tree_tokens / leaves, self.leaves),
            "tree/flat_per_leaf": Metric.mean(self.leaf_tokens / leaves, self.leaves),
        }
        for reason, n in sorted(self.finish_reasons.items()):
            out[f"tree/finish/{reason}"] = Metric.sum(n)
        for depth, n in sorted(self.depth_hist.items()):
            out[f"tree/leaf_depth/{depth}"] = Metric.sum(n)
        for depth, n in sorted(self.parents.items()):
            out[f"tree/branching/{depth}"] = Metric.mean(self.children[depth] / n, n)
        if self.tool_trees:
            out.update(self._tool_metrics())
        return out

    def _tool_metrics(self) -> dict[str, Metric]:
        out = {
            "tree/tool_calls": Metric.sum(self.tool_calls),
            "tree/tool_errors": Metric.sum(self.tool_errors),
            "tree/tool_calls_per_leaf": Metric.mean(
                self.tool_leaf_calls / max(self.tool_leaves, 1), max(self.tool_leaves, 1)
            ),
            "tree/observation_tokens": Metric.sum(self.observation_tokens),
        }
        if self.tool_parents:
            out["tree/tool_branching"] = Metric.mean(
                self.tool_children / self.tool_parents, self.tool_parents
            )
        return out


def tree_metrics(trees: Iterable[Any]) -> dict[str, float]:
    """The ``tree/`` metrics of ``trees`` as plain values (see :class:`TreeTally`)."""
    return values(TreeTally().update(trees).metrics())


@dataclass
class SamplingStats:
    steps: int = 0
    requests: int = 0
    decoded_tokens: int = 0
    prefill_tokens_computed: int = 0
    prefill_tokens_cached: int = 0
    backend_s: float = 0.0
    max_batch: int = 0
    tally: TreeTally = field(default_factory=TreeTally)

    @property
    def trees(self) -> int:
        return self.tally.trees

    @property
    def leaves(self) -> int:
        return self.tally.leaves

    @property
    def leaf_tokens(self) -> int:
        return self.tally.leaf_tokens

    @property
    def fallbacks(self) -> int:
        return self.tally.fallbacks

    def record_step(self, results: Sequence[Any], wall_s: float) -> None:
        """One backend call: ``results`` are GenResult-like (token_ids, num_prompt_tokens, num_cached_tokens)."""
        self.steps += 1
        self.requests += len(results)
        self.max_batch = max(self.max_batch, len(results))
        self.backend_s += wall_s
        for r in results:
            self.decoded_tokens += len(r.token_ids)
            self.prefill_tokens_cached += r.num_cached_tokens
            self.prefill_tokens_computed += r.num_prompt_tokens - r.num_cached_tokens

    def record_tree(self, tree: Any) -> None:
        self.tally.add(tree)

    def engine_metrics(self, wall_s: float | None = None) -> dict[str, Metric]:
        """The ``rollout/`` keys: the engine's work since this object was made (cumulative).
        Throughput uses ``wall_s`` (default: time spent in backend calls)."""
        wall = wall_s if wall_s is not None else self.backend_s
        prefill = self.prefill_tokens_computed + self.prefill_tokens_cached
        return {
            "rollout/steps": Metric.sum(self.steps),
            "rollout/requests": Metric.sum(self.requests),
            "rollout/max_batch": Metric.max(self.max_batch),
            "rollout/decoded_tokens": Metric.sum(self.decoded_tokens),
            "rollout/prefill_tokens_computed": Metric.sum(self.prefill_tokens_computed),
            "rollout/prefill_tokens_cached": Metric.sum(self.prefill_tokens_cached),
            "rollout/prefix_cache_hit_rate": Metric.mean(
                self.prefill_tokens_cached / prefill if prefill else 0.0, max(prefill, 1)
            ),
            "rollout/backend_s": Metric.sum(self.backend_s),
            "rollout/trajectories_per_s": Metric.sum(self.leaves / wall if wall else 0.0),
            "rollout/tokens_per_s": Metric.sum(self.tally.leaf_tokens / wall if wall else 0.0),
            "rollout/decoded_tokens_per_s": Metric.sum(self.decoded_tokens / wall if wall else 0.0),
        }

    def metrics(self, wall_s: float | None = None) -> dict[str, Metric]:
        """The engine's ``rollout/`` keys and the ``tree/`` keys of every tree recorded."""
        return {**self.engine_metrics(wall_s), **self.tally.metrics()}

    def as_dict(self, wall_s: float | None = None) -> dict[str, float]:
        return values(self.metrics(wall_s))
