"""A locally built stand-in for a base model used with a ChatML chat template (the 7B preset's case:
Qwen2.5 base, ``data.template=chat``): Qwen-style special tokens ``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>``, a ``generation_config.json`` whose only EOS is ``<|endoftext|>``, and a 1-layer Qwen2
whose weights make greedy AND temperature-1 sampling follow a fixed chain after a prompt's final
newline: ``Hi`` ``<|im_end|>`` ``\\boxed{7}`` ``<|endoftext|>`` (a turn, then a hallucinated box).

How the weights force the chain: attention and MLP outputs are zero (``o_proj``, ``down_proj``), so the
last hidden state is the current token's embedding; chain tokens embed as distinct one-hot vectors and
``lm_head`` maps each to its successor with a logit of 80 (every other logit is 0).
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
BEFORE, AFTER = "Hi", "\\boxed{7}"  # the text before <|im_end|> and the box after it (gold answer: 7)


def build_tokenizer():
    """The tiny byte-level tokenizer with Qwen's chat special tokens, ``<|endoftext|>`` as its EOS."""
    from common.tiny import build_tokenizer as tiny_tokenizer

    tok = tiny_tokenizer(None)
    tok.add_special_tokens({"additional_special_tokens": [ENDOFTEXT, IM_START, IM_END]})
    tok.eos_token = ENDOFTEXT
    tok.chat_template = CHATML
    return tok


def chain_ids(tok) -> list[int]:
    """The token ids the model emits after a final newline, in order."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    ids = enc(BEFORE) + [tok.convert_tokens_to_ids(IM_END)] + enc(AFTER)
    return ids + [tok.convert_tokens_to_ids(ENDOFTEXT)]


def build_chat_model(out_dir: str | Path) -> Path:
    """Write the model, its tokenizer and its generation config into ``out_dir``."""
    tok = build_tokenizer()
    return build_chain_model(out_dir, chain_ids(tok), tok)


def text_chain_ids(tok, text: str) -> list[int]:
    """``text`` (one token per byte) then ``<|endoftext|>``: a chain for :func:`build_chain_model`."""
    return tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids(ENDOFTEXT)]


def build_chain_model(out_dir: str | Path, chain_after_newline: list[int], tok=None) -> Path:
    """The same kind of model emitting ``chain_after_newline`` (distinct token ids) after a newline."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    tok = tok or build_tokenizer()
    newline = tok.encode("\n", add_special_tokens=False)
    chain = newline + list(chain_after_newline)
    assert len(set(chain)) == len(chain), "each chain token needs its own successor"
    hidden = 64
    one = dict.fromkeys(("num_hidden_layers", "num_attention_heads", "num_key_value_heads"), 1)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, max_position_embeddings=512,
        tie_word_embeddings=False, eos_token_id=tok.eos_token_id, **one,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).float()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for slot, (tok_id, nxt) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[tok_id, slot] = 1.0  # RMS-normed: 8.0 in that slot
            model.lm_head.weight[nxt, slot] = 10.0
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.eos_token_id}))
    return out
