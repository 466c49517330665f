# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Attention masks of block diffusion (True = the query may attend to the key).

The vectorised training pass runs the network once on `x_t ⊕ x_0` (length 2L). With `is0(i) = i >= L` and
`blk(i) = (i - L·is0(i)) // L'` (Sec. 3.2 and Suppl. B.6 of Arriola et al., 2025):

* M_BD  (block-diagonal):       blk(q) == blk(k) and is0(q) == is0(k)
* M_OBC (offset block-causal):  blk(q) >  blk(k) and is0(k) and not is0(q)
* M_BC  (block-causal):         blk(q) >= blk(k) and is0(k) and is0(q)

so the full mask is [[M_BD, M_OBC], [0, M_BC]]: a noisy block sees itself and the clean blocks before it, and the
clean copy is an ordinary block-causal pass (which is why its keys and values can be cached at inference).

`clean_attention` (`BD3LMConfig.clean_attention`) chooses the clean quadrant: `"block_causal"` is M_BC above (the
paper); `"causal"` replaces it by M_C (clean → clean, `i(q) >= i(k)` for the token indices within the half), as in
Nemotron-Labs-Diffusion's mask. With a causal LM as the denoiser the clean stream is then the source model itself (its
keys and values are the source's KV cache). M_BD and M_OBC are the same under both. The causal-LM denoiser lays the
halves out as `x_0 ⊕ x_t` (`clean_first=True`, so that the noisy half is last, where PEFT's activated LoRA acts); the
predicate depends only on which half and which token an index is, so the order changes nothing else.

The sampling pass (new tokens after `past_len` committed ones): under `"block_causal"` every block sees itself and the
blocks before it ([`block_causal_mask`]); under `"causal"` the last `min(block_size, q_len)` new tokens are the noisy
block (they see each other and everything before them) and all tokens before them are clean and attend causally
([`causal_sampling_mask`]). [`sampling_noisy_length`] says how many trailing tokens are noisy in either case.

Both denoisers (the DiT and a causal-LM backbone) take their masks from here, with padded keys removed
([`with_key_padding`] for dense masks, [`flex_block_mask`] for FlexAttention): [`vectorised_attention_mask`] for the
`x_t ⊕ x_0` pass and [`sampling_attention_mask`] for the block-causal sampling pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# The attention patterns of the clean stream (`BD3LMConfig.clean_attention`); the first is the paper's.
CLEAN_ATTENTIONS = ("block_causal", "causal")


def block_diffusion_mask_mod(
    seq_len: int, block_size: int, clean_attention: str = "block_causal", clean_first: bool = False
) -> Callable:
    """The M_BD ∨ M_OBC ∨ (M_BC or M_C) predicate over indices of the 2L sequence, in FlexAttention `mask_mod` form;
    the halves are `x_t ⊕ x_0`, or `x_0 ⊕ x_t` with `clean_first`."""
    causal = clean_attention == "causal"

    def mask_mod(batch_idx, head_idx, q_idx, kv_idx):
        q_second = q_idx >= seq_len
        kv_second = kv_idx >= seq_len
        q_clean = ~q_second if clean_first else q_second
        kv_clean = ~kv_second if clean_first else kv_second
        q_token = torch.where(q_second, q_idx - seq_len, q_idx)
        kv_token = torch.where(kv_second, kv_idx - seq_len, kv_idx)
        q_block = q_token // block_size
        kv_block = kv_token // block_size
        # same half as `~(q ^ k)`: torch.compile's inductor (torch 2.13) fails on `==` between two boolean tensors
        block_diagonal = (q_block == kv_block) & ~(q_clean ^ kv_clean)
        offset_block_causal = (q_block > kv_block) & kv_clean & ~q_clean
        clean = (q_token >= kv_token) if causal else (q_block >= kv_block)
        clean_to_clean = clean & kv_clean & q_clean
        if causal:  # M_BD would let a clean token see the later clean tokens of its block
            block_diagonal = block_diagonal & ~q_clean
        return block_diagonal | offset_block_causal | clean_to_clean

    return mask_mod


def block_diffusion_mask(
    seq_len: int,
    block_size: int,
    device: torch.device | str | None = None,
    clean_attention: str = "block_causal",
    clean_first: bool = False,
) -> torch.BoolTensor:
    """Dense `(2L, 2L)` boolean mask of the vectorised `x_t ⊕ x_0` pass (`x_0 ⊕ x_t` with `clean_first`; module
    docstring)."""
    idx = torch.arange(2 * seq_len, device=device)
    mask_mod = block_diffusion_mask_mod(seq_len, block_size, clean_attention, clean_first)
    return mask_mod(None, None, idx[:, None], idx[None, :])


def block_causal_mask(
    q_len: int, block_size: int, past_len: int = 0, device: torch.device | str | None = None
) -> torch.BoolTensor:
    """Dense `(q_len, past_len + q_len)` block-causal mask of the sampling pass (the M_BC quadrant).

    The queries sit at positions `past_len .. past_len + q_len - 1` of a window whose first `past_len` tokens are
    committed, so every query may attend to all of them; among the new tokens, block `blk(i) = i // block_size`
    (counted from the start of the window) sees itself and earlier blocks.
    """
    q_pos = torch.arange(past_len, past_len + q_len, device=device)
    kv_pos = torch.arange(past_len + q_len, device=device)
    return (q_pos[:, None] // block_size) >= (kv_pos[None, :] // block_size)


def sampling_noisy_length(q_len: int, block_size: int, past_len: int, clean_attention: str) -> int:
    """How many trailing tokens of a sampling call are the noisy block (the rest are clean): under `"causal"` the last
    `min(block_size, q_len)`; under `"block_causal"` those in the block of the last token (blocks counted from the
    start of the window, as [`block_causal_mask`] counts them)."""
    if clean_attention == "causal":
        return min(block_size, q_len)
    end = past_len + q_len
    return end - max((end - 1) // block_size * block_size, past_len)


def causal_sampling_mask(
    q_len: int, block_size: int, past_len: int = 0, device: torch.device | str | None = None
) -> torch.BoolTensor:
    """Dense `(q_len, past_len + q_len)` mask of the sampling pass under `clean_attention="causal"`: every new token
    sees the committed tokens and the new tokens up to itself (causal), and the last `min(block_size, q_len)` new
    tokens (the noisy block) also see each other."""
    q_pos = torch.arange(past_len, past_len + q_len, device=device)
    kv_pos = torch.arange(past_len + q_len, device=device)
    noisy_start = past_len + q_len - min(block_size, q_len)
    noisy_pair = (q_pos[:, None] >= noisy_start) & (kv_pos[None, :] >= noisy_start)
    return (q_pos[:, None] >= kv_pos[None, :]) | noisy_pair


def with_key_padding(allowed: torch.BoolTensor, key_padding: torch.BoolTensor | None) -> torch.BoolTensor:
    """`(batch, 1, q, kv)` from a `(q, kv)` mask (`(1, 1, q, kv)` without padding): padded keys removed, each query
    keeps its own key (the last `q` keys are the queries') so that no softmax row is empty; the outputs of padding
    queries are never used."""
    q_len, kv_len = allowed.shape
    if key_padding is None:
        return allowed[None, None]
    diagonal = torch.zeros_like(allowed)
    diagonal[torch.arange(q_len), torch.arange(q_len) + (kv_len - q_len)] = True
    return ((allowed[None] & key_padding[:, None, :]) | diagonal[None])[:, None]


def flex_block_mask(
    mask_mod: Callable, key_padding: torch.BoolTensor | None, q_len: int, kv_len: int, device: torch.device
) -> object:
    """FlexAttention's `BlockMask` of `mask_mod`, with padded keys removed as in [`with_key_padding`]."""
    from torch.nn.attention.flex_attention import create_block_mask

    if key_padding is None:
        return create_block_mask(mask_mod, None, None, q_len, kv_len, device)
    offset = kv_len - q_len

    def padded(b, h, q_idx, kv_idx):
        return (mask_mod(b, h, q_idx, kv_idx) & key_padding[b, kv_idx]) | (q_idx + offset == kv_idx)

    return create_block_mask(padded, key_padding.shape[0], None, q_len, kv_len, device)


def vectorised_attention_mask(
    seq_len: int,
    block_size: int,
    key_padding: torch.BoolTensor | None,
    device: torch.device,
    flex: bool,
    clean_attention: str = "block_causal",
    clean_first: bool = False,
) -> object:
    """The `x_t ⊕ x_0` mask (`x_0 ⊕ x_t` with `clean_first`; 2L queries and keys), padded keys removed (`key_padding`
    covers the 2L columns): a FlexAttention `BlockMask` when `flex`, else a dense boolean `(batch or 1, 1, 2L, 2L)`
    mask."""
    if flex:
        mask_mod = block_diffusion_mask_mod(seq_len, block_size, clean_attention, clean_first)
        return flex_block_mask(mask_mod, key_padding, 2 * seq_len, 2 * seq_len, device)
    return with_key_padding(
        block_diffusion_mask(seq_len, block_size, device, clean_attention, clean_first), key_padding
    )


def sampling_attention_mask(
    q_len: int,
    block_size: int,
    past_len: int,
    key_padding: torch.BoolTensor | None,
    device: torch.device,
    flex: bool,
    clean_attention: str = "block_causal",
) -> object:
    """The mask of the sampling pass (`q_len` new tokens after `past_len` committed ones; block-causal, or
    [`causal_sampling_mask`] under `clean_attention="causal"`), padded keys removed (`key_padding` covers the
    `past_len + q_len` columns): a `BlockMask` when `flex`, else dense boolean."""
    build = causal_sampling_mask if clean_attention == "causal" else block_causal_mask
    allowed = build(q_len, block_size, past_len, device)
    if flex:

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed[q_idx, kv_idx]

        return flex_block_mask(mask_mod, key_padding, q_len, past_len + q_len, device)
    return with_key_padding(allowed, key_padding)


__all__ = [
    "CLEAN_ATTENTIONS",
    "block_causal_mask",
    "causal_sampling_mask",
    "block_diffusion_mask",
    "block_diffusion_mask_mod",
    "flex_block_mask",
    "sampling_attention_mask",
    "sampling_noisy_length",
    "vectorised_attention_mask",
    "with_key_padding",
]
