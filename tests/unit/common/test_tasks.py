"""The arith task: determinism, disjoint splits, correct answers, lengths, answer checking, caching."""

from __future__ import annotations

import json
import re

import pytest

from common.answers import last_boxed
from common.errors import DataError
from common.tasks import (
    check_answer,
    generate,
    get_task,
    split_of,
    synthetic_path,
    task_vocabulary,
    write_jsonl,
)


def test_same_seed_same_rows_and_different_seeds_differ():
    a = generate("arith", 50, seed=7, split="train")
    assert a == generate("arith", 50, seed=7, split="train")
    b = generate("arith", 50, seed=8, split="train")
    assert [r["prompt"] for r in a] != [r["prompt"] for r in b]
    # A prefix of a larger draw: n does not change which problems come first.
    assert generate("arith", 20, seed=7, split="train") == a[:20]


def test_splits_are_disjoint_across_seeds():
    train = {r["prompt"] for s in (0, 1, 2) for r in generate("arith", 1000, seed=s, split="train")}
    held_out = {r["prompt"] for s in (0, 1, 2) for r in generate("arith", 300, seed=s, split="eval")}
    assert train and held_out
    assert not train & held_out
    assert all(split_of("arith", p) == "eval" for p in held_out)


def test_rows_have_the_schema_and_unique_ids():
    rows = generate("arith", 200, seed=3, split="eval")
    assert all(set(r) == {"id", "prompt", "answer", "solution", "task"} for r in rows)
    assert all(r["task"] == "arith" for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)


def test_answers_are_correct_and_the_scratchpad_is_consistent():
    for r in generate("arith", 300, seed=5, split="train"):
        m = re.fullmatch(r"Compute ([0-9+\-]+)\.\n", r["prompt"])
        assert m, r["prompt"]
        tokens = re.findall(r"[+-]?\d+", m.group(1))
        assert int(r["answer"]) == sum(int(t) for t in tokens)
        # Every scratchpad line is a true equation, chained on the previous result.
        lines = r["solution"].split("\n")
        acc = int(tokens[0])
        for line, tok in zip(lines[:-1], tokens[1:]):
            a, op, b, c = re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)", line).groups()
            assert int(a) == acc and op + b in (tok, "+" + tok.lstrip("+"))
            acc = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert acc == int(c) >= 0
        assert lines[-1] == "The answer is \\boxed{" + r["answer"] + "}"
        assert check_answer("arith", r["solution"], r["answer"])


def test_response_lengths_are_30_to_120_tokens():
    # One character is one token of the task tokenizer; + 1 for EOS.
    lengths = [len(r["solution"]) + 1 for r in generate("arith", 2000, seed=0, split="train")]
    assert min(lengths) >= 30 and max(lengths) <= 120


def test_vocabulary_covers_every_character():
    vocab = set(task_vocabulary("arith"))
    for r in generate("arith", 500, seed=1, split="train"):
        assert set(r["prompt"] + r["solution"]) <= vocab


@pytest.mark.parametrize(
    ("text", "answer", "ok"),
    [
        ("so \\boxed{42}", "42", True),
        ("\\boxed{ 42 }", "42", True),
        ("\\boxed{41} no, \\boxed{42}", "42", True),  # the last box counts
        ("\\boxed{42} no, \\boxed{41}", "42", False),
        ("\\boxed{42} and then more text", "42", True),
        ("\\boxed{42}\\boxed{4", "42", True),  # an unfinished box does not hide the last complete one
        ("the answer is 42", "42", False),  # missing box
        ("\\boxed{43}", "42", False),
        ("\\boxed{042}", "42", True),  # integers compare as integers
        ("\\boxed{-7}", "-7", True),
        ("\\boxed{4_2}", "42", False),
        ("\\boxed{\\frac{1}{2}}", "42", False),
        ("\\boxed{}", "42", False),
        ("\\boxed{42", "42", False),
    ],
)
def test_check_answer(text, answer, ok):
    assert check_answer("arith", text, answer) is ok


def test_extract_last_boxed_handles_nested_braces():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{{{x}}}") == "{{x}}"
    assert last_boxed("no box") is None


def test_unknown_task_and_split_are_rejected():
    with pytest.raises(DataError, match="unknown synthetic task"):
        get_task("nope")
    with pytest.raises(DataError, match="unknown split"):
        generate("arith", 1, seed=0, split="test")


def test_synthetic_path_writes_once_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEPO_CACHE", str(tmp_path))
    path = synthetic_path("arith", "eval", 30, seed=2)
    assert path.is_relative_to(tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == generate("arith", 30, seed=2, split="eval")
    mtime = path.stat().st_mtime_ns
    assert synthetic_path("arith", "eval", 30, seed=2) == path
    assert path.stat().st_mtime_ns == mtime
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_write_jsonl(tmp_path):
    rows = generate("arith", 3, seed=0, split="train")
    path = write_jsonl(rows, tmp_path / "sub" / "x.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


def test_long_task_rewrites_the_rest_of_the_chain_on_every_line():
    rows = generate("long", 300, seed=2, split="train")
    lengths = []
    for r in rows:
        expr = re.fullmatch(r"Compute ([0-9+\-]+)\.\n", r["prompt"]).group(1)
        remaining = expr
        lines = r["solution"].split("\n")
        assert lines[-1] == "The answer is \\boxed{" + r["answer"] + "}"
        assert 7 <= len(lines) - 1 <= 9
        for line in lines[:-1]:
            # "a op b=c, c<rest>": the operation on the chain's first two numbers, then the chain
            # rewritten with its result first; the last line is the last operation alone
            m = re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)(?:, (\d+)([0-9+\-]*))?", line)
            assert m, line
            a, op, b, c, again, rest = m.groups()
            assert remaining == f"{a}{op}{b}{rest or ''}"
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
            assert again in (None, c)
            remaining = f"{c}{rest or ''}"
        assert remaining == r["answer"] == str(eval(expr))  # noqa: S307 - digits and +/- only, checked above
        lengths.append(len(r["solution"]))
    # long enough that decoding dominates, short enough for the preset's 256-token responses
    assert min(lengths) >= 120 and max(lengths) <= 210 < get_task("long").max_new_tokens
    assert 150 <= sum(lengths) / len(lengths) <= 175


def test_the_long_task_keeps_the_other_tasks_alphabets_and_cache_names(tmp_path):
    # a new character in arith's alphabet would renumber its tokenizer and so every cached demo model
    assert task_vocabulary("arith") == task_vocabulary("arith2") == "\n +-.0123456789=CT\\abdehimnoprstuwx{}"
    assert set(task_vocabulary("long")) - set(task_vocabulary("arith")) == {","}
    assert (
        synthetic_path("arith", "train", 5, 0, cache_dir=tmp_path).name
        == "arith-train-n5-seed0-d1-1o2-3.jsonl"
    )
    assert (
        synthetic_path("long", "eval", 5, 0, cache_dir=tmp_path).name
        == "long-eval-n5-seed0-d1-1o7-9-rewrite.jsonl"
    )


def test_calc_task_solutions_call_the_calculator_and_mark_its_result():
    from common.tools import calculator, parse_tool_call

    t = get_task("calc")
    for r in generate("calc", 200, seed=1, split="train"):
        a, b = re.fullmatch(r"Compute (\d+)\*(\d+)\.\n", r["prompt"]).groups()
        assert 10 <= int(a) <= 999 and 10 <= int(b) <= 99 and r["answer"] == str(int(a) * int(b))
        call_end = r["solution"].index("]") + 1
        call = parse_tool_call(r["solution"][:call_end], "tiny")
        assert call.name == "calc" and calculator(call.arguments["_"]) == r["answer"]
        (span,) = t.observation_spans(r["solution"])
        assert r["solution"][slice(*span)] == f"=> {r['answer']}\n" and span[0] == call_end
        assert check_answer("calc", r["solution"], r["answer"])
    assert (
        t.observation_spans(t.direct_solution("Compute 12*3.\n", "36"))
        == []
        == get_task("arith").observation_spans("1+2=3\n")
    )
    assert t.direct_solution("Compute 12*3.\n", "36") == "12*3=36\nThe answer is \\boxed{36}"
    assert set("[calc ]=> *") <= set(task_vocabulary("calc"))
