"""One way to name and load every model: 'tiny:<task>', a local Hugging Face directory, or a hub id.

``resolve_model_path`` turns a model name into something transformers and vLLM both load (building
and caching tiny models on first use); ``load_tokenizer``/``load_model`` go through it and turn every
failure into a :class:`ModelError` that names the model and the fix. accelerate is not used here:
its ``init_empty_weights`` saves memory when instantiating large models from a config, but every
model here is either tiny or loaded with ``from_pretrained``, which already avoids the double
allocation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from common.config import DType
from common.errors import CheckpointError, ConfigError, ModelError

LATEST = "latest"  # the pointer file naming a checkpoint root's newest complete checkpoint


def _looks_local(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a path shape is meant as a local path.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def resolve_model_path(
    path_or_id: str,
    *,
    tiny_size: str = "s",
    tiny_warmup_steps: int = 1000,
    tiny_unboxed_share: float = 0.5,
    tiny_seed: int = 0,
) -> str:
    """A loadable model location: the cached tiny build, the local directory, or the hub id unchanged.
    The defaults of the ``tiny_*`` options are ``ModelConfig``'s."""
    if not path_or_id:
        raise ModelError("empty model path: set model.path to a local directory, a hub id or 'tiny:arith'")
    if path_or_id.startswith("tiny:"):
        # Imported here: it pulls in torch and transformers, needed only when a tiny model is asked for.
        from common.tiny import resolve_tiny

        return str(
            resolve_tiny(
                path_or_id,
                size=tiny_size,
                warmup_steps=tiny_warmup_steps,
                unboxed_share=tiny_unboxed_share,
                seed=tiny_seed,
            )
        )
    if _looks_local(path_or_id):
        d = Path(path_or_id).expanduser()
        if not d.is_dir():
            raise ModelError(f"model directory {d} does not exist: check model.path")
        if not (d / "config.json").is_file():
            raise ModelError(
                f"model directory {d} has no config.json: it is not a Hugging Face model directory "
                "(save one with save_pretrained, or point model.path at the directory that holds config.json)"
            )
        return str(d)
    return path_or_id


def tiny_options(model_cfg) -> dict:
    """``resolve_model_path``'s tiny-model options from a ``common.config.ModelConfig``."""
    return dict(
        tiny_size=model_cfg.tiny_size,
        tiny_warmup_steps=model_cfg.tiny_warmup_steps,
        tiny_unboxed_share=model_cfg.tiny_unboxed_share,
        tiny_seed=model_cfg.tiny_seed,
    )


def resolve_model(model_cfg) -> str:
    """``resolve_model_path`` for a ``common.config.ModelConfig``."""
    return resolve_model_path(model_cfg.path, **tiny_options(model_cfg))


def _hub_error(name: str, exc: Exception) -> ModelError:
    return ModelError(
        f"cannot load model {name!r}: it is not a local directory and fetching it from the hub failed "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Download it first "
        "(huggingface-cli download) and pass the local directory, or use 'tiny:arith' offline"
    )


def load_tokenizer(path: str, *, trust_remote_code: bool = False, **resolve_kw):
    """The model's tokenizer (transformers AutoTokenizer)."""
    from transformers import AutoTokenizer

    resolved = resolve_model_path(path, **resolve_kw)
    try:
        return AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _hub_error(resolved, exc) from exc


_DTYPES = get_args(DType)  # model.dtype


def load_model(
    path: str,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    **resolve_kw,
):
    """The causal LM (transformers AutoModelForCausalLM) in ``dtype`` on ``device``, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ModelError(f"dtype={dtype!r} is not one of {', '.join(_DTYPES)}")
    resolved = resolve_model_path(path, **resolve_kw)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise _hub_error(resolved, exc) from exc
    return model.to(device).eval()


def eos_token_ids(path: str, **resolve_kw) -> list[int]:
    """Every end-of-sequence id: generation_config.json's (an int or a list) first, then the tokenizer's."""
    resolved = resolve_model_path(path, **resolve_kw)
    ids: list[int] = []
    gen = Path(resolved) / "generation_config.json"
    if gen.is_file():
        raw = json.loads(gen.read_text()).get("eos_token_id")
    else:
        try:
            from transformers import GenerationConfig

            raw = GenerationConfig.from_pretrained(resolved).eos_token_id
        except (OSError, ValueError):
            raw = None  # many models ship no generation config: the tokenizer's EOS is then the one
    if raw is not None:
        ids.extend(raw if isinstance(raw, list) else [raw])
    tok_eos = load_tokenizer(resolved).eos_token_id
    if tok_eos is not None and tok_eos not in ids:
        ids.append(tok_eos)
    if not ids:
        raise ModelError(
            f"model {resolved!r} defines no EOS token in generation_config.json or its tokenizer"
        )
    return [int(i) for i in ids]


_TURN_MARK = "TREEPO-END-OF-TURN-PROBE"  # assistant content whose closing the chat template shows


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token(s) the tokenizer's chat template writes right after an assistant message
    (Qwen/ChatML ``<|im_end|>``, Llama 3 ``<|eot_id|>``, Gemma ``<end_of_turn>``): found by rendering a
    user/assistant exchange, not from a table of model names. [] when the template closes a turn with
    plain text (then only the EOS ids end a response). ModelError if the template cannot render it."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _TURN_MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja errors come in many types
        raise ModelError(
            f"data.template=chat: the tokenizer's chat template cannot render an assistant turn "
            f"({type(e).__name__}: {e}), so its end-of-turn token is unknown: set generators.stop_token_ids"
        ) from None
    at = text.rfind(_TURN_MARK)
    if at < 0:
        raise ModelError(
            "data.template=chat: the tokenizer's chat template drops the assistant's message, so its "
            "end-of-turn token is unknown: set generators.stop_token_ids"
        )
    ids = tokenizer.encode(text[at + len(_TURN_MARK) :].lstrip(), add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | {
        int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special
    }
    return [int(ids[0])] if ids and ids[0] in special else []


def stop_token_ids(
    tokenizer, eos_ids: Sequence[int], template: str = "plain", extra: Sequence[int] = ()
) -> list[int]:
    """Every id that ends a response: the EOS ids, then ``extra`` (``generators.stop_token_ids``) if
    given, else the chat template's end-of-turn token(s) when ``template == "chat"``. Sampling stops at
    the first of them, and the reward scores the text before it (the same in training, ``treepo
    sample`` and ``treepo eval``)."""
    vocab = len(tokenizer)
    bad = [i for i in extra if not 0 <= int(i) < vocab]
    if bad:
        raise ConfigError(
            f"generators.stop_token_ids has ids {bad} outside the tokenizer's vocabulary (size {vocab}): fix them"
        )
    added = [int(i) for i in extra] if extra else (end_of_turn_ids(tokenizer) if template == "chat" else [])
    return list(dict.fromkeys([*eos_ids, *added]))


def resolve_eval_model(spec: str) -> str:
    """A checkpoint root or run directory → the checkpoint its ``latest`` pointer names; else unchanged."""
    d = Path(spec).expanduser()
    if not d.is_dir() or (d / "config.json").is_file():
        return spec
    for root in (d, d / "checkpoints"):
        pointer = root / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            target = root / name
            if not name or not (target / "config.json").is_file():
                raise CheckpointError(
                    f"{pointer} names {name!r}, which is not a model directory under {root}: pass a "
                    "ckpt-<step> directory explicitly"
                )
            return str(target)
    return spec
