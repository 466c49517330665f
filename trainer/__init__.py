# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Training, fine-tuning and evaluation of BD3-LM with `transformers.Trainer` (import name `bd3lm_trainer`).

Training sits at the top (`training_args`, `trainer`, `callbacks`, `ema`, `faults`, `sharding`, `data`, `peft_presets`,
`utils`, and `model_card` for publishing); the other jobs have their own subpackages: `evaluation/` (likelihood bounds,
perplexity, generative perplexity, lm-eval), `cli/` (the `bd3lm` command) and `corpus/` (the embedded corpus and
tokenizer).
"""

from .callbacks import (
    GradientVarianceCallback,
    NoiseScheduleSearchCallback,
    TrainerBoundCallback,
    estimate_gradient_variance,
    noise_interval_grid,
    plot_schedule_search,
)
from .data import BD3LMDataCollator, build_lm_dataset, load_text_dataset
from .ema import EMACallback
from .faults import NonFiniteLossError, checkpoint_problem, last_complete_checkpoint
from .peft_presets import LORA_TARGET_MODULES, gated_lora_config, lora_target_modules, merge_and_unload
from .trainer import BD3LMTrainer, load_for_finetuning
from .training_args import BD3LMTrainingArguments
from .utils import noised_nelbo, per_block_nelbo, unwrap_bd3lm

__all__ = [
    "BD3LMDataCollator",
    "BD3LMTrainer",
    "BD3LMTrainingArguments",
    "EMACallback",
    "GradientVarianceCallback",
    "LORA_TARGET_MODULES",
    "NonFiniteLossError",
    "NoiseScheduleSearchCallback",
    "TrainerBoundCallback",
    "build_lm_dataset",
    "checkpoint_problem",
    "estimate_gradient_variance",
    "gated_lora_config",
    "last_complete_checkpoint",
    "load_for_finetuning",
    "load_text_dataset",
    "lora_target_modules",
    "merge_and_unload",
    "noise_interval_grid",
    "noised_nelbo",
    "per_block_nelbo",
    "plot_schedule_search",
    "unwrap_bd3lm",
]
