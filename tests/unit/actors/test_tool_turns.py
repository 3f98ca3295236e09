"""Tool calls as segment boundaries in the sampler, over a scripted character backend and the real
tool runner (calculator, user tools): where a segment ends, the observation tokens, branching after
them, the bounds, and a slow tool that stalls only its own tree."""

from __future__ import annotations

import time

import numpy as np
import pytest

from actors.backends.base import BackendCounters, GenResult
from actors.sampler import TreeSampler
from actors.tool_turns import ToolTurns
from common.config import SamplingConfig, TreeConfig
from common.sampling_metrics import TOOL_CALLS_KEY, TOOL_ERRORS_KEY, tree_metrics
from common.tools import Tool, ToolRunner, resolve_tools
from common.tree import decode_tree, encode_tree

EOS = 1


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def decode(tokens) -> str:
    return "".join(chr(t) for t in tokens if t >= 2)


class ScriptBackend:
    """Emits ``script(prompt, response_so_far, max_tokens)`` (texts; the prompt is the first line), then
    random letters up to max_tokens."""

    def __init__(self, script):
        self.script = script
        self.block_size = 1
        self.policy_version = 0
        self.counters = BackendCounters()
        self.rng = np.random.default_rng(0)
        self.calls: list[list[str]] = []  # response texts of every batch's requests

    def generate(self, requests):
        out, batch = [], []
        for r in requests:
            prompt, _, so_far = decode(r.prompt_ids).partition("\n")
            batch.append(so_far)
            toks = ids(self.script(prompt, so_far, r.max_tokens))
            toks += [int(x) for x in self.rng.integers(97, 123, max(0, r.max_tokens - len(toks)))]
            toks = toks[: r.max_tokens]
            out.append(GenResult(toks, [-0.5] * len(toks), "length", len(r.prompt_ids), 0))
        self.calls.append(batch)
        return out

    def update_weights(self, named_tensors, version):  # pragma: no cover - not used
        self.policy_version = version

    def reset_prefix_cache(self):  # pragma: no cover
        pass

    def close(self):  # pragma: no cover
        pass


PROMPT = ids("Compute 12*34.\n")


def turns(tools: dict[str, Tool], max_calls: int = 4) -> ToolTurns:
    return ToolTurns(ToolRunner(tools), "tiny", ids, decode, max_calls)


def tree_cfg(**kw) -> TreeConfig:
    base = dict(w=4, d=4, l=16, b=2, root_divergence_min=1, root_divergence_max=1, max_response_tokens=64)
    base.update(kw)
    return TreeConfig(**base, align_segments_to_blocks=False, repetition_check=False)


def sampler(backend, tools, expansion="barrier_free", **kw) -> TreeSampler:
    return TreeSampler(
        backend, tree_cfg(**kw), SamplingConfig(), [EOS], decode, tools=tools, expansion=expansion
    )


def calc_then_answer(prompt: str, so_far: str, n: int) -> str:
    """Call the calculator first; after its result, answer and stop."""
    if not so_far:
        return "[calc 12*34]zzzz"  # the tokens after the call are cut
    answer = "[calc 12*34]=> 408\nThe answer is \\boxed{408}" + chr(EOS)
    return answer[len(so_far) :] if answer.startswith(so_far) else ""


@pytest.mark.parametrize("expansion", ["barrier_free", "level"])
def test_a_call_ends_the_segment_and_its_result_is_observation_tokens_shared_by_the_children(expansion):
    backend = ScriptBackend(calc_then_answer)
    s = sampler(backend, turns(resolve_tools(["calc=calculator"])), expansion)
    s.submit("p", PROMPT)
    trees = []
    while s.in_flight:
        trees += s.step()
    (tree,) = trees
    tree = decode_tree(encode_tree(tree))  # the masks survive the wire
    (root_child,) = [seg for seg in tree.segments if seg.parent_id == 0]
    assert decode(root_child.token_ids) == "[calc 12*34]=> 408\n"
    obs = root_child.observed_mask()
    assert decode(root_child.token_ids[obs]) == "=> 408\n" and not obs[: len("[calc 12*34]")].any()
    assert (root_child.logprobs[obs] == 0).all()
    # the tree branches at the tool boundary: b=2 children continue after the observation
    children = [seg for seg in tree.segments if seg.parent_id == root_child.node_id]
    assert len(children) == 2
    for leaf in tree.leaves:
        text = decode(tree.response_ids(leaf))
        assert text.startswith("[calc 12*34]=> 408\nThe answer is \\boxed{408}")
        assert leaf.length == len(tree.response_ids(leaf))
    assert tree.metadata[TOOL_CALLS_KEY] == 1 and tree.metadata[TOOL_ERRORS_KEY] == 0
    assert tree.num_observation_tokens() == len("=> 408\n")
    # decoded tokens count what the engine sampled, never the observation
    assert tree.num_tokens() == sum(len(seg.token_ids) for seg in tree.segments) - len("=> 408\n")
    # every request after the call carries the observation in its prefix
    later = [so_far for batch in backend.calls[1:] for so_far in batch]
    assert later and all(t.startswith("[calc 12*34]=> 408\n") for t in later)


def test_a_failing_call_is_an_error_observation_and_the_limit_answers_without_running():
    ran = []

    def boom(x: str) -> str:
        ran.append(x)
        raise ValueError("no such thing")

    def script(prompt: str, so_far: str, n: int) -> str:
        return "[boom x]" if so_far.count("[boom") < 3 else chr(EOS)

    backend = ScriptBackend(script)
    s = sampler(
        backend,
        turns(resolve_tools(["calc=calculator"]) | {"boom": Tool("boom", boom, ("x",))}, 2),
        w=1,
        d=8,
        max_response_tokens=256,
    )
    tree = s.run([("p", PROMPT)], 4).__next__()
    text = decode(tree.response_ids(tree.leaves[0]))
    assert text.count("=> error: ValueError: no such thing\n") == 2
    assert "=> error: the tool-call limit of 2 per response is reached; answer now\n" in text
    assert len(ran) == 2  # the third call never ran
    assert tree.metadata[TOOL_CALLS_KEY] == 3 and tree.metadata[TOOL_ERRORS_KEY] == 3


def test_an_observation_past_the_response_limit_is_cut_and_ends_the_path():
    def script(prompt: str, so_far: str, n: int) -> str:
        return "[big 1]" if not so_far else ""

    big = Tool("big", lambda x: "9" * 200, ("x",))
    backend = ScriptBackend(script)
    s = sampler(backend, turns({"big": big}), w=2, max_response_tokens=32)
    tree = next(s.run([("p", PROMPT)], 4))
    calling = [seg for seg in tree.segments if seg.num_observed]
    # each root path (the second is the restart after the first ended) calls, and the result is cut
    assert len(calling) == 2 and all(len(seg.token_ids) == 32 for seg in calling)
    assert all(leaf.finish_reason == "max_tokens" and leaf.length == 32 for leaf in tree.leaves)


def test_a_slow_tool_stalls_only_its_own_tree_with_barrier_free_expansion():
    def slow(x: str) -> str:
        time.sleep(4.0)
        return "done"

    def script(prompt: str, so_far: str, n: int) -> str:
        return "[slow 1]" if prompt == "Compute 12*34." and not so_far else ""

    # tree "a" calls the slow tool in its first segment; tree "b" never calls and needs 4 depths
    tools = turns({"slow": Tool("slow", slow, ("x",))})
    backend = ScriptBackend(script)
    s = sampler(backend, tools, w=2, d=4, l=16, max_response_tokens=64)
    s.submit("a", PROMPT)
    s.submit("b", ids("Compute 1+1.\n"))
    t0, done = time.perf_counter(), {}
    while s.in_flight:
        for tree in s.step():
            done[tree.prompt_id] = time.perf_counter() - t0
    assert done["b"] < 3.0 and done["a"] >= 4.0  # b grew all its depths while a's call ran


def test_tree_metrics_count_tool_calls_errors_and_branching_at_tool_boundaries():
    backend = ScriptBackend(calc_then_answer)
    s = sampler(backend, turns(resolve_tools(["calc=calculator"])))
    trees = list(s.run([("p", PROMPT), ("q", PROMPT)], 4))
    m = tree_metrics(trees)
    assert m["tree/tool_calls"] == 2 and m["tree/tool_errors"] == 0
    assert m["tree/tool_calls_per_leaf"] == pytest.approx(1.0)  # every leaf's path holds one call
    assert m["tree/observation_tokens"] == 2 * len("=> 408\n")
    assert m["tree/tool_branching"] == pytest.approx(2.0)  # children of a node that ends in a call


def test_flat_sampling_goes_on_after_a_call_as_independent_paths():
    """GRPO's flat paths (one Lmax segment each) continue after a tool call with one more segment."""
    backend = ScriptBackend(calc_then_answer)
    s = sampler(backend, turns(resolve_tools(["calc=calculator"])), mode="flat", w=3)
    (tree,) = list(s.run([("p", PROMPT)], 4))
    assert len(tree.leaves) == 3
    assert all(len(tree.path(leaf.node_id)) == 2 for leaf in tree.leaves)  # the call's segment, then the rest
    for leaf in tree.leaves:
        assert decode(tree.response_ids(leaf)).startswith("[calc 12*34]=> 408\nThe answer is \\boxed{408}")
        assert leaf.finish_reason == "finished"
    assert tree.metadata[TOOL_CALLS_KEY] == 3  # each independent path made its own call
