"""The Tree wire type: one finished segment tree per prompt, as it crosses process boundaries.

A tree is a set of segment nodes (node id, parent id, depth, token ids, behavior logprobs, the
policy version each segment was sampled under) plus the leaves (the last node of each trajectory,
its finish reason, its response length, a reward slot and the reward's correct/wrong verdict). The prompt is the implicit root, node
id 0; root children have ``parent_id == 0`` and ``depth == 1``.

Two leaves share a subtree at depth ``j`` iff their first ``j`` path nodes are the same nodes,
which is all the tree advantage needs (see :meth:`Tree.leaf_paths`).

Serialization is msgpack with raw little-endian array bytes and a schema version. Never pickle:
the replay queue is an input boundary, so :func:`decode_tree` validates every size, type and id and
raises :class:`WireError` with the reason. Schema versions: 2 added each leaf's verdict (``correct``);
3 added observation tokens (``nodes.observed``, written only when some segment has one); a decoder
reads its own version only (an entry of another version is rejected with the reason, into the
dead-letter stream), so producers and consumers of one queue must run the same build.

Observation tokens. A segment that ends in a tool call holds the sampled tokens and then the tool's
result as rendered by the chat template: :attr:`Segment.observed` marks those tokens (True = an
observation: not sampled, behavior logprob 0.0 as a placeholder, never trained on). They are part of
the path like any other token -- children branch after them, siblings share them -- but
:meth:`Tree.num_tokens` counts sampled tokens only and the learner masks them from the loss. Rules
(:meth:`Tree.validate`): a segment may consist of observation tokens only (a tool result as its own
segment), but every leaf's path needs at least one sampled token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from common.errors import WireError

SCHEMA_VERSION = 3
ROOT_ID = 0
FINISH_REASONS = ("finished", "eos", "max_tokens", "max_depth", "repetition")
_META_TYPES = (str, int, float, bool, type(None))


@dataclass
class Segment:
    node_id: int
    parent_id: int
    depth: int
    token_ids: np.ndarray  # int32 [T]
    logprobs: np.ndarray  # float32 [T], behavior logprob of each sampled token (0.0 on observations)
    version: int  # policy version the segment was sampled under
    observed: np.ndarray | None = None  # bool [T]: True = observation token (not sampled); None = none

    def __post_init__(self) -> None:
        self.token_ids = np.asarray(self.token_ids, dtype=np.int32)
        self.logprobs = np.asarray(self.logprobs, dtype=np.float32)
        if self.observed is not None:
            obs = np.asarray(self.observed)
            ok = obs.ndim == 1 and (obs.dtype == bool or bool(np.isin(obs, (0, 1)).all()))
            self.observed = obs.astype(bool) if ok else obs  # else validate() names the problem

    def observed_mask(self) -> np.ndarray:
        """bool [T]: which tokens are observations (all False when ``observed`` is None)."""
        return np.zeros(len(self.token_ids), dtype=bool) if self.observed is None else self.observed

    @classmethod
    def with_observation(
        cls,
        node_id: int,
        parent_id: int,
        depth: int,
        token_ids,
        logprobs,
        version: int,
        observation_ids=(),
    ) -> Segment:
        """A segment of sampled ``token_ids`` (with their ``logprobs``) followed by the observation
        tokens ``observation_ids`` (a tool's result as the chat template renders it): logprob 0.0 and
        ``observed`` True on those; ``observed`` None when there are none."""
        sampled = np.asarray(token_ids, dtype=np.int32)
        obs = np.asarray(observation_ids, dtype=np.int32)
        mask = np.concatenate([np.zeros(len(sampled), dtype=bool), np.ones(len(obs), dtype=bool)])
        return cls(
            node_id,
            parent_id,
            depth,
            np.concatenate([sampled, obs]),
            np.concatenate([np.asarray(logprobs, dtype=np.float32), np.zeros(len(obs), dtype=np.float32)]),
            version,
            mask if len(obs) else None,
        )

    @property
    def num_observed(self) -> int:
        return 0 if self.observed is None else int(np.count_nonzero(self.observed))

    @property
    def num_sampled(self) -> int:
        return len(self.token_ids) - self.num_observed


@dataclass
class Leaf:
    node_id: int  # last segment node of the trajectory
    finish_reason: str
    length: int  # response tokens (sum of the path's segment lengths)
    reward: float = math.nan  # filled by the generator's reward step
    answer: str | None = None  # extracted final answer (majority vote, metrics)
    correct: bool | None = None  # the reward's verdict (None = not scored): what dynamic sampling judges


@dataclass
class Tree:
    tree_id: str
    prompt_id: str
    prompt_ids: np.ndarray  # int32 [P]
    segments: list[Segment]
    leaves: list[Leaf]
    generator_id: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)  # flat str -> scalar (answer, task, epoch, ...)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompt_ids = np.asarray(self.prompt_ids, dtype=np.int32)

    # ---------------------------------------------------------------- structure
    def nodes(self) -> dict[int, Segment]:
        return {s.node_id: s for s in self.segments}

    def path(self, node_id: int) -> list[Segment]:
        """Segments from the root's child down to ``node_id`` (inclusive)."""
        nodes = self.nodes()
        out: list[Segment] = []
        while node_id != ROOT_ID:
            seg = nodes[node_id]
            out.append(seg)
            node_id = seg.parent_id
        out.reverse()
        return out

    def leaf_paths(self) -> list[list[int]]:
        """Node ids root→leaf for every leaf (the subgroup structure of the advantage)."""
        return [[s.node_id for s in self.path(leaf.node_id)] for leaf in self.leaves]

    def response_ids(self, leaf: Leaf) -> np.ndarray:
        return np.concatenate([s.token_ids for s in self.path(leaf.node_id)]) if leaf.length else _EMPTY_I

    def response_logprobs(self, leaf: Leaf) -> np.ndarray:
        return np.concatenate([s.logprobs for s in self.path(leaf.node_id)]) if leaf.length else _EMPTY_F

    def response_observed(self, leaf: Leaf) -> np.ndarray:
        """bool [R]: which response tokens of ``leaf`` are observations (never trained on)."""
        segs = self.path(leaf.node_id)
        return np.concatenate([s.observed_mask() for s in segs]) if segs else np.zeros(0, dtype=bool)

    def sampled_length(self, leaf: Leaf) -> int:
        """Sampled response tokens of ``leaf`` (``leaf.length`` less its path's observation tokens)."""
        return sum(s.num_sampled for s in self.path(leaf.node_id))

    def response_versions(self, leaf: Leaf) -> np.ndarray:
        """Policy version of every response token (a path may span weight updates)."""
        segs = self.path(leaf.node_id)
        if not segs:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.full(len(s.token_ids), s.version, dtype=np.int64) for s in segs])

    def oldest_version(self, leaf: Leaf) -> int:
        return min(s.version for s in self.path(leaf.node_id))

    @property
    def rewards_L(self) -> np.ndarray:
        return np.array([lf.reward for lf in self.leaves], dtype=np.float64)

    @property
    def correct_L(self) -> np.ndarray:
        """The verdict of every leaf; WireError if some leaf has none (the tree was not scored)."""
        missing = [lf.node_id for lf in self.leaves if lf.correct is None]
        _check(not missing, f"tree {self.tree_id}: leaves {missing} have no verdict: score the tree first")
        return np.array([lf.correct for lf in self.leaves], dtype=bool)

    def num_tokens(self) -> int:
        """Distinct response tokens decoded for this tree (shared prefixes counted once): sampled
        tokens only, observation tokens are not decoded (see :meth:`num_observation_tokens`)."""
        return int(sum(s.num_sampled for s in self.segments))

    def num_observation_tokens(self) -> int:
        """Distinct observation tokens of this tree (tool results; shared prefixes counted once)."""
        return int(sum(s.num_observed for s in self.segments))

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise WireError if the structure is inconsistent (ids, depths, lengths, values)."""
        _check(isinstance(self.tree_id, str) and self.tree_id, "tree_id must be a non-empty string")
        _check(isinstance(self.prompt_id, str) and self.prompt_id, "prompt_id must be a non-empty string")
        _check(
            self.prompt_ids.ndim == 1 and len(self.prompt_ids) > 0, "prompt_ids must be a non-empty 1-D array"
        )
        _check(bool((self.prompt_ids >= 0).all()), "prompt_ids has negative token ids")
        _check(len(self.leaves) > 0, "a tree needs at least one leaf")
        nodes: dict[int, Segment] = {}
        for s in self.segments:
            _check_segment(s)
            _check(s.node_id not in nodes, f"duplicate node id {s.node_id}")
            nodes[s.node_id] = s
        for s in self.segments:
            if s.parent_id == ROOT_ID:
                _check(s.depth == 1, f"node {s.node_id}: a root child must have depth 1, not {s.depth}")
            else:
                _check(s.parent_id in nodes, f"node {s.node_id}: unknown parent {s.parent_id}")
                _check(
                    s.depth == nodes[s.parent_id].depth + 1,
                    f"node {s.node_id}: depth {s.depth} != parent depth + 1",
                )
        seen: set[int] = set()
        for leaf in self.leaves:
            _check(
                leaf.finish_reason in FINISH_REASONS,
                f"leaf {leaf.node_id}: bad finish reason {leaf.finish_reason!r}",
            )
            _check(leaf.node_id in nodes, f"leaf refers to unknown node {leaf.node_id}")
            _check(leaf.node_id not in seen, f"two leaves end at node {leaf.node_id}")
            seen.add(leaf.node_id)
            length = sum(len(s.token_ids) for s in self.path(leaf.node_id))
            _check(
                leaf.length == length, f"leaf {leaf.node_id}: length {leaf.length} != path tokens {length}"
            )
            _check(
                length == 0 or self.sampled_length(leaf) > 0,
                f"leaf {leaf.node_id}: every token of its path is an observation (a trajectory needs at "
                "least one sampled token)",
            )
            _check(isinstance(leaf.reward, float), f"leaf {leaf.node_id}: reward must be a float")
            _check(
                leaf.correct is None or isinstance(leaf.correct, bool),
                f"leaf {leaf.node_id}: correct must be true, false or null",
            )
        for key, value in self.metadata.items():
            _check(
                isinstance(key, str) and isinstance(value, _META_TYPES), f"metadata {key!r} must be a scalar"
            )
        for key, value in self.timings.items():
            _check(
                isinstance(key, str)
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value),
                f"timing {key!r} must be a finite number, not {value!r}",
            )


def _check_segment(s: Segment) -> None:
    """One segment's own fields: id, 1-D arrays of one length, token ids, logprobs, observations."""
    _check(isinstance(s.node_id, int) and s.node_id > ROOT_ID, f"node id {s.node_id!r} must be an int > 0")
    _check(s.token_ids.ndim == 1 and s.logprobs.ndim == 1, f"node {s.node_id}: arrays must be 1-D")
    _check(
        len(s.token_ids) == len(s.logprobs),
        f"node {s.node_id}: {len(s.token_ids)} tokens but {len(s.logprobs)} logprobs",
    )
    _check(bool((s.token_ids >= 0).all()), f"node {s.node_id}: negative token id")
    _check(isinstance(s.version, int) and s.version >= 0, f"node {s.node_id}: bad version {s.version!r}")
    obs = s.observed
    if obs is not None:
        _check(
            isinstance(obs, np.ndarray) and obs.ndim == 1 and obs.dtype == bool,
            f"node {s.node_id}: observed must be a 1-D mask of 0/1 (True = observation token)",
        )
        _check(
            len(obs) == len(s.token_ids),
            f"node {s.node_id}: {len(s.token_ids)} tokens but {len(obs)} observation flags",
        )
        _check(
            not bool(s.logprobs[obs].any()),
            f"node {s.node_id}: observation tokens must carry logprob 0.0 (a placeholder: they are not sampled)",
        )
    sampled = s.logprobs if obs is None else s.logprobs[~obs]
    _check(bool(np.isfinite(sampled).all()), f"node {s.node_id}: non-finite logprob")
    _check(bool((sampled <= 1e-3).all()), f"node {s.node_id}: logprob > 0")


_EMPTY_I = np.zeros(0, dtype=np.int32)
_EMPTY_F = np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class RunLimits:
    """What a tree must satisfy to be trained by one run (its config, model and data): checked by
    :func:`check_for_run` at the queue boundary, after :func:`decode_tree`'s structural checks.

    ``rewards`` is the lowest and highest reward the run's ``reward.*`` can give a leaf
    (:func:`common.rewards.resolve.reward_range`); ``max_version`` is read at check time (a
    callable: the learner's version moves); ``prompt_ids`` is the run's training prompt id set
    (None: not checked).
    """

    vocab_size: int
    max_prompt_tokens: int
    max_response_tokens: int
    leaves: int  # tree.w: every tree ends with exactly w leaves
    epochs: int
    rewards: tuple[float, float]  # (lowest, highest) reward a leaf can get from the run's reward.*
    max_version: Any = None  # () -> int
    prompt_ids: frozenset[str] | None = None


def check_for_run(tree: Tree, limits: RunLimits) -> None:
    """Raise WireError naming the first way ``tree`` (decodable, structurally valid) does not fit the
    run: token ids outside the vocabulary, prompt or response over its cap, a leaf count other than
    ``tree.w``, a non-finite reward or one outside what ``reward.*`` can give, a segment version from
    the future, an unknown prompt or a tree id that is not ``<prompt id>@e<epoch>`` of a run epoch."""
    v, (lo, hi) = limits.vocab_size, limits.rewards
    _check(int(tree.prompt_ids.max()) < v, f"prompt token id {int(tree.prompt_ids.max())} >= vocab size {v}")
    _check(
        len(tree.prompt_ids) <= limits.max_prompt_tokens,
        f"prompt of {len(tree.prompt_ids)} tokens exceeds data.max_prompt_tokens={limits.max_prompt_tokens}",
    )
    for s in tree.segments:
        if len(s.token_ids):
            top = int(s.token_ids.max())
            _check(top < v, f"node {s.node_id}: token id {top} >= vocab size {v}")
    _check(
        len(tree.leaves) == limits.leaves,
        f"{len(tree.leaves)} leaves, expected tree.w={limits.leaves}",
    )
    for leaf in tree.leaves:
        _check(
            leaf.length <= limits.max_response_tokens,
            f"leaf {leaf.node_id}: {leaf.length} response tokens exceed tree.max_response_tokens="
            f"{limits.max_response_tokens}",
        )
        _check(math.isfinite(leaf.reward), f"leaf {leaf.node_id}: reward {leaf.reward} is not finite")
        _check(
            lo <= leaf.reward <= hi,
            f"leaf {leaf.node_id}: reward {leaf.reward:g} is outside [{lo:g}, {hi:g}], what reward.* can "
            "give (a user function or reward server that returns more needs a larger reward.max_abs)",
        )
    if limits.max_version is not None and tree.segments:
        newest, now = max(s.version for s in tree.segments), int(limits.max_version())
        _check(newest <= now, f"segment version {newest} is from the future (the learner is at {now})")
    if limits.prompt_ids is not None:
        _check(tree.prompt_id in limits.prompt_ids, f"unknown prompt id {tree.prompt_id!r}")
    pid, sep, epoch = tree.tree_id.rpartition("@e")
    _check(
        bool(sep) and pid == tree.prompt_id and epoch.isdigit() and int(epoch) < limits.epochs,
        f"tree id {tree.tree_id!r} is not '<prompt id>@e<epoch>' of prompt {tree.prompt_id!r} "
        f"with an epoch < data.epochs={limits.epochs}",
    )


def _check(ok: bool, reason: str) -> None:
    if not ok:
        raise WireError(reason)


# -------------------------------------------------------------------- serialization


def encode_tree(tree: Tree) -> bytes:
    """Serialize a (valid) tree: msgpack map, arrays as raw little-endian bytes, schema version."""
    tree.validate()
    seg = tree.segments
    payload = {
        "schema": SCHEMA_VERSION,
        "tree_id": tree.tree_id,
        "prompt_id": tree.prompt_id,
        "prompt_ids": tree.prompt_ids.astype("<i4").tobytes(),
        "generator_id": int(tree.generator_id),
        "metadata": dict(tree.metadata),
        "timings": {k: float(v) for k, v in tree.timings.items()},
        "nodes": {
            "id": np.array([s.node_id for s in seg], dtype="<i4").tobytes(),
            "parent": np.array([s.parent_id for s in seg], dtype="<i4").tobytes(),
            "depth": np.array([s.depth for s in seg], dtype="<i4").tobytes(),
            "version": np.array([s.version for s in seg], dtype="<i8").tobytes(),
            "len": np.array([len(s.token_ids) for s in seg], dtype="<i4").tobytes(),
            "tokens": (np.concatenate([s.token_ids for s in seg]) if seg else _EMPTY_I)
            .astype("<i4")
            .tobytes(),
            "logprobs": (np.concatenate([s.logprobs for s in seg]) if seg else _EMPTY_F)
            .astype("<f4")
            .tobytes(),
        },
        "leaves": [
            [lf.node_id, lf.finish_reason, lf.length, float(lf.reward), lf.answer, lf.correct]
            for lf in tree.leaves
        ],
    }
    if any(s.num_observed for s in seg):  # omitted when there are none: entries stay small
        payload["nodes"]["observed"] = np.concatenate([s.observed_mask() for s in seg]).astype("u1").tobytes()
    return msgpack.packb(payload, use_bin_type=True)


def _array(raw: Any, dtype: str, name: str, count: int | None = None) -> np.ndarray:
    _check(isinstance(raw, bytes), f"{name} must be bytes")
    size = np.dtype(dtype).itemsize
    _check(len(raw) % size == 0, f"{name}: {len(raw)} bytes is not a whole number of {dtype} items")
    arr = np.frombuffer(raw, dtype=dtype)
    if count is not None:
        _check(len(arr) == count, f"{name}: {len(arr)} items, expected {count}")
    return arr


def _observed(raw: Any, total: int) -> np.ndarray | None:
    """``nodes.observed`` (absent or empty: no observation token): one 0/1 byte per token."""
    if raw is None or raw == b"":
        return None
    arr = _array(raw, "u1", "nodes.observed", total)
    _check(bool((arr <= 1).all()), "nodes.observed must hold only 0 and 1 (1 = observation token)")
    return arr.astype(bool)


def _span(observed: np.ndarray | None, start: int, end: int) -> np.ndarray | None:
    """One segment's observation mask (None when it has no observation token)."""
    if observed is None or not observed[start:end].any():
        return None
    return observed[start:end].copy()


def _segments(nodes: Any) -> list[Segment]:
    """The segments of ``nodes``: per-node arrays plus every node's tokens, logprobs and observation
    flags concatenated in node order."""
    _check(isinstance(nodes, dict), "nodes must be a map")
    ids = _array(nodes.get("id"), "<i4", "nodes.id")
    n = len(ids)
    parents = _array(nodes.get("parent"), "<i4", "nodes.parent", n)
    depths = _array(nodes.get("depth"), "<i4", "nodes.depth", n)
    versions = _array(nodes.get("version"), "<i8", "nodes.version", n)
    lens = _array(nodes.get("len"), "<i4", "nodes.len", n)
    _check(bool((lens >= 0).all()), "nodes.len has negative lengths")
    total = int(lens.sum())
    tokens = _array(nodes.get("tokens"), "<i4", "nodes.tokens", total)
    logprobs = _array(nodes.get("logprobs"), "<f4", "nodes.logprobs", total)
    observed = _observed(nodes.get("observed"), total)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    return [
        Segment(
            node_id=int(ids[i]),
            parent_id=int(parents[i]),
            depth=int(depths[i]),
            token_ids=tokens[offsets[i] : offsets[i + 1]].astype(np.int32),
            logprobs=logprobs[offsets[i] : offsets[i + 1]].astype(np.float32),
            version=int(versions[i]),
            observed=_span(observed, offsets[i], offsets[i + 1]),
        )
        for i in range(n)
    ]


def decode_tree(data: bytes, *, max_bytes: int | None = None) -> Tree:
    """Parse and validate one serialized tree; raise WireError with the reason if malformed."""
    _check(isinstance(data, (bytes, bytearray, memoryview)), "entry must be bytes")
    if max_bytes is not None:
        _check(len(data) <= max_bytes, f"entry of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise WireError(f"not a msgpack entry: {type(e).__name__}: {e}") from None
    _check(isinstance(obj, dict), "entry is not a map")
    _check(
        obj.get("schema") == SCHEMA_VERSION,
        f"schema version {obj.get('schema')!r}, expected {SCHEMA_VERSION} (a build reads its own schema "
        "only: run the producers and the consumers of a queue from the same build)",
    )
    required = (
        "tree_id",
        "prompt_id",
        "prompt_ids",
        "generator_id",
        "metadata",
        "timings",
        "nodes",
        "leaves",
    )
    missing = [k for k in required if k not in obj]
    _check(not missing, f"missing fields {missing}")
    segments = _segments(obj["nodes"])
    leaves_raw = obj["leaves"]
    _check(isinstance(leaves_raw, list), "leaves must be a list")
    leaves = []
    for item in leaves_raw:
        _check(
            isinstance(item, list) and len(item) == 6,
            "each leaf must be [node_id, reason, length, reward, answer, correct]",
        )
        node_id, reason, length, reward, answer, correct = item
        _check(isinstance(node_id, int) and isinstance(length, int), "leaf node_id and length must be ints")
        _check(isinstance(reward, (int, float)), "leaf reward must be a number")
        _check(answer is None or isinstance(answer, str), "leaf answer must be a string or null")
        _check(correct is None or isinstance(correct, bool), "leaf correct must be true, false or null")
        leaves.append(Leaf(node_id, reason, length, float(reward), answer, correct))
    for name in ("metadata", "timings"):
        _check(isinstance(obj[name], dict), f"{name} must be a map")
    _check(isinstance(obj["generator_id"], int), "generator_id must be an int")
    tree = Tree(
        tree_id=obj["tree_id"],
        prompt_id=obj["prompt_id"],
        prompt_ids=_array(obj["prompt_ids"], "<i4", "prompt_ids").astype(np.int32),
        segments=segments,
        leaves=leaves,
        generator_id=obj["generator_id"],
        metadata=obj["metadata"],
        timings=obj["timings"],
    )
    tree.validate()
    return tree
