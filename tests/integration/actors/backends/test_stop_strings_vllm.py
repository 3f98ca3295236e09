"""Stop strings (``generators.stop``) on the vLLM CPU engine.

- The session's tiny model (random weights) grown into trees with every two-digit string as a stop
  string: every path ends at the token that completes its first stop string (none earlier in it),
  including strings split across segment boundaries, and the scored text ends before it.
- ``treepo sample`` (unaligned 2-token segments: ``END`` split across segments, found by the sampler)
  and ``treepo eval`` (flat: the engine's detokenizer stops at ``END``) on ``tests/chat_model.py``'s
  chain model (``Hi END\\boxed{7}``) in child processes (the session's in-process engine holds the
  tiny model; one in-process engine per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from chat_model import build_chain_model, build_tokenizer, text_chain_ids
from paths import REPO

from actors.sampler import TreeSampler
from actors.scoring import leaf_texts
from common.config import SamplingConfig, TreeConfig
from common.models import eos_token_ids, load_tokenizer
from common.stops import StopRule

pytestmark = pytest.mark.integration

STOPS = [f"{a}{b}" for a in range(10) for b in range(10)]
PROMPTS = ["12+7=", "3*4+5*6=", "(8-3)*2+91="]


def test_vllm_tree_paths_end_at_their_first_stop_string(vllm_backend, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    decode = lambda ids: tok.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    eos = eos_token_ids(str(tiny_model_dir))
    cfg = TreeConfig(w=8, d=4, l=8, b=2, max_response_tokens=32, align_segments_to_blocks=False, seed=3)
    sampling = SamplingConfig(per_request_seed=True)  # the same trees whatever ran on the engine before
    sampler = TreeSampler(vllm_backend, cfg, sampling, eos, decode, stop_strings=STOPS)
    rule = StopRule.of(eos, STOPS)
    items = [(f"p{i}", tok(p)["input_ids"], {"answer": "0"}) for i, p in enumerate(PROMPTS)]
    trees = list(sampler.run(items, max_in_flight=3))
    stopped = split = 0
    for tree in trees:
        tree.validate()
        for leaf, scored in zip(tree.leaves, leaf_texts(tree, decode, rule)):
            ids = tree.response_ids(leaf).tolist()
            assert rule.text_cut(decode(ids[:-1])) is None  # no stop before the last token
            at = rule.text_cut(decode(ids))
            if at is None:
                continue
            stopped += 1
            assert leaf.finish_reason == "eos" and scored == decode(ids)[:at]
            last = tree.path(leaf.node_id)[-1].token_ids.tolist()
            split += rule.text_cut(decode(last)) is None  # the string began in an earlier segment
    assert stopped >= 4 and split >= 1, (stopped, split)


@pytest.mark.slow
def test_vllm_sample_and_eval_stop_at_a_string_split_across_segments(tmp_path):
    pytest.importorskip("vllm")
    tok = build_tokenizer()
    model = build_chain_model(tmp_path / "model", text_chain_ids(tok, "Hi END\\boxed{7}"), tok)
    rows = tmp_path / "q.jsonl"
    rows.write_text(json.dumps({"id": "q1", "prompt": "What is 3+4?\n", "answer": "7"}) + "\n")
    over = ['generators.stop=["END"]', "tree.l=2", "tree.d=12", "tree.w=2", "tree.max_response_tokens=24"]
    over += ["tree.align_segments_to_blocks=false", "generators.kv_cache_gib=0.0625"]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="2")
    out = tmp_path / "trees.jsonl"
    cmd = [sys.executable, "-m", "cluster", "sample", "--model", str(model), "--data", str(rows)]
    cmd += ["--out", str(out), "--backend", "vllm", "--reward", "math", "--no-progress", *over]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    leaves = [lf for rec in map(json.loads, out.read_text().splitlines()) for lf in rec["leaves"]]
    assert len(leaves) == 2
    for lf in leaves:  # segments "Hi", " E", "ND": the path ends with the third
        assert (lf["response"], lf["finish_reason"], len(lf["node_path"])) == ("Hi END", "eos", 3)
        assert (lf["correct"], lf["reward"], lf["answer"]) == (False, -1.0, None)
    ev = tmp_path / "eval"
    cmd = [sys.executable, "-m", "cluster", "eval", "--model", str(model), "--data", str(rows)]
    cmd += ["--k", "2", "--sampling", "flat", "--out", str(ev), "reward.fn=math", *over]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    problem = json.loads((ev / "q.problems.jsonl").read_text().splitlines()[0])
    assert problem["correct"] == [False, False] and problem["answers"] == [None, None]
    # one request per answer: the engine itself stopped at "END" (its detokenizer), not at Lmax or EOS
    (res,) = [
        v for k, v in json.loads((ev / "summary.json").read_text())["results"].items() if k != "overall"
    ]
    assert res["decoded_tokens"] == 2 * len("Hi END")


@pytest.mark.slow
def test_training_applies_stop_strings(tmp_path, vllm_backend, tiny_model_dir):
    """The local driver's step: its trees end at their first stop string (every two-digit string; one
    token per character here, so a stopped leaf's text ends with one), written to rollouts.jsonl."""
    import torch
    from transformers import AutoModelForCausalLM

    from cluster.local import train
    from common.config import load_config

    run = tmp_path / "run"
    stops = "[" + ",".join(f'"{s}"' for s in STOPS) + "]"
    over = [f"run_dir={run}", "driver=local", f"model.path={tiny_model_dir}", "generators.kv_cache_gib=0.25"]
    over += ["tree.w=4", "tree.l=8", "tree.max_response_tokens=32", "learner.prompts_per_step=2"]
    over += ["learner.mini_batch_prompts=2", "algo.dynamic_sampling=false", "eval.every_steps=0"]
    over += ["log.progress=false", "log.backends=[]", "learner.total_steps=1", "log.rollouts_every_steps=1"]
    over += [f"generators.stop={stops}", "data.synthetic_train_size=2"]
    version = vllm_backend.policy_version
    try:
        assert train(load_config(None, over), backend=vllm_backend) == 0
    finally:
        original = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        vllm_backend.update_weights(original.named_parameters(remove_duplicate=False), version)
    rule = StopRule.of((), STOPS)
    leaves = [
        lf
        for rec in map(json.loads, (run / "rollouts.jsonl").read_text().splitlines())
        for lf in rec["leaves"]
    ]
    assert len(leaves) == 8
    stopped = [lf for lf in leaves if rule.text_cut(lf["text"]) is not None]
    assert stopped, "no leaf met a stop string: the check would be vacuous"
    for lf in stopped:
        assert lf["finish_reason"] == "eos" and rule.text_cut(lf["text"][:-1]) is None
        assert any(lf["text"].endswith(s) for s in STOPS)
