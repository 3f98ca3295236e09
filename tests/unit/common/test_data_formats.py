"""The datasets users already have: verl-layout parquet, named and nested columns, chat-message prompts,
Hugging Face ``datasets`` directories and shard folders, several files mixed by weight. Files are
written with the real libraries (pyarrow, datasets)."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import DataConfig, load_config
from common.data import encode_rows, load_prompt_set, load_rows, mixture_counts
from common.errors import ConfigError, DataError

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer():
    """A byte-level BPE trained in milliseconds, with a ChatML template (any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_start|>", "<|im_end|>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(
        ["What is 2 + 3? Put the answer in \\boxed{}. system user assistant"] * 20, trainer
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def verl_rows(n: int, start: int = 0) -> list[dict]:
    """Rows in verl's layout (the TreePO release's data, DAPO-Math-17k)."""
    return [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
            "ability": "MATH",
            "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
            "extra_info": {"index": i, "split": "train"},
        }
        for i in range(start, start + n)
    ]


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def cfg(**kw) -> DataConfig:
    return DataConfig(max_prompt_tokens=4096, **kw)


# ------------------------------------------------------------------------------------- verl layout


def test_verl_parquet_out_of_the_box(tmp_path, chat_tokenizer, caplog):
    path = write_parquet(tmp_path / "dapo.parquet", verl_rows(3))
    with caplog.at_level(logging.INFO, logger="common.data"):
        rows = load_rows(path, bad_rows="reject")
        load_rows(path, bad_rows="reject")  # said once per file
    # said once per file, at warning level: the console of a quiet run shows it
    assert [r.levelno for r in caplog.records if "verl layout" in r.getMessage()] == [logging.WARNING]
    assert [r.answer for r in rows] == ["1", "2", "3"]
    assert rows[0].id == "dapo.parquet:1"
    assert rows[0].prompt == [{"role": "user", "content": "What is 0 + 1?"}]
    assert rows[2].metadata["data_source"] == "math_dapo"
    assert rows[2].metadata["extra_info"] == {"index": 2, "split": "train"}
    assert "prompt" not in rows[0].metadata
    # chat: the messages as they are; plain: the one user message's text
    [enc] = encode_rows(rows[:1], chat_tokenizer, "chat", bad_rows="reject")
    assert chat_tokenizer.decode(enc.prompt_ids) == (
        "<|im_start|>user\nWhat is 0 + 1?<|im_end|>\n<|im_start|>assistant\n"
    )
    [plain] = encode_rows(rows[:1], chat_tokenizer, "plain", "Be brief.", bad_rows="reject")
    assert chat_tokenizer.decode(plain.prompt_ids) == "Be brief.\n\nWhat is 0 + 1?"


def test_message_prompts_with_system_and_turns(tmp_path, chat_tokenizer):
    sys_user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    few_shot = [
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "\\boxed{2}"},
        {"role": "user", "content": "What is 2 + 3?"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "answer": "5"}) for p in (sys_user, few_shot)) + "\n")
    rows = load_rows(path, bad_rows="reject")
    chat = encode_rows(rows, chat_tokenizer, "chat", bad_rows="reject")
    assert chat_tokenizer.decode(chat[0].prompt_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "<|im_start|>assistant\n\\boxed{2}<|im_end|>" in chat_tokenizer.decode(chat[1].prompt_ids)
    # plain takes one user message: the few-shot row is a bad row naming the fix
    plain = encode_rows(rows, chat_tokenizer, "plain", bad_rows="skip")
    assert chat_tokenizer.decode(plain[0].prompt_ids) == "Be brief.\n\nWhat is 2 + 3?"
    [bad] = plain.report.bad
    assert (bad.path, bad.row) == (str(path), 2) and "use data.template=chat" in bad.reason
    # a row's own system message and data.system_prompt: one of them must go
    both = encode_rows(rows, chat_tokenizer, "chat", "Other.", bad_rows="skip")
    assert [e.row.row_no for e in both] == [2] and "unset data.system_prompt" in both.report.bad[0].reason


BAD_VERL = [
    (
        {"prompt": [{"role": "user", "content": "q"}], "reward_model": {"style": "rule"}},
        "missing reward_model.ground_truth",
    ),
    ({"prompt": [], "reward_model": {"ground_truth": "1"}}, "empty prompt"),
    (
        {"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}},
        "message 0 is not {role: str, content: str}",
    ),
    ({"prompt": [{"role": "bot", "content": "q"}], "reward_model": {"ground_truth": "1"}}, "role 'bot'"),
    (
        {
            "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "reward_model": {"ground_truth": "1"},
        },
        "last prompt message is from 'assistant'",
    ),
    (
        {"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": [1, 2]}},
        "reward_model.ground_truth must be a string or a number",
    ),
]


def test_verl_bad_rows_name_file_row_and_reason(tmp_path):
    path = tmp_path / "v.jsonl"
    good = verl_rows(1)[0]
    path.write_text("\n".join(json.dumps(r) for r in [good] + [r for r, _ in BAD_VERL]) + "\n")
    rows = load_rows(path, bad_rows="skip")
    assert len(rows) == 1
    for bad, (_, reason) in zip(rows.report.bad, BAD_VERL):
        assert bad.path == str(path) and reason in bad.reason, (bad, reason)
    assert [b.row for b in rows.report.bad] == list(range(2, len(BAD_VERL) + 2))
    with pytest.raises(DataError, match=r"v\.jsonl:2: missing reward_model\.ground_truth"):
        load_rows(path, bad_rows="reject")


def test_named_and_dotted_keys(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text(
        json.dumps({"question": "What is 2+3?", "meta": {"gold": 5}, "src": "x"})
        + "\n"
        + json.dumps({"question": "What is 1+1?", "meta": {}})
        + "\n"
    )
    rows = load_rows(path, prompt_key="question", answer_key="meta.gold")
    assert [(r.prompt, r.answer, r.metadata) for r in rows] == [
        ("What is 2+3?", "5", {"meta": {"gold": 5}, "src": "x"})
    ]
    assert rows.report.bad[0].reason == "missing meta.gold"
    # an explicit key is used as given, never replaced by the detection
    verl = write_parquet(tmp_path / "v.parquet", verl_rows(2))
    with pytest.raises(DataError, match=r"no row has the column 'answer' \(data.answer_key\)"):
        load_rows(verl, answer_key="answer")
    assert [r.answer for r in load_rows(verl, answer_key="extra_info.index")] == ["0", "1"]


# ------------------------------------------------------------------ datasets directories and shards


def test_datasets_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    one = tmp_path / "one"
    datasets.Dataset.from_list(verl_rows(4)).save_to_disk(str(one))
    rows = load_rows(one, bad_rows="reject")
    assert [r.answer for r in rows] == ["1", "2", "3", "4"] and rows[0].prompt[0]["role"] == "user"

    both = tmp_path / "both"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(verl_rows(3)),
            "test": datasets.Dataset.from_list(verl_rows(2, 100)),
        }
    ).save_to_disk(str(both))
    assert [r.answer for r in load_rows(both, split="train")] == ["1", "2", "3"]
    assert [r.answer for r in load_rows(both, split="eval")] == ["101", "102"]
    assert len(load_rows(both / "test", split="train")) == 2  # a split's own directory, whatever the split

    only_train = tmp_path / "only_train"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(verl_rows(1))}).save_to_disk(str(only_train))
    with pytest.raises(DataError, match=r"has the splits train and none for 'eval'.*only_train/<split>"):
        load_rows(only_train, split="eval")


def test_shard_directory_parquet_and_arrow(tmp_path):
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    write_parquet(data / "train-00000-of-00002.parquet", verl_rows(2))
    bad_shard = verl_rows(2, 2)
    bad_shard[1]["reward_model"] = {"style": "rule"}
    write_parquet(data / "train-00001-of-00002.parquet", bad_shard)
    table = pa.Table.from_pylist(verl_rows(3, 100))
    arrow = str(data / "test-00000-of-00001.arrow")
    with pa.OSFile(arrow, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:  # as datasets writes
        w.write_table(table)
    rows = load_rows(tmp_path / "hub", split="train")
    assert [r.answer for r in rows] == ["1", "2", "3"]
    assert [r.id for r in rows] == [
        "train-00000-of-00002.parquet:1",
        "train-00000-of-00002.parquet:2",
        "train-00001-of-00002.parquet:1",
    ]
    [bad] = rows.report.bad
    assert bad.path == str(data / "train-00001-of-00002.parquet") and bad.row == 2
    assert [r.answer for r in load_rows(tmp_path / "hub", split="eval")] == ["101", "102", "103"]
    # an Arrow IPC file (feather v2) and a folder without split names: every shard
    flat = tmp_path / "flat"
    flat.mkdir()
    with pa.OSFile(str(flat / "a.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    write_parquet(flat / "b.parquet", verl_rows(1))
    assert [r.answer for r in load_rows(flat, split="eval")] == ["101", "102", "103", "1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .parquet, .arrow or .jsonl shards"):
        load_rows(empty)


# ----------------------------------------------------------------------------------------- mixtures


def test_mixture_counts_follow_the_weights():
    assert mixture_counts([100, 300], [1, 1]) == [200, 200]
    assert mixture_counts([10, 10, 10], [1, 1, 1]) == [10, 10, 10]
    assert mixture_counts([5, 5], [2, 1]) == [7, 3]  # 6.67 / 3.33: the larger remainder rounds up
    assert sum(mixture_counts([7, 11, 3], [0.2, 0.5, 0.3])) == 21


def test_weighted_mixture_is_deterministic_and_resumable(tmp_path, chat_tokenizer):
    a = write_parquet(tmp_path / "a.parquet", verl_rows(10))
    b = tmp_path / "b.jsonl"
    b.write_text("\n".join(json.dumps({"id": i, "prompt": f"p{i}", "answer": i}) for i in range(4)) + "\n")
    c = cfg(train_weights=[1, 1], shuffle_seed=3)
    mixed, path, task = load_prompt_set([str(a), str(b)], "train", chat_tokenizer, c)
    ids = [e.row.id for e in mixed]
    assert path == a and task is None
    assert len(ids) == 14 and len(set(ids)) == 14  # as many as both files; unique ids
    from_a = [i for i in ids if i.startswith("a.parquet/")]
    from_b = [i for i in ids if i.startswith("b.jsonl/")]
    assert len(from_a) == 7 and len(from_b) == 7
    # b (4 prompts) is repeated: every prompt once, then a seeded 3 of them again as copies
    assert from_b[:4] == ["b.jsonl/0", "b.jsonl/1", "b.jsonl/2", "b.jsonl/3"]
    assert all(i.endswith("#2") for i in from_b[4:])
    # the same files, weights and seed give the same list (what exactly-once dispatch and resume need)
    again = [e.row.id for e in load_prompt_set([str(a), str(b)], "train", chat_tokenizer, c)[0]]
    assert again == ids
    other = [
        e.row.id
        for e in load_prompt_set(
            [str(a), str(b)], "train", chat_tokenizer, cfg(train_weights=[1, 1], shuffle_seed=4)
        )[0]
    ]
    assert sorted(other) != sorted(ids)  # another seed, another subset of a
    # the copies keep their prompt, answer and metadata
    by_id = {e.row.id: e for e in mixed}
    copy = by_id[from_b[4]]
    assert copy.row.answer == by_id[from_b[4][:-2]].row.answer
    # no weights: every file once, whole, in order
    plain = [e.row.id for e in load_prompt_set([str(a), str(b)], "train", chat_tokenizer, cfg())[0]]
    assert plain == [f"a.parquet/a.parquet:{i}" for i in range(1, 11)] + [f"b.jsonl/{i}" for i in range(4)]
    # bad rows of every member are kept in the mixture's report with their file
    b.write_text(b.read_text() + json.dumps({"prompt": "", "answer": 1}) + "\n")
    mixed = load_prompt_set([str(a), str(b)], "train", chat_tokenizer, cfg())[0]
    assert [(x.path, x.row) for x in mixed.report.bad] == [(str(b), 5)]


def test_mixture_with_a_synthetic_task_and_repeated_names(tmp_path, chat_tokenizer):
    one, two = tmp_path / "x", tmp_path / "y"
    one.mkdir(), two.mkdir()
    for d in (one, two):
        write_parquet(d / "train.parquet", verl_rows(2))
    mixed, _, _ = load_prompt_set(
        [str(one / "train.parquet"), str(two / "train.parquet")], "train", chat_tokenizer, cfg()
    )
    assert [e.row.id.split("/")[0] for e in mixed] == ["0-train.parquet"] * 2 + ["1-train.parquet"] * 2


def test_train_list_config_rules():
    c = load_config(None, ["data.train=[a.parquet,b.jsonl]", "data.train_weights=[0.3,0.7]", "driver=local"])
    assert c.data.train == ["a.parquet", "b.jsonl"] and c.data.train_weights == [0.3, 0.7]
    for overrides, message in [
        (["data.train_weights=[1]"], "data.train is one file"),
        (["data.train=[a,b]", "data.train_weights=[1]"], "1 weights for 2 files"),
        (["data.train=[a,b]", "data.train_weights=[1,0]"], "must be positive"),
        (["data.train=[]"], "non-empty list"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def test_nested_metadata_travels_as_one_json_string(tmp_path):
    from common.data import full_metadata, wire_metadata
    from common.tree import _META_TYPES

    [row] = load_rows(write_parquet(tmp_path / "v.parquet", verl_rows(1)))
    wire = wire_metadata(row.metadata)
    assert all(isinstance(v, _META_TYPES) for v in wire.values())  # what a tree may carry
    assert wire["data_source"] == "math_dapo"
    back = full_metadata(wire)
    assert (
        back["extra_info"] == {"index": 0, "split": "train"} and back["reward_model"]["ground_truth"] == "1"
    )
    assert full_metadata({"a": 1}) == {"a": 1}


def test_a_file_without_the_configured_columns_is_refused_with_its_columns(tmp_path, caplog):
    """A parquet whose columns are not the configured keys: one error listing the file's columns and
    the keys to set, before any row is reported bad (no line per row)."""
    path = write_parquet(
        tmp_path / "q.parquet",
        [{"question_text": f"What is {i}+1?", "solution": str(i + 1)} for i in range(12)],
    )
    with caplog.at_level(logging.WARNING, logger="common.data"), pytest.raises(DataError) as e:
        load_rows(path)
    msg = str(e.value)
    assert "'prompt' (data.prompt_key)" in msg and "'answer' (data.answer_key)" in msg
    assert "columns are question_text, solution" in msg
    assert "data.prompt_key=<column> and data.answer_key=<column>" in msg
    assert not [r for r in caplog.records if "skipping bad row" in r.getMessage()]
    # only the answer column is wrong: only data.answer_key is named
    path = write_parquet(tmp_path / "a.parquet", [{"prompt": "2+2?", "solution": "4"}])
    with pytest.raises(DataError, match=r"column 'answer' \(data.answer_key\); .*set data.answer_key="):
        load_rows(path)
    # the configured keys fix it
    rows = load_rows(path, answer_key="solution")
    assert [r.answer for r in rows] == ["4"]
