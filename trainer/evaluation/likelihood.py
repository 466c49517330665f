# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Likelihood bounds of BD3-LM: the block NELBO (Arriola et al., 2025, Eq. (8)) of sequences and of continuations.

* [`nelbo`]: per-token and per-sequence NELBO of a batch, averaged over K jointly stratified Monte-Carlo draws of the
  noise levels t, or computed exactly by enumerating each block's mask patterns (`exact=True`, L' <= 8). It
  upper-bounds -log p_θ(x) in expectation; at L' = 1 with a time-independent log-linear model the t-integral is done
  analytically (t ≡ 1) and the value is the exact autoregressive NLL.
* [`score_continuations`]: the NELBO of a target given a clean context (block-aligned; sliding windows for long
  targets), with per-request seeds so that values do not depend on the batch: the basis of lm-eval's loglikelihood.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modeling_bd3lm.checks_bd3lm import is_int
from modeling_bd3lm.noise_schedule_bd3lm import EVAL_NOISE_INTERVAL, draw_noise, nelbo_valid_mask
from modeling_bd3lm.sampling_bd3lm import suppress_mask_logit

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class NELBOOutput:
    """Result of [`nelbo`].

    Args:
        per_token (`torch.FloatTensor` of shape `(batch, seq_len)`):
            The per-token NELBO terms `loss_weight(t_b) · 1[x_t^ℓ = m] · (-log p_θ(x^ℓ | x_t^b, x^{<b}))`,
            averaged over the draws; zero at positions that are not counted. Only sums over whole blocks are bounds.
        per_sequence (`torch.FloatTensor` of shape `(batch,)`):
            Sum of `per_token` over each sequence: the sequence NELBO in nats, E[·] >= -log p_θ(x).
        num_tokens (`torch.LongTensor` of shape `(batch,)`):
            Counted positions of each sequence (not padding, label != -100, not a kept BOS).
        per_draw (`torch.FloatTensor` of shape `(num_samples, batch)`):
            The per-sequence NELBO of every draw (each one alone is an unbiased estimate).
    """

    per_token: torch.Tensor
    per_sequence: torch.Tensor
    num_tokens: torch.Tensor
    per_draw: torch.Tensor

    @property
    def token_mean(self) -> float:
        """Σ per_sequence / Σ num_tokens: the token-mean NELBO of the batch (nats)."""
        return float(self.per_sequence.sum() / self.num_tokens.sum().clamp_min(1))


def stratified_noise_levels(
    num_samples: int,
    batch_size: int,
    num_blocks: int,
    generator: torch.Generator | None = None,
    antithetic: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Noise levels t ∼ U[1e-3, 1] for K draws of every (sequence, block) cell, stratified in two ways at once.

    With N = K·M draws for M = batch·blocks cells, draw k of cell c lands in the coarse stratum S_k(c) of [0, 1) cut
    in K (each cell's K draws cover all K coarse strata, in a random order), and inside it in the fine stratum
    R_{S}(c) of M (within one coarse stratum the M cells cover all M fine strata). So the N values hit each of the N
    strata of width 1/N once, as in the official batch-antithetic sampler, while every single draw of every cell is
    still marginally U[0, 1]: each per-draw, per-sequence value is an unbiased NELBO estimate (the official sampler
    gives cell 0 the lowest t every time).

    Returns:
        `torch.FloatTensor` of shape `(num_samples, batch_size, num_blocks)`.
    """
    k, m = num_samples, batch_size * num_blocks
    if antithetic:
        coarse = torch.rand(m, k, generator=generator, device=device).argsort(dim=1).T  # (K, M): a permutation per cell
        fine = torch.rand(k, m, generator=generator, device=device).argsort(dim=1)  # (K strata, M): perm. per stratum
        jitter = torch.rand(k, m, generator=generator, device=device)
        u = (coarse + (fine.gather(0, coarse) + jitter) / m) / k
    else:
        u = torch.rand(k, m, generator=generator, device=device)
    lo, hi = EVAL_NOISE_INTERVAL
    return (lo + (hi - lo) * u).view(k, batch_size, num_blocks)


def _is_deterministic(config: Any) -> bool:
    """t ≡ 1 gives the expected NELBO exactly: `always_mask`, or L' = 1 with a time-independent log-linear model.

    At L' = 1 a block is either masked (probability t, weight 1/t) or clean (zero loss), and a time-independent
    denoiser predicts the same distribution for every t: E_t[(1/t)·t·NLL] = NLL, the value at t = 1.
    """
    loglinear = getattr(config, "noise_schedule", "loglinear") in ("loglinear", "linear")
    return bool(config.always_mask) or (
        config.block_size == 1 and loglinear and not getattr(config, "time_conditioning", False)
    )


def _check_num_samples(num_samples: Any) -> int:
    if not is_int(num_samples) or num_samples < 1:
        raise ValueError(f"`num_samples` (K, the Monte-Carlo noise draws) must be an integer >= 1, got {num_samples!r}")
    return num_samples


@torch.no_grad()
def nelbo(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    num_samples: int = 1,
    generator: Generators = None,
    ignore_bos: bool | None = None,
    antithetic: bool | None = None,
    exact: bool = False,
) -> NELBOOutput:
    """Block NELBO (Eq. (8) of Arriola et al., 2025) of every sequence, averaged over K noise draws.

    L_BD(x) = Σ_b E_{t∼U[1e-3,1]} E_{q(x_t^b|x^b)} [loss_weight(t) · Σ_{ℓ∈b, x_t^ℓ=m} -log p_θ(x^ℓ | x_t^b, x^{<b})]

    The model runs in eval mode with its vectorised `x_t ⊕ x_0` pass. Sequences whose length is not a multiple of
    `block_size` are padded on the right (the last block is then a shorter diffusion); longer than `model_length` is an
    error (use [`dataset_perplexity`], which wraps, or [`score_continuations`], which slides).

    Args:
        model ([`BD3LMForMaskedDiffusion`]): the model.
        input_ids (`torch.LongTensor` of shape `(batch, seq_len)`): clean tokens x_0.
        attention_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): 0 for padding (never attended).
        labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): -100 marks positions that are
            conditioning only: kept clean in x_t and not counted (a prompt). Defaults to `input_ids`.
        num_samples (`int`, defaults to 1): K, the Monte-Carlo draws of (t, x_t) per sequence.
        generator (`torch.Generator` or a sequence of them, *optional*): randomness of t and of the masks, drawn on
            the generator's device (CPU when none is given). One generator per row makes each row's value independent
            of the batch it is in (then t is stratified across the K draws of a row only).
        ignore_bos (`bool`, *optional*): keep each row's first real token (after any left padding) clean and
            uncounted; defaults to `config.ignore_bos`.
        antithetic (`bool`, *optional*): stratify t ([`stratified_noise_levels`]); defaults to
            `config.antithetic_sampling`.
        exact (`bool`, defaults to `False`): compute the expectation exactly instead of by Monte-Carlo, by
            enumerating the 2^L' - 1 mask patterns of a block (all blocks at once: each is conditioned on clean
            previous blocks) with their t-integrated weights ([`mask_pattern_weights`]); 2^L' - 1 forward passes,
            so L' <= 8. Needs a time-independent denoiser. `num_samples` and the generator are then unused.
    """
    config = model.config
    num_samples = _check_num_samples(num_samples)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise TypeError("`input_ids` must be an integer tensor of shape (batch, seq_len).")
    batch, seq_len = input_ids.shape
    if batch == 0 or seq_len == 0:
        raise ValueError(f"`input_ids` is empty (shape {tuple(input_ids.shape)}); pass at least one token.")
    if seq_len > config.model_length:
        raise ValueError(
            f"`input_ids` has {seq_len} tokens, more than `model_length`={config.model_length}; use "
            "`dataset_perplexity` (wraps documents) or `score_continuations` (sliding window)."
        )
    ignore_bos = config.ignore_bos if ignore_bos is None else ignore_bos
    if config.ignore_bos and not ignore_bos:
        raise ValueError(
            "`ignore_bos=False` is impossible for a model with `config.ignore_bos=True`: it never scores a row's first token."
        )
    antithetic = config.antithetic_sampling if antithetic is None else antithetic
    if generator is not None and not isinstance(generator, torch.Generator):
        generator = list(generator)
        if len(generator) != batch:
            raise ValueError(f"Pass one generator per row: got {len(generator)} for a batch of {batch}.")

    # 1. pad to whole blocks; counted positions are real, labelled and (with ignore_bos) not the row's first real one
    device = model.device
    bs = config.block_size
    pad = -seq_len % bs
    x_0 = F.pad(input_ids.to(device), (0, pad), value=0)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    mask = F.pad(mask.to(device).long(), (0, pad), value=0)
    labels = x_0.clone() if labels is None else F.pad(labels.to(device), (0, pad), value=-100)
    counted = nelbo_valid_mask(labels, mask, ignore_bos)
    labels = labels.masked_fill(~counted, -100)
    num_blocks = x_0.shape[1] // bs

    if exact and not _is_deterministic(config):
        per_token = _enumerated_nelbo(model, x_0, mask, counted)[:, :seq_len]
        per_sequence = per_token.sum(1)
        return NELBOOutput(per_token, per_sequence, counted[:, :seq_len].sum(1), per_sequence.expand(num_samples, -1))

    # 2. K draws; deterministic models need one
    draws = 1 if _is_deterministic(config) else num_samples
    if _is_deterministic(config):
        levels = torch.ones(1, batch, num_blocks)
    elif isinstance(generator, list):
        # Draw over each row's own blocks only, so that its value does not depend on the batch's padded width.
        row_blocks = [_round_up(int(m.nonzero().max()) + 1, bs) // bs if m.any() else 0 for m in mask.cpu()]
        levels = torch.ones(draws, batch, num_blocks)
        for i, (g, nb) in enumerate(zip(generator, row_blocks)):
            levels[:, i, :nb] = stratified_noise_levels(draws, 1, nb, g, antithetic, g.device)[:, 0].cpu()
    else:
        noise_device = generator.device if generator is not None else "cpu"
        levels = stratified_noise_levels(draws, batch, num_blocks, generator, antithetic, noise_device)
    per_draw, total = [], torch.zeros(x_0.shape, dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        for k in range(draws):
            t = levels[k]
            x_t = _draw_x_t(model, x_0, t, counted, generator)
            out = model(
                x_0,
                noisy_input_ids=x_t,
                attention_mask=mask,
                labels=labels,
                noise_levels=t.to(device),
                return_dict=True,
            )
            token_loss = out.token_loss.float()
            total += token_loss
            per_draw.append(token_loss.sum(1))
    finally:
        model.train(was_training)
    per_token = (total / draws)[:, :seq_len]
    per_draw_t = torch.stack(per_draw).repeat(num_samples // draws, 1)
    return NELBOOutput(per_token, per_token.sum(1), counted[:, :seq_len].sum(1), per_draw_t)


def mask_pattern_weights(schedule: Any, block_size: int, grid_points: int = 20_001) -> torch.Tensor:
    """c[n, k] = E_{t∼U[1e-3,1]}[loss_weight(t) · p_t^k (1 - p_t)^(n-k)]: the weight of one given pattern of k masked
    tokens among n maskable ones of a block, where p_t is the mask probability (trapezoid rule in t).

    Summing c[n, |S|] · Σ_{ℓ∈S} -log p_θ(x^ℓ | x masked at S) over the non-empty patterns S gives the block's NELBO
    expectation exactly. For the log-linear schedule c[n, k] = ∫ t^(k-1) (1-t)^(n-k) dt / (1 - 1e-3).
    """
    lo, hi = EVAL_NOISE_INTERVAL
    t = torch.linspace(lo, hi, grid_points, dtype=torch.float64)
    p, w = schedule.mask_probability(t), schedule.loss_weight(t)
    table = torch.zeros(block_size + 1, block_size + 1, dtype=torch.float64)
    for n in range(1, block_size + 1):
        for k in range(1, n + 1):
            table[n, k] = torch.trapezoid(w * p**k * (1 - p) ** (n - k), t) / (hi - lo)
    return table


def _enumerated_nelbo(model, x_0, mask, counted) -> torch.Tensor:
    """Exact per-token NELBO terms by enumerating each block's mask patterns (see `nelbo(exact=True)`)."""
    config = model.config
    bs, batch, length = config.block_size, x_0.shape[0], x_0.shape[1]
    if bs > 8:
        raise ValueError(f"`exact=True` needs 2^block_size - 1 forward passes; block_size={bs} is too large (<= 8).")
    if getattr(config, "time_conditioning", False):
        raise ValueError("`exact=True` assumes a time-independent denoiser; this model has `time_conditioning=True`.")
    table = mask_pattern_weights(model.noise_schedule, bs).to(x_0.device)
    blocks = counted.view(batch, -1, bs)
    maskable = blocks.sum(-1)  # n per block
    # A pattern's bits on unmaskable positions change nothing: each subset S appears 2^(L' - n) times.
    duplicates = 2.0 ** (bs - maskable).double()
    total = torch.zeros(x_0.shape, dtype=torch.float64, device=x_0.device)
    was_training = model.training
    model.eval()
    try:
        for pattern in range(1, 2**bs):
            bits = torch.tensor([(pattern >> j) & 1 for j in range(bs)], dtype=torch.bool, device=x_0.device)
            move = bits.repeat(length // bs)[None] & counted
            if not move.any():
                continue
            x_t = x_0.masked_fill(move, config.mask_token_id)
            logits = model(x_0, noisy_input_ids=x_t, attention_mask=mask, return_dict=True).logits.float()
            logits = suppress_mask_logit(logits, config.mask_token_id)  # SUBS: the mask is never predicted
            nll = -torch.log_softmax(logits, -1).gather(-1, x_0[..., None])[..., 0].double()
            weight = table[maskable, move.view(batch, -1, bs).sum(-1)] / duplicates  # (batch, blocks)
            total += torch.where(move, weight.repeat_interleave(bs, 1) * nll, torch.zeros_like(nll))
    finally:
        model.train(was_training)
    return total.float()


def _draw_x_t(model, x_0, noise_levels, maskable, generator: Generators) -> torch.LongTensor:
    """x_t ∼ q(x_t | x_0) at the given t with `draw_noise` (the training estimator's forward process, no resampling:
    the interval is the unclipped one), drawn on the generator's device (CPU by default: same draws on every
    accelerator). Only `maskable` positions (the counted ones) are masked: a prompt stays clean."""
    config, schedule, block_size = model.config, model.noise_schedule, model.config.block_size
    if isinstance(generator, list):
        x_t = x_0.clone()
        for i, g in enumerate(generator):
            # only up to the row's last maskable block: the draws must not depend on the batch's padded width
            n = _round_up(int(maskable[i].nonzero().max()) + 1, block_size) if maskable[i].any() else 0
            row = draw_noise(
                x_0[i : i + 1, :n].to(g.device),
                config,
                EVAL_NOISE_INTERVAL,
                maskable[i : i + 1, :n].to(g.device),
                noise_levels[i : i + 1, : n // block_size].to(g.device),
                g,
                schedule,
            )[0]
            x_t[i, :n] = row[0]
        return x_t
    noise_device = generator.device if generator is not None else torch.device("cpu")
    x_t, _ = draw_noise(
        x_0.to(noise_device),
        config,
        EVAL_NOISE_INTERVAL,
        maskable.to(noise_device),
        noise_levels.to(noise_device),
        generator,
        schedule,
    )
    return x_t.to(x_0.device)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_windows(
    context: Sequence[int], target: Sequence[int], model_length: int, block_size: int, stride: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Cut the scoring of `target` given `context` into windows that fit `model_length`, target chunks block-aligned.

    A target that fits after one block of context is scored in one window; a longer one in chunks of `stride` tokens
    (default `model_length // 2`), each preceded by as much of the text before it as fits. Every target token is
    scored once and the chunk NELBOs add up to a bound on -log q(target | context) for the sliding-window model q.

    Returns:
        `[(window_context, chunk), ...]` with `len(pad(window_context)) + len(pad(chunk)) <= model_length`.
    """
    context, target = list(context), list(target)
    if _round_up(len(target), block_size) + block_size <= model_length:
        chunk = len(target)
    else:
        chunk = stride if stride is not None else max(block_size, model_length // 2 // block_size * block_size)
        if not 1 <= chunk <= model_length - block_size:
            limit = model_length - block_size
            raise ValueError(f"`stride`={stride} must be in [1, model_length - block_size] = [1, {limit}].")
    windows = []
    for start in range(0, len(target), chunk):
        piece = target[start : start + chunk]
        room = model_length - _round_up(len(piece), block_size)
        prefix = (context + target[:start])[-room:] if room > 0 else []
        windows.append((prefix, piece))
    return windows


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    num_samples: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    stride: int | None = None,
    check_greedy: bool = False,
    pad_token_id: int = 0,
    progress: bool = False,
    exact: bool = False,
) -> list[tuple[float, bool | None]]:
    """NELBO of each `target` given its clean `context`: `(nelbo_nats, is_greedy)` per pair.

    The context is left-padded so that the target starts at a block boundary; context tokens stay clean and
    uncounted, so the value bounds -log p_θ(target | context) under the block factorisation (exact at L' = 1 with
    t ≡ 1; otherwise Monte-Carlo with `num_samples` draws, or the exact expectation over the noise with `exact`). Each
    window gets its own generator seeded from `seed` and its tokens, so scores do not depend on the batch size or on the
    other requests. `is_greedy` (with `check_greedy`) asks whether every target token is the argmax of its prediction
    with its whole block masked and the previous blocks clean: the greedy test of autoregressive models at L' = 1, a
    one-step (stricter) greedy test for L' > 1.
    """
    config = model.config
    bs, length = config.block_size, config.model_length
    for i, (_context, target) in enumerate(pairs):
        if len(target) == 0:
            raise ValueError(f"Pair {i} has an empty target: nothing to score.")
    windows = [
        (i, ctx, tgt)
        for i, (context, target) in enumerate(pairs)
        for ctx, tgt in plan_windows(context, target, length, bs, stride)
    ]
    windows.sort(key=lambda w: -(len(w[1]) + len(w[2])))  # similar lengths together: less padding
    totals = [0.0] * len(pairs)
    greedy: list[bool | None] = [True if check_greedy else None] * len(pairs)
    for start in tqdm(range(0, len(windows), batch_size), disable=not progress, desc="scoring"):
        chunk = windows[start : start + batch_size]
        # Each row: context left-padded to whole blocks, so that its target starts on a block boundary; then the
        # target, right-padded to the batch width (padding is never attended, so mixed padding is harmless).
        width = max(_round_up(len(ctx), bs) + _round_up(len(tgt), bs) for _, ctx, tgt in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for r, (_, ctx, tgt) in enumerate(chunk):
            begin = _round_up(len(ctx), bs)
            end = begin + len(tgt)
            ids[r, begin - len(ctx) : end] = torch.tensor([*ctx, *tgt], dtype=torch.long)
            mask[r, begin - len(ctx) : end] = 1
            labels[r, begin:end] = ids[r, begin:end]
        gens = [torch.Generator().manual_seed(_row_seed(seed, ctx, tgt)) for _, ctx, tgt in chunk]
        out = nelbo(model, ids, mask, labels, num_samples, gens, exact=exact)
        hits = _greedy_hits(model, ids, mask, labels) if check_greedy else None
        for r, (i, _, _) in enumerate(chunk):
            totals[i] += float(out.per_sequence[r])
            if hits is not None:
                greedy[i] = bool(greedy[i] and hits[r])
    return list(zip(totals, greedy))


def _row_seed(seed: int, context: Sequence[int], target: Sequence[int]) -> int:
    data = torch.tensor([len(context), *context, *target], dtype=torch.int64).numpy().tobytes()
    return (zlib.crc32(data) + 1_000_003 * seed) % (2**63)


def _greedy_hits(model, ids, mask, labels) -> torch.BoolTensor:
    """Whether each row's labelled tokens are the argmax with their blocks fully masked (see `score_continuations`)."""
    device = model.device
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    scored = labels != -100
    x_t = ids.masked_fill(scored, model.config.mask_token_id)
    logits = model(ids, noisy_input_ids=x_t, attention_mask=mask, return_dict=True).logits.float()
    logits = suppress_mask_logit(logits, model.config.mask_token_id)
    return ((logits.argmax(-1) == ids) | ~scored).all(dim=1).cpu()


__all__ = [
    "NELBOOutput",
    "mask_pattern_weights",
    "nelbo",
    "plan_windows",
    "score_continuations",
    "stratified_noise_levels",
]
