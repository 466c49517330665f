# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""The base class of the BD3-LM models (`BD3LMModel`, the DiT, and `BD3LMForMaskedDiffusion`): transformers
integration shared by both (key hooks of the official checkpoints, strict safetensors loading, saving with the code
files and an `auto_map`, weight initialisation)."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedModel

from .checks_bd3lm import check_loading_info, explain_load_error
from .configuration_bd3lm import BD3LMConfig
from .layers_bd3lm import (
    BD3LMBlock,
    BD3LMEmbedding,
    BD3LMFinalLayer,
    BD3LMLayerNorm,
    BD3LMRotaryEmbedding,
    checkpoint_key,
    parameter_name,
)

# `save_pretrained` writes this into config.json so that every auto class resolves to the bundled code.
AUTO_MAP = {
    "AutoConfig": "configuration_bd3lm.BD3LMConfig",
    "AutoModel": "modeling_bd3lm.BD3LMForMaskedDiffusion",
    "AutoModelForMaskedLM": "modeling_bd3lm.BD3LMForMaskedDiffusion",
    "AutoModelForCausalLM": "modeling_bd3lm.BD3LMForMaskedDiffusion",  # what pipeline("text-generation") loads
}


class BD3LMPreTrainedModel(PreTrainedModel):
    config_class = BD3LMConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BD3LMBlock"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_cache_class = True
    _keys_to_ignore_on_load_unexpected = [r"^sampling_eps_(min|max)$"]
    # The model computes its own token-mean loss: a plain `Trainer` must not pass `num_items_in_batch` (BD3LMTrainer
    # normalises the token terms itself).
    accepts_loss_kwargs = False

    @staticmethod
    def _fix_state_dict_key_on_load(key: str) -> tuple[str, bool]:
        """transformers 4.57's load-time key hook: the official embedding key to the `nn.Embedding` one."""
        if parameter_name(key) != key:
            return parameter_name(key), True
        return PreTrainedModel._fix_state_dict_key_on_load(key)  # only 4.x calls this hook, and defines the base

    @staticmethod
    def _fix_state_dict_key_on_save(key: str) -> tuple[str, bool]:
        """transformers 4.57's save-time key hook: checkpoints keep the official embedding key."""
        return checkpoint_key(key), checkpoint_key(key) != key

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether activation checkpointing is on. PEFT still reads this name, which transformers 5 deprecates with a
        FutureWarning on every LoRA wrap; answering it here keeps that out (4.57 only has this name)."""
        return any(getattr(module, "gradient_checkpointing", False) for module in self.modules())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but from safetensors only (never a pickle) and strict: a truncated or
        corrupted weights file, or weights that do not fit the config (missing, unexpected or resized tensors), raise
        a `ValueError` that says so instead of loading a partly random model."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError(
                "BD3-LM loads weights from safetensors only (pickles can run code): drop use_safetensors=False."
            )
        kwargs["use_safetensors"] = True
        return_info = kwargs.pop("output_loading_info", False)
        allow_size_mismatch = bool(kwargs.pop("ignore_mismatched_sizes", False))
        try:
            # Let transformers report resized tensors instead of raising (its message differs per release).
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **kwargs,
            )
        except Exception as error:
            explained = explain_load_error(error, pretrained_model_name_or_path)
            if explained is error:
                raise
            raise explained from error
        check_loading_info(
            info,
            pretrained_model_name_or_path,
            tolerated_missing=(r"(^|\.)sampling_eps_(min|max)$",),  # initialised from the config
            tolerated_unexpected=tuple(cls._keys_to_ignore_on_load_unexpected or ()),
            allow_size_mismatch=allow_size_mismatch,
        )
        return (model, info) if return_info else model

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Save weights (safetensors), config and the code files, with an `auto_map` for every auto class."""
        # Official configs carry `modeling_bd3lm.BD3LM`, a class this code does not define: point at ours.
        self.config.auto_map = dict(AUTO_MAP)
        self.config.architectures = ["BD3LMForMaskedDiffusion"]
        super().save_pretrained(save_directory, *args, **kwargs)
        tokenizer = getattr(self, "tokenizer", None)  # set by `from_causal_lm`: the tokenizer with its mask token
        if tokenizer is not None and kwargs.get("is_main_process", True):
            tokenizer.save_pretrained(save_directory)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Through `torch.nn.init` so that transformers 5.x can skip tensors that were loaded from a checkpoint.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, BD3LMEmbedding):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))  # the official EmbeddingLayer init
        elif isinstance(module, BD3LMLayerNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, BD3LMRotaryEmbedding):
            module.inv_freq.copy_(module.compute_inv_freq())
        if isinstance(module, (BD3LMBlock, BD3LMFinalLayer)) and module.adaLN_modulation is not None:
            # adaLN-Zero: every block starts as the identity.
            nn.init.zeros_(module.adaLN_modulation.weight)
            nn.init.zeros_(module.adaLN_modulation.bias)
        if isinstance(module, BD3LMFinalLayer):
            nn.init.zeros_(module.linear.weight)
            nn.init.zeros_(module.linear.bias)
        if module is self and "sampling_eps_min" in module._buffers:
            # The wrapper's clipped-interval buffers start at the config's values.
            module.sampling_eps_min.fill_(module.config.sampling_eps_min)
            module.sampling_eps_max.fill_(module.config.sampling_eps_max)


__all__ = ["AUTO_MAP", "BD3LMPreTrainedModel"]
