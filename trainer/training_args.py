# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""`BD3LMTrainingArguments`: [`TrainingArguments`] plus the BD3-LM method options (TRL's `*_config.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from modeling_bd3lm.checks_bd3lm import is_int, is_real

from .callbacks import DEFAULT_SEARCH_STEP, DEFAULT_SEARCH_WIDTHS

NAN_LOSS_POLICIES = ("stop", "skip")


def _is_real(value: Any) -> bool:
    """A finite real number (`is_real` of the package, which lets inf and NaN through)."""
    return is_real(value) and math.isfinite(value)


# BD3LMTrainingArguments field -> (test, requirement): one ValueError naming the field per bad value.
_ARGUMENT_RULES = {
    "schedule_search_widths": (
        lambda v: bool(v) and all(_is_real(w) and 0.0 < w <= 1.0 for w in v),
        "must be a non-empty list of widths in (0, 1]",
    ),
    "schedule_search_step": (lambda v: _is_real(v) and 0.0 < v < 1.0, "must be a number in (0, 1)"),
    "schedule_search_batches": (lambda v: is_int(v) and v >= 1, "must be an integer >= 1"),
    "noise_interval": (
        lambda v: v is None or (len(v) == 2 and all(_is_real(x) for x in v) and 0.0 <= v[0] <= v[1] <= 1.0),
        "must be two numbers 0 <= β <= ω <= 1",
    ),
    "ema_decay": (lambda v: _is_real(v) and 0.0 <= v < 1.0, "must be a number in [0, 1)"),
    "grad_variance_minibatches": (lambda v: is_int(v) and v >= 0, "must be an integer >= 0"),
    "nan_loss_policy": (lambda v: v in NAN_LOSS_POLICIES, f"must be one of {NAN_LOSS_POLICIES}"),
}


@dataclass
class BD3LMTrainingArguments(TrainingArguments):
    r"""
    [`TrainingArguments`] plus the BD3-LM method options. Every `TrainingArguments` field keeps its meaning.

    Defaults that differ from `TrainingArguments`: `learning_rate=3e-4` and `lr_scheduler_type="constant_with_warmup"`
    (the paper's AdamW recipe; the paper also warms up for 2,500 steps, set `warmup_steps` for that), and
    `ddp_find_unused_parameters=False` (every trainable parameter takes part in the vectorised pass).

    > Parameters of the data-driven noise schedule (paper Sec. 4)

    schedule_search (`bool`, *optional*, defaults to `True`):
        After every evaluation, grid-search the clipped training interval [β, ω] that minimises the variance of the
        per-block NELBO and write it into the model's `sampling_eps_min/max` buffers.
    schedule_search_widths (`list[float]`, *optional*, defaults to `[0.5, 0.6, 0.7, 0.8, 0.9]`):
        Interval widths of the grid (upstream `clip_search_widths`).
    schedule_search_step (`float`, *optional*, defaults to 0.05):
        Offset step of the grid (upstream `clip_search_delta`).
    schedule_search_batches (`int`, *optional*, defaults to 100):
        Evaluation batches per interval (N; upstream uses the first 100 validation batches).
    noise_interval (`list[float]`, *optional*):
        A fixed training interval `[β, ω]`, written into the buffers when the trainer is built; the search then
        only reports (upstream `fix_clipping=True`). The paper's optima: `[0.45, 0.95]` for L'=4, `[0.3, 0.8]` for
        L'=16.

    > Parameters of the weight average and diagnostics

    use_ema (`bool`, *optional*, defaults to `False`):
        Keep an exponential moving average of the weights; evaluation, `save_model` and checkpoints then use it.
    ema_decay (`float`, *optional*, defaults to 0.9999):
        EMA decay, with the (1 + n) / (10 + n) warm-up.
    grad_variance_minibatches (`int`, *optional*, defaults to 0):
        If > 0, log the paper's gradient-variance estimate over this many evaluation minibatches after every
        evaluation.

    > Fault handling

    nan_loss_policy (`str`, *optional*, defaults to `"stop"`):
        What a non-finite (NaN or ±inf) training loss, or gradient norm, does. `"stop"`: raise
        [`NonFiniteLossError`] naming the global step, before the optimizer touches the weights (they keep their last
        finite update; the last checkpoint is intact). `"skip"`: discard that step's gradients so the optimizer leaves
        the weights and its state unchanged, and log a warning with the step (the learning-rate schedule still
        advances). Checked on all processes at once, so every rank takes the same decision.
    """

    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate (paper: 3e-4)."})
    lr_scheduler_type: str = field(
        default="constant_with_warmup", metadata={"help": "Learning-rate schedule (paper: constant with warm-up)."}
    )
    schedule_search: bool = field(
        default=True, metadata={"help": "Search the clipped noise interval after every evaluation."}
    )
    schedule_search_widths: list[float] = field(
        default_factory=lambda: list(DEFAULT_SEARCH_WIDTHS), metadata={"help": "Interval widths of the search grid."}
    )
    schedule_search_step: float = field(default=DEFAULT_SEARCH_STEP, metadata={"help": "Offset step of the grid."})
    schedule_search_batches: int = field(default=100, metadata={"help": "Evaluation batches per searched interval."})
    noise_interval: list[float] | None = field(
        default=None, metadata={"help": "Fixed training noise interval `β ω` (the search then only reports)."}
    )
    use_ema: bool = field(default=False, metadata={"help": "Evaluate and save an EMA of the weights."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay (with warm-up)."})
    grad_variance_minibatches: int = field(
        default=0, metadata={"help": "Minibatches of the gradient-variance diagnostic (0 = off)."}
    )
    nan_loss_policy: str = field(
        default="stop",
        metadata={
            "help": "On a NaN/inf training loss or gradient norm: 'stop' (raise, naming the step; the weights keep "
            "their last finite update) or 'skip' (drop that update and log a warning)."
        },
    )

    def __post_init__(self) -> None:
        if self.ddp_find_unused_parameters is None:
            # Every trainable parameter takes part in the vectorised pass, so DDP can skip the graph traversal.
            self.ddp_find_unused_parameters = False
        super().__post_init__()
        for name, (test, requirement) in _ARGUMENT_RULES.items():
            if not test(getattr(self, name)):
                raise ValueError(f"`{name}` {requirement}, got {getattr(self, name)!r}.")
        if self.noise_interval is not None:
            self.noise_interval = [float(v) for v in self.noise_interval]


__all__ = ["NAN_LOSS_POLICIES", "BD3LMTrainingArguments"]
