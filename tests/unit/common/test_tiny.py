"""Tiny models and tokenizers: round-trips, saved format, atomic builds, model resolution, warm-start quality."""

from __future__ import annotations

import json

import pytest
import torch

from common import tiny
from common.errors import ModelError
from common.models import eos_token_ids, load_model, load_tokenizer, resolve_model_path
from common.tasks import check_answer, generate
from common.tiny import (
    SIZES,
    answer_report,
    build_tokenizer,
    make_tiny_model,
    resolve_tiny,
    sample_responses,
)


def test_char_tokenizer_round_trips_task_text_and_has_eos():
    tok = build_tokenizer("arith")
    for r in generate("arith", 200, seed=0, split="train"):
        text = r["prompt"] + r["solution"]
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|eos|>"
    assert tok.pad_token_id != tok.eos_token_id
    # Special tokens are not added silently: prompt + response ids == ids of the concatenation.
    assert tok.encode("Compute 1+2.\n") == tok.encode("Compute 1+2.\n", add_special_tokens=False)
    assert tok.decode([*tok.encode("1+2=3"), tok.eos_token_id], skip_special_tokens=True) == "1+2=3"


def test_byte_tokenizer_round_trips_any_text():
    tok = build_tokenizer(None)
    text = "héllo\n\twörld 🙂  \\boxed{x}\r\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert len(tok) == 256 + len(tiny.SPECIAL_TOKENS)


@pytest.mark.parametrize("task", ["arith", None])
def test_saved_tokenizer_reloads_with_identical_ids(task, tmp_path):
    """AutoTokenizer (and so vLLM) re-creates a qwen2 model's tokenizer class: it must encode the same."""
    built = build_tokenizer(task)
    d = make_tiny_model(tmp_path / "m", task=task, size="xs", progress=False)
    loaded = load_tokenizer(str(d))
    for r in generate("arith", 100, seed=4, split="eval"):
        text = r["prompt"] + r["solution"]
        ids = built.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == ids
        assert loaded.decode(ids) == text
    for name in ("eos_token_id", "pad_token_id", "bos_token_id", "unk_token_id"):
        assert getattr(loaded, name) == getattr(built, name)
    assert len(loaded) == len(built)
    assert loaded.chat_template == built.chat_template


def test_chat_template():
    tok = build_tokenizer("arith")
    # Only the task's characters (and the roles') are in the vocabulary: anything else would be <|unk|>.
    msgs = [{"role": "system", "content": "Compute it."}, {"role": "user", "content": "Compute 1+2."}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "system: Compute it.\nuser: Compute 1+2.\nassistant: "
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("size", sorted(SIZES))
def test_sizes_use_head_dim_64(size):
    cfg = tiny.build_config(size, build_tokenizer("arith"))
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert cfg.max_position_embeddings >= 1024


def test_saved_model_loads_with_identical_logits(tiny_model_dir):
    files = {p.name for p in tiny_model_dir.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "treepo_tiny.json",
    } <= files
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    tok = load_tokenizer(str(tiny_model_dir))
    assert gen["eos_token_id"] == tok.eos_token_id and gen["pad_token_id"] == tok.pad_token_id
    info = json.loads((tiny_model_dir / "treepo_tiny.json").read_text())
    assert info["size"] == "xs" and info["task"] == "arith" and info["warmup_steps"] == 0

    # Rebuilding with the same seed gives the same weights (deterministic init) ...
    torch.manual_seed(0)
    ref = tiny.Qwen2ForCausalLM(tiny.build_config("xs", tok)).float().eval()
    loaded = load_model(str(tiny_model_dir))
    ids = torch.tensor([tok.encode("Compute 12+34-5.\n12+34=46\n", add_special_tokens=False)])
    with torch.no_grad():
        # ... and the saved copy reproduces the in-memory model's logits exactly.
        assert torch.equal(ref(ids).logits, loaded(ids).logits)
    assert loaded.dtype == torch.float32


_BUILD_IN_CHILD = """
import hashlib, json, sys, torch
from common import tiny
tiny.PASS_RATE_PROBLEMS = 2  # the build's own measurement, kept short
d = tiny.make_tiny_model(sys.argv[1], size="xs", warmup_steps=3, progress=False)
print(json.dumps({
    "weights": hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest(),
    "info_threads": json.loads((d / "treepo_tiny.json").read_text())["threads"],
    "threads_after": torch.get_num_threads(),
    "deterministic_after": torch.are_deterministic_algorithms_enabled(),
}))
"""


def test_build_ignores_omp_num_threads_and_restores_torch_settings(tmp_path):
    """A warm-started build runs at the pinned thread count with deterministic algorithms, so the same
    seed gives the same weights whatever OMP_NUM_THREADS says; the caller's settings come back after.
    Each build runs in a fresh process: once an in-process vLLM engine has bound its threads, torch's
    thread count can no longer be changed in that process."""
    import os
    import subprocess
    import sys

    out = {}
    for threads in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        r = subprocess.run(
            [sys.executable, "-c", _BUILD_IN_CHILD, str(tmp_path / f"t{threads}")],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        out[threads] = json.loads(r.stdout.strip().splitlines()[-1])
        assert out[threads]["threads_after"] == threads and not out[threads]["deterministic_after"]
        assert out[threads]["info_threads"] == tiny.WARMUP_THREADS
    assert out[1]["weights"] == out[2]["weights"]


def test_different_seed_gives_different_weights(tmp_path):
    a = load_model(str(make_tiny_model(tmp_path / "a", size="xs", seed=0, progress=False)))
    b = load_model(str(make_tiny_model(tmp_path / "b", size="xs", seed=1, progress=False)))
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def fail(*_args, **_kw):
        raise RuntimeError("injected failure after the weights were written")

    monkeypatch.setattr(tiny, "_write_build_info", fail)
    with pytest.raises(RuntimeError, match="injected"):
        make_tiny_model(tmp_path / "m", size="xs", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="already exists"):
        make_tiny_model(tmp_path / "m", size="xs", progress=False)


def test_resolve_tiny_builds_once_and_caches(tmp_path, monkeypatch):
    built = []
    real = tiny.make_tiny_model
    monkeypatch.setattr(tiny, "make_tiny_model", lambda *a, **k: built.append(a) or real(*a, **k))
    a = resolve_tiny("tiny:arith", size="xs", warmup_steps=0, cache_dir=tmp_path, progress=False)
    b = resolve_tiny("tiny:arith", size="xs", warmup_steps=0, cache_dir=tmp_path, progress=False)
    assert a == b and len(built) == 1
    assert (a / "config.json").is_file()
    c = resolve_tiny("tiny:arith", size="xs", warmup_steps=0, cache_dir=tmp_path, seed=1, progress=False)
    assert c != a and len(built) == 2
    with pytest.raises(ModelError, match="unknown tiny model size"):
        resolve_tiny("tiny:arith", size="xl", cache_dir=tmp_path)


def test_resolve_model_path(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("TREEPO_CACHE", str(tmp_path / "cache"))
    got = resolve_model_path("tiny:arith", tiny_size="xs", tiny_warmup_steps=0)
    assert got.startswith(str(tmp_path / "cache")) and (tmp_path / "cache").exists()
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def test_hub_id_offline_is_a_model_error(monkeypatch):
    import huggingface_hub.constants

    # Offline mode makes the failure immediate; with network access it would be a 404, also a ModelError.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="hub"):
        load_tokenizer("treepo-test-nonexistent/model")
    with pytest.raises(ModelError, match="hub"):
        load_model("treepo-test-nonexistent/model")


def test_eos_token_ids(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    assert eos_token_ids(str(tiny_model_dir)) == [tok.eos_token_id]
    # Several EOS ids in generation_config.json (as in many instruct models) are all returned.
    d = tiny_model_dir.parent / "multi-eos"
    if not d.exists():
        import shutil

        shutil.copytree(tiny_model_dir, d)
        gen = json.loads((d / "generation_config.json").read_text())
        gen["eos_token_id"] = [5, tok.eos_token_id]
        (d / "generation_config.json").write_text(json.dumps(gen))
    assert eos_token_ids(str(d)) == [5, tok.eos_token_id]


@pytest.mark.slow
def test_warm_start_leaves_room_for_rl(warm_model_dir):
    """What the demo needs of its model, on any machine: competent enough to earn reward often, well
    below the ceiling, and many right answers unboxed, so the reward (boxed answers only) can rise.

    Bounds from builds of seeds 0-2 (threads pinned, so OMP_NUM_THREADS 1 and 2 build the same model),
    re-measured as below: T=1 accuracy 0.39-0.57, solved 0.68-0.92, boxed share 0.46-0.60, solved minus
    accuracy 0.30-0.46; build info: pass_rate_t1 0.31-0.55, solved_greedy 0.60-0.98, 650-1000 steps.
    Each bound keeps a margin of at least 0.13 (200 problems: standard error about 0.035)."""
    info = json.loads((warm_model_dir / "treepo_tiny.json").read_text())
    assert info["unboxed_share"] == 0.5 and info["warmup_steps"] == 1000
    assert 400 <= info["warmup_steps_run"] <= 1000
    model, tok = load_model(str(warm_model_dir)), load_tokenizer(str(warm_model_dir))
    held_out = generate("arith", 200, seed=99, split="eval")  # other problems than the build measured
    with tiny.reproducible_torch():
        report = answer_report("arith", held_out, sample_responses(model, tok, held_out, 1.0, seed=1))
    print(f"build: {info}; re-measured at T=1: {report}")
    assert 0.2 <= report["accuracy"] <= 0.7, "the demo model earns too little reward or leaves RL no room"
    assert report["solved"] >= 0.45, "the demo model has not learned the task"
    assert 0.3 <= report["boxed_share"] <= 0.8, "the boxed/unboxed mix the demo relies on is gone"
    assert report["solved"] >= report["accuracy"] + 0.15  # right but unboxed answers: the reward's room
    assert 0.2 <= info["pass_rate_t1"] <= 0.7 and info["solved_greedy"] >= 0.4


def test_warm_start_rows_mix_unboxed_answers():
    plain = tiny.warm_start_rows("arith", 400, seed=3)
    assert plain == generate("arith", 400, seed=3, split="train")  # share 0: the boxed-only data
    mixed = tiny.warm_start_rows("arith", 400, seed=3, unboxed_share=0.5)
    assert mixed == tiny.warm_start_rows("arith", 400, seed=3, unboxed_share=0.5)  # seeded
    bare = [m for m, p in zip(mixed, plain) if m["solution"] != p["solution"]]
    assert 0.4 <= len(bare) / len(mixed) <= 0.6
    for m in bare:
        p = next(p for p in plain if p["id"] == m["id"])
        assert m["solution"] == p["solution"].replace(f"\\boxed{{{m['answer']}}}", m["answer"])
        assert not check_answer("arith", m["solution"], m["answer"])  # the reward calls it wrong
    assert [m["prompt"] for m in mixed] == [p["prompt"] for p in plain]


def test_answer_report():
    rows = [{"answer": "3"}, {"answer": "4"}, {"answer": "5"}, {"answer": "6"}]
    texts = [
        "1+2=3\nThe answer is \\boxed{3}",
        "1+2=3\nThe answer is \\boxed{3}",
        "2+3=5\nThe answer is 5",
        "The answer is 7",
    ]
    assert answer_report("arith", rows, texts) == {"accuracy": 0.25, "boxed_share": 0.5, "solved": 0.5}


def test_unboxed_share_is_checked_and_named_in_the_cache(tmp_path, monkeypatch):
    names = []
    monkeypatch.setattr(tiny, "make_tiny_model", lambda out, *a, **k: names.append(out.name) or out.mkdir())
    resolve_tiny("tiny:arith", size="xs", warmup_steps=3, unboxed_share=0.25, cache_dir=tmp_path)
    resolve_tiny("tiny:arith", size="xs", warmup_steps=3, unboxed_share=0.0, cache_dir=tmp_path)
    resolve_tiny("tiny:arith", size="xs", warmup_steps=0, unboxed_share=0.25, cache_dir=tmp_path)
    assert names[0].startswith("tiny-arith-xs-w3-unboxed25-seed0")
    assert names[1].startswith("tiny-arith-xs-w3-seed0")  # share 0 keeps the earlier cache name
    assert names[2].startswith("tiny-arith-xs-w0-seed0")  # no warm-start: nothing to mix
    for bad in (1.0, -0.1, 0.123):
        with pytest.raises(ModelError, match="unboxed_share"):
            resolve_tiny("tiny:arith", size="xs", warmup_steps=3, unboxed_share=bad, cache_dir=tmp_path)


def test_tool_task_warm_start_mixes_calls_and_direct_answers_and_puts_no_loss_on_tool_results():
    from common.tiny import _collate, _encode_rows, build_tokenizer, warm_start_rows

    rows = warm_start_rows("calc", 400, seed=3)
    calls = [r for r in rows if r["solution"].startswith("[calc ")]
    assert 0.2 < len(calls) / len(rows) < 0.4  # tool_share 0.3; the others answer directly
    direct = [r for r in rows if r not in calls]
    assert all(
        r["solution"].endswith("=" + r["answer"] + "\nThe answer is \\boxed{" + r["answer"] + "}")
        for r in direct
    )
    tok = build_tokenizer("calc")
    encoded = _encode_rows(tok, rows[:16], "calc")
    input_ids, _, labels = _collate(encoded, tok.pad_token_id)
    for i, (r, (ids, plen, observed)) in enumerate(zip(rows[:16], encoded)):
        assert tok.decode(ids[plen:-1]) == r["solution"]  # the observation stays in the input
        result = f"=> {r['answer']}\n" if r in calls else ""
        assert tok.decode([ids[j] for j in observed]) == result
        # loss on every response token but the tool's result (and on EOS)
        expect = [j for j in range(plen, len(ids)) if j not in set(observed)]
        assert (labels[i] != -100).nonzero().flatten().tolist() == expect
    # arith rows encode exactly as before: no tool results
    arith = warm_start_rows("arith", 8, seed=0)
    assert all(not obs for _, _, obs in _encode_rows(build_tokenizer("arith"), arith, "arith"))
