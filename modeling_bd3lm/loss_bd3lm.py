# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""The block NELBO of BD3-LM (Arriola et al., 2025, Eq. (8)) under the SUBS parameterisation: the training loss of
`BD3LMForMaskedDiffusion.forward` and `block_nelbo`, for every kind of denoiser."""

from __future__ import annotations

from typing import Any

import torch

from .checks_bd3lm import checking_values
from .noise_schedule_bd3lm import nelbo_valid_mask
from .sampling_bd3lm import suppress_mask_logit

# Above this NELBO weight -α'_t / (1 - α_t) a masked token's term is an overflow, not a loss (t ≈ 0 masks nothing).
_MAX_LOSS_WEIGHT = 1e30


def block_nelbo(
    config: Any,
    noise_schedule: Any,
    logits: torch.Tensor,
    labels: torch.LongTensor,
    noisy_input_ids: torch.LongTensor,
    noise_levels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block NELBO (Eq. (8) of Arriola et al., 2025) under the SUBS parameterisation.

    L_BD(x; θ) = Σ_b E_t E_q [ -α'_t / (1 - α_t) · log p_θ(x^b | x_t^b, x^{<b}) ], where only masked positions
    contribute (carry-over gives unmasked tokens log-probability 0) and the mask logit is suppressed.

    Returns:
        `(loss, token_loss)`: the token mean over non-padding (and, with `ignore_bos`, non-first) positions, and
        the per-token terms of shape `(batch, seq_len)`.
    """
    # SUBS: zero masking probability (out of place: the caller's logits are returned raw)
    log_probs = torch.log_softmax(suppress_mask_logit(logits.float(), config.mask_token_id), dim=-1)
    valid = nelbo_valid_mask(labels, attention_mask, config.ignore_bos)
    if checking_values() and bool(((labels == config.mask_token_id) & valid).any()):
        raise ValueError(
            f"`labels` contain the mask token id {config.mask_token_id}, which the model can never predict (SUBS "
            "gives it probability 0, so the loss is infinite); the data must not contain the mask token: check "
            "the tokenizer and `mask_token_id`, or set those labels to -100."
        )
    targets = torch.where(valid, labels, torch.zeros_like(labels))
    nll = -log_probs.gather(-1, targets[..., None]).squeeze(-1)
    if config.always_mask:
        weight = torch.ones_like(noise_levels)
    else:
        weight = noise_schedule.loss_weight(noise_levels.float())
    weight = weight.repeat_interleave(config.block_size, dim=1)
    is_masked = (noisy_input_ids == config.mask_token_id) & valid
    # Zero the weight, not only the term, off the masked positions: an infinite weight there (t = 0) would turn
    # the zero gradient of an unused term into NaN.
    weight = torch.where(is_masked, weight, torch.zeros_like(weight))
    if checking_values() and not bool((weight <= _MAX_LOSS_WEIGHT).all()):  # also catches inf and NaN
        raise ValueError(
            "`noisy_input_ids` has mask tokens in a block whose `noise_levels` entry is (nearly) 0, where the NELBO "
            f"weight overflows (t = 0 masks nothing); use t > {1 / _MAX_LOSS_WEIGHT:g} for blocks with masked tokens."
        )
    token_loss = torch.where(is_masked, weight * nll, torch.zeros_like(nll))
    loss = token_loss.sum() / valid.sum().clamp_min(1)
    return loss, token_loss


__all__ = ["block_nelbo"]
