"""What a training run says on the console, the same for both drivers: the demo's defaults on the
first lines, one evaluation line format, the reason of a run that trained nothing; and a bad JSON
row's message."""

from __future__ import annotations

from cluster.logs import demo_notes, eval_line, nothing_trained
from common.config import load_config
from common.data.files import jsonl_records


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run_dir={tmp_path}", *extra])


def test_the_demos_model_and_eval_data_are_said(tmp_path):
    notes = demo_notes(_cfg(tmp_path))
    assert [n.split(":")[0] for n in notes] == ["[train] model", "[train] eval data"]
    assert "tiny:arith" in notes[0] and "model.path=" in notes[0]
    assert "synthetic:arith" in notes[1] and "data.eval=" in notes[1]
    mine = _cfg(tmp_path, "model.path=/models/qwen", "data.train=my.parquet")
    lines = demo_notes(mine)
    assert (
        len(lines) == 2 and "warning: training on my.parquet but evaluating on the synthetic task" in lines[1]
    )
    assert (
        demo_notes(_cfg(tmp_path, "model.path=/m", "data.train=my.parquet", "data.eval=held.parquet")) == []
    )
    assert demo_notes(_cfg(tmp_path, "model.path=/m", "data.train=my.parquet", "eval.every_steps=0")) == []


def test_one_eval_line_for_both_drivers():
    local = {"eval/mean@4": 0.25, "eval/pass@4": 0.5, "eval/accuracy": 0.25, "eval/answered": 0.75}
    ray = {**local, "eval/version": 3.0, "timing/eval_s": 1.5}  # what the generator and controller add
    line = "[eval] step 7: eval/mean@4=0.250  eval/pass@4=0.500  eval/answered=0.750"
    assert eval_line(7, local) == eval_line(7, ray) == line


def test_a_run_that_trained_nothing_says_why(tmp_path):
    cfg = _cfg(tmp_path)
    assert "dynamic sampling dropped all 12 tree(s)" in str(nothing_trained(cfg, 12))
    assert str(nothing_trained(cfg, 0)).startswith("0 steps trained: the prompts ran out")


def test_a_bad_json_row_says_at_once(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": "\tb"}\n{"prompt": "unterminated')  # the last line without its newline
    errors = [err for _, _, err in jsonl_records(path)]
    assert errors == [
        "invalid JSON (Invalid control character at column 8)",
        "invalid JSON (Unterminated string starting at column 12)",
    ]
