"""Prompt datasets: jsonl/parquet rows, bad-row reporting, plain and chat templates."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import DataConfig
from common.data import PromptRow, encode_rows, format_prompt, load_prompts, load_rows
from common.errors import DataError

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<eos>"]


@pytest.fixture(scope="module")
def raw_tokenizer():
    """A byte-level BPE trained in milliseconds on a few sentences (any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [
        "What is 2 + 3? Put the answer in \\boxed{}.",
        "Please reason step by step.",
        "system user assistant",
    ]
    tok.train_from_iterator(corpus * 20, trainer)
    return tok


@pytest.fixture(scope="module")
def plain_tokenizer(raw_tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=raw_tokenizer, eos_token="<eos>", bos_token="<eos>")


@pytest.fixture(scope="module")
def chat_tokenizer(raw_tokenizer):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=raw_tokenizer, eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------- loading


def test_jsonl_rows_ids_answers_and_metadata(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"id": "a", "prompt": "What is 2+3?", "answer": "5", "level": 3, "task": "arith"},
            "",
            {"prompt": "Half?", "answer": 0.5},
            {"id": 7, "prompt": "Seven?", "answer": 7},
            {"prompt": "Twelve?", "answer": 12.0},
        ],
    )
    rows = load_rows(path)
    assert [r.id for r in rows] == ["a", "train.jsonl:3", "7", "train.jsonl:5"]
    assert [r.answer for r in rows] == ["5", "0.5", "7", "12"]
    assert rows[0].metadata == {"level": 3, "task": "arith"}
    assert rows[1].metadata == {}
    assert [r.row_no for r in rows] == [1, 3, 4, 5]  # line numbers: the blank line counts, is not a row
    assert rows.report.total == 4 and rows.report.kept == 4 and rows.report.bad == []
    assert load_rows(path) == rows  # derived ids are stable


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ('["a", "list"]', "not a JSON object"),
    ({"answer": "1"}, "missing prompt"),
    ({"prompt": "   ", "answer": "1"}, "empty prompt"),
    ({"prompt": 3, "answer": "1"}, "prompt must be a string"),
    ({"prompt": "p"}, "missing answer"),
    ({"prompt": "p", "answer": None}, "missing answer"),
    ({"prompt": "p", "answer": ""}, "empty answer"),
    ({"prompt": "p", "answer": [1, 2]}, "answer must be a string or a number, got list"),
    ({"prompt": "p", "answer": {"x": 1}}, "got dict"),
    ({"prompt": "p", "answer": True}, "got bool"),
    ({"id": [1], "prompt": "p", "answer": "1"}, "id must be a string or an integer"),
    ({"id": "good", "prompt": "again", "answer": "1"}, "duplicate id 'good' (first at row 1)"),
]


def test_bad_rows_skipped_with_file_row_and_reason(tmp_path, caplog):
    lines = [{"id": "good", "prompt": "p", "answer": "1"}] + [x for x, _ in BAD_LINES]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="common.data"):
        rows = load_rows(path, bad_rows="skip")
    assert [r.id for r in rows] == ["good"]
    report = rows.report
    assert report.total == len(lines) and report.kept == 1
    assert [b.row for b in report.bad] == list(range(2, len(lines) + 1))
    for bad, (_, reason) in zip(report.bad, BAD_LINES):
        assert reason in bad.reason, (bad, reason)
        assert bad.path == str(path)
    assert str(report.bad[0]).startswith(f"{path}:2: invalid JSON")
    # the first 10 are logged one by one, the rest as a count
    logged = [r.getMessage() for r in caplog.records]
    assert sum("skipping bad row" in m for m in logged) == 10
    assert any("3 more bad rows skipped (13 in all)" in m for m in logged)


def test_non_utf8_line_is_a_bad_row(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"prompt": "ok", "answer": "1"}\n{"prompt": "\xff\xfe", "answer": "1"}\n')
    rows = load_rows(path)
    assert len(rows) == 1 and rows.report.bad[0].row == 2 and "not UTF-8" in rows.report.bad[0].reason


def test_reject_raises_at_first_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "answer": "1"}, {"prompt": "p", "answer": [1]}])
    with pytest.raises(DataError, match=r"r\.jsonl:2: answer must be a string or a number"):
        load_rows(path, bad_rows="reject")
    with pytest.raises(DataError, match="bad_rows='drop'"):
        load_rows(path, bad_rows="drop")


def test_empty_and_all_bad_files_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no usable rows"):
        load_rows(empty)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}, {"answer": "x"}])
    with pytest.raises(
        DataError, match=r"no usable rows \(2 rows, 2 bad; first: .*bad\.jsonl:1: missing answer"
    ):
        load_rows(bad)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl.*does not exist"):
        load_rows(tmp_path / "nope.jsonl")
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(DataError, match="use .jsonl or .parquet"):
        load_rows(csv)


def test_required_prompt_only(tmp_path):
    path = write_jsonl(tmp_path / "infer.jsonl", [{"prompt": "p"}])
    rows = load_rows(path, required=("prompt",))
    assert rows[0].answer == "" and rows[0].prompt == "p"


def test_parquet_rows(tmp_path):
    table = pa.table(
        {
            "id": ["x", "y", "z", "w"],
            "prompt": ["What is 1+1?", None, "Third", "Fourth"],
            "answer": [2, 3, None, 4],  # an int column with a null: pyarrow keeps ints
            "source": ["s1", "s2", "s3", "s4"],
        }
    )
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=2)
    rows = load_rows(path)
    assert [(r.id, r.prompt, r.answer, r.metadata) for r in rows] == [
        ("x", "What is 1+1?", "2", {"source": "s1"}),
        ("w", "Fourth", "4", {"source": "s4"}),
    ]
    assert [(b.row, b.reason) for b in rows.report.bad] == [(2, "missing prompt"), (3, "missing answer")]


def test_parquet_float_answers_and_derived_ids(tmp_path):
    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": [12.0, 0.25]}), path)
    rows = load_rows(path)
    assert [(r.id, r.answer) for r in rows] == [("f.parquet:1", "12"), ("f.parquet:2", "0.25")]


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="cannot read .*broken.parquet as parquet"):
        load_rows(path)


# --------------------------------------------------------------------------------------- templates


def row(prompt="What is 2 + 3?"):
    return PromptRow("r", prompt, "5", {}, source="t.jsonl", row_no=1)


def test_plain_template(plain_tokenizer, raw_tokenizer):
    ids = format_prompt(row(), plain_tokenizer, "plain")
    assert ids == plain_tokenizer.encode("What is 2 + 3?", add_special_tokens=False)
    assert plain_tokenizer.decode(ids) == "What is 2 + 3?"
    with_sys = format_prompt(row(), plain_tokenizer, "plain", system_prompt="Please reason step by step.")
    assert plain_tokenizer.decode(with_sys) == "Please reason step by step.\n\nWhat is 2 + 3?"
    eos = plain_tokenizer.convert_tokens_to_ids("<eos>")
    assert eos not in ids and eos not in with_sys  # no special tokens added
    assert format_prompt(row(), raw_tokenizer, "plain") == ids  # a raw tokenizers.Tokenizer works too


def test_chat_template(chat_tokenizer):
    ids = format_prompt(row(), chat_tokenizer, "chat", system_prompt="Be brief.")
    text = chat_tokenizer.decode(ids)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert all(isinstance(t, int) for t in ids)
    no_sys = chat_tokenizer.decode(format_prompt(row(), chat_tokenizer, "chat"))
    assert no_sys.startswith("<|im_start|>user\n") and "system" not in no_sys


def test_chat_template_missing(plain_tokenizer):
    with pytest.raises(DataError, match="template=plain or a tokenizer"):
        format_prompt(row(), plain_tokenizer, "chat")
    with pytest.raises(DataError, match="not one of plain, chat"):
        format_prompt(row(), plain_tokenizer, "fancy")


def test_encode_rows_skips_long_prompts(tmp_path, plain_tokenizer):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "step " * 50, "answer": "1"}],
    )
    rows = load_rows(path)
    limit = len(plain_tokenizer.encode("What is 2 + 3?", add_special_tokens=False))
    enc = encode_rows(rows, plain_tokenizer, "plain", "", max_prompt_tokens=limit, bad_rows="skip")
    assert [e.row.row_no for e in enc] == [1]
    assert enc[0].prompt_ids == format_prompt(rows[0], plain_tokenizer)
    [bad] = enc.report.bad
    assert bad.path == str(path) and bad.row == 2 and f"> max_prompt_tokens={limit}" in bad.reason
    with pytest.raises(DataError, match=r"p\.jsonl:2: prompt has \d+ tokens > max_prompt_tokens"):
        encode_rows(rows, plain_tokenizer, "plain", "", max_prompt_tokens=limit, bad_rows="reject")
    with pytest.raises(DataError, match="no usable prompts"):
        encode_rows(rows, plain_tokenizer, "plain", "", max_prompt_tokens=1, bad_rows="skip")


def test_load_prompts_with_data_config(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "What is 2 + 3?", "answer": 5}])
    cfg = DataConfig(template="chat", system_prompt="Be brief.", max_prompt_tokens=256)
    [enc] = load_prompts(path, chat_tokenizer, cfg)
    assert enc.prompt_ids == format_prompt(enc.row, chat_tokenizer, "chat", "Be brief.")
    assert enc.row.answer == "5"


def test_synthetic_task_rows_load(tmp_path):
    tasks = pytest.importorskip("common.tasks")
    rows_in = tasks.generate("arith", 5, seed=1, split="train")
    path = write_jsonl(tmp_path / "arith.jsonl", rows_in)
    rows = load_rows(path, bad_rows="reject")
    assert [r.id for r in rows] == [r["id"] for r in rows_in]
    assert all(r.metadata["task"] == "arith" and "solution" in r.metadata for r in rows)
