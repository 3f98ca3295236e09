"""The chat stop rule on the vLLM CPU engine: ``treepo sample`` with ``data.template=chat`` on
``tests/chat_model.py``'s model (only EOS in generation_config.json: ``<|endoftext|>``) stops every
path at ``<|im_end|>``, and the box the model writes after it does not count.

The session's shared in-process engine holds the tiny model (one in-process engine per process), so
this engine runs in a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from chat_model import build_chat_model
from paths import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_vllm_stops_a_chat_model_at_end_of_turn(tmp_path):
    pytest.importorskip("vllm")
    model = build_chat_model(tmp_path / "model")
    rows = tmp_path / "q.jsonl"
    rows.write_text(json.dumps({"id": "q1", "prompt": "What is 3+4?", "answer": "7"}) + "\n")
    out = tmp_path / "trees.jsonl"
    cmd = [sys.executable, "-m", "cluster", "sample", "--model", str(model), "--data", str(rows)]
    cmd += ["--out", str(out), "--backend", "vllm", "--reward", "math", "--no-progress", "data.template=chat"]
    cmd += [
        "tree.w=4",
        "tree.d=2",
        "tree.l=32",
        "tree.max_response_tokens=64",
        "generators.kv_cache_gib=0.0625",
    ]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="2")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    leaves = [lf for rec in map(json.loads, out.read_text().splitlines()) for lf in rec["leaves"]]
    assert len(leaves) == 4
    for leaf in leaves:
        # "Hi" then <|im_end|>: 3 tokens, stopped by the engine, the box after it never sampled
        assert (leaf["response"], leaf["length"], leaf["finish_reason"]) == ("Hi", 3, "eos")
        assert (leaf["reward"], leaf["correct"], leaf["answer"]) == (-1.0, False, None)
