# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Helpers shared by the trainer, its callbacks, the evaluation code and the command line (TRL's `trainer/utils.py`).

* the model behind the wrappers ([`unwrap_bd3lm`]) and the training estimator's NELBO at a given interval
  ([`noised_nelbo`]), with its per-block statistic and the cross-process gather;
* batches and seeded generators of the evaluation-time diagnostics;
* the one check of "a local folder or a Hub id" ([`check_model_reference`]) and the JSON reader of saved reports;
* the one matplotlib preamble ([`pyplot`], [`save_figure`]).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# The model and its estimator


def unwrap_bd3lm(model: torch.nn.Module) -> torch.nn.Module:
    """The `BD3LMForMaskedDiffusion` inside a DDP / compiled / PEFT wrapper (checked by `model_type`, so that a copy
    loaded with `trust_remote_code` also qualifies)."""
    current = model
    for _ in range(8):
        if hasattr(current, "get_base_model"):  # PEFT (which would also forward the attributes checked below)
            current = current.get_base_model()
            continue
        config = getattr(current, "config", None)
        if getattr(config, "model_type", None) == "bd3lm" and hasattr(current, "set_noise_interval"):
            return current
        if isinstance(getattr(current, "module", None), torch.nn.Module):  # DDP, DataParallel
            current = current.module
        elif isinstance(getattr(current, "_orig_mod", None), torch.nn.Module):  # torch.compile
            current = current._orig_mod
        else:
            break
    raise TypeError(
        f"Expected a BD3LMForMaskedDiffusion (possibly wrapped by PEFT or DDP), got {type(model).__name__}."
    )


def noised_nelbo(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    interval: tuple[float, float],
    generator: torch.Generator | None = None,
):
    """The block NELBO of `batch` under the training estimator with t ∼ U[β, ω] per (sequence, block), whatever mode
    the model is in: the noise is the model's own `draw_noise(..., interval=interval)`, so that the rule for the
    interval and the rejection resampling (`config.resample`) are exactly those of training. Returns the model output
    (`loss`, `token_loss`, `noisy_input_ids`, `noise_levels`).
    """
    x_0 = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    x_t, noise_levels = unwrap_bd3lm(model).draw_noise(x_0, attention_mask, generator=generator, interval=interval)
    return model(
        input_ids=x_0,
        noisy_input_ids=x_t,
        noise_levels=noise_levels,
        labels=batch.get("labels", x_0),
        attention_mask=attention_mask,
        return_dict=True,
    )


def per_block_nelbo(token_loss: torch.Tensor, valid: torch.BoolTensor, block_size: int):
    """Per-block NELBO values, the mean of `token_loss` over the L' positions of each block (upstream's statistic),
    and a mask of the blocks holding at least one counted token. Shapes `(batch, num_blocks)`."""
    batch, seq_len = token_loss.shape
    values = token_loss.float().view(batch, seq_len // block_size, block_size).mean(-1)
    return values, valid.view(batch, seq_len // block_size, block_size).any(-1)


def gather_block_values(accelerator: Any, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """All processes' per-block values of one batch (duplicates of an uneven last batch dropped), flattened."""
    if accelerator is not None and accelerator.num_processes > 1:
        # Dynamic padding can give processes different block counts; pad so that the gather lines up.
        values = accelerator.pad_across_processes(values.contiguous(), dim=1, pad_index=0)
        valid = accelerator.pad_across_processes(valid.float().contiguous(), dim=1, pad_index=0)
        values, valid = accelerator.gather_for_metrics((values, valid))
    return values[valid.bool()]


# ----------------------------------------------------------------------------------------------------------------------
# Batches and randomness of the diagnostics


def take_batches(dataloader: Iterable, num_batches: int) -> Iterator:
    """The first `num_batches` batches; an accelerate loader stopped early is unregistered from its GradientState
    (it only does that itself at its end), so that the training loader stays the active one."""
    iterator = iter(dataloader)
    try:
        yield from itertools.islice(iterator, num_batches)
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
        end = getattr(dataloader, "end", None)
        if callable(end):
            end()


def diagnostic_generator(device: torch.device, seed: int, step: int, process_index: int) -> torch.Generator:
    """The generator of an evaluation-time diagnostic: a function of the run's seed, the step and the process only, so
    that the measurement is repeatable and leaves the global RNG (and so training) alone."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step * 9_973 + process_index) % (2**63))
    return generator


# ----------------------------------------------------------------------------------------------------------------------
# Arguments


def check_repo_id(repo_id: str, *, name: str = "repo_id", namespace: bool = True) -> str:
    """`repo_id` when it is a valid Hub repository id (`namespace/name`; with `namespace=False` a bare `name` too),
    else a `ValueError` naming the argument and the fix."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if not repo_id or (namespace and "/" not in repo_id):
            raise HFValidationError("it needs a namespace.")
    except HFValidationError as error:
        raise ValueError(
            f"{name}={repo_id!r} is not a valid Hub repository id: {error} Use 'namespace/name' "
            "(letters, digits, '-', '_', '.')."
        ) from None
    return repo_id


def is_hub_id(value: str, namespace: bool = True) -> bool:
    """Whether `value` passes [`check_repo_id`]."""
    try:
        check_repo_id(value, namespace=namespace)
    except ValueError:
        return False
    return True


def check_model_reference(
    value: str | os.PathLike, argument: str, *, namespace: bool = True, need_config: bool = False
) -> str:
    """`value` as a string when it names a local folder or a Hub repository id, else a `ValueError` naming `argument`.

    Args:
        value: a folder or a Hub id.
        argument (`str`): how the caller spells the argument in the message (`"model"`, `"--init-from"`).
        namespace (`bool`, defaults to `True`): a Hub id must be `owner/name` (tokenizers may be a bare `gpt2`).
        need_config (`bool`, defaults to `False`): a folder must hold `config.json` (a saved model).
    """
    value = os.fspath(value)
    if os.path.isdir(value):
        if need_config and not os.path.isfile(os.path.join(value, "config.json")):
            raise ValueError(f"{value} has no config.json; is it a trained model folder?")
        return value
    if not is_hub_id(value, namespace):
        raise ValueError(
            f"{argument} {value!r} is neither a folder nor a Hub id ({'owner/name' if namespace else 'name or owner/name'})"
        )
    return value


def read_json(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in `path`; a `ValueError` that calls it `what` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{what} {path} is not readable JSON ({error}); was the save interrupted?") from error


# ----------------------------------------------------------------------------------------------------------------------
# Figures

_warned_without_matplotlib: set[str] = set()


def pyplot(missing: str | None = None):
    """`matplotlib.pyplot` on the file-only Agg backend (no display needed), or None when matplotlib is not installed;
    `missing` is then logged as a warning, once per message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if missing and missing not in _warned_without_matplotlib:
            logger.warning(missing)
            _warned_without_matplotlib.add(missing)
        return None
    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Lay out `fig`, write it to `path` and free it (figures are never shown)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


__all__ = [
    "check_model_reference",
    "check_repo_id",
    "diagnostic_generator",
    "gather_block_values",
    "is_hub_id",
    "noised_nelbo",
    "per_block_nelbo",
    "pyplot",
    "read_json",
    "save_figure",
    "take_batches",
    "unwrap_bd3lm",
]
