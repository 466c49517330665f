# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Output classes of BD3-LM. Their cache field is named by `cache_bd3lm.CACHE_FIELD` (`cache` on transformers >= 5.24,
`past_key_values` before): build outputs with `**{CACHE_FIELD: cache}` and read them with `getattr(output, CACHE_FIELD)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import MaskedLMOutput
from transformers.utils import ModelOutput

from .cache_bd3lm import CACHE_FIELD, with_cache_field

# ----------------------------------------------------------------------------------------------------------------------
# Model output


@dataclass
class BD3LMOutput(with_cache_field(MaskedLMOutput)):
    """
    Output of [`BD3LMForMaskedDiffusion`] and [`BD3LMModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Token-mean block NELBO (returned when `labels` are given).
        logits (`torch.FloatTensor` of shape `(batch, seq_len, vocab_size)`):
            Raw denoiser logits, before the SUBS step (mask-logit suppression and carry-over); in the vectorised pass
            only the `x_t` half.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            The embeddings and the output of every layer, each `(batch, seq_len, hidden_size)`.
        past_key_values / cache (`Cache`, *optional*):
            Pre-rotary keys and values of committed (clean) tokens. The field is `cache` on transformers >= 5.24
            (where `past_key_values` remains a deprecated alias) and `past_key_values` before.
        noisy_input_ids (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*):
            The `x_t` the loss was computed on.
        noise_levels (`torch.FloatTensor` of shape `(batch, num_blocks)`, *optional*):
            The noise level t of every (sequence, block).
        token_loss (`torch.FloatTensor` of shape `(batch, seq_len)`, *optional*):
            The per-token NELBO term `loss_weight(t_b) · (-log p_θ(x_0^ℓ | x_t^b, x^{<b}))` at masked positions, zero
            elsewhere; block means of it feed the data-driven schedule search.
        clean_logits (`torch.FloatTensor` of shape `(batch, seq_len, vocab_size)`, *optional*):
            With `output_clean_logits=True` in the vectorised pass: the raw network outputs at the clean (`x_0`)
            positions. For a converted causal LM row i predicts token i + 1 (the source's convention); with
            `clean_attention="causal"` and the clean stream untouched they are the source model's logits.
    """

    noisy_input_ids: torch.LongTensor | None = None
    noise_levels: torch.FloatTensor | None = None
    token_loss: torch.FloatTensor | None = None
    clean_logits: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Generation output


@dataclass
class _BD3LMGenerateOutputBase(ModelOutput):
    sequences: torch.LongTensor | None = None
    nfe: torch.LongTensor | None = None
    num_forwards: int | None = None
    tokens_per_forward: torch.FloatTensor | None = None
    logits: tuple[torch.FloatTensor, ...] | None = None
    cache_rows: torch.LongTensor | None = None
    acceptance_lengths: tuple[torch.LongTensor, ...] | None = None
    generation_mode: str | None = None


@dataclass
class BD3LMGenerateOutput(with_cache_field(_BD3LMGenerateOutputBase)):
    """
    Output of [`BD3LMGenerationMixin.generate`] with `return_dict_in_generate=True`.

    Args:
        sequences (`torch.LongTensor` of shape `(batch * num_return_sequences, prompt_len + new_len)`):
            The prompt as given (padding kept) followed by the new tokens; after a stop (EOS, stopping criteria)
            a row holds `pad_token_id`. `new_len` is at most `max_new_tokens`.
        nfe (`torch.LongTensor` of shape `(batch,)`):
            Denoising network calls each row needed (the paper's NFE): calls made while the row had masked tokens
            (for `ddpm`, only calls after the row's block changed). In the clean-stream modes ("autoregressive",
            "draft_verify") every call the row took part in, the prompt's prefill and the draft passes included.
        num_forwards (`int`):
            All network calls made for the batch (a batched call counts once). With the cache, the prompt and each
            committed block are written by the next block's first denoising call; only once the window slides beyond
            `model_length` does a committed block take a call of its own.
        tokens_per_forward (`torch.FloatTensor` of shape `(batch,)`):
            New tokens of each row divided by its `nfe`.
        logits (`tuple(torch.FloatTensor)`, *optional*, with `output_logits=True`):
            Raw logits of every denoising call, each `(batch, block_size, vocab)`; rows that had left the batch are NaN.
        cache_rows (`torch.LongTensor`):
            Rows (indices into `sequences`) held by the cache: rows that stopped early leave the batch, and their keys
            and values with it.
        acceptance_lengths (`tuple(torch.LongTensor)`, *optional*):
            With `generation_mode="draft_verify"`, per row the tokens each verify call accepted (the drafts that agreed
            with the clean stream plus its own next token: 1 to `block_size`, before cutting at a stop).
        generation_mode (`str`):
            The decoding mode that produced the output.
        past_key_values / cache (`Cache`):
            Pre-rotary keys and values of the committed window of the rows in `cache_rows` (the last block is not
            committed, as the last token of an autoregressive decode). `cache` on transformers >= 5.24.
    """


__all__ = ["CACHE_FIELD", "BD3LMGenerateOutput", "BD3LMOutput"]
