# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""BD3-LM for Hugging Face transformers: the code that ships inside every checkpoint."""

from .configuration_bd3lm import BD3LMConfig
from .generation_bd3lm import BD3LMGenerateOutput, BD3LMGenerationConfig, BD3LMGenerationMixin
from .masks_bd3lm import block_causal_mask, block_diffusion_mask, block_diffusion_mask_mod
from .modeling_bd3lm import (
    CACHE_FIELD,
    BD3LMForMaskedDiffusion,
    BD3LMModel,
    BD3LMOutput,
    BD3LMPreTrainedModel,
    read_cache_layer,
    trim_cache_left,
)
from .noise_schedule_bd3lm import BD3LMNoiseSchedule, add_noise, draw_noise, nelbo_valid_mask, sample_noise_levels

__all__ = [
    "CACHE_FIELD",
    "BD3LMConfig",
    "BD3LMGenerateOutput",
    "BD3LMGenerationConfig",
    "BD3LMGenerationMixin",
    "BD3LMForMaskedDiffusion",
    "BD3LMModel",
    "BD3LMOutput",
    "BD3LMPreTrainedModel",
    "BD3LMNoiseSchedule",
    "add_noise",
    "draw_noise",
    "nelbo_valid_mask",
    "sample_noise_levels",
    "block_causal_mask",
    "block_diffusion_mask",
    "block_diffusion_mask_mod",
    "read_cache_layer",
    "trim_cache_left",
]
