# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Checks of user input shared by the forward pass, generation and loading.

Each check raises a `TypeError` (wrong kind of object) or a `ValueError` (wrong shape or value) that names the argument
and the fix, so that a mistake surfaces at the call instead of as an index error, a shape mismatch or a NaN deep
inside torch.

Checks of tensor *values* (ids in range, a mask of 0 and 1, noise levels in [0, 1]) read the tensor's contents: a
device sync, and under `torch.compile` / `torch.export` a data-dependent branch that breaks the graph. They run in eager
mode only (`checking_values()`); types and shapes are checked in every mode.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from transformers.cache_utils import Cache

# Integer dtypes accepted for token ids (uint8 only holds vocabularies of <= 256 ids, but is not wrong).
ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
IGNORE_INDEX = -100
# Keyword arguments other libraries pass to every model and BD3-LM ignores (a tokenizer's `token_type_ids`, the
# Trainer's `num_items_in_batch`); any other unknown keyword argument is a mistake and raises.
IGNORED_KWARGS = ("token_type_ids", "num_items_in_batch")
# Standard HF arguments BD3-LM does not implement: accepted only when unset.
UNSUPPORTED_KWARGS = {
    "inputs_embeds": "pass `input_ids`",
    "position_ids": "positions follow from the window (0..past_len + seq_len - 1)",
    "head_mask": "heads cannot be masked",
}


def _shape(value: torch.Tensor) -> tuple[int, ...]:
    return tuple(value.shape)


def is_int(value: Any) -> bool:
    """An integer that is not a bool (`True` is an `int` to Python, never a size or an id to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number (int or float) that is not a bool; it may be inf or NaN (check `math.isfinite` too)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checking_values() -> bool:
    """Whether checks that read tensor values run: in eager mode, not while `torch.compile` or `torch.export` trace."""
    return not torch.compiler.is_compiling()


def padded_keys(attention_mask: torch.Tensor | None) -> torch.BoolTensor | None:
    """The key-padding mask to apply, or None when nothing is padded. In eager mode an all-ones mask is dropped (the
    kernels then take the shared unpadded mask); a traced graph always applies it, which removes nothing from an
    all-ones mask, so as not to branch on the mask's values."""
    if attention_mask is None or (checking_values() and bool(attention_mask.all())):
        return None
    return attention_mask.bool()


def check_tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}; wrap it with torch.tensor(...).")
    return value


def check_token_ids(name: str, ids: Any, vocab_size: int, allow_ignore_index: bool = False) -> None:
    """`ids` is a non-empty 2-D integer tensor whose entries lie in [0, vocab_size) (or are -100 when allowed)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor of token ids of shape (batch, seq_len), got {type(ids).__name__}; "
            "use the tokenizer with return_tensors='pt'."
        )
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"`{name}` must be an integer tensor of token ids, got dtype {ids.dtype}; use torch.long.")
    if ids.dim() != 2:
        raise ValueError(f"`{name}` must have shape (batch, seq_len), got {_shape(ids)}; add a batch dimension.")
    if ids.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {_shape(ids)}); pass at least one sequence of at least one token.")
    if not checking_values():
        return
    valid = (ids >= 0) & (ids < vocab_size)
    if allow_ignore_index:
        valid |= ids == IGNORE_INDEX
    if not bool(valid.all()):
        bad = ids[~valid][0].item()
        allowed = f"[0, {vocab_size})" + (" or -100 (ignored)" if allow_ignore_index else "")
        raise ValueError(
            f"`{name}` holds id {bad}, outside {allowed}; check that the tokenizer matches the model "
            f"(config.vocab_size={vocab_size})."
        )


def check_attention_mask(name: str, mask: Any, expected_shape: tuple[int, int], what: str) -> None:
    """`mask` is a tensor of 0 (padding) and 1 (tokens) of `expected_shape`; `what` says what its columns cover."""
    check_tensor(name, mask)
    if mask.is_complex():
        raise TypeError(f"`{name}` must hold 0 and 1 (bool, integer or float), got dtype {mask.dtype}.")
    if _shape(mask) != tuple(expected_shape):
        raise ValueError(f"`{name}` must have shape {tuple(expected_shape)} ({what}), got {_shape(mask)}.")
    if mask.dtype != torch.bool and checking_values() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"`{name}` must hold only 0 (padding) and 1 (tokens).")


def check_vectorised_length(seq_len: int, config: Any) -> None:
    """The training pass works on whole blocks of one window."""
    if seq_len % config.block_size != 0:
        raise ValueError(
            f"The sequence length {seq_len} must be a multiple of `block_size`={config.block_size} for the block "
            "NELBO; pad or crop the batch (the data collator chunks to `model_length`)."
        )
    if seq_len > config.model_length:
        raise ValueError(
            f"The input has {seq_len} tokens, more than `model_length`={config.model_length}; chunk the data to the "
            "training context."
        )


def check_noise_levels(noise_levels: Any, expected_shape: tuple[int, int]) -> None:
    check_tensor("noise_levels", noise_levels)
    if not torch.is_floating_point(noise_levels):
        raise TypeError(f"`noise_levels` must be a float tensor, got dtype {noise_levels.dtype}.")
    if _shape(noise_levels) != tuple(expected_shape):
        raise ValueError(
            f"`noise_levels` must have shape (batch, seq_len // block_size) = {tuple(expected_shape)}, got "
            f"{_shape(noise_levels)}."
        )
    if checking_values() and not bool(((noise_levels >= 0) & (noise_levels <= 1)).all()):  # NaN fails both tests
        raise ValueError("`noise_levels` must be floats in [0, 1] (no NaN).")


def check_timesteps(timesteps: Any, batch: int) -> None:
    check_tensor("timesteps", timesteps)
    if not torch.is_floating_point(timesteps) or _shape(timesteps) not in ((batch,), (batch, 1)):
        raise ValueError(
            f"`timesteps` must be a float tensor of shape (batch,) = ({batch},), got {_shape(timesteps)} "
            f"{timesteps.dtype}."
        )


def check_cache(past_key_values: Any, batch: int) -> None:
    """A transformers `Cache` whose committed rows match the batch."""
    if not isinstance(past_key_values, Cache):
        raise TypeError(
            f"`cache` must be a transformers Cache (e.g. DynamicCache()), got {type(past_key_values).__name__}"
            "; legacy tuples of tensors are not supported."
        )
    for layer in getattr(past_key_values, "layers", []):
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel() > 0:
            if keys.shape[0] != batch:
                raise ValueError(
                    f"`cache` holds {keys.shape[0]} rows but `input_ids` has batch {batch}; pass the cache "
                    "built for these sequences (or a fresh DynamicCache())."
                )
            return


def check_forward_inputs(
    config: Any,
    input_ids: Any,
    *,
    noisy_input_ids: Any,
    attention_mask: Any,
    labels: Any,
    noise_levels: Any,
    timesteps: Any,
    cache: Any,
    use_cache: bool | None,
) -> bool:
    """The checks of `BD3LMForMaskedDiffusion.forward`, for every kind of denoiser: once per call, before the network.
    Returns whether the call is the vectorised `x_t ⊕ x_0` pass (`noisy_input_ids`, `labels` or `noise_levels` given)
    rather than the sampling pass. The sampling window's length is checked where the cache is opened
    (`cache_bd3lm.open_window`)."""
    check_token_ids("input_ids", input_ids, config.vocab_size)
    batch, seq_len = input_ids.shape
    if cache is not None:
        check_cache(cache, batch)
    if config.time_conditioning and timesteps is not None:
        check_timesteps(timesteps, batch)
    vectorised = noisy_input_ids is not None or labels is not None or noise_levels is not None
    if not vectorised:
        past_len = 0 if cache is None else cache.get_seq_length()
        if attention_mask is not None:
            check_attention_mask(
                "attention_mask",
                attention_mask,
                (batch, past_len + seq_len),
                f"one column per token of the window: {past_len} cached + {seq_len} new",
            )
        return False
    if cache is not None or use_cache:
        raise ValueError("The vectorised `noisy_input_ids` pass cannot use `cache`/`use_cache`.")
    check_vectorised_length(seq_len, config)
    if attention_mask is not None:
        check_attention_mask("attention_mask", attention_mask, (batch, seq_len), "one column per token")
    if labels is not None:
        check_token_ids("labels", labels, config.vocab_size, allow_ignore_index=True)
        if tuple(labels.shape) != (batch, seq_len):
            raise ValueError(f"`labels` must have the shape of `input_ids` {(batch, seq_len)}, got {_shape(labels)}.")
    if noise_levels is not None:
        check_noise_levels(noise_levels, (batch, seq_len // config.block_size))
    if noisy_input_ids is not None:
        check_token_ids("noisy_input_ids", noisy_input_ids, config.vocab_size)
        if noisy_input_ids.shape != input_ids.shape:
            raise ValueError(
                f"`noisy_input_ids` must have the shape of `input_ids` {_shape(input_ids)}, got {_shape(noisy_input_ids)}."
            )
        if labels is not None and noise_levels is None:
            raise ValueError("Pass `noise_levels` with `noisy_input_ids` and `labels` to weight the NELBO.")
    return True


def check_generator(generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")


def check_extra_kwargs(kwargs: dict[str, Any], where: str) -> None:
    """Drop the keyword arguments BD3-LM ignores; raise on unsupported or unknown ones (a typo would be silent)."""
    for name in IGNORED_KWARGS:
        kwargs.pop(name, None)
    for name, why in UNSUPPORTED_KWARGS.items():
        value = kwargs.pop(name, None)
        if value is not None and value is not False:
            raise ValueError(f"`{name}` is not supported by {where}: {why}.")
    unknown = sorted(name for name, value in kwargs.items() if value is not None)
    if unknown:
        raise TypeError(f"{where} got unexpected keyword arguments {unknown}; see its docstring for the arguments.")


def check_special_token_ids(ids: dict[str, Any], vocab_size: int) -> None:
    """Special-token ids (`pad_token_id`, ...) that will be fed to or compared with the model lie in its vocabulary."""
    for name, value in ids.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for token_id in values:
            if token_id is not None and not 0 <= int(token_id) < vocab_size:
                raise ValueError(
                    f"`{name}`={value!r} is outside the model's vocabulary [0, {vocab_size}); use the tokenizer's id "
                    "for that token (or fix generation_config.json)."
                )


def tokenizer_size(tokenizer: Any) -> int | None:
    """Number of ids a tokenizer can produce (added tokens included), or None when it cannot tell."""
    try:
        return len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
        return size if isinstance(size, int) else None


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, name: str = "tokenizer") -> None:
    """A tokenizer must not produce ids the model has no embedding for (a smaller one is fine: the mask token and
    padding rows may sit past its end, as in the released GPT-2 + mask models)."""
    if tokenizer is None:
        return
    size = tokenizer_size(tokenizer)
    if size is not None and size > vocab_size:
        raise ValueError(
            f"The {name} has {size} tokens but the model's `vocab_size` is {vocab_size}: ids >= {vocab_size} have no "
            "embedding. Use the tokenizer the model was trained with, or resize the model's embeddings."
        )


def explain_load_error(error: Exception, source: Any) -> Exception:
    """The error `from_pretrained` should raise for `error`: a `ValueError` that says what is wrong for a truncated or
    corrupted safetensors file and for a folder holding only pickle weights; otherwise `error` itself."""
    # The safetensors reader's error is matched by name: the bundle imports only torch and transformers.
    if type(error).__name__ == "SafetensorError":
        return ValueError(
            f"The weights file of {source} is not a readable safetensors file ({error}): it is truncated or corrupted "
            "(an interrupted save or download?). Save it again or re-download it (force_download=True)."
        )
    folder = str(source)
    if isinstance(error, OSError) and os.path.isdir(folder):
        pickles = sorted(name for name in os.listdir(folder) if name.endswith((".bin", ".pt", ".pth")))
        if pickles:
            return ValueError(
                f"{folder} holds pickle weights ({', '.join(pickles)}) but no model.safetensors; BD3-LM loads "
                "safetensors only. Convert them once in a trusted environment and `save_pretrained` again."
            )
    return error


def check_loading_info(
    info: dict[str, Any],
    source: Any,
    tolerated_missing: tuple[str, ...] = (),
    tolerated_unexpected: tuple[str, ...] = (),
    allow_size_mismatch: bool = False,
) -> None:
    """Refuse weights that do not fit the config: transformers only warns about missing and unexpected keys (a config
    with another depth would silently load a partly random model) and words size mismatches differently per release.

    Args:
        info: the `output_loading_info` dict of `from_pretrained`.
        source: the folder or Hub id, for the message.
        tolerated_missing / tolerated_unexpected: regular expressions of keys that may be absent / extra (buffers the
            config initialises).
        allow_size_mismatch: the caller passed `ignore_mismatched_sizes=True` on purpose.
    """

    def keys(name: str, tolerated: tuple[str, ...]) -> list[str]:
        found = info.get(name) or []
        return sorted(k for k in found if not any(re.search(pattern, k) for pattern in tolerated))

    missing = keys("missing_keys", tolerated_missing)
    unexpected = keys("unexpected_keys", tolerated_unexpected)
    mismatched = (
        []
        if allow_size_mismatch
        else sorted(
            # transformers 5 reports (key, shape in the weights, shape of the model), 4.57 only the key
            entry if isinstance(entry, str) else f"{entry[0]} {tuple(entry[1])} in the weights vs {tuple(entry[2])}"
            for entry in (info.get("mismatched_keys") or [])
        )
    )
    problems = [
        f"{label}: {', '.join(found[:3])}{f' and {len(found) - 3} more' if len(found) > 3 else ''}"
        for label, found in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
        if found
    ]
    if problems:
        raise ValueError(
            f"The weights of {source} do not match its config ({'; '.join(problems)}). Check that config.json "
            "belongs to these weights (hidden_dim, n_blocks, n_heads, cond_dim, vocab_size); pass "
            "ignore_mismatched_sizes=True only to re-initialise layers whose size you changed on purpose."
        )


__all__ = [
    "check_attention_mask",
    "check_extra_kwargs",
    "check_generator",
    "check_loading_info",
    "check_noise_levels",
    "check_special_token_ids",
    "check_tensor",
    "check_timesteps",
    "check_token_ids",
    "check_tokenizer_fits",
    "check_vectorised_length",
    "checking_values",
    "explain_load_error",
    "padded_keys",
    "tokenizer_size",
]
