# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Load a checkpoint to evaluate: the device, this package's model code (never remote code) and the tokenizer beside it."""

from __future__ import annotations

import logging
import os

import torch

from ..corpus import resolve_tokenizer

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None, fallback: bool = False) -> torch.device:
    """The device to evaluate on: `device`, or CUDA when available and else the CPU when it is `None`.

    An accelerator this machine lacks (`cuda` on a CPU-only machine or torch build, `mps` off a Mac) raises a one-line
    `ValueError` that names `--device cpu`; with `fallback=True` the CPU is used instead, after one warning line. The
    lm-eval adapter falls back because lm-eval's command line passes `device="cuda:0"` when the user chose none, so it
    cannot tell its default from a choice (lm-eval's own `hf` model falls back too). A device index past the ones
    present is an error either way: that is a choice, not a default.
    """
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device`={device!r} is not a torch device ({err}); use e.g. `cpu` or `cuda:0`.") from None
    kind = resolved.type
    if kind in ("cpu", "meta"):
        return resolved
    check = "backends.mps" if kind == "mps" else kind  # torch.cuda, torch.xpu, ... have `is_available()`
    is_available = getattr(torch.backends.mps if kind == "mps" else getattr(torch, kind, None), "is_available", None)
    if not (callable(is_available) and is_available()):
        why = f"device {str(device)!r} is not available on this machine (torch.{check}.is_available() is False)"
        if not fallback:
            raise ValueError(f"{why}; pass `--device cpu`.")
        logger.warning("bd3lm: %s; evaluating on the CPU instead (pass --device cpu to choose it).", why)
        return torch.device("cpu")
    count = getattr(torch, kind).device_count() if hasattr(getattr(torch, kind, None), "device_count") else 1
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(
            f"`device`={str(device)!r}: this machine has {count} {kind} device(s), {kind}:0 to {kind}:{count - 1}."
        )
    return resolved


def load_model_and_tokenizer(
    model: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
    device_fallback: bool = False,
):
    """A BD3-LM checkpoint with this package's code (never remote code) in eval mode on
    `resolve_device(device, device_fallback)`, and its tokenizer (`tokenizer`, default the checkpoint's own;
    `"bd3lm-corpus"` for the embedded one)."""
    from modeling_bd3lm import BD3LMForMaskedDiffusion

    target = resolve_device(device, device_fallback)  # before the weights load: a bad device fails fast
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    net = BD3LMForMaskedDiffusion.from_pretrained(model, **kwargs)
    net.to(target).eval()
    try:
        return net, resolve_tokenizer(tokenizer or model)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"No tokenizer at `{tokenizer or model}`; pass `--tokenizer` (a folder, a Hub id or `bd3lm-corpus`)."
        ) from err


__all__ = ["load_model_and_tokenizer", "resolve_device"]
