# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""What `BD3LMForMaskedDiffusion` needs of a denoiser: one interface for both passes, whatever the network.

`BD3LMForMaskedDiffusion` keeps the network as `self.backbone` (so checkpoint keys are `backbone.…`) and reaches it
only through `self.denoiser`, an object of the class that `DENOISERS[config.denoiser_type]` names (the registry in
`modeling_bd3lm.py`). Two kinds ship:

* `"dit"`: `BD3LMModel`, the official DiT (`modeling_bd3lm.py`); it is its own denoiser.
* `"causal_lm"`: `CausalLMDenoiser` over a transformers causal LM (`causal_backbone_bd3lm.py`).

A new kind is one file with a subclass of [`BD3LMDenoiser`] plus one entry in `DENOISERS` (and, when it brings config
fields, one in `configuration_bd3lm.DENOISER_CONFIGS`). Nothing else in the package asks which kind it has: the model,
generation and the committed window read the properties below.

The wrapper checks every input once before calling a denoiser (`BD3LMForMaskedDiffusion.forward`): a denoiser gets
valid ids, a mask of the right width, and in the sampling pass a `Cache` (or None) whose window fits `model_length`.

A leaf of the package: it imports only torch.
"""

from __future__ import annotations

from typing import Any

import torch


class BD3LMDenoiser:
    """The denoiser interface (a mixin: the DiT is an `nn.Module` with it, the causal-LM adapter a plain object).

    `__call__(input_ids, noisy_input_ids=None, attention_mask=None, timesteps=None, cache=None, use_cache=None,
    output_hidden_states=None, output_attentions=None, return_dict=True, output_clean_logits=False) -> BD3LMOutput`
    runs one of two passes:

    * `noisy_input_ids` given: the vectorised `x_t ⊕ x_0` pass; logits `(batch, L, vocab)` aligned with the tokens
      (row i predicts token i), hidden states and attention weights of the `x_t` half, no cache; with
      `output_clean_logits` also `clean_logits`, the raw outputs at the `x_0` positions.
    * otherwise: the block-causal sampling pass over `input_ids` after the committed tokens of `cache`; raw logits (row
      j predicts token j + 1 when `predicts_next_token`, else token j); `use_cache=True` commits this call's keys and
      values to `cache`, otherwise `cache` is left as it was.

    The clean stream attends block-causally or causally (`config.clean_attention`, masks in `masks_bd3lm.py`); a kind
    that supports only one must make its config refuse the other.

    `timesteps` is σ, used only with `config.time_conditioning` (a kind that cannot use it must make its config refuse
    `time_conditioning=True`).
    """

    # The sampling pass's output at position j predicts token j + 1 (a causal LM's head, kept: the token shift).
    # Generation then reads the first token of a block from the last committed position (`CommittedWindow`).
    predicts_next_token: bool = False
    # Keys are cached after the position embedding, so a window slides by re-running the kept committed tokens at
    # re-based positions (`CommittedWindow` re-prefills) instead of dropping the oldest cache entries.
    caches_after_positions: bool = False
    # Its passes gate an activated-LoRA adapter to the noisy positions (`gating_bd3lm.adapter_gate`), so that a gated
    # adapter (`bd3lm_trainer.gated_lora_config`) never acts at clean positions.
    gates_adapters: bool = False

    @classmethod
    def build_backbone(cls, config: Any, backbone: torch.nn.Module | None = None) -> torch.nn.Module:
        """The network `BD3LMForMaskedDiffusion` stores as `backbone`: `backbone` when given (pretrained weights, kept
        as they are), else a new one built from `config`."""
        raise NotImplementedError

    @classmethod
    def bind(cls, backbone: torch.nn.Module, config: Any) -> BD3LMDenoiser:
        """The denoiser interface over the stored network."""
        raise NotImplementedError

    @property
    def description(self) -> str | None:
        """One line for model cards on what network denoises; None for the official DiT (its config says it all)."""
        return None

    @property
    def remedy_for_long_windows(self) -> str:
        """The end of the error raised when a sampling call's window exceeds `model_length`."""
        if self.caches_after_positions:
            return "generate() slides a window (re-prefilling the kept committed tokens)"
        return "generate() slides a window, or trim the cache with `trim_cache_left`"

    def causal_pass(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = True,
        logits_to_keep: int | None = None,
        allowed: torch.BoolTensor | None = None,
        adapter_positions: int = 0,
        position_ids: torch.LongTensor | None = None,
    ) -> Any:
        """The clean stream run as an autoregressive model (`BD3LMForMaskedDiffusion.causal_forward`, the decoding
        modes "autoregressive" and "draft_verify"): only a denoiser that `predicts_next_token` has one."""
        raise ValueError(
            f"The {type(self).__name__} denoiser has no autoregressive view (its clean stream has no next-token head); "
            "use generation_mode='diffusion'."
        )

    def check_attention(self) -> None:
        """Raise a one-line `ValueError` when the network's attention kernel cannot run the block-diffusion masks.
        Called once where the model is built or loaded, and when its attention kernel is switched."""


__all__ = ["BD3LMDenoiser"]
