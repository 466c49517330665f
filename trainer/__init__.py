# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Training, fine-tuning and evaluation of BD3-LM with `transformers.Trainer` (import name `bd3lm_trainer`)."""

from .callbacks import (
    EMACallback,
    GradientVarianceCallback,
    NoiseScheduleSearchCallback,
    estimate_gradient_variance,
    noise_interval_grid,
    noised_nelbo,
    per_block_nelbo,
    plot_schedule_search,
    unwrap_bd3lm,
)
from .faults import NonFiniteLossError, checkpoint_problem, last_complete_checkpoint
from .data import BD3LMDataCollator, build_lm_dataset, load_text_dataset
from .peft_presets import LORA_TARGET_MODULES, lora_target_modules
from .trainer import BD3LMTrainer, BD3LMTrainingArguments, load_for_finetuning

__all__ = [
    "BD3LMDataCollator",
    "BD3LMTrainer",
    "BD3LMTrainingArguments",
    "EMACallback",
    "GradientVarianceCallback",
    "LORA_TARGET_MODULES",
    "NonFiniteLossError",
    "NoiseScheduleSearchCallback",
    "build_lm_dataset",
    "checkpoint_problem",
    "estimate_gradient_variance",
    "last_complete_checkpoint",
    "load_for_finetuning",
    "load_text_dataset",
    "lora_target_modules",
    "noise_interval_grid",
    "noised_nelbo",
    "per_block_nelbo",
    "plot_schedule_search",
    "unwrap_bd3lm",
]
