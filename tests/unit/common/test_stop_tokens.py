"""Stop tokens of a base model used with a chat template (issue 14, item 2): EOS ids plus the chat
template's end-of-turn token, derived from the tokenizer; sampling stops at the first stop token and the
reward scores the text before it, the same in training, ``treepo sample`` and ``treepo eval``.

The model is ``tests/chat_model.py``'s: Qwen-style special tokens, a generation_config.json whose only
EOS is ``<|endoftext|>``, weights that emit ``Hi<|im_end|>\\boxed{7}<|endoftext|>`` (gold answer 7).
"""

from __future__ import annotations

import json

import pytest
from chat_model import ENDOFTEXT, IM_END, build_chat_model, build_tokenizer, chain_ids

from actors.engine_inputs import EngineInputs, train_reward
from actors.scoring import leaf_texts, score_trees
from cluster import cli
from common.config import load_config
from common.errors import ConfigError, ModelError
from common.models import end_of_turn_ids, eos_token_ids, stop_token_ids
from common.tiny import build_tokenizer as tiny_tokenizer
from common.tree import Leaf, Segment, Tree


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "q.jsonl"
    path.write_text(json.dumps({"id": "q1", "prompt": "What is 3+4?\n", "answer": "7"}) + "\n")
    return path


def test_the_end_of_turn_token_comes_from_the_chat_template():
    tok = build_tokenizer()
    eos, eot = tok.convert_tokens_to_ids(ENDOFTEXT), tok.convert_tokens_to_ids(IM_END)
    assert end_of_turn_ids(tok) == [eot]
    assert stop_token_ids(tok, [eos], "chat") == [eos, eot]
    assert stop_token_ids(tok, [eos], "plain") == [eos]  # no template, no end of turn
    assert stop_token_ids(tok, [eos], "chat", [5, eos]) == [eos, 5]  # the override replaces the derived
    with pytest.raises(ConfigError, match="generators.stop_token_ids"):
        stop_token_ids(tok, [eos], "chat", [len(tok)])
    # a template that closes a turn with plain text ("role: content\n") adds nothing
    assert end_of_turn_ids(tiny_tokenizer("arith")) == []
    tok.chat_template = "{{ raise_exception('no assistant turns') }}"
    with pytest.raises(ModelError, match="generators.stop_token_ids"):
        stop_token_ids(tok, [eos], "chat")
    assert stop_token_ids(tok, [eos], "chat", [eot]) == [eos, eot]  # the override needs no template


def test_the_scored_text_ends_at_the_first_stop_token():
    tok = build_tokenizer()
    ids = chain_ids(tok)  # Hi <|im_end|> \boxed{7} <|endoftext|>, as a generator without the rule sent it
    tree = Tree("t", "p", [1], [Segment(1, 0, 1, ids, [-0.1] * len(ids), 0)], [Leaf(1, "eos", len(ids))])
    tree.metadata["answer"] = "7"
    decode = lambda x: tok.decode(x, skip_special_tokens=True)  # noqa: E731
    stops = frozenset({tok.convert_tokens_to_ids(ENDOFTEXT), tok.convert_tokens_to_ids(IM_END)})
    assert leaf_texts(tree, decode, stops) == ["Hi"]
    assert leaf_texts(tree, decode, frozenset({tok.eos_token_id})) == ["Hi\\boxed{7}"]
    score_trees([tree], train_reward(load_config(None, ["reward.fn=math"]), None), decode, stops)
    assert (tree.leaves[0].reward, tree.leaves[0].correct, tree.leaves[0].answer) == (-1.0, False, None)


def sample_hf(model, data, *overrides: str):
    """The first prompt's tree of ``data`` on the transformers backend (2 leaves), scored as training
    scores it; returns the run's engine inputs too."""
    cfg = load_config(
        None,
        [f"model.path={model}", "generators.backend=hf", "reward.fn=math", "tree.w=2", *overrides],
    )
    inputs = EngineInputs.load(cfg)
    prompts = inputs.prompt_set(str(data), "train")
    backend = inputs.open_backend(prompts)
    try:
        items = [(p.row.id, p.prompt_ids, {"answer": p.row.answer}) for p in prompts.prompts]
        trees = list(inputs.sampler(backend).run(items, 1))
    finally:
        backend.close()
    score_trees(trees, prompts.reward, inputs.decode, inputs.stop_set)
    return inputs, trees[0]


def _sample(model, data, template, **extra):
    shape = ["tree.d=2", "tree.l=16", "tree.max_response_tokens=32"]
    return sample_hf(
        model, data, f"data.template={template}", *shape, *[f"{k}={v}" for k, v in extra.items()]
    )


def test_a_chat_model_stops_at_end_of_turn_and_a_box_after_it_does_not_count(chat_model, rows):
    tok = build_tokenizer()
    chain = chain_ids(tok)
    assert eos_token_ids(str(chat_model)) == [tok.convert_tokens_to_ids(ENDOFTEXT)]  # the preset's case
    inputs, tree = _sample(chat_model, rows, "chat")
    assert inputs.stop_ids == chain[-1:] + [tok.convert_tokens_to_ids(IM_END)]
    for leaf in tree.leaves:  # the real (transformers) engine stopped at <|im_end|>
        assert tree.response_ids(leaf).tolist() == chain[:3] and leaf.finish_reason == "eos"
        assert (leaf.reward, leaf.correct, leaf.answer) == (-1.0, False, None)
    # without the rule (EOS ids only: a plain template) the same model runs on and the box counts
    _, tree = _sample(chat_model, rows, "plain")
    assert all(tree.response_ids(lf).tolist() == chain for lf in tree.leaves)
    assert all(lf.correct and lf.reward == 1.0 for lf in tree.leaves)
    # the override replaces the derived stop: stop at the box's closing brace instead
    inputs, tree = _sample(chat_model, rows, "chat", **{"generators.stop_token_ids": f"[{chain[-2]}]"})
    assert inputs.stop_ids == [chain[-1], chain[-2]]
    assert all(tree.response_ids(lf).tolist() == chain[:-1] for lf in tree.leaves)


def test_sample_and_eval_commands_apply_the_same_rule(chat_model, rows, tmp_path):
    out = tmp_path / "trees.jsonl"
    argv = ["sample", "--model", str(chat_model), "--data", str(rows), "--out", str(out), "--no-progress"]
    assert cli.main([*argv, "--backend", "hf", "--reward", "math", "data.template=chat", "tree.w=2"]) == 0
    leaves = [lf for rec in map(json.loads, out.read_text().splitlines()) for lf in rec["leaves"]]
    assert leaves and all(
        lf["response"] == "Hi" and lf["correct"] is False and lf["reward"] == -1.0 for lf in leaves
    )
    ev = tmp_path / "eval"
    argv = ["eval", "--model", str(chat_model), "--data", str(rows), "--k", "2", "--out", str(ev)]
    assert cli.main([*argv, "generators.backend=hf", "data.template=chat", "reward.fn=math"]) == 0
    problem = json.loads((ev / "q.problems.jsonl").read_text().splitlines()[0])
    assert problem["correct"] == [False, False] and problem["answers"] == [None, None]
