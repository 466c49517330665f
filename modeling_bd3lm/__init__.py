# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""BD3-LM for Hugging Face transformers: the code that ships inside every checkpoint."""

from .cache_bd3lm import CACHE_FIELD, CommittedWindow, read_cache_layer, trim_cache_left
from .configuration_bd3lm import BD3LMConfig
from .gating_bd3lm import adapter_gate, has_gated_adapter
from .generation_bd3lm import BD3LMGenerateOutput, BD3LMGenerationConfig, BD3LMGenerationMixin, BlockDenoiser
from .masks_bd3lm import block_causal_mask, block_diffusion_mask, block_diffusion_mask_mod
from .modeling_bd3lm import BD3LMForMaskedDiffusion, BD3LMModel, BD3LMOutput, BD3LMPreTrainedModel
from .modes_bd3lm import DECODING_MODES
from .noise_schedule_bd3lm import BD3LMNoiseSchedule, add_noise, draw_noise, nelbo_valid_mask, sample_noise_levels
from .tokenization_bd3lm import MASK_TOKEN, add_mask_token, set_special_token_ids, special_token_ids

__all__ = [
    "CACHE_FIELD",
    "BD3LMConfig",
    "BD3LMGenerateOutput",
    "BD3LMGenerationConfig",
    "BD3LMGenerationMixin",
    "BlockDenoiser",
    "DECODING_MODES",
    "CommittedWindow",
    "adapter_gate",
    "has_gated_adapter",
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
    "MASK_TOKEN",
    "add_mask_token",
    "set_special_token_ids",
    "special_token_ids",
]
