# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Tokenizer -> model ids: the one owner of the mask token, the special ids a BD3-LM config carries, and loading.

A BD3-LM needs one id the tokenizer never produces from text: the mask token `m` of the absorbing-state diffusion
(Arriola et al., 2025, Sec. 2). The official checkpoints extend GPT-2 with `<|mask|>` at the next free id (50257, so
`vocab_size == 50258`); this module gives any tokenizer without a mask token the same, and (with a model) makes sure
the embedding has a row for it. Everyone else (conversion of a causal LM, the corpus, the `bd3lm` CLI, presets, the
Trainer) calls these functions instead of copying ids themselves.

A leaf: it imports nothing of the package, so it ships inside checkpoints and loads on transformers 4.57.
"""

from __future__ import annotations

import os
from typing import Any

import torch

#: The mask token appended to a tokenizer that has none (the embedded corpus tokenizer's own is the same string).
MASK_TOKEN = "<|mask|>"
#: The special ids a BD3-LM config and its generation config carry besides `mask_token_id`.
SPECIAL_TOKEN_NAMES = ("bos_token_id", "eos_token_id", "pad_token_id")


def load_pretrained_tokenizer(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """`AutoTokenizer.from_pretrained(name_or_path, **kwargs)` without remote code unless asked for
    (`trust_remote_code=False` by default: a tokenizer rarely needs any) and without the notice transformers prints
    about a checkpoint's custom config."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs.setdefault("trust_remote_code", False)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(os.fspath(name_or_path), **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def add_mask_token(tokenizer: Any, model: torch.nn.Module | None = None, mask_token: str = MASK_TOKEN) -> int:
    """Give `tokenizer` a mask token if it has none (`mask_token` at the next free id) and return the mask id.

    With `model`, the id also gets an embedding row: when it has none the input embeddings (and an untied output
    head) are resized and the new rows set to the mean of the old ones (deterministic; the head row never matters,
    since SUBS gives the mask token probability 0). An id that already has a row (vocabularies padded past the
    tokenizer, as Qwen's) keeps it. Without a tokenizer (`None`) the mask is a new last row of `model`.

    Raises:
        ValueError: `mask_token` is an ordinary token of the tokenizer; or the tokenizer is larger than the model's
            embedding (not this model's tokenizer); or neither a tokenizer nor a model is given.
    """
    if tokenizer is None and model is None:
        raise ValueError("add_mask_token() needs a tokenizer, a model or both; got neither.")
    rows = model.get_input_embeddings().weight.shape[0] if model is not None else None
    if tokenizer is None:
        mask_id = rows
    else:
        if rows is not None and len(tokenizer) > rows:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows: it is not this "
                "model's tokenizer; pass the source's own tokenizer (tokenizer=...)."
            )
        if tokenizer.mask_token_id is None:
            if mask_token in tokenizer.get_vocab():
                raise ValueError(
                    f"mask_token={mask_token!r} is already an ordinary token of this tokenizer; pass another string "
                    "(or give the tokenizer a mask token first: tokenizer.add_special_tokens({'mask_token': ...}))."
                )
            tokenizer.add_special_tokens({"mask_token": mask_token})
        mask_id = int(tokenizer.mask_token_id)
    if model is not None and mask_id >= rows:
        _add_embedding_rows(model, mask_id + 1)
    return mask_id


def _add_embedding_rows(model: torch.nn.Module, size: int) -> None:
    """Resize `model`'s embeddings to `size` rows, the new ones set to the mean of the old (head: its own mean)."""
    with torch.no_grad():
        old = model.get_input_embeddings().weight
        rows = old.shape[0]
        mean = old.float().mean(dim=0).to(old.dtype)
        model.resize_token_embeddings(size, mean_resizing=False)
        model.get_input_embeddings().weight[rows:] = mean
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            head.weight[rows:] = head.weight[:rows].float().mean(dim=0).to(head.weight.dtype)
            if getattr(head, "bias", None) is not None:
                head.bias[rows:] = 0


def add_pad_token(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token its EOS as pad (the pad rule of `special_token_ids`, on the tokenizer
    itself: `tokenizer(..., padding=True)` and batched, left-padded `generate()` need one). Returns the tokenizer."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def special_token_ids(tokenizer: Any, config: Any = None) -> dict[str, int | None]:
    """The ids a BD3-LM config carries, read from `tokenizer` (may be None), else from `config` (e.g. the source
    causal LM's, or the model's own): `bos_token_id`, `eos_token_id`, `pad_token_id` and `mask_token_id`.

    The one pad rule: the tokenizer's PAD, else the config's, else EOS. Padding is never attended to nor scored, so
    any in-vocabulary id serves, and EOS is the one every causal-LM tokenizer has (GPT-2 and Llama have no PAD).
    """
    ids: dict[str, int | None] = {}
    for name in (*SPECIAL_TOKEN_NAMES, "mask_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        ids[name] = value if value is not None else getattr(config, name, None)
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = ids["eos_token_id"]
    return ids


def set_special_token_ids(config: Any, token_ids: dict[str, int | None], generation_config: Any = None) -> None:
    """Write the ids of `token_ids` that are not None onto `config` and the BOS/EOS/PAD ones also onto
    `generation_config` when given (so that a plain `generate()` stops at EOS and pads with PAD; its `mask_token_id`
    stays unset, which means the config's). Keys outside `special_token_ids`' are a ValueError."""
    unknown = sorted(set(token_ids) - {*SPECIAL_TOKEN_NAMES, "mask_token_id"})
    if unknown:
        raise ValueError(f"token_ids has unknown keys {unknown}; use those of special_token_ids().")
    for name, value in token_ids.items():
        if value is None:
            continue
        setattr(config, name, value)
        if generation_config is not None and name in SPECIAL_TOKEN_NAMES:
            setattr(generation_config, name, value)


__all__ = [
    "MASK_TOKEN",
    "SPECIAL_TOKEN_NAMES",
    "add_mask_token",
    "add_pad_token",
    "load_pretrained_tokenizer",
    "set_special_token_ids",
    "special_token_ids",
]
