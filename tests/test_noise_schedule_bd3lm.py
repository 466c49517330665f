"""Noise schedules, the antithetic noise sampler and the forward process q(x_t | x_0)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_bd3lm import BD3LMNoiseSchedule, add_noise, sample_noise_levels


@pytest.mark.parametrize("name", ["loglinear", "square", "square_root", "log", "cosine"])
def test_loss_weight_is_minus_alpha_prime_over_one_minus_alpha(name):
    schedule = BD3LMNoiseSchedule(name)
    # away from the clamps of square / square_root, where the reference formula is defined piecewise
    t = torch.linspace(0.1, 0.99, 50, dtype=torch.float64, requires_grad=True)
    alpha = schedule.alpha_t(t)
    (d_alpha,) = torch.autograd.grad(alpha.sum(), t)
    expected = -d_alpha / (1 - alpha)
    if name == "cosine":  # the reference adds eps in the denominator for stability
        expected = -d_alpha / (1 - alpha + 1e-3)
    torch.testing.assert_close(schedule.loss_weight(t.detach()), expected.detach(), rtol=1e-9, atol=1e-9)


def test_loglinear_is_alpha_one_minus_t():
    t = torch.rand(100)
    schedule = BD3LMNoiseSchedule("linear")
    torch.testing.assert_close(schedule.alpha_t(t), 1 - t)
    torch.testing.assert_close(schedule.loss_weight(t), 1 / t)


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="noise_schedule"):
        BD3LMNoiseSchedule("zigzag")


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.floats(0.0, 0.5), st.floats(0.5, 1.0))
def test_antithetic_draws_one_per_stratum(batch, blocks, lo, hi):
    t = sample_noise_levels(batch, blocks, lo, hi, antithetic=True, generator=torch.Generator().manual_seed(0))
    assert t.shape == (batch, blocks)
    assert t.min() >= lo and t.max() <= hi
    n = batch * blocks
    if hi - lo > 1e-3:
        strata = ((t.flatten().double() - lo) / (hi - lo) * n).floor().clamp(max=n - 1)
        assert sorted(strata.tolist()) == list(range(n))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_add_noise_masks_only_maskable_positions(block_size, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.randint(0, 50, (3, block_size * blocks), generator=g)
    p = torch.rand(3, blocks, generator=g)
    maskable = torch.rand(x_0.shape, generator=g) < 0.7
    x_t = add_noise(x_0, p, 63, block_size, maskable=maskable, generator=g)
    changed = x_t != x_0
    assert torch.all(x_t[changed] == 63)
    assert not changed[~maskable].any()


def test_add_noise_frequency_matches_probability():
    x_0 = torch.zeros(2000, 8, dtype=torch.long)
    p = torch.tensor([[0.2, 0.8]]).expand(2000, 2)
    x_t = add_noise(x_0, p, 63, 4, generator=torch.Generator().manual_seed(0))
    rate = (x_t == 63).float().view(2000, 2, 4).mean(dim=(0, 2))
    torch.testing.assert_close(rate, torch.tensor([0.2, 0.8]), atol=0.02, rtol=0)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 8), st.integers(0, 2**31 - 1))
def test_resampling_lands_every_block_in_the_interval(block_size, seed):
    lo, hi = 0.3, 0.8
    if not any(lo <= k / block_size <= hi for k in range(block_size + 1)):
        return
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.randint(0, 50, (4, block_size * 5), generator=g)
    p = lo + (hi - lo) * torch.rand(4, 5, generator=g)
    x_t = add_noise(x_0, p, 63, block_size, resample_interval=(lo, hi), generator=g)
    frac = (x_t == 63).float().view(4, 5, block_size).mean(-1)
    assert torch.all((frac >= lo) & (frac <= hi))


def test_resampling_into_an_unreachable_interval_raises():
    with pytest.raises(ValueError, match="sampling_eps"):
        add_noise(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), 0.7), 63, 1, resample_interval=(0.45, 0.95))
