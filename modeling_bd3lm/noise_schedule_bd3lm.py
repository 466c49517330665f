# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Masking noise schedules and the forward process q(x_t | x_0) of block diffusion.

Notation follows Arriola et al. (2025): t ∈ [0, 1] is the noise level of a block, α_t the probability that a
token is still clean, and each block b of L' tokens has its own t_b.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Floors the reference schedules use so that 1 / (1 - α_t) stays finite near t = 0.
_SCHEDULE_EPS = 1e-3
# Evaluation always uses the unbiased interval U[1e-3, 1] (the paper's perplexity protocol).
EVAL_NOISE_INTERVAL = (1e-3, 1.0)
_MAX_RESAMPLE_ROUNDS = 1000
# Every schedule name a config may carry ("linear" is the official alias of "loglinear").
NOISE_SCHEDULES = ("loglinear", "linear", "square", "square_root", "log", "cosine")


class BD3LMNoiseSchedule:
    """A masking schedule: `mask_probability(t) = 1 - α_t` and `loss_weight(t) = -α'_t / (1 - α_t)`.

    The block NELBO weights the cross-entropy of each masked token by `loss_weight(t_b)` (Eq. (8) of the paper, whose
    weight is α'_t / (1 - α_t) multiplying a log-likelihood; here it multiplies a negative log-likelihood, hence the
    sign). For the default log-linear schedule α_t = 1 - t, so the mask probability is t and the weight is 1 / t.

    Args:
        name (`str`): one of `"loglinear"` (alias `"linear"`), `"square"`, `"square_root"`, `"log"`, `"cosine"`.
    """

    def __init__(self, name: str = "loglinear") -> None:
        if name not in NOISE_SCHEDULES:
            raise ValueError(f"`noise_schedule`={name!r} is unknown; use one of {NOISE_SCHEDULES}.")
        if name == "linear":
            name = "loglinear"
        self.name = name

    def mask_probability(self, t: torch.Tensor) -> torch.Tensor:
        """1 - α_t, the probability that a token is masked at noise level t."""
        if self.name == "loglinear":
            return t
        if self.name == "square":
            return t.square().clamp_min(_SCHEDULE_EPS)
        if self.name == "square_root":
            return t.sqrt().clamp_min(_SCHEDULE_EPS)
        if self.name == "log":
            return torch.log1p(t) / math.log(2.0)
        return 1.0 - (1.0 - _SCHEDULE_EPS) * torch.cos(t * math.pi / 2)  # cosine

    def alpha_t(self, t: torch.Tensor) -> torch.Tensor:
        """α_t, the probability that a token is still clean."""
        return 1.0 - self.mask_probability(t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-α'_t / (1 - α_t): the positive NELBO weight of a masked token's cross-entropy."""
        p = self.mask_probability(t)
        if self.name == "loglinear":
            return 1.0 / t
        if self.name == "square":
            return 2.0 * t / p
        if self.name == "square_root":
            return 0.5 * t.rsqrt() / p
        if self.name == "log":
            return 1.0 / (p * math.log(2.0) * (1.0 + t))
        return (1.0 - _SCHEDULE_EPS) * torch.sin(t * math.pi / 2) * (math.pi / 2) / (p + _SCHEDULE_EPS)


def sample_noise_levels(
    batch_size: int,
    num_blocks: int,
    eps_min: float | torch.Tensor,
    eps_max: float | torch.Tensor,
    antithetic: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw one noise level per (sequence, block), t ∼ U[eps_min, eps_max].

    With `antithetic`, the N = batch·blocks draws are stratified jointly: cell j gets t_j = (u_j + j) / N, one draw per
    stratum of [0, 1) (the low-discrepancy sampler of the official code), then rescaled to the interval. The bounds may
    be Python floats or 0-d float32 tensors (the model's buffers); both give the same draws.

    Returns:
        `torch.FloatTensor` of shape `(batch_size, num_blocks)`.
    """
    n = batch_size * num_blocks
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    if antithetic:
        u = (u / n + torch.arange(n, device=u.device, dtype=torch.float32) / n) % 1.0
    if isinstance(eps_min, torch.Tensor) or isinstance(eps_max, torch.Tensor):
        # As for floats: the width is the float64 difference rounded once to float32, the bounds' own dtype.
        lo, hi = torch.as_tensor(eps_min, device=u.device), torch.as_tensor(eps_max, device=u.device)
        width = (hi.double() - lo.double()).float()
        return (lo.float() + width * u).view(batch_size, num_blocks)
    return (eps_min + (eps_max - eps_min) * u).view(batch_size, num_blocks)


def add_noise(
    x_0: torch.LongTensor,
    mask_probability: torch.Tensor,
    mask_token_id: int,
    block_size: int,
    resample_interval: tuple[float, float] | None = None,
    maskable: torch.BoolTensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    """Sample x_t ∼ q(x_t | x_0): each token is replaced by the mask token independently with its block's probability.

    q(x_t^ℓ | x^ℓ) = Cat(α_t·onehot(x^ℓ) + (1 - α_t)·onehot(m)) (Sec. 3 of the paper).

    Args:
        x_0 (`torch.LongTensor` of shape `(batch, seq_len)`): clean tokens.
        mask_probability (`torch.Tensor` of shape `(batch, seq_len // block_size)`): 1 - α_t per block.
        mask_token_id (`int`): the absorbing token m.
        block_size (`int`): L'.
        resample_interval (`tuple[float, float]`, *optional*): when given, blocks whose realised masked fraction lies
            outside [β, ω] are redrawn until every block is inside (the official `training.resample`).
        maskable (`torch.BoolTensor` of shape `(batch, seq_len)`, *optional*): positions that may be masked (False for
            padding or a kept BOS).
        generator (`torch.Generator`, *optional*): source of randomness.
    """
    batch, seq_len = x_0.shape
    num_blocks = seq_len // block_size
    p_tok = mask_probability.repeat_interleave(block_size, dim=1)  # (batch, seq_len)
    if maskable is None:
        maskable = torch.ones_like(x_0, dtype=torch.bool)
    move = (torch.rand(x_0.shape, generator=generator, device=x_0.device) < p_tok) & maskable
    if resample_interval is not None:
        beta, omega = resample_interval
        # Only fractions k / L' exist, so an interval that contains none of them could never be satisfied.
        if not any(beta <= k / block_size <= omega for k in range(block_size + 1)):
            raise ValueError(
                f"The resampling interval [{beta}, {omega}] contains no achievable mask fraction k/{block_size}; "
                "widen `sampling_eps_min/max` or set `resample=False`."
            )
        for _ in range(_MAX_RESAMPLE_ROUNDS):
            frac = move.view(batch, num_blocks, block_size).float().mean(-1)
            bad = (frac < beta) | (frac > omega)
            if not bad.any():
                break
            redraw = (torch.rand(x_0.shape, generator=generator, device=x_0.device) < p_tok) & maskable
            bad_tok = bad.repeat_interleave(block_size, dim=1)
            move = torch.where(bad_tok, redraw, move)
        else:
            raise RuntimeError(
                f"Rejection resampling into [{beta}, {omega}] did not converge in {_MAX_RESAMPLE_ROUNDS} rounds "
                "(blocks with padding or a kept BOS may be unable to reach the interval); set `resample=False`."
            )
    return torch.where(move, torch.full_like(x_0, mask_token_id), x_0)


# ----------------------------------------------------------------------------------------------------------------------
# The block NELBO's noise: the one place that draws it (training loss, schedule search, gradient variance, likelihood)


def _float32(value: float) -> float:
    """`value` rounded to float32, the dtype of the noise-interval buffers."""
    return float(torch.tensor(value, dtype=torch.float32))


def resampling_bounds(interval: tuple[float, float], resample: bool) -> tuple[float, float] | None:
    """The bounds that rejection resampling enforces on each block's masked fraction for `t ∼ U[interval]`, or None.

    None without `resample`, and for the unclipped interval [1e-3, 1]; a bound at the default end of the range is not
    enforced (0.0 instead of 1e-3, as upstream). Compared in float32, the buffers' dtype: 1e-3 reads back from them as
    0.0010000000475 and would otherwise count as clipped (every block would then need a masked token).
    """
    lo, hi = _float32(interval[0]), _float32(interval[1])
    floor, ceiling = (_float32(bound) for bound in EVAL_NOISE_INTERVAL)
    if not resample or (lo, hi) == (floor, ceiling):
        return None
    return (lo if lo > floor else 0.0, hi)


def first_real_tokens(x_0: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.BoolTensor:
    """The first real (not padding) token of every row, shape `(batch, seq_len)`: column 0 without a mask or in a
    right-padded row, the first column after the padding in a left-padded one. This is the token `ignore_bos` keeps
    clean and uncounted, so that a row scores the same whatever padding its batch gives it."""
    if attention_mask is None:
        first = torch.zeros(x_0.shape, dtype=torch.bool, device=x_0.device)
        first[:, 0] = True
        return first
    real = attention_mask.bool()
    return real & (real.long().cumsum(dim=1) == 1)


def nelbo_valid_mask(
    labels: torch.Tensor, attention_mask: torch.Tensor | None = None, ignore_bos: bool = False
) -> torch.BoolTensor:
    """The positions the block NELBO counts: labelled (not -100), not padding, and with `ignore_bos` not the first
    real token of the row ([`first_real_tokens`]).

    Shape `(batch, seq_len)`. The loss is the mean of the token terms over these positions.
    """
    valid = labels != -100
    if attention_mask is not None:
        valid = valid & attention_mask.bool()
    if ignore_bos:
        valid = valid & ~first_real_tokens(labels, attention_mask)
    return valid


def maskable_positions(
    x_0: torch.Tensor, attention_mask: torch.Tensor | None = None, ignore_bos: bool = False
) -> torch.BoolTensor:
    """The positions the forward process may mask: not padding, and with `ignore_bos` not the first real token of the
    row ([`first_real_tokens`])."""
    maskable = torch.ones_like(x_0, dtype=torch.bool) if attention_mask is None else attention_mask.bool().clone()
    if ignore_bos:
        maskable &= ~first_real_tokens(x_0, attention_mask)
    return maskable


def draw_noise(
    x_0: torch.LongTensor,
    config: Any,
    interval: tuple[float | torch.Tensor, float | torch.Tensor] = EVAL_NOISE_INTERVAL,
    maskable: torch.BoolTensor | None = None,
    noise_levels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    schedule: BD3LMNoiseSchedule | None = None,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Sample `(x_t, noise_levels)` for the block NELBO (Sec. 3.2 and Sec. 4 of Arriola et al., 2025).

    One t per (sequence, block), t ∼ U[β, ω] with [β, ω] = `interval` held in float32 (as the model's buffers hold
    the training interval), antithetic across the batch with `config.antithetic_sampling`; then x_t ∼ q(x_t | x_0)
    with rejection resampling into [β, ω] when `config.resample` and the interval is clipped ([`resampling_bounds`]).
    `config.always_mask` gives t ≡ 1 (every maskable token masked). Given `noise_levels` are used as they are, without
    resampling.

    Args:
        x_0 (`torch.LongTensor` of shape `(batch, seq_len)`): clean tokens; `seq_len` a multiple of `block_size`.
        config: a `BD3LMConfig` (`block_size`, `mask_token_id`, `antithetic_sampling`, `resample`, `always_mask`).
        interval (`tuple[float, float]`, defaults to `EVAL_NOISE_INTERVAL`): [β, ω]; in training, the training
            interval (floats, or the model's 0-d float32 buffers).
        maskable (`torch.BoolTensor` of shape `(batch, seq_len)`, *optional*): positions that may be masked
            ([`maskable_positions`]); all by default.
        noise_levels (`torch.Tensor` of shape `(batch, seq_len // block_size)`, *optional*): t, if already drawn.
        generator (`torch.Generator`, *optional*): the randomness, drawn on `x_0`'s device.
        schedule ([`BD3LMNoiseSchedule`], *optional*): defaults to `config.noise_schedule`'s.
    """
    batch, seq_len = x_0.shape
    num_blocks = seq_len // config.block_size
    bounds = None
    if noise_levels is None:
        if config.always_mask:
            noise_levels = torch.ones(batch, num_blocks, device=x_0.device)
        else:
            # Bounds held in float32, as the buffers hold the training interval; the buffers themselves may come as
            # 0-d tensors (no device sync, no graph break under torch.compile), which draw the same t.
            lo, hi = (bound if isinstance(bound, torch.Tensor) else _float32(bound) for bound in interval)
            noise_levels = sample_noise_levels(
                batch, num_blocks, lo, hi, config.antithetic_sampling, generator, x_0.device
            )
            if config.resample:  # rejection resampling is data-dependent: it never compiles into one graph anyway
                bounds = resampling_bounds((float(lo), float(hi)), True)
    if config.always_mask:
        mask_probability = torch.ones_like(noise_levels)
    else:
        schedule = schedule if schedule is not None else BD3LMNoiseSchedule(config.noise_schedule)
        mask_probability = schedule.mask_probability(noise_levels)
    x_t = add_noise(x_0, mask_probability, config.mask_token_id, config.block_size, bounds, maskable, generator)
    return x_t, noise_levels


__all__ = [
    "BD3LMNoiseSchedule",
    "EVAL_NOISE_INTERVAL",
    "NOISE_SCHEDULES",
    "add_noise",
    "draw_noise",
    "first_real_tokens",
    "maskable_positions",
    "nelbo_valid_mask",
    "resampling_bounds",
    "sample_noise_levels",
]
