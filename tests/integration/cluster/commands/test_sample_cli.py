"""``treepo sample`` on the tiny model and the synthetic arith task: trees, summary, wire file."""

from __future__ import annotations

import json
import struct

import pytest

from cluster import cli
from cluster.commands import sample as sample_cmd
from common.tree import decode_tree

pytestmark = pytest.mark.integration


def read_wire(path):
    data = path.read_bytes()
    trees, i = [], 0
    while i < len(data):
        (n,) = struct.unpack_from("<I", data, i)
        trees.append(decode_tree(data[i + 4 : i + 4 + n]))
        i += 4 + n
    return trees


def check_outputs(out, w, n_prompts):
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == n_prompts
    for rec in lines:
        assert rec["num_leaves"] == w == len(rec["leaves"])
        assert rec["gold_answer"] and rec["prompt"]
        for leaf in rec["leaves"]:
            assert leaf["finish_reason"] in ("finished", "eos", "max_tokens", "max_depth", "repetition")
            assert leaf["reward"] in (-1.0, 1.0) and isinstance(leaf["response"], str) and leaf["node_path"]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["tree/trees"] == n_prompts and summary["tree/leaves"] == n_prompts * w
    assert "reward/mean" in summary and f"reward/maj@{w}" in summary
    return lines, summary


def test_sample_cli_hf_backend(tiny_model_dir, tmp_path, capsys):
    out, wire = tmp_path / "trees.jsonl", tmp_path / "trees.bin"
    rc = cli.main(
        [
            "sample",
            "--model",
            str(tiny_model_dir),
            "--data",
            "synthetic:arith",
            "--out",
            str(out),
            "--wire",
            str(wire),
            "--limit",
            "3",
            "--backend",
            "hf",
            "--reward",
            "arith",
            "--no-progress",
            "tree.w=4",
            "tree.d=2",
            "tree.l=16",
            "tree.max_response_tokens=32",
            "generators.trees_in_flight=2",
        ]
    )
    assert rc == 0
    lines, _ = check_outputs(out, 4, 3)
    trees = read_wire(wire)
    assert [t.tree_id for t in trees] == [rec["tree_id"] for rec in lines]
    assert all(t.leaves[0].reward in (-1.0, 1.0) for t in trees)
    assert "decoded tokens" in capsys.readouterr().out


def test_sample_cli_on_the_shared_vllm_engine(vllm_backend, tiny_model_dir, tmp_path):
    out = tmp_path / "trees.jsonl"
    args = cli.build_parser().parse_args(
        [
            "sample",
            "--model",
            str(tiny_model_dir),
            "--data",
            "synthetic:arith",
            "--out",
            str(out),
            "--limit",
            "3",
            "--no-progress",
            "--render",
            str(tmp_path / "trees.html"),
            "--render-trees",
            "2",
            "tree.w=8",
            "tree.d=3",
            "tree.l=32",
            "tree.max_response_tokens=96",
        ]
    )
    assert sample_cmd.run(args, backend=vllm_backend) == 0
    _, summary = check_outputs(out, 8, 3)
    assert summary["rollout/prefill_tokens_cached"] > 0
    page = (tmp_path / "trees.html").read_text()  # the first 2 trees, every leaf of each
    assert page.count('<section class="tree"') == 2 and page.count('data-leaf="') == 2 * 8
