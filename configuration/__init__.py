"""Named BD3-LM presets: model sizes (`tiny`, `small`, `medium`) and block sizes (`bs1`, `bs4`, `bs8`, `bs16`,
`mdlm`) with the paper's clipped noise intervals. Installed as `bd3lm_configuration`.

>>> from bd3lm_configuration import load_preset
>>> config = load_preset("tiny", block="bs16")
>>> config.block_size, config.sampling_eps_min
(16, 0.3)
"""

from __future__ import annotations

import importlib
from typing import Any

from modeling_bd3lm import BD3LMConfig
from modeling_bd3lm.tokenization_bd3lm import special_token_ids

from .block_sizes import BLOCK_PRESETS

SIZE_PRESETS = ("tiny", "small", "medium")


def size_preset(name: str) -> dict[str, Any]:
    """The raw overrides of a size preset."""
    if name not in SIZE_PRESETS:
        raise ValueError(f"Unknown size preset {name!r}; choose one of {SIZE_PRESETS}.")
    return dict(importlib.import_module(f"{__name__}.{name}").CONFIG)


def load_preset(size: str = "tiny", block: str | None = None, tokenizer: Any = None, **overrides: Any) -> BD3LMConfig:
    """Build a `BD3LMConfig` from a size preset, an optional block-size preset and explicit overrides (last wins).

    Args:
        size: a key of `SIZE_PRESETS` (`"tiny"`, `"small"`, `"medium"`).
        block: a key of `BLOCK_PRESETS` (`"bs1"`, `"bs4"`, `"bs8"`, `"bs16"`, `"mdlm"`): L' and its training interval.
        tokenizer: take `vocab_size` (`len(tokenizer)`) and the mask, BOS, EOS and pad ids from it
            (`modeling_bd3lm.special_token_ids`: a tokenizer without PAD pads with EOS); it needs a mask token
            (`bd3lm_trainer.corpus.add_mask_token` appends one).
        overrides: any `BD3LMConfig` field.
    """
    kwargs = size_preset(size)
    if block is not None:
        if block not in BLOCK_PRESETS:
            raise ValueError(f"Unknown block preset {block!r}; choose one of {tuple(BLOCK_PRESETS)}.")
        block_kwargs = dict(BLOCK_PRESETS[block])
        if block_kwargs["block_size"] is None:  # MDLM: one block over the whole context
            block_kwargs["block_size"] = overrides.get("model_length", kwargs["model_length"])
        kwargs.update(block_kwargs)
    if tokenizer is not None:
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError("tokenizer has no mask token: call bd3lm_trainer.corpus.add_mask_token(tokenizer) first.")
        kwargs["vocab_size"] = len(tokenizer)
        kwargs.update({k: v for k, v in special_token_ids(tokenizer).items() if v is not None})
    kwargs.update(overrides)
    return BD3LMConfig(**kwargs)


__all__ = ["BLOCK_PRESETS", "SIZE_PRESETS", "load_preset", "size_preset"]
