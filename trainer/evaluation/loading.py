# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Load a checkpoint to evaluate: this package's model code (never remote code) and the tokenizer beside it."""

from __future__ import annotations

import os

import torch

from ..corpus import resolve_tokenizer


def load_model_and_tokenizer(model: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                             device: str | None = None, dtype: str | None = None):
    """A BD3-LM checkpoint with this package's code in eval mode on `device` (default: cuda if available, else cpu),
    and its tokenizer (`tokenizer`, default the checkpoint's own; `"bd3lm-corpus"` for the embedded one)."""
    from modeling_bd3lm import BD3LMForMaskedDiffusion

    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    net = BD3LMForMaskedDiffusion.from_pretrained(model, **kwargs)
    net.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    try:
        return net, resolve_tokenizer(tokenizer or model)
    except (OSError, ValueError) as err:
        raise ValueError(f"No tokenizer at `{tokenizer or model}`; pass `--tokenizer` (a folder, a Hub id or "
                         "`bd3lm-corpus`).") from err


__all__ = ["load_model_and_tokenizer"]
