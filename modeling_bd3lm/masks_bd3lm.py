# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Attention masks of block diffusion (True = the query may attend to the key).

The vectorised training pass runs the network once on `x_t ⊕ x_0` (length 2L). With `is0(i) = i >= L` and
`blk(i) = (i - L·is0(i)) // L'` (Sec. 3.2 and Suppl. B.6 of Arriola et al., 2025):

* M_BD  (block-diagonal):       blk(q) == blk(k) and is0(q) == is0(k)
* M_OBC (offset block-causal):  blk(q) >  blk(k) and is0(k) and not is0(q)
* M_BC  (block-causal):         blk(q) >= blk(k) and is0(k) and is0(q)

so the full mask is [[M_BD, M_OBC], [0, M_BC]]: a noisy block sees itself and the clean blocks before it, and the
clean copy is an ordinary block-causal pass (which is why its keys and values can be cached at inference).
"""

from __future__ import annotations

from typing import Callable

import torch


def block_diffusion_mask_mod(seq_len: int, block_size: int) -> Callable:
    """The M_BD ∨ M_OBC ∨ M_BC predicate over indices of the 2L sequence, in FlexAttention `mask_mod` form."""

    def mask_mod(batch_idx, head_idx, q_idx, kv_idx):
        q_clean = q_idx >= seq_len
        kv_clean = kv_idx >= seq_len
        q_block = torch.where(q_clean, q_idx - seq_len, q_idx) // block_size
        kv_block = torch.where(kv_clean, kv_idx - seq_len, kv_idx) // block_size
        # same half as `~(q ^ k)`: torch.compile's inductor (torch 2.13) fails on `==` between two boolean tensors
        block_diagonal = (q_block == kv_block) & ~(q_clean ^ kv_clean)
        offset_block_causal = (q_block > kv_block) & kv_clean & ~q_clean
        block_causal = (q_block >= kv_block) & kv_clean & q_clean
        return block_diagonal | offset_block_causal | block_causal

    return mask_mod


def block_diffusion_mask(seq_len: int, block_size: int, device: torch.device | str | None = None) -> torch.BoolTensor:
    """Dense `(2L, 2L)` boolean mask of the vectorised `x_t ⊕ x_0` pass (module docstring)."""
    idx = torch.arange(2 * seq_len, device=device)
    return block_diffusion_mask_mod(seq_len, block_size)(None, None, idx[:, None], idx[None, :])


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


__all__ = ["block_diffusion_mask", "block_diffusion_mask_mod", "block_causal_mask"]
