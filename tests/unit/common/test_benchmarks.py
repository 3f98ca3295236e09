"""The benchmark converter on sample rows of each public format (tests/data/bench_samples/)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from paths import TEST_DATA

from common.benchmarks import convert_file, detect_format, normalize_answer, write_rows
from common.data import load_rows
from common.errors import DataError

SAMPLES = TEST_DATA / "bench_samples"

# file -> (detected format, [(id, answer)] kept, [(row, reason fragment)] bad)
EXPECTED = {
    "math500.jsonl": (
        "math500",
        [
            ("test/prealgebra/1001.json", "21"),
            ("test/algebra/2002.json", "-\\frac{1}{2}"),
            ("test/number_theory/3003.json", "\\frac{1}{3}"),  # "$\frac{1}{3}$" unwrapped
        ],
        [(4, "missing answer"), (5, "duplicate id 'test/prealgebra/1001.json' (first at row 1)")],
    ),
    "aime24.jsonl": ("aime", [("2024-I-1", "24"), ("2024-I-2", "24")], [(3, "empty problem text")]),
    "aime25.jsonl": ("aime", [("0", "28"), ("2", "1001")], [(2, "invalid JSON")]),
    "amc23.jsonl": ("amc", [("0", "27"), ("1", "2.5")], [(3, "missing answer"), (4, "got True")]),
    "minerva.jsonl": (
        "minerva",
        [("0", "20"), ("1", "\\frac{3}{2}")],  # the LAST box of the solution
        [(3, "no complete \\boxed"), (4, "no complete \\boxed")],
    ),
    "olympiadbench.jsonl": (
        "olympiadbench",
        [("1606", "\\frac{1}{2}"), ("1607", "-2, 2"), ("1608", "6")],
        [(4, "empty answer list")],
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_format_converts_and_reports_bad_rows(name):
    fmt, kept, bad = EXPECTED[name]
    res = convert_file(SAMPLES / name)
    assert res.format == fmt
    assert [(r["id"], r["answer"]) for r in res.rows] == kept
    assert all(r["source"] == Path(name).stem and r["format"] == fmt for r in res.rows)
    # nothing silently dropped: every input row is kept or listed with its row number and reason
    assert res.report.total == len(kept) + len(bad) == res.report.kept + len(res.report.bad)
    assert [b.row for b in res.report.bad] == [row for row, _ in bad]
    for b, (_, reason) in zip(res.report.bad, bad):
        assert reason in b.reason and b.path.endswith(name)


def test_prompts_metadata_and_context():
    ob = {r["id"]: r for r in convert_file(SAMPLES / "olympiadbench.jsonl").rows}
    assert ob["1608"]["prompt"].startswith("A cart starts at rest") and ob["1608"]["prompt"].endswith(
        "after $3$ s?"
    )
    assert ob["1608"]["unit"] == "m/s" and ob["1607"]["is_multiple_answer"] is True
    assert "final_answer" not in ob["1606"] and "question" not in ob["1606"]
    m = convert_file(SAMPLES / "math500.jsonl").rows[0]
    assert m["prompt"] == "What is $\\frac{3}{4}$ of 28?" and m["level"] == 1 and m["subject"] == "Prealgebra"
    assert "unique_id" not in m and "solution" in m
    a = convert_file(SAMPLES / "aime24.jsonl").rows[0]
    assert "Problem" not in a and "Answer" not in a and a["Solution"] == "$2^{10}=1024$."


def test_reject_stops_at_first_bad_row_naming_file_and_row():
    with pytest.raises(DataError, match=r"amc23\.jsonl:3: missing answer"):
        convert_file(SAMPLES / "amc23.jsonl", bad_rows="reject")


@pytest.mark.parametrize(
    "raw, want",
    [
        ("$\\frac{1}{2}$", "\\frac{1}{2}"),
        ("  $$x^2$$ ", "x^2"),
        ("\\(3\\)", "3"),
        ("$\\boxed{7}$", "7"),
        ("\\boxed{a}+\\boxed{b}", "\\boxed{a}+\\boxed{b}"),  # not ONE wrapped answer
        ("$a$ and $b$", "$a$ and $b$"),
        (27.0, "27"),
        (2.5, "2.5"),
        (-3, "-3"),
        (["$1$"], "1"),
        (["$-2$", "$2$"], "-2, 2"),
    ],
)
def test_answer_normalisation(raw, want):
    assert normalize_answer(raw) == want


@pytest.mark.parametrize("raw", [None, True, float("nan"), [], "  ", "$ $", {"a": 1}])
def test_answers_that_cannot_be_answers(raw):
    with pytest.raises(ValueError):
        normalize_answer(raw)


def test_multi_answer_join_is_what_the_verifier_accepts_in_any_order():
    from common.rewards import verify_boxed

    gold = normalize_answer(["$-2$", "$2$"])
    assert verify_boxed("2, -2", gold) and not verify_boxed("2", gold)


def test_parquet_input_and_output_load_as_prompt_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    recs = [json.loads(x) for x in (SAMPLES / "olympiadbench.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "OlympiadBench.parquet")
    res = convert_file(tmp_path / "OlympiadBench.parquet")
    assert res.format == "olympiadbench" and [r["answer"] for r in res.rows] == ["\\frac{1}{2}", "-2, 2", "6"]
    for out in (tmp_path / "ob.jsonl", tmp_path / "ob.parquet"):
        write_rows(res.rows, out)
        rows = load_rows(out, bad_rows="reject")
        assert [(r.id, r.answer) for r in rows] == [(r["id"], r["answer"]) for r in res.rows]
        assert rows[0].metadata["source"] == "OlympiadBench"


def test_format_override_detection_error_and_unknown_format(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text(json.dumps({"text": "no known columns", "label": 1}) + "\n")
    with pytest.raises(DataError, match="cannot tell the benchmark format.*--format"):
        convert_file(bad)
    with pytest.raises(DataError, match="unknown benchmark format"):
        convert_file(bad, format="gsm8k")
    # AIME/AMC-shaped columns: the file name decides the label, --format overrides it
    assert detect_format({"id": 1, "problem": "p", "answer": 3}, "amc12.jsonl") == "amc"
    assert convert_file(SAMPLES / "aime25.jsonl", format="amc").format == "amc"


def test_convert_bench_command(tmp_path, capsys):
    from cluster.commands import convert as convert_cmd

    p = argparse.ArgumentParser()
    convert_cmd.add_arguments(p)
    inputs = [str(SAMPLES / n) for n in ("math500.jsonl", "amc23.jsonl", "minerva.jsonl")]
    assert convert_cmd.run(p.parse_args([*inputs, "--out", str(tmp_path / "conv")])) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])["converted"]
    assert [r["kept"] for r in report] == [3, 2, 2] and "amc23.jsonl:4" in report[1]["bad"][1]
    assert len(load_rows(tmp_path / "conv" / "minerva.jsonl")) == 2
    with pytest.raises(DataError, match="minerva.jsonl:3"):
        convert_cmd.run(p.parse_args([inputs[2], "--out", str(tmp_path / "m.jsonl"), "--bad-rows", "reject"]))


def test_pipeline_overlap_bound_and_summary():
    from cluster.bench.pipeline import overlap_bound, summarize

    b = overlap_bound(3.0, 1.0, batch=8)
    assert b["sync_trees_per_s"] == pytest.approx(2.0) and b["async_trees_per_s"] == pytest.approx(8 / 3)
    assert b["speedup"] == pytest.approx(4 / 3)
    assert overlap_bound(2.0, 2.0, batch=4)["speedup"] == pytest.approx(
        2.0
    )  # perfect overlap halves the time
    with pytest.raises(ValueError):
        overlap_bound(0.0, 0.0, batch=4)
    rows = [{"step": 0, "time": 0.0, "eval/accuracy": 0.1}]  # the start-up eval is not a step
    for k in range(1, 5):
        rows.append(
            {
                "step": k,
                "time": 10.0 + 2.0 * k,
                "timing/step_s": 2.0,
                "timing/generate_s": 0.5,
                "timing/train_s": 1.2,
                "staleness/max": float(k % 2),
                "learner/idle_frac": 0.25,
                "generator/idle_frac": 0.5,
                "generator/busy_s": 0.8 * k,
                "timing/sync_s": 0.1,
            }
        )
    s = summarize(rows, batch=8, leaves_per_tree=4)
    assert s["steps_measured"] == 3 and s["step_s"] == pytest.approx(2.0)
    assert s["trees_per_s"] == pytest.approx(4.0) and s["samples_per_s"] == pytest.approx(16.0)
    assert s["rest_s"] == pytest.approx(1.5) and s["staleness_max"] == 1.0
    assert s["gen_busy_s"] == pytest.approx(0.8) and s["learner_busy_s"] == pytest.approx(1.3)
    with pytest.raises(ValueError, match="at least 2"):
        summarize(rows[:2], batch=8, leaves_per_tree=4)
