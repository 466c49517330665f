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

# Which positions of a sampling call are projected on the vocabulary (transformers' `logits_to_keep` convention): None
# or 0 for all, an int n > 0 for the last n, or a 1-D tensor of position indices (kept in that order).
LogitsToKeep = int | torch.LongTensor | None


def check_logits_to_keep(logits_to_keep: LogitsToKeep, seq_len: int) -> None:
    """Raise a `ValueError` naming the fix unless `logits_to_keep` selects positions of a `seq_len`-token call."""
    if logits_to_keep is None:
        return
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1 or logits_to_keep.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"`logits_to_keep` as a tensor must be a 1-D integer tensor of positions, got shape "
                f"{tuple(logits_to_keep.shape)} and dtype {logits_to_keep.dtype}."
            )
        if logits_to_keep.numel() and not (0 <= int(logits_to_keep.min()) and int(logits_to_keep.max()) < seq_len):
            raise ValueError(f"`logits_to_keep` has positions outside 0..{seq_len - 1} (the call's new tokens).")
        return
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(
            f"`logits_to_keep` must be None, an int >= 0 (the last that many positions; 0 for all) or a 1-D tensor of "
            f"positions, got {logits_to_keep!r}."
        )


def keep_positions(hidden: torch.Tensor, logits_to_keep: LogitsToKeep) -> torch.Tensor:
    """The positions (dim 1) of `hidden` that `logits_to_keep` selects, to be projected on the vocabulary: all for None
    or 0, the last n for an int n, the listed ones for a 1-D index tensor. Select BEFORE the output head, so that the
    head (`hidden × vocab` per row) runs on the kept rows only."""
    if logits_to_keep is None or (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        return hidden
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:]
    return hidden.index_select(1, logits_to_keep.to(hidden.device))


class BD3LMDenoiser:
    """The denoiser interface (a mixin: the DiT is an `nn.Module` with it, the causal-LM adapter a plain object).

    `__call__(input_ids, noisy_input_ids=None, attention_mask=None, timesteps=None, cache=None, use_cache=None,
    output_hidden_states=None, output_attentions=None, return_dict=True, output_clean_logits=False,
    logits_to_keep=None) -> BD3LMOutput` runs one of two passes:

    * `noisy_input_ids` given: the vectorised `x_t ⊕ x_0` pass; logits `(batch, L, vocab)` aligned with the tokens
      (row i predicts token i), hidden states and attention weights of the `x_t` half, no cache; with
      `output_clean_logits` also `clean_logits`, the raw outputs at the `x_0` positions.
    * otherwise: the block-causal sampling pass over `input_ids` after the committed tokens of `cache`; raw logits (row
      j predicts token j + 1 when `predicts_next_token`, else token j); `use_cache=True` commits this call's keys and
      values to `cache`, otherwise `cache` is left as it was. `logits_to_keep` ([`keep_positions`]) projects only
      some positions on the vocabulary: the logits are then `(batch, kept, vocab)`, in the order asked.

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


__all__ = ["BD3LMDenoiser", "LogitsToKeep", "check_logits_to_keep", "keep_positions"]
