"""LoRA adapters on the learner (``learner.lora.rank > 0``) through ``peft`` (the ``lora`` extra).

The HF model gets peft's LoRA layers injected in place (:func:`apply_lora`): each target linear layer
``x`` becomes ``x.base_layer`` (frozen) plus ``x.lora_A`` / ``x.lora_B`` (trained; ``B`` starts at
zero, so step 0 is the base model). Everything else in the learner is unchanged: the optimizer sees the
trainable (adapter) parameters only, tree packing's attention function still runs (peft replaces the
projections, not the attention), and the reference model of ``algo.kl_coef > 0`` is the same module
with its adapters switched off (no second copy of the weights).

What leaves the learner is always a plain HF model:

- engines receive the merged weights ``W + (alpha / rank) * B @ A`` under the base names
  (:func:`merged_weights`), computed per layer without touching the trained parameters;
- a checkpoint's ``model.safetensors`` is that merged model (transformers and vLLM load it as is), and
  ``adapter/`` holds peft's ``adapter_model.safetensors`` + ``adapter_config.json`` in the master
  weights' dtype, which a resume loads back (the base comes from ``model.path`` again);
- ``treepo merge-lora <adapter dir> --out DIR`` merges an adapter into its base model and writes an
  HF model directory (:func:`merge_adapter`).

Not supported (refused where the config is checked): adapters on embeddings or the output head (often
tied), LoRA with ``learner.fsdp`` (the base is replicated; adapters are small). LoRA dropout is not
offered: the PPO ratio needs the recomputed π_prox logprobs to be the policy's, not a dropout draw.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError, ModelError

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError(
            "learner.lora.rank > 0 needs peft: pip install -e '.[lora]' (or pip install peft), or set "
            "learner.lora.rank=0"
        ) from None
    return peft


def enabled(learner_cfg) -> bool:
    lora = getattr(learner_cfg, "lora", None)
    return lora is not None and int(lora.rank) > 0


def apply_lora(module: torch.nn.Module, lora_cfg, base_path: str | None = None):
    """Inject LoRA layers into ``module`` (in place) and freeze everything else; returns the PeftModel
    wrapper (``module`` stays the HF model that forwards run on)."""
    peft = _peft()
    targets = [str(t) for t in lora_cfg.target_modules]
    config = peft.LoraConfig(
        r=int(lora_cfg.rank),
        lora_alpha=float(lora_cfg.alpha),
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_path,
    )
    _check_targets(module, targets)
    try:
        wrapped = peft.get_peft_model(module, config)
    except ValueError as exc:  # peft: no target found, or a target of a type it cannot adapt
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(
            f"learner.lora.target_modules={targets} does not fit {type(module).__name__} ({first}): name "
            "its linear layers, e.g. q_proj,k_proj,v_proj,o_proj"
        ) from None
    return wrapped


def _check_targets(module: torch.nn.Module, targets: list[str]) -> None:
    """Each target must name (the end of) some module's name, and every module it names must be linear
    (peft's rule for a list of targets: the full name or its last dotted parts)."""
    names = dict(module.named_modules())
    for target in targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            raise ConfigError(
                f"learner.lora.target_modules names {target!r}, which {type(module).__name__} does not have: "
                "name its linear layers, e.g. q_proj,k_proj,v_proj,o_proj"
            )
        bad = [n for n in hits if not isinstance(names[n], torch.nn.Linear)]
        if bad:
            raise ConfigError(
                f"learner.lora.target_modules names {target!r}, which matches {bad[0]} "
                f"({type(names[bad[0]]).__name__}), not a linear layer: name linear layers, e.g. "
                "q_proj,k_proj,v_proj,o_proj"
            )


def lora_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """HF-side name (``model.layers.0.self_attn.q_proj``) -> peft LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def base_name(name: str) -> str:
    """The HF name of a base parameter inside a LoRA layer (drops peft's ``base_layer.``)."""
    return name.replace(".base_layer.", ".")


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


@torch.no_grad()
def delta(layer) -> torch.Tensor:
    """``(alpha / rank) * B @ A`` of one LoRA layer, in the base weight's shape (float32 for the sum)."""
    a = layer.lora_A[ADAPTER_NAME].weight.float()
    b = layer.lora_B[ADAPTER_NAME].weight.float()
    d = (b @ a) * float(layer.scaling[ADAPTER_NAME])
    return d.T if getattr(layer, "fan_in_fan_out", False) else d


@torch.no_grad()
def _base_params(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, Any]]:
    """(HF base name, base parameter, its LoRA layer or None) of every parameter of the merged model,
    tied ones included (like ``named_parameters(remove_duplicate=False)`` of the model without LoRA)."""
    layers = lora_layers(module)
    for name, p in module.named_parameters(remove_duplicate=False):
        if is_adapter_param(name):
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        if owner and leaf == "weight" and owner in layers:
            yield f"{owner}.weight", p, layers[owner]
        else:
            yield base_name(name), p, None


def merged_weights(module: torch.nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF base name, tensor in ``dtype``) of every parameter of the merged model, tied ones included
    (like ``named_parameters(remove_duplicate=False)`` of the model without LoRA). The trained
    parameters are only read."""
    for name, p, layer in _base_params(module):
        yield name, ((p.float() + delta(layer)).to(dtype) if layer is not None else p.detach().to(dtype))


def merged_spec(
    module: torch.nn.Module, dtype: torch.dtype
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of what :func:`merged_weights` yields, in its order, without merging."""
    return [(name, dtype, tuple(p.shape)) for name, p, _ in _base_params(module)]


def merged_state(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """:func:`merged_weights` as a state dict, tied names sharing one tensor (as ``save_pretrained``
    expects of a tied model)."""
    out: dict[str, torch.Tensor] = {}
    by_param: dict[int, torch.Tensor] = {}
    params = dict(module.named_parameters(remove_duplicate=False))
    for name, t in merged_weights(module, dtype):
        src = params.get(name)  # an unadapted parameter: tied names share their source's tensor
        if src is not None:
            t = by_param.setdefault(id(src), t)
        out[name] = t
    return out


@contextlib.contextmanager
def adapters_off(wrapped) -> Iterator[None]:
    """The base model for the duration (the reference policy of ``algo.kl_coef > 0``)."""
    with wrapped.disable_adapter():
        yield


def adapter_state(wrapped) -> dict[str, torch.Tensor]:
    """A copy of the adapter's tensors as peft saves them (names without the adapter name)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(wrapped).items()}


def save_adapter(wrapped, directory: str | os.PathLike) -> Path:
    """peft's adapter format: ``adapter_model.safetensors`` + ``adapter_config.json``."""
    directory = Path(directory)
    wrapped.save_pretrained(str(directory), safe_serialization=True)
    # save_pretrained writes the adapter (and a README) under directory; keep the two files that matter
    readme = directory / "README.md"
    if readme.is_file():
        readme.unlink()
    return directory


def load_adapter(wrapped, directory: str | os.PathLike) -> None:
    """Load a saved adapter into ``wrapped`` exactly (same rank and targets), refusing a mismatch."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelError(
            f"{directory} holds no {ADAPTER_WEIGHTS}: the checkpoint was not written with learner.lora.rank > 0; "
            "resume with the LoRA settings it was trained with"
        )
    saved = json.loads((directory / ADAPTER_CONFIG).read_text())
    mine = wrapped.peft_config[ADAPTER_NAME]
    if int(saved.get("r", -1)) != int(mine.r) or set(saved.get("target_modules") or []) != set(
        mine.target_modules
    ):
        raise ModelError(
            f"the adapter in {directory} has rank {saved.get('r')} on {sorted(saved.get('target_modules') or [])}, "
            f"the config rank {mine.r} on {sorted(mine.target_modules)}: resume with the same learner.lora.*"
        )
    state = load_file(str(weights))
    result = set_peft_model_state_dict(wrapped, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if is_adapter_param(k)]
    if unexpected or missing:
        raise ModelError(
            f"the adapter in {directory} does not match the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}: resume with the same model.path and learner.lora.*"
        )


def merge_adapter(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Merge the adapter in ``adapter_dir`` (or a checkpoint directory holding ``adapter/``) into its
    base model and write an HF model directory (weights, config, tokenizer files) to ``out_dir``."""
    peft = _peft()
    from transformers import AutoModelForCausalLM

    from common.models import resolve_model_path

    src = Path(adapter_dir)
    if not (src / ADAPTER_CONFIG).is_file() and (src / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        src = src / ADAPTER_DIR
    if not (src / ADAPTER_CONFIG).is_file():
        raise ConfigError(
            f"{adapter_dir} holds no {ADAPTER_CONFIG}: pass a LoRA checkpoint (ckpt-<step>) or its adapter/ "
            "directory"
        )
    saved = json.loads((src / ADAPTER_CONFIG).read_text())
    base = base or saved.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{src / ADAPTER_CONFIG} names no base model: pass --base MODEL_DIR")
    base_dir = resolve_model_path(base)
    torch_dtype = getattr(torch, dtype) if dtype else None
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype or "auto")
    merged = peft.PeftModel.from_pretrained(model, str(src)).merge_and_unload()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    from learner.checkpoint import TOKENIZER_FILES

    for directory in (Path(base_dir), src.parent):
        for name in TOKENIZER_FILES:
            f = directory / name
            if f.is_file() and not (out / name).exists():
                shutil.copy2(f, out / name)
    return out
