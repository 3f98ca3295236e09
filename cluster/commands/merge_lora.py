"""``treepo merge-lora``: a LoRA adapter (peft format, as a ``learner.lora`` checkpoint holds it in
``ckpt-<step>/adapter/``) merged into its base model, written as a Hugging Face model directory that
transformers and vLLM load as is. The base is the one named in ``adapter_config.json`` (the learner's
resolved ``model.path``) unless ``--base`` is given. A LoRA checkpoint's own ``model.safetensors`` is
already this merge in ``model.dtype``; the command serves adapters kept or moved on their own.
"""

from __future__ import annotations

import argparse
import json
from typing import get_args

from common.config import DType


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "adapter", help="A LoRA checkpoint directory (ckpt-<step>) or the adapter directory in it."
    )
    p.add_argument("--out", required=True, help="Directory for the merged model (created).")
    p.add_argument(
        "--base",
        default=None,
        help="Base model directory or hub id (default: the adapter's base_model_name_or_path).",
    )
    p.add_argument(
        "--dtype",
        choices=get_args(DType),
        default=None,
        help="dtype of the merged weights (default: the base model's).",
    )


def run(args: argparse.Namespace) -> int:
    from learner.lora import merge_adapter

    out = merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype)
    print(json.dumps({"merged": str(out), "adapter": args.adapter}))
    return 0
