# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""What every `bd3lm` subcommand shares: the user-mistake exception, the exit status it maps to, option checks."""

from __future__ import annotations

EXIT_USAGE = 2
# `modeling_bd3lm.SAMPLERS`, spelled out so that `--help` does not import torch (a test keeps them equal).
SAMPLER_NAMES = ("first_hitting", "ddpm", "topk_confidence", "confidence_threshold", "margin", "entropy")
# `modeling_bd3lm.DECODING_MODES` and `DRAFT_VARIANTS`, spelled out so that parsing the command line loads no model code.
GENERATION_MODE_NAMES = ("diffusion", "autoregressive", "draft_verify")
DRAFT_VARIANT_NAMES = ("two_pass", "one_forward")


class CLIError(Exception):
    """A user mistake: printed as one line, no traceback."""


def check_positive(name: str, value: int | float | None) -> None:
    """A `CLIError` naming `--name` unless `value` is None or > 0."""
    if value is not None and value <= 0:
        raise CLIError(f"--{name} must be positive, got {value}")


__all__ = ["DRAFT_VARIANT_NAMES", "EXIT_USAGE", "GENERATION_MODE_NAMES", "SAMPLER_NAMES", "CLIError", "check_positive"]
