"""Tiny models and tokenizers: round-trips, saved format, atomic builds, model resolution, warm-start quality."""

from __future__ import annotations

import json

import pytest
import torch

from common import tiny
from common.errors import ModelError
from common.models import eos_token_ids, load_model, load_tokenizer, resolve_model_path
from common.tasks import generate
from common.tiny import SIZES, build_tokenizer, make_tiny_model, pass_rate, resolve_tiny


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
def test_warm_start_reaches_target_pass_rate(warm_model_dir):
    """The default tiny:arith model solves some but not most held-out problems at T=1 (room for RL)."""
    info = json.loads((warm_model_dir / "treepo_tiny.json").read_text())
    model, tok = load_model(str(warm_model_dir)), load_tokenizer(str(warm_model_dir))
    held_out = generate("arith", 100, seed=99, split="eval")  # other problems than the build measured
    greedy = pass_rate(model, tok, "arith", held_out, temperature=0.0)
    sampled = pass_rate(model, tok, "arith", held_out, temperature=1.0, seed=1)
    print(f"build: {info}; re-measured greedy={greedy:.2f} T=1={sampled:.2f}")
    assert 0.10 <= sampled <= 0.40
    assert 0.10 <= info["pass_rate_t1"] <= 0.40
    assert greedy >= 0.10
