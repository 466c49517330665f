# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Turn a pretrained transformers causal LM into a BD3-LM (`BD3LMForMaskedDiffusion.from_causal_lm`).

The loaded causal LM becomes the model's `backbone` as is (`BD3LMForMaskedDiffusion(config, backbone=...)`: no second
copy of the weights). A tokenizer without a mask
token gets `<|mask|>`; when its id has no embedding row the embeddings (and an untied head) are resized and the new
row is set to the mean of the existing rows (deterministic; the head row never matters because SUBS gives the mask
token probability 0). An id that already has a row (vocabularies padded past the tokenizer, as Qwen's) keeps it.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

from .causal_backbone_bd3lm import check_causal_lm
from .checks_bd3lm import is_int
from .configuration_bd3lm import check_decoder_only
from .tokenization_bd3lm import (
    MASK_TOKEN,
    SPECIAL_TOKEN_NAMES,
    add_mask_token,
    load_pretrained_tokenizer,
    set_special_token_ids,
    special_token_ids,
)

# `from_pretrained` arguments that also decide how the tokenizer is found.
_TOKENIZER_KWARGS = (
    "gguf_file",
    "revision",
    "cache_dir",
    "token",
    "local_files_only",
    "subfolder",
    "trust_remote_code",
)
_DEFAULT_MODEL_LENGTH = 1024


def split_kwargs(config_class: type, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(config overrides, from_pretrained kwargs)`: the names `BD3LMConfig.__init__` (or a generic config) takes
    are config fields, everything else goes to `AutoModelForCausalLM.from_pretrained`."""
    fields = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs", "backbone_config"}
    fields |= {"bos_token_id", "eos_token_id", "pad_token_id"}
    config = {k: v for k, v in kwargs.items() if k in fields}
    return config, {k: v for k, v in kwargs.items() if k not in fields}


def load_source(source: Any, pretrained_kwargs: dict[str, Any]) -> torch.nn.Module:
    """The causal LM from a model object, a folder or a Hub id; one-line errors for what cannot be converted."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if isinstance(source, torch.nn.Module):
        implementation = pretrained_kwargs.pop("attn_implementation", None)
        unused = sorted(k for k in pretrained_kwargs if k not in ("dtype", "torch_dtype"))
        if unused:
            raise ValueError(
                f"from_causal_lm() got {unused} with a model object; they only apply to a folder or Hub id."
            )
        dtype = pretrained_kwargs.get("dtype", pretrained_kwargs.get("torch_dtype"))
        if dtype is not None:
            source = source.to(dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        if implementation is not None:
            if hasattr(source, "set_attn_implementation"):
                source.set_attn_implementation(implementation)
            else:  # transformers 4.57
                source.config._attn_implementation = implementation
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"`source` must be a causal LM object, a folder or a Hub id, got {type(source).__name__}.")
    source = os.fspath(source)
    if pretrained_kwargs.get("gguf_file"):
        # GGUF files hold decoder-only LMs, and reading their config alone takes as long as a small model's load
        # (the file is parsed): `check_causal_lm` checks the loaded model instead.
        return AutoModelForCausalLM.from_pretrained(source, **pretrained_kwargs)
    config_kwargs = {k: pretrained_kwargs[k] for k in _TOKENIZER_KWARGS if k in pretrained_kwargs}
    config = AutoConfig.from_pretrained(source, **config_kwargs)
    check_decoder_only(config, source)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"{source} (model_type={config.model_type!r}) is not a causal LM; BD3-LM converts decoder-only causal LMs "
            "(Llama, Qwen2, Qwen3, GPT-2, ...)."
        )
    return AutoModelForCausalLM.from_pretrained(source, **pretrained_kwargs)


def load_tokenizer(source: Any, tokenizer: Any, pretrained_kwargs: dict[str, Any]) -> Any:
    """The tokenizer given, else the source's (None when the source has none, e.g. a bare model object)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    name = tokenizer if tokenizer is not None else source
    if not isinstance(name, (str, os.PathLike)):
        return None
    kwargs = {k: pretrained_kwargs[k] for k in _TOKENIZER_KWARGS if k in pretrained_kwargs}
    if tokenizer is not None:
        kwargs.pop("gguf_file", None)
        kwargs.pop("subfolder", None)
    try:
        return load_pretrained_tokenizer(name, **kwargs)
    except (OSError, ValueError) as error:
        if tokenizer is not None:
            raise ValueError(f"Could not load the tokenizer {tokenizer}: {str(error).splitlines()[0]}") from error
        return None


def default_model_length(backbone_config: Any, block_size: int) -> int:
    """min(max_position_embeddings, 1024), rounded down to a multiple of the block size."""
    limit = getattr(backbone_config, "max_position_embeddings", None)
    length = min(limit, _DEFAULT_MODEL_LENGTH) if isinstance(limit, int) and limit > 0 else _DEFAULT_MODEL_LENGTH
    return max(block_size, length // block_size * block_size)


def _check_divides(block_size: int, model_length: Any) -> None:
    if not is_int(model_length) or model_length < 1:
        raise ValueError(f"`model_length` must be a positive integer, got {model_length!r}.")
    if model_length % block_size != 0:
        raise ValueError(
            f"`block_size`={block_size} does not divide `model_length`={model_length}; pick a block size that divides "
            "it (or pass model_length=...)."
        )


def from_causal_lm(cls: type, source: Any, block_size: int, tokenizer: Any = None, **kwargs: Any) -> Any:
    """Implementation of `BD3LMForMaskedDiffusion.from_causal_lm` (see its docstring)."""
    config_class = cls.config_class
    if not is_int(block_size) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive integer, got {block_size!r}.")
    overrides, pretrained_kwargs = split_kwargs(config_class, kwargs)
    if "backbone_config" in kwargs:
        raise ValueError("from_causal_lm() builds `backbone_config` from the source; do not pass it.")
    if getattr(getattr(source, "config", None), "model_type", None) == config_class.model_type:
        raise ValueError("The source is already a BD3-LM; load it with BD3LMForMaskedDiffusion.from_pretrained.")
    tokenizer_source = tokenizer
    model_length = overrides.pop("model_length", None)
    if model_length is not None:  # before loading anything
        _check_divides(block_size, model_length)
    model = load_source(source, dict(pretrained_kwargs))
    check_causal_lm(model)
    tokenizer = load_tokenizer(source, tokenizer_source, pretrained_kwargs)
    model_length = model_length or default_model_length(model.config, block_size)
    _check_divides(block_size, model_length)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and model_length > max_positions:
        raise ValueError(
            f"`model_length`={model_length} exceeds the source's max_position_embeddings={max_positions}; pass "
            f"model_length <= {max_positions}."
        )
    mask_id = add_mask_token(tokenizer, model)
    ids = special_token_ids(tokenizer, model.config)
    special = {name: ids[name] for name in SPECIAL_TOKEN_NAMES}
    special.update({k: v for k, v in overrides.items() if k in special})
    overrides = {k: v for k, v in overrides.items() if k not in special}
    config = config_class(
        backbone_config=model.config,
        block_size=block_size,
        model_length=model_length,
        mask_token_id=mask_id,
        **special,
        **overrides,
    )
    bd3lm = cls(config, backbone=model)  # adopts the loaded network as is, and probes its attention kernel
    device = model.get_input_embeddings().weight.device
    for name, buffer in list(bd3lm.named_buffers(recurse=False)):
        setattr(bd3lm, name, buffer.to(device))
    bd3lm.eval()
    if bd3lm.generation_config is not None:
        set_special_token_ids(bd3lm.generation_config, special)
    bd3lm.tokenizer = tokenizer
    return bd3lm


__all__ = ["MASK_TOKEN", "add_mask_token", "from_causal_lm"]
