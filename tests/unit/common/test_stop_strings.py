"""Stop strings (``generators.stop``): a path ends at the token that completes one, also when the string
is split across TreePO segments; the tokens after it are dropped and the reward scores the text before
it; the same in training, ``treepo sample`` and ``treepo eval``.

The model is ``tests/chat_model.py``'s chain model on the transformers backend (no block alignment, so
``tree.l`` sets the segment length): after a prompt's final newline it writes ``Hi END\\boxed{7}`` and
``<|endoftext|>``, one token per byte. With ``tree.l=2`` the segments are ``Hi``, `` E``, ``ND``, …: the
stop string ``END`` is split across the second and third.
"""

from __future__ import annotations

import json

import pytest
from chat_model import build_chain_model, build_tokenizer, text_chain_ids
from test_stop_tokens import sample_hf

from actors.scoring import leaf_texts
from cluster import cli
from common.config import load_config
from common.errors import ConfigError
from common.stops import StopRule
from common.tiny import build_tokenizer as byte_tokenizer
from common.tree import Leaf, Segment, Tree

CHAIN = "Hi END\\boxed{7}"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def chain_model(tmp_path_factory, tok):
    return build_chain_model(tmp_path_factory.mktemp("chain") / "model", text_chain_ids(tok, CHAIN), tok)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "q.jsonl"
    path.write_text(json.dumps({"id": "q1", "prompt": "What is 3+4?\n", "answer": "7"}) + "\n")
    return path


def enc(tok, s):
    return tok.encode(s, add_special_tokens=False)


def test_stop_rule_finds_a_string_split_across_tokens_and_segments(tok):
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    rule = StopRule.of([tok.eos_token_id], ["END", "x}"])
    assert rule.cut_text("ab x}END") == "ab " and rule.cut_text("no stop") == "no stop"
    # completed by the second token of the new segment; the first new token alone does not complete it
    assert rule.string_end(enc(tok, "Hi E"), enc(tok, "ND\\b"), decode) == 1
    assert rule.string_end(enc(tok, "Hi"), enc(tok, " EN"), decode) is None
    assert rule.string_end([], enc(tok, "xxENDyy"), decode) == 4
    # a stop string wholly inside the context is not this segment's (that path ended before)
    assert rule.string_end(enc(tok, "END"), enc(tok, "ab"), decode) is None
    # the scored text: before the first stop token, then before the first stop string
    ids = enc(tok, "a\\boxed{1}x}END") + [tok.eos_token_id] + enc(tok, "\\boxed{2}")
    assert rule.response_text(ids, decode) == "a\\boxed{1}"
    # a character split across byte tokens: the context's last (incomplete) character may complete it
    btok = byte_tokenizer(None)
    bdecode = lambda ids: btok.decode(ids, skip_special_tokens=True)  # noqa: E731
    e_acute = enc(btok, "é")
    assert len(e_acute) == 2
    rule = StopRule.of([], ["é"])
    assert rule.string_end(enc(btok, "a") + e_acute[:1], e_acute[1:] + enc(btok, "b"), bdecode) == 0
    assert rule.context_tokens == 4
    with pytest.raises(ValueError, match="generators.stop"):
        StopRule.of([], [""])
    with pytest.raises(ConfigError, match="generators.stop"):
        load_config(None, ['generators.stop=["END", ""]'])


def test_scored_text_ends_before_the_first_stop_string(tok):
    ids = enc(tok, CHAIN) + [tok.eos_token_id]
    tree = Tree("t", "p", [1], [Segment(1, 0, 1, ids, [-0.1] * len(ids), 0)], [Leaf(1, "eos", len(ids))])
    tree.metadata["answer"] = "7"
    decode = lambda x: tok.decode(x, skip_special_tokens=True)  # noqa: E731
    assert leaf_texts(tree, decode, StopRule.of([tok.eos_token_id], ["END"])) == ["Hi "]
    assert leaf_texts(tree, decode, StopRule.of([tok.eos_token_id], ["7}"])) == ["Hi END\\boxed{"]
    assert leaf_texts(tree, decode, frozenset({tok.eos_token_id})) == [CHAIN]  # token ids still work


def _sample(model, data, **extra):
    extra_keys = [f"{k}={v}" for k, v in extra.items()]
    return sample_hf(model, data, "tree.d=12", "tree.max_response_tokens=24", *extra_keys)[1]


@pytest.mark.parametrize("l, depth", [(2, 3), (4, 2)])
def test_a_path_ends_at_a_stop_string_split_across_segments(chain_model, rows, tok, l, depth):
    """l=2: ``END`` spans the 2nd and 3rd segments; l=4: the 2nd segment ``ND\\b`` loses its ``\\b``."""
    tree = _sample(chain_model, rows, **{"tree.l": l, "generators.stop": '["END"]'})
    assert len(tree.leaves) == 2
    for leaf in tree.leaves:
        assert tree.response_ids(leaf).tolist() == enc(tok, "Hi END")
        assert leaf.finish_reason == "eos" and len(tree.path(leaf.node_id)) == depth
        assert (leaf.reward, leaf.correct, leaf.answer) == (-1.0, False, None)  # the box came after it
    # without the stop string the same model writes its box and it counts
    tree = _sample(chain_model, rows, **{"tree.l": l})
    for leaf in tree.leaves:
        assert tree.response_ids(leaf).tolist()[: len(enc(tok, CHAIN))] == enc(tok, CHAIN)
        assert (leaf.reward, leaf.correct, leaf.answer) == (1.0, True, "7")


def test_sample_and_eval_commands_apply_stop_strings(chain_model, rows, tmp_path):
    out = tmp_path / "trees.jsonl"
    argv = ["sample", "--model", str(chain_model), "--data", str(rows), "--out", str(out), "--no-progress"]
    over = ['generators.stop=["END"]', "tree.l=2", "tree.d=12", "tree.w=2", "tree.max_response_tokens=24"]
    assert cli.main([*argv, "--backend", "hf", "--reward", "math", *over]) == 0
    leaves = [lf for rec in map(json.loads, out.read_text().splitlines()) for lf in rec["leaves"]]
    assert len(leaves) == 2
    for lf in leaves:
        assert (lf["response"], lf["finish_reason"], len(lf["node_path"])) == ("Hi END", "eos", 3)
        assert (lf["correct"], lf["reward"], lf["answer"]) == (False, -1.0, None)
    for sampling in ("flat", "tree"):
        ev = tmp_path / f"eval-{sampling}"
        argv = ["eval", "--model", str(chain_model), "--data", str(rows), "--k", "2", "--out", str(ev)]
        argv += ["--sampling", sampling, "generators.backend=hf", "reward.fn=math", *over]
        assert cli.main(argv) == 0
        problem = json.loads((ev / "q.problems.jsonl").read_text().splitlines()[0])
        assert problem["correct"] == [False, False] and problem["answers"] == [None, None]
        if sampling == "flat":  # one request per answer: the engine itself stopped at "END"
            (res,) = [
                v
                for k, v in json.loads((ev / "summary.json").read_text())["results"].items()
                if k != "overall"
            ]
            assert res["decoded_tokens"] == 2 * len("Hi END")
