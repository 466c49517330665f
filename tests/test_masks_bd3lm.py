"""The attention masks equal their formulas (Arriola et al., 2025, Sec. 3.2 / Suppl. B.6)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_bd3lm import block_causal_mask, block_diffusion_mask


@st.composite
def lengths_and_block_sizes(draw) -> tuple[int, int]:
    block_size = draw(st.integers(1, 8))
    return block_size * draw(st.integers(1, 8)), block_size


def reference_mask(seq_len: int, block_size: int) -> list[list[bool]]:
    """The three-part mask written out index by index."""
    out = []
    for q in range(2 * seq_len):
        row = []
        for k in range(2 * seq_len):
            q0, k0 = q >= seq_len, k >= seq_len
            bq, bk = (q - seq_len * q0) // block_size, (k - seq_len * k0) // block_size
            m_bd = bq == bk and q0 == k0
            m_obc = bq > bk and k0 and not q0
            m_bc = bq >= bk and k0 and q0
            row.append(m_bd or m_obc or m_bc)
        out.append(row)
    return out


@settings(max_examples=40, deadline=None)
@given(lengths_and_block_sizes())
def test_block_diffusion_mask_equals_formula(shape):
    seq_len, block_size = shape
    assert block_diffusion_mask(seq_len, block_size).tolist() == reference_mask(seq_len, block_size)


@settings(max_examples=40, deadline=None)
@given(lengths_and_block_sizes())
def test_block_diffusion_mask_structure(shape):
    seq_len, block_size = shape
    mask = block_diffusion_mask(seq_len, block_size)
    x_t_to_x_t, x_t_to_x_0 = mask[:seq_len, :seq_len], mask[:seq_len, seq_len:]
    x_0_to_x_t, x_0_to_x_0 = mask[seq_len:, :seq_len], mask[seq_len:, seq_len:]
    assert not x_0_to_x_t.any()  # the clean stream never sees noisy tokens
    assert torch.equal(x_0_to_x_0, block_causal_mask(seq_len, block_size))  # it is the sampling pass
    blocks = torch.arange(seq_len) // block_size
    assert torch.equal(x_t_to_x_t, blocks[:, None] == blocks[None, :])  # noisy tokens: own block only
    assert torch.equal(x_t_to_x_0, blocks[:, None] > blocks[None, :])  # and strictly earlier clean blocks
    if block_size == seq_len:  # MDLM: two independent bidirectional copies
        assert x_t_to_x_t.all() and not x_t_to_x_0.any()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(0, 24), st.integers(1, 24))
def test_block_causal_mask_with_committed_prefix(block_size, past_len, q_len):
    mask = block_causal_mask(q_len, block_size, past_len)
    assert mask.shape == (q_len, past_len + q_len)
    full = block_causal_mask(past_len + q_len, block_size)
    assert torch.equal(mask, full[past_len:])  # the cached call sees exactly the rows of the uncached window
