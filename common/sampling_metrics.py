"""Typed sampling metrics with an explicit reduction per key, namespaced ``rollout/`` and ``tree/``.

``rollout/`` keys describe engine work (decoded tokens, prefill tokens computed vs served from the
prefix cache, throughput); ``tree/`` keys describe the trees (leaves per tree, fallbacks, leaf depth
histogram, finish reasons). :meth:`SamplingStats.metrics` returns ``{key: common.metrics.Metric}``;
a logger combining several generators reduces each key with its own ``reduce`` (sum, mean or max).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from common.metrics import Metric


@dataclass
class SamplingStats:
    steps: int = 0
    requests: int = 0
    decoded_tokens: int = 0
    prefill_tokens_computed: int = 0
    prefill_tokens_cached: int = 0
    backend_s: float = 0.0
    max_batch: int = 0
    trees: int = 0
    leaves: int = 0
    leaf_tokens: int = 0  # response tokens over all trajectories (shared prefixes counted per leaf)
    tree_tokens: int = 0  # distinct response tokens stored in the trees
    fallbacks: int = 0
    root_divergence_sum: int = 0
    finish_reasons: Counter = field(default_factory=Counter)
    depth_hist: Counter = field(default_factory=Counter)

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

    def record_tree(self, tree: Any, fallbacks: int = 0, root_divergence: int = 0, steps: int = 0) -> None:
        self.trees += 1
        self.leaves += len(tree.leaves)
        self.fallbacks += fallbacks
        self.root_divergence_sum += root_divergence
        self.tree_tokens += tree.num_tokens()
        depth = {s.node_id: s.depth for s in tree.segments}
        for leaf in tree.leaves:
            self.leaf_tokens += leaf.length
            self.finish_reasons[leaf.finish_reason] += 1
            self.depth_hist[depth[leaf.node_id]] += 1

    def metrics(self, wall_s: float | None = None) -> dict[str, Metric]:
        """All metrics; throughput uses ``wall_s`` (default: time spent in backend calls)."""
        wall = wall_s if wall_s is not None else self.backend_s
        prefill = self.prefill_tokens_computed + self.prefill_tokens_cached
        out = {
            "rollout/steps": Metric(self.steps, "sum"),
            "rollout/requests": Metric(self.requests, "sum"),
            "rollout/max_batch": Metric(self.max_batch, "max"),
            "rollout/decoded_tokens": Metric(self.decoded_tokens, "sum"),
            "rollout/prefill_tokens_computed": Metric(self.prefill_tokens_computed, "sum"),
            "rollout/prefill_tokens_cached": Metric(self.prefill_tokens_cached, "sum"),
            "rollout/prefix_cache_hit_rate": Metric(
                self.prefill_tokens_cached / prefill if prefill else 0.0, "mean"
            ),
            "rollout/backend_s": Metric(self.backend_s, "sum"),
            "rollout/trajectories_per_s": Metric(self.leaves / wall if wall else 0.0, "sum"),
            "rollout/tokens_per_s": Metric(self.leaf_tokens / wall if wall else 0.0, "sum"),
            "rollout/decoded_tokens_per_s": Metric(self.decoded_tokens / wall if wall else 0.0, "sum"),
            "tree/trees": Metric(self.trees, "sum"),
            "tree/leaves": Metric(self.leaves, "sum"),
            "tree/leaves_per_tree": Metric(self.leaves / self.trees if self.trees else 0.0, "mean"),
            "tree/fallbacks": Metric(self.fallbacks, "sum"),
            "tree/root_divergence": Metric(
                self.root_divergence_sum / self.trees if self.trees else 0.0, "mean"
            ),
            "tree/leaf_tokens": Metric(self.leaf_tokens, "sum"),
            "tree/distinct_tokens": Metric(self.tree_tokens, "sum"),
        }
        for reason, n in sorted(self.finish_reasons.items()):
            out[f"tree/finish/{reason}"] = Metric(n, "sum")
        for depth, n in sorted(self.depth_hist.items()):
            out[f"tree/leaf_depth/{depth}"] = Metric(n, "sum")
        return out

    def as_dict(self, wall_s: float | None = None) -> dict[str, float]:
        return {k: m.value for k, m in self.metrics(wall_s).items()}
