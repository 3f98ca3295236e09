"""``treepo eval`` and ``treepo bench eval`` end to end on the shared vLLM CPU engine (xs tiny model).

The random-init model never writes a ``\\boxed{}`` answer, so the tests score it with a user reward
(a real ``package.module:function`` reward run in verifier workers) that is right for about half of
the responses: mean@k, pass@k and the weighted overall numbers then carry information.
"""

from __future__ import annotations

import json
import shutil

import pytest
from paths import TEST_DATA

from cluster import cli
from cluster.bench import eval as bench_eval
from cluster.commands import eval as eval_cmd
from common.errors import CheckpointError

pytestmark = pytest.mark.integration

REWARD_MODULE = """
def first_char_even(response_text, answer, metadata):
    return 1.0 if response_text and ord(response_text[0]) % 2 == 0 else -1.0
"""
# short answers keep the test fast: 2 segments of 16 tokens (unaligned: below the 32-token block)
TREE = [
    "tree.d=2",
    "tree.l=16",
    "tree.max_response_tokens=32",
    "tree.b=2",
    "tree.align_segments_to_blocks=false",
]


@pytest.fixture
def digit_reward(tmp_path, monkeypatch):
    mod = tmp_path / "reward_mod"
    mod.mkdir()
    (mod / "eval_digit_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(mod))  # verifier workers get this process's sys.path
    return "reward.fn=eval_digit_reward:first_char_even"


@pytest.fixture
def bench_files(tmp_path):
    """Two benchmark files of different sizes (2 and 1 problems) in our row schema."""
    from common.tasks import generate

    rows = generate("arith", 3, seed=7, split="eval")
    paths = []
    for name, part in (("a", rows[:2]), ("b", rows[2:])):
        p = tmp_path / "bench" / name / "test.jsonl"  # same stem: outputs must not collide
        p.parent.mkdir(parents=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in part))
        paths.append(str(p))
    return paths


def check_eval_outputs(out, files, k):
    summary = json.loads((out / "summary.json").read_text())
    res = summary["results"]
    assert list(res) == [*files, "overall"] and summary["k"] == k
    for f in files:
        s = res[f]
        problems = [json.loads(x) for x in open(summary["problems_files"][f])]
        assert len(problems) == s["problems"]
        for p in problems:
            assert len(p["correct"]) == len(p["answers"]) == len(p["texts"]) == k
            assert p["mean_at_k"] == pytest.approx(sum(p["correct"]) / k)
            assert p["pass_at_k"] == float(any(p["correct"])) >= p["mean_at_k"]
            assert 0.0 <= p["maj_at_k"] <= 1.0
        for key in (f"mean@{k}", f"pass@{k}", f"maj@{k}"):
            assert s[key] == pytest.approx(
                sum(p[key.split("@")[0] + "_at_k"] for p in problems) / len(problems)
            )
        assert s["decoded_tokens"] > 0 and s["wall_s"] > 0 and s["trajectories_per_s"] > 0
    assert len({summary["problems_files"][f] for f in files}) == len(files)
    total = sum(res[f]["problems"] for f in files)
    for key in (f"mean@{k}", f"pass@{k}", f"maj@{k}"):
        weighted = sum(res[f][key] * res[f]["problems"] for f in files) / total
        assert res["overall"][key] == pytest.approx(weighted)
    assert res["overall"]["decoded_tokens"] == sum(res[f]["decoded_tokens"] for f in files)
    assert res["overall"][f"pass@{k}"] >= res["overall"][f"mean@{k}"]
    return res


def test_eval_flat_and_tree_on_two_files(
    vllm_backend, tiny_model_dir, bench_files, digit_reward, tmp_path, capsys
):
    k = 4
    overall = {}
    for sampling in ("flat", "tree"):
        out = tmp_path / sampling
        args = cli.build_parser().parse_args(
            ["eval", "--model", str(tiny_model_dir), "--data", *bench_files, "--sampling", sampling,
             "--k", str(k), "--out", str(out), digit_reward, *TREE]
        )  # fmt: skip
        assert eval_cmd.run(args, backend=vllm_backend) == 0
        res = check_eval_outputs(out, bench_files, k)
        overall[sampling] = res["overall"]
        printed = capsys.readouterr().out
        assert "overall" in printed and f"maj@{k}" in printed
    # 3 problems in both modes; the mixed rewards make the weighted mean a real check
    assert overall["flat"]["problems"] == overall["tree"]["problems"] == 3
    assert 0.0 < overall["flat"][f"mean@{k}"] + overall["tree"][f"mean@{k}"] < 2.0
    # the tree shares segments between answers: fewer decoded than trajectory tokens
    assert overall["tree"]["decoded_tokens"] < overall["tree"]["trajectory_tokens"]
    assert overall["flat"]["decoded_tokens"] == overall["flat"]["trajectory_tokens"]


def test_model_may_be_a_checkpoint_root_or_run_dir(vllm_backend, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    shutil.copytree(tiny_model_dir, root / "ckpt-00000003")
    (root / "latest").write_text("ckpt-00000003\n")
    want = str(root / "ckpt-00000003")
    assert eval_cmd.resolve_eval_model(str(root)) == want
    assert eval_cmd.resolve_eval_model(str(run_dir)) == want
    assert eval_cmd.resolve_eval_model(want) == want
    args = cli.build_parser().parse_args(
        ["eval", "--model", str(run_dir), "--data", "synthetic:arith", "--max-problems", "2", "--k", "2",
         "--out", str(tmp_path / "out"), "tree.max_response_tokens=32", "tree.d=1", "tree.l=32"]
    )  # fmt: skip
    assert eval_cmd.run(args, backend=vllm_backend) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"] == want and summary["results"]["overall"]["problems"] == 2
    (root / "latest").write_text("ckpt-00000009\n")
    with pytest.raises(CheckpointError, match="ckpt-00000009"):
        eval_cmd.resolve_eval_model(str(root))


def test_bench_eval_table_and_json(vllm_backend, tiny_model_dir, digit_reward, tmp_path, capsys):
    import argparse

    p = argparse.ArgumentParser()
    bench_eval.add_arguments(p)
    out = tmp_path / "bench.json"
    args = p.parse_args(
        ["--warmup-problems", "1", "--branching", "4", "--json", str(out), f"model.path={tiny_model_dir}",
         "eval.k=4", "eval.max_problems=2", *TREE, digit_reward]
    )  # fmt: skip
    assert bench_eval.run(args, backend=vllm_backend) == 0
    result = json.loads(out.read_text())
    assert list(result["results"]) == ["flat", "tree_b4"]
    c = result["config"]  # the keys reached the bench
    assert (c["k"], c["d"], c["l"], c["max_response_tokens"], c["problems"]) == (4, 2, 16, 32, 2)
    assert c["model"] == str(tiny_model_dir) and c["preset"] is None and digit_reward in c["overrides"]
    for s in result["results"].values():
        assert s["problems"] == 2 and s["pass@4"] >= s["mean@4"] and 0 <= s["maj@4"] <= 1
    r, s = result["ratios_vs_flat"]["tree_b4"], result["results"]["tree_b4"]
    assert r["decoded_tokens"] == pytest.approx(
        s["decoded_tokens"] / result["results"]["flat"]["decoded_tokens"]
    )
    assert "tree_b4" in capsys.readouterr().out


def test_eval_on_converted_public_benchmarks(vllm_backend, tiny_model_dir, tmp_path):
    """Converter output feeds ``treepo eval`` as is: the math reward scores every answer per row."""

    from common.benchmarks import convert_file, write_rows

    samples = TEST_DATA / "bench_samples"
    files = []
    for name in ("math500.jsonl", "olympiadbench.jsonl"):
        dst = tmp_path / "conv" / name
        write_rows(convert_file(samples / name).rows, dst)
        files.append(str(dst))
    args = cli.build_parser().parse_args(
        ["eval", "--model", str(tiny_model_dir), "--data", *files, "--k", "2", "--out", str(tmp_path / "out"),
         "tree.max_response_tokens=16", "tree.d=1"]
    )  # fmt: skip
    assert eval_cmd.run(args, backend=vllm_backend) == 0
    res = check_eval_outputs(tmp_path / "out", files, 2)
    assert [res[f]["problems"] for f in files] == [3, 3]
    # the random model writes no boxed answer: every sample is scored wrong, none is dropped
    assert res["overall"]["mean@2"] == res["overall"]["maj@2"] == 0.0
