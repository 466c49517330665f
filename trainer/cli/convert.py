# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""`bd3lm convert`: turn a pretrained causal LM (folder, Hub id or GGUF file) into a BD3-LM folder, and the
causal-LM branch of `bd3lm train --init-from`.

    bd3lm convert HuggingFaceTB/SmolLM2-135M smollm2-bd3lm --block-size 4
    bd3lm convert ./models --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf smollm2-bd3lm --block-size 4

The folder is written next to its final place and renamed into it at the end, so a failed conversion leaves nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Any

from ..utils import check_model_reference
from .common import CLIError, check_positive

DTYPES = ("float32", "bfloat16", "float16", "auto")


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="the causal LM: a folder or a Hub id (Llama, Qwen2, Qwen3, GPT-2, ...)")
    parser.add_argument("output_dir", help="the new BD3-LM folder (must not exist yet)")
    parser.add_argument("--block-size", type=int, required=True, help="L', tokens denoised together")
    parser.add_argument(
        "--model-length", type=int, help="L, the training context (default: min(max_position_embeddings, 1024))"
    )
    parser.add_argument("--gguf-file", help="a GGUF file inside SOURCE to load (dequantised)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default: float32)")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the source's)")
    parser.add_argument("--revision", help="Hub revision of SOURCE to pin")
    parser.add_argument(
        "--no-token-shift",
        action="store_true",
        help="predict token i at position i (SDAR-style) instead of keeping the AR head's i-1 -> i meaning",
    )


def convert(args: argparse.Namespace) -> Any:
    """Load and convert as `bd3lm convert` does; returns the model (its tokenizer is `model.tokenizer`)."""
    check_model_reference(args.source, "source")
    check_positive("block-size", args.block_size)
    from modeling_bd3lm import BD3LMForMaskedDiffusion

    kwargs: dict[str, Any] = {"dtype": args.dtype}
    for name in ("model_length", "gguf_file", "revision"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    if getattr(args, "no_token_shift", False):
        kwargs["token_shift"] = False
    return BD3LMForMaskedDiffusion.from_causal_lm(
        args.source, block_size=args.block_size, tokenizer=getattr(args, "tokenizer", None), **kwargs
    )


def run_convert(args: argparse.Namespace) -> int:
    output = os.path.abspath(args.output_dir)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise CLIError(f"{args.output_dir} already exists; choose a new folder")
    model = convert(args)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
    try:
        model.save_pretrained(staging)
        if os.path.isdir(output):
            os.rmdir(output)  # empty (checked above)
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    tokenizer = "with its tokenizer" if model.tokenizer is not None else "no tokenizer found: pass --tokenizer"
    print(
        f"bd3lm convert: {type(model.backbone).__name__} ({n_params / 1e6:.1f}M parameters) -> {args.output_dir}: "
        f"L'={config.block_size}, L={config.model_length}, mask token id {config.mask_token_id}, "
        f"token shift {'on' if config.token_shift else 'off'}, {tokenizer}",
        flush=True,
    )
    return 0


def init_from_causal_lm(args: argparse.Namespace) -> tuple[Any, Any] | None:
    """For `bd3lm train --init-from X`: `(model, tokenizer)` converted from X when X is a causal LM (any
    `model_type` but bd3lm), else None (X is a BD3-LM checkpoint). The block size defaults to 4."""
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(args.init_from)
    if config.get("model_type") == "bd3lm":
        return None
    converted = argparse.Namespace(
        source=args.init_from,
        block_size=args.block_size or 4,
        model_length=args.model_length,
        tokenizer=args.tokenizer,
        dtype="float32",
    )
    model = convert(converted)
    if model.tokenizer is None:
        raise CLIError(f"--init-from {args.init_from} has no tokenizer; pass --tokenizer")
    return model, model.tokenizer


__all__ = ["add_convert_arguments", "convert", "init_from_causal_lm", "run_convert"]
