"""TreePO segment-tree sampler: pure logic over a :class:`GenerationBackend`.

The rules (``docs/algorithm.md``), per tree, one depth at a time:

1. The root gets ``root divergence`` children, drawn U{min..max} per tree and capped at ``w``.
2. A depth extends every live path of the tree by one segment (one ``n=1`` request per path;
   children of a node are duplicate requests of its prefix). How depths reach the engine is the
   expansion (``sampling.expansion``, :mod:`actors.expansion`): ``level`` runs one depth of EVERY tree
   in flight as ONE batched backend call; ``barrier_free`` submits a tree's next depth as soon as its
   own depth is done, while the other trees' requests keep running (the only barrier left is per
   tree and depth: rules 3-5 look at all the siblings of a depth). Both grow the same trees from the
   same seeds.
3. Classification after the segment, first match wins: answer (``boxed_as_eos``: a complete
   ``\\boxed{}``; ``boxed_and_eos_first``: boxed AND EOS) → ``finished``; EOS → ``eos``; response
   length ≥ Lmax → ``max_tokens`` (truncated to Lmax); depth ≥ d → ``max_depth``; some substring of
   ``repetition_substring_chars`` characters occurring ≥ ``repetition_min_count`` times in the
   segment text → ``repetition`` (``repetition_first`` moves this check to the front).
4. Branching with budget transfer: ``T = max(a, min(w − F, b·a + b·f))`` children over the ``a``
   live paths, ≥ 1 each: ``fixed_avg`` (``floor(T/a)`` each, remainder to the last path or to random
   distinct paths) or probability-driven (weights ``softmax(σ·(s − min s)/τ)`` over the mean logprob
   of the last segment or the whole path, optional cosine schedule of τ over depth; one child each,
   the rest by largest remainder).
5. Fallback when a tree has no live path and ``F < w``: candidate leaves (policy), shuffled, each cut
   at a uniformly random segment boundary (keep 0..B−1 whole segments), ``b`` copies per candidate
   (cycling through the candidates) until ``w − F`` is used; no candidate → restart from the root.
   A continuation is a NEW node whose parent is the kept node, i.e. a sibling inside the original
   subtree. Invariant ``a + F ≤ w`` throughout; every tree ends with exactly ``w`` leaves.

Deviations from the authors' release (deliberate, see docs/algorithm.md):

- EOS is detected anywhere in a segment (including its first token) and for every id of a list;
  tokens after the first EOS are dropped. A stop string (``generators.stop``) counts as an EOS: it is
  looked for in the decoded text of the segment together with the path's tail before it (a stop string
  split across a segment boundary is found), the tokens after the one that completes it are dropped
  and the path ends with finish reason ``eos`` (:class:`common.stops.StopRule`). A boxed answer is
  looked for in the whole last segment plus the ``answer_overlap_tokens`` tokens before it (the
  release looks in the last segment only), so an answer split across a segment boundary is seen; a
  window scales with ``l``, unlike a fixed tail of characters, so a box followed by a long segment
  still ends the path. The box must come before the path's stop (the text the reward scores).
- A segment that would cross Lmax is truncated BEFORE classification (the tokens past Lmax are not
  part of the trajectory, so an EOS past Lmax does not count).
- Segment alignment: a path's segment ends where (prompt + response length − 1) is a multiple of the
  backend's block size, so a child re-prefills one token instead of a whole block. The first
  segment is stretched by < 1 block; later segments are ``l`` tokens when ``l`` is a multiple of the
  block size. Requests never ask for tokens past Lmax.
- ``remainder=random`` gives the ``T mod a`` extra children one each to random distinct paths (the
  release gives them all to the last path: ``remainder=last``).
- The restart with no fallback candidate queues ``min(root divergence, w − F)`` root children, like
  a fresh start; fallback cycles through the candidates if ``b`` copies each do not use the budget.
- Tools (``tools``, :mod:`actors.tool_turns`): a segment also ends right after a complete tool
  call; the path stays live, the call runs and its result is appended to that segment as
  observation tokens (never sampled, masked from the loss), and the rules above apply at that
  boundary as at a length boundary: the children continue after the observation.
- Flat mode (GRPO) is the degenerate tree: ``w`` root children, no branching, and one segment of
  Lmax tokens per leaf (independent sampling, the honest baseline: no per-segment overhead); with
  tools a path goes on after each call with one more segment (up to ``tool_use.max_calls``).

Determinism: every choice uses the tree's own ``numpy`` Generator seeded from ``tree.seed`` and the
tree id; optional per-request engine seeds are derived from (seed, tree id, node id).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.backends.base import GenerationBackend, GenRequest, GenResult
from actors.expansion import make_expansion
from common.answers import last_boxed
from common.config import SamplingConfig, TreeConfig
from common.errors import ConfigError
from common.sampling_metrics import (
    FALLBACKS_KEY,
    RESTARTS_KEY,
    TOOL_CALLS_KEY,
    TOOL_ERRORS_KEY,
    SamplingStats,
)
from common.stops import StopRule
from common.tree import ROOT_ID, Leaf, Segment, Tree

FINISHED, EOS, MAX_TOKENS, MAX_DEPTH, REPETITION = "finished", "eos", "max_tokens", "max_depth", "repetition"

DecodeFn = Callable[[Sequence[int]], str]


# --------------------------------------------------------------------------------------------------
# Pure rule functions
# --------------------------------------------------------------------------------------------------


def stable_hash(*parts: Any) -> int:
    """A 63-bit hash that is the same in every process (``hash()`` of str is salted per process)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def has_repetition(text: str, substring_chars: int, min_count: int) -> bool:
    """True if some ``substring_chars``-character substring occurs ≥ ``min_count`` times (overlapping)."""
    n = len(text) - substring_chars + 1
    if n < min_count:
        return False
    counts = Counter(text[i : i + substring_chars] for i in range(n))
    return max(counts.values()) >= min_count


def segment_tokens(path_len: int, resp_len: int, l: int, lmax: int, block_size: int, align: bool) -> int:
    """New tokens to request for a path of ``path_len`` tokens (prompt + response ``resp_len``).

    Aligned: the smallest ``n ≥ l`` with ``(path_len + n − 1) % block_size == 0``; capped at Lmax.
    """
    n = l + ((1 - path_len - l) % block_size) if align and block_size > 1 else l
    return max(1, min(n, lmax - resp_len))


def child_budget(a: int, f: int, F: int, w: int, b: int) -> int:
    """``T = max(a, min(w − F, b·a + b·f))``: finished paths hand their ``b`` children to survivors."""
    return max(a, min(w - F, b * a + b * f))


def allocate_fixed_avg(T: int, a: int, remainder: str, rng: np.random.Generator) -> list[int]:
    """``floor(T/a)`` children each; the ``T mod a`` rest to the last path or to random distinct paths."""
    counts = [T // a] * a
    rest = T - sum(counts)
    if rest:
        if remainder == "last":
            counts[-1] += rest
        else:
            for i in rng.choice(a, size=rest, replace=False):
                counts[int(i)] += 1
    return counts


def prob_weights(scores: Sequence[float], sigma: float, tau: float) -> np.ndarray:
    """``softmax(σ·(s − min s)/τ)``; σ = −1 favours low-probability paths, +1 high-probability ones."""
    s = np.asarray(scores, dtype=np.float64)
    z = sigma * (s - s.min()) / tau
    z -= z.max()
    e = np.exp(z)
    return e / e.sum()


def allocate_prob(T: int, weights: np.ndarray) -> list[int]:
    """One child per path, the remaining ``T − a`` by largest remainder of ``weights·(T − a)``."""
    a = len(weights)
    extra = T - a
    quota = weights * extra
    counts = np.floor(quota).astype(int)
    left = extra - int(counts.sum())
    if left > 0:
        # ties broken by path order (stable sort) so the result is deterministic
        order = np.argsort(-(quota - counts), kind="stable")
        counts[order[:left]] += 1
    return [int(c) + 1 for c in counts]


def cosine_tau(tau_start: float, tau_end: float, depth: int, d: int) -> float:
    """Cosine schedule of the allocation temperature from ``tau_start`` (depth 1) to ``tau_end`` (depth d)."""
    progress = (depth - 1) / max(d - 1, 1)
    return tau_end + (tau_start - tau_end) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def live_schedule(w: int, d: int, b: int, root_divergence: int) -> list[int]:
    """Live paths per step with no early stops: ``r, min(b·r, w), …`` (d entries)."""
    out, n = [], min(root_divergence, w)
    for _ in range(d):
        out.append(n)
        n = max(n, min(w, b * n))
    return out


def analytic_decoded_tokens(
    w: int,
    d: int,
    l: int,
    b: int,
    root_divergence: int,
    lmax: int,
    prompt_len: int,
    block_size: int,
    align: bool,
) -> tuple[int, int]:
    """(tree, flat) decoded tokens for one prompt with no early stop and perfect prefix caching.

    The tree decodes ``Σ_k n_k · len_k`` (``n_k`` from :func:`live_schedule`, ``len_k`` the aligned
    segment lengths capped at Lmax); ``w`` independent chains decode ``w · Lmax``. ``1 − tree/flat``
    is the bound ``1 − Σ_k min(b_init·b^k, w)/(w·d)`` for equal segment lengths.
    """
    tree, resp = 0, 0
    for n_k in live_schedule(w, d, b, root_divergence):
        if resp >= lmax:
            break
        seg = segment_tokens(prompt_len + resp, resp, l, lmax, block_size, align)
        tree += n_k * seg
        resp += seg
    return tree, w * lmax


# --------------------------------------------------------------------------------------------------
# Tree state
# --------------------------------------------------------------------------------------------------


@dataclass
class _Node:
    node_id: int
    parent_id: int
    depth: int
    token_ids: list[int]
    logprobs: list[float]
    version: int
    resp_len: int  # response tokens up to and including this node (observation tokens included)
    calls: int = 0  # tool calls on the path up to and including this node
    call: Any = None  # the tool call (common.tools.ToolCall) this segment ends in, if any
    observed: int = 0  # observation tokens at the end of token_ids (a tool's result)

    @property
    def sampled_logprobs(self) -> list[float]:
        return self.logprobs[: len(self.logprobs) - self.observed]


@dataclass
class _Pending:
    node_id: int  # the id the new segment will get (known up front: per-request seeds use it)
    parent_id: int
    depth: int


@dataclass
class _TreeState:
    tree_id: str
    prompt_id: str
    prompt_ids: list[int]
    metadata: dict[str, Any]
    rng: np.random.Generator
    root_divergence: int
    nodes: dict[int, _Node] = field(default_factory=dict)
    pending: list[_Pending] = field(default_factory=list)
    leaves: list[Leaf] = field(default_factory=list)
    next_id: int = ROOT_ID + 1
    fallbacks: int = 0
    restarts: int = 0  # fallbacks with no candidate leaf: re-seeded from the root
    steps: int = 0
    t_start: float = 0.0
    tool_calls: int = 0
    tool_errors: int = 0
    waiting: list = field(default_factory=list)  # (node, future) of the depth's tool calls
    wave: tuple[list[_Node], int] = ([], 0)  # the depth's live nodes and paths finished at it

    def new_pending(self, parent_id: int, depth: int) -> None:
        self.pending.append(_Pending(self.next_id, parent_id, depth))
        self.next_id += 1

    def path_ids(self, node_id: int) -> list[int]:
        out = []
        while node_id != ROOT_ID:
            out.append(node_id)
            node_id = self.nodes[node_id].parent_id
        out.reverse()
        return out

    def response(self, node_id: int) -> list[int]:
        out: list[int] = []
        for nid in self.path_ids(node_id):
            out.extend(self.nodes[nid].token_ids)
        return out

    def resp_len(self, node_id: int) -> int:
        return 0 if node_id == ROOT_ID else self.nodes[node_id].resp_len


# --------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------


class TreeSampler:
    """Grows many segment trees at once over one backend.

    ``submit`` adds a prompt (its tree starts growing at the next step); ``step`` advances the trees
    in flight (see the expansion) and returns the trees that finished; ``run`` keeps up to
    ``max_in_flight`` trees growing and yields each as soon as it is done (a finished tree leaves and
    the next prompt enters without waiting for the slowest tree); ``drain`` lets the segments in the
    engine finish without starting new ones (before a weight update).
    """

    def __init__(
        self,
        backend: GenerationBackend,
        tree_cfg: TreeConfig,
        sampling_cfg: SamplingConfig | None = None,
        eos_ids: Iterable[int] = (),
        decode_fn: DecodeFn | None = None,
        *,
        generator_id: int = 0,
        stats: SamplingStats | None = None,
        require_eos: bool = True,
        stop_strings: Sequence[str] = (),
        expansion: str | None = None,
        tools: Any = None,
    ) -> None:
        self.backend = backend
        self.tools = tools  # actors.tool_turns.ToolTurns, or None
        self.cfg = tree_cfg
        self.sampling = sampling_cfg or SamplingConfig()
        self.stop = StopRule.of(eos_ids, stop_strings)
        self.eos_ids = self.stop.ids
        self.decode_fn = decode_fn
        self.generator_id = generator_id
        self.stats = stats if stats is not None else SamplingStats()
        self.flat = tree_cfg.mode == "flat"
        self.lmax = tree_cfg.max_response_tokens
        # flat: one segment of Lmax tokens per path, and one more after each tool call (up to the limit)
        self.d = (1 + (tools.max_calls if tools is not None else 0)) if self.flat else tree_cfg.d
        self._trees: dict[str, _TreeState] = {}
        self._seen_prompts: Counter[str] = Counter()
        self.expansion = expansion or self.sampling.expansion
        self._expansion = make_expansion(self.expansion, self)
        if tree_cfg.mode not in ("tree", "flat"):
            raise ConfigError(f"tree.mode={tree_cfg.mode!r} is not 'tree' or 'flat': fix tree.mode")
        if tree_cfg.root_divergence_min > tree_cfg.root_divergence_max:
            raise ConfigError("tree.root_divergence_min > tree.root_divergence_max: set min <= max")
        if not self.eos_ids and require_eos:  # only benchmarks of the no-early-stop shape go without
            raise ConfigError("the sampler needs at least one EOS token id: pass eos_ids from the tokenizer")
        if self.stop.strings and decode_fn is None:
            raise ConfigError("generators.stop needs the tokenizer's decode: pass decode_fn to the sampler")

    # ------------------------------------------------------------------ public API
    @property
    def in_flight(self) -> int:
        return len(self._trees)

    def submit(
        self,
        prompt_id: str,
        prompt_ids: Sequence[int],
        metadata: dict[str, Any] | None = None,
        tree_id: str | None = None,
    ) -> str:
        """Start a tree for one prompt; returns its tree id (default: prompt id, ``#n`` on repeats)."""
        prompt_id = str(prompt_id)
        if tree_id is None:
            n = self._seen_prompts[prompt_id]
            tree_id = prompt_id if n == 0 else f"{prompt_id}#{n}"
        self._seen_prompts[prompt_id] += 1
        if tree_id in self._trees:
            raise ValueError(f"tree id {tree_id!r} is already in flight: pass a distinct tree_id")
        if len(prompt_ids) == 0:
            raise ValueError(f"prompt {prompt_id!r} has no tokens: skip empty prompts before sampling")
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, stable_hash(tree_id)])
        w = cfg.w
        if self.flat:
            r = w
        else:
            r = min(int(rng.integers(cfg.root_divergence_min, cfg.root_divergence_max + 1)), w)
        st = _TreeState(tree_id, prompt_id, [int(t) for t in prompt_ids], dict(metadata or {}), rng, r)
        st.t_start = time.perf_counter()
        for _ in range(r):
            st.new_pending(ROOT_ID, 1)
        self._trees[tree_id] = st
        return tree_id

    def step(self) -> list[Tree]:
        """Advance the trees in flight; returns the trees that finished. Level-synchronous: one segment
        for every live path of every tree (ONE backend call). Barrier-free: engine steps until some
        tree's depth completes (its children are in the engine before this returns)."""
        return self._expansion.step()

    def drain(self) -> list[Tree]:
        """Run the segments in the engine to their end without starting new ones; returns the trees
        that finished. Call before the weights change (a segment is sampled under one version) or
        before another user takes the engine. Level-synchronous expansion has nothing in the engine
        between steps."""
        return self._expansion.drain()

    @property
    def requests_in_engine(self) -> int:
        """Segment requests submitted and not finished (always 0 between level-synchronous steps)."""
        return self._expansion.in_engine

    # ------------------------------------------------------------------ one depth of one tree (expansion)
    def tree_ids(self) -> list[str]:
        """The trees in flight, in the order they entered."""
        return list(self._trees)

    def wave_requests(self, tree_id: str) -> list[GenRequest]:
        """One request per pending segment of tree ``tree_id`` (its next depth), in pending order."""
        st = self._trees[tree_id]
        bs = max(int(self.backend.block_size), 1)
        out = []
        for p in st.pending:
            prefix = st.prompt_ids + st.response(p.parent_id)
            resp_len = st.resp_len(p.parent_id)
            if self.flat:
                n = self.lmax - resp_len
            else:
                n = segment_tokens(
                    len(prefix), resp_len, self.cfg.l, self.lmax, bs, self.cfg.align_segments_to_blocks
                )
            seed = (
                stable_hash(self.cfg.seed, st.tree_id, p.node_id) % (2**31)
                if self.sampling.per_request_seed
                else None
            )
            out.append(GenRequest(prefix, n, seed))
        return out

    def complete_wave(
        self, tree_id: str, requests: Sequence[GenRequest], results: Sequence[GenResult], version: int
    ) -> Tree | None:
        """Add the segments of tree ``tree_id``'s pending depth (``results`` of ``requests``, sampled
        under policy ``version``), wait for their tool calls, then branch or fall back. Returns the
        tree once it has its ``w`` leaves (it leaves the sampler), else None (its next depth is pending)."""
        self.begin_wave(tree_id, requests, results, version)
        return self.finish_wave(tree_id)

    def begin_wave(
        self, tree_id: str, requests: Sequence[GenRequest], results: Sequence[GenResult], version: int
    ) -> list[Any]:
        """The first half of :meth:`complete_wave`: add the depth's segments and start the tool calls
        they end in; returns those calls' futures (:meth:`finish_wave` once they are done)."""
        st = self._trees[tree_id]
        if len(results) != len(st.pending) or len(requests) != len(st.pending):
            raise RuntimeError(
                f"tree {tree_id}: {len(results)} results for {len(st.pending)} pending segments"
            )
        live: list[_Node] = []
        f = 0
        for p, req, res in zip(st.pending, requests, results):
            node, reason = self._add_segment(st, p, res, version, req.max_tokens)
            if reason is None:
                live.append(node)
                if node.call is not None:
                    st.waiting.append((node, self.tools.submit(node.call, node.calls - 1)))
            else:
                st.leaves.append(Leaf(node.node_id, reason, node.resp_len))
                f += 1
        st.steps += 1
        st.pending = []
        st.wave = (live, f)
        return [future for _, future in st.waiting]

    def finish_wave(self, tree_id: str) -> Tree | None:
        """The second half of :meth:`complete_wave`: append the tool results (waiting for them), then
        branch or fall back; the tree once it has its ``w`` leaves, else None."""
        st = self._trees[tree_id]
        live, f = st.wave
        for node, future in st.waiting:
            if not self._observe(st, node, future.result()):
                live.remove(node)
                st.leaves.append(Leaf(node.node_id, MAX_TOKENS, node.resp_len))
                f += 1
        st.waiting, st.wave = [], ([], 0)
        self._grow(st, live, f)
        if len(st.pending) + len(st.leaves) > self.cfg.w:
            raise RuntimeError(f"tree {tree_id}: a + F = {len(st.pending)} + {len(st.leaves)} > w")
        if st.pending:
            return None
        del self._trees[tree_id]
        return self._finish(st)

    def run(
        self,
        prompts: Iterable[tuple[str, Sequence[int]] | tuple[str, Sequence[int], dict]],
        max_in_flight: int,
    ) -> Iterator[Tree]:
        """Sample a tree per prompt ``(prompt_id, prompt_ids[, metadata])``, yielding trees as they finish."""
        it = iter(prompts)
        exhausted = False
        while True:
            while not exhausted and self.in_flight < max_in_flight:
                item = next(it, None)
                if item is None:
                    exhausted = True
                    break
                self.submit(*item)
            if not self._trees:
                return
            yield from self.step()

    # ------------------------------------------------------------------ internals
    def _add_segment(
        self, st: _TreeState, p: _Pending, res: GenResult, version: int, max_tokens: int
    ) -> tuple[_Node, str | None]:
        toks = [int(t) for t in res.token_ids]
        lps = [float(x) for x in res.logprobs]
        if len(lps) != len(toks):
            raise RuntimeError(f"backend returned {len(toks)} tokens but {len(lps)} logprobs")
        parent_len = st.resp_len(p.parent_id)
        # never more than requested, never past Lmax (those tokens are not part of the trajectory)
        keep = min(max_tokens, self.lmax - parent_len)
        toks, lps = toks[:keep], lps[:keep]
        eos_at = self.stop.first_token(toks)
        if self.stop.strings:  # a stop string completed before the first stop token ends the path there
            ctx = st.response(p.parent_id)[-self.stop.context_tokens :] if parent_len else []
            at = self.stop.string_end(ctx, toks if eos_at is None else toks[:eos_at], self.decode_fn)
            eos_at = at if at is not None else eos_at
        call_at = None
        if self.tools is not None:  # a tool call completed before the stop ends the segment there
            parent = st.response(p.parent_id)
            call_at = self.tools.call_end(parent, toks if eos_at is None else toks[:eos_at])
            eos_at = None if call_at is not None else eos_at
        end = call_at if call_at is not None else eos_at
        if end is not None:  # EOS anywhere in the segment (the release misses a first-token EOS)
            toks, lps = toks[: end + 1], lps[: end + 1]
        node = _Node(p.node_id, p.parent_id, p.depth, toks, lps, version, parent_len + len(toks))
        node.calls = st.nodes[p.parent_id].calls if p.parent_id != ROOT_ID else 0
        if call_at is not None:
            node.call = self.tools.parse(parent + toks)
            node.calls += node.call is not None
        st.nodes[node.node_id] = node
        return node, self._classify(st, node, eos_at is not None)

    def _observe(self, st: _TreeState, node: _Node, result: Any) -> bool:
        """Append a tool's ``result`` to ``node`` as observation tokens; False when it does not fit in
        Lmax (cut there: the path ends)."""
        st.tool_calls += 1
        st.tool_errors += not result.ok
        ids = self.tools.observation_ids(result)
        room = self.lmax - node.resp_len
        ids = ids[:room]
        node.token_ids = node.token_ids + ids
        node.logprobs = node.logprobs + [0.0] * len(ids)
        node.observed = len(ids)
        node.resp_len += len(ids)
        return node.resp_len < self.lmax

    def _classify(self, st: _TreeState, node: _Node, eos_hit: bool) -> str | None:
        cfg = self.cfg
        checks: list[Callable[[], str | None]] = [
            lambda: FINISHED if self._answered(st, node, eos_hit) else None,
            lambda: EOS if eos_hit else None,
            lambda: MAX_TOKENS if node.resp_len >= self.lmax else None,
            lambda: MAX_DEPTH if node.depth >= self.d else None,
            lambda: REPETITION if self._repetitive(node) else None,
        ]
        if cfg.repetition_first:
            checks.insert(0, checks.pop())
        for check in checks:
            reason = check()
            if reason is not None:
                return reason
        return None

    def _answered(self, st: _TreeState, node: _Node, eos_hit: bool) -> bool:
        if self.decode_fn is None:
            return False
        if self.cfg.answer_policy == "boxed_and_eos_first" and not eos_hit:
            return False
        ids = self._answer_window(st, node)
        if ids and ids[-1] in self.eos_ids:  # the text the reward scores: before the stop
            ids = ids[:-1]
        return last_boxed(self.stop.cut_text(self.decode_fn(ids))) is not None

    def _answer_window(self, st: _TreeState, node: _Node) -> list[int]:
        """The last segment and the ``answer_overlap_tokens`` before it (a box split across the
        boundary is whole in here)."""
        ids = st.response(node.node_id)
        return ids[max(0, len(ids) - len(node.token_ids) - self.cfg.answer_overlap_tokens) :]

    def _repetitive(self, node: _Node) -> bool:
        if not self.cfg.repetition_check or self.decode_fn is None:
            return False
        text = self.decode_fn(node.token_ids)
        return has_repetition(text, self.cfg.repetition_substring_chars, self.cfg.repetition_min_count)

    def _grow(self, st: _TreeState, live: list[_Node], f: int) -> None:
        cfg, w = self.cfg, self.cfg.w
        F, a = len(st.leaves), len(live)
        if a:
            if self.flat:
                counts = [1] * a
            else:
                T = child_budget(a, f, F, w, cfg.b)
                if cfg.allocation == "fixed_avg":
                    counts = allocate_fixed_avg(T, a, cfg.remainder, st.rng)
                else:
                    counts = allocate_prob(T, self._prob_weights(st, live))
            for node, c in zip(live, counts):
                for _ in range(c):
                    st.new_pending(node.node_id, node.depth + 1)
        elif w > F:
            self._fallback(st)

    def _prob_weights(self, st: _TreeState, live: list[_Node]) -> np.ndarray:
        cfg = self.cfg
        scores = []
        for node in live:
            if cfg.prob_score == "segment":
                lps = node.sampled_logprobs
            else:
                lps = [x for nid in st.path_ids(node.node_id) for x in st.nodes[nid].sampled_logprobs]
            scores.append(float(np.mean(lps)) if lps else 0.0)
        tau = cfg.prob_temperature
        if cfg.prob_temperature_end >= 0:
            # after a fallback live paths can sit at different depths: the deepest one sets the schedule
            tau = cosine_tau(
                cfg.prob_temperature, cfg.prob_temperature_end, max(n.depth for n in live), cfg.d
            )
        sigma = -1.0 if cfg.allocation == "prob_low" else 1.0
        return prob_weights(scores, sigma, tau)

    def _fallback(self, st: _TreeState) -> None:
        cfg = self.cfg
        remaining = cfg.w - len(st.leaves)
        allowed = {
            "answered_or_eos": (FINISHED, EOS),
            "answered": (FINISHED,),
            "any": (FINISHED, EOS, MAX_TOKENS, MAX_DEPTH, REPETITION),
            "none": (),
        }[cfg.fallback]
        cands = [lf for lf in st.leaves if lf.finish_reason in allowed]
        st.fallbacks += 1
        if not cands:  # restart from the root, like a fresh start
            st.restarts += 1
            for _ in range(min(st.root_divergence, remaining)):
                st.new_pending(ROOT_ID, 1)
            return
        order = [cands[int(i)] for i in st.rng.permutation(len(cands))]
        i = 0
        while remaining > 0:
            path = st.path_ids(order[i % len(order)].node_id)
            i += 1
            keep = int(st.rng.integers(0, len(path)))  # whole segments kept: 0..B-1 (0 = from the root)
            parent = path[keep - 1] if keep else ROOT_ID
            for _ in range(min(cfg.b, remaining)):
                st.new_pending(parent, keep + 1)
                remaining -= 1

    def _finish(self, st: _TreeState) -> Tree:
        segments = [
            Segment.with_observation(
                n.node_id,
                n.parent_id,
                n.depth,
                n.token_ids[: len(n.token_ids) - n.observed],
                n.sampled_logprobs,
                n.version,
                n.token_ids[len(n.token_ids) - n.observed :],
            )
            for n in sorted(st.nodes.values(), key=lambda n: n.node_id)
        ]
        tools = {TOOL_CALLS_KEY: st.tool_calls, TOOL_ERRORS_KEY: st.tool_errors} if self.tools else {}
        tree = Tree(
            tree_id=st.tree_id,
            prompt_id=st.prompt_id,
            prompt_ids=np.asarray(st.prompt_ids, np.int32),
            segments=segments,
            leaves=st.leaves,
            generator_id=self.generator_id,
            metadata={**st.metadata, FALLBACKS_KEY: st.fallbacks, RESTARTS_KEY: st.restarts, **tools},
            timings={"sample_s": time.perf_counter() - st.t_start},
        )
        self.stats.record_tree(tree)
        return tree
