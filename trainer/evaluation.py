# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Evaluation of BD3-LM: block-NELBO likelihood bounds, (zero-shot) perplexity and generative perplexity.

* [`nelbo`]: per-token and per-sequence block NELBO of a batch (Arriola et al., 2025, Eq. (8)), averaged over K
  jointly stratified Monte-Carlo draws of the noise levels t. It upper-bounds -log p_θ(x) in expectation; at L' = 1
  with a time-independent log-linear model the t-integral is done analytically (t ≡ 1) and the value is the exact
  autoregressive NLL.
* [`dataset_perplexity`]: the paper's test-perplexity protocol on any local or Hub dataset: documents tokenized
  without specials, EOS appended, concatenated and wrapped to `model_length`; PPL bound = exp(token-mean NELBO).
* [`generative_perplexity`]: sample quality judged by a causal LM (the paper uses GPT-2 large), with a sliding window
  and the corpus-level exp(total NLL / total tokens), plus unigram entropy and network calls per token.
* [`add_eval_arguments`] / [`run_eval`]: the `bd3lm eval` command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modeling_bd3lm.noise_schedule_bd3lm import EVAL_NOISE_INTERVAL, add_noise

from .generative_perplexity import (
    GenerativePerplexityResult,
    generative_perplexity,
    judge_windows,
    network_calls_per_token,
    unigram_entropy,
)

Generators = torch.Generator | Sequence[torch.Generator] | None

#: Folder of the `evaluate` metric module of the per-token NELBO: `evaluate.load(NELBO_METRIC_PATH)` (works offline).
NELBO_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "bd3lm_nelbo")

# ----------------------------------------------------------------------------------------------------------------------
# Likelihood


@dataclass
class NELBOOutput:
    """Result of [`nelbo`].

    Args:
        per_token (`torch.FloatTensor` of shape `(batch, seq_len)`):
            The per-token NELBO terms `loss_weight(t_b) · 1[x_t^ℓ = m] · (-log p_θ(x^ℓ | x_t^b, x^{<b}))`, averaged
            over the draws; zero at positions that are not counted. Only sums over whole blocks are bounds.
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
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` (K, the Monte-Carlo noise draws) must be an integer >= 1, got {num_samples!r}.")
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
) -> NELBOOutput:
    """Block NELBO (Eq. (8) of Arriola et al., 2025) of every sequence, averaged over K noise draws.

    L_BD(x) = Σ_b E_{t∼U[1e-3,1]} E_{q(x_t^b|x^b)} [ loss_weight(t) · Σ_{ℓ∈b, x_t^ℓ=m} -log p_θ(x^ℓ | x_t^b, x^{<b}) ]

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
        ignore_bos (`bool`, *optional*): keep position 0 clean and uncounted; defaults to `config.ignore_bos`.
        antithetic (`bool`, *optional*): stratify t ([`stratified_noise_levels`]); defaults to
            `config.antithetic_sampling`.
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
        raise ValueError("`ignore_bos=False` is impossible for a model with `config.ignore_bos=True`: it never scores position 0.")
    antithetic = config.antithetic_sampling if antithetic is None else antithetic
    if generator is not None and not isinstance(generator, torch.Generator):
        generator = list(generator)
        if len(generator) != batch:
            raise ValueError(f"Pass one generator per row: got {len(generator)} for a batch of {batch}.")

    # 1. pad to whole blocks; counted positions are real, labelled and (with ignore_bos) not the first
    device = model.device
    bs = config.block_size
    pad = -seq_len % bs
    x_0 = F.pad(input_ids.to(device), (0, pad), value=0)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    mask = F.pad(mask.to(device).long(), (0, pad), value=0)
    labels = x_0.clone() if labels is None else F.pad(labels.to(device), (0, pad), value=-100)
    labels = labels.masked_fill(mask == 0, -100)
    if ignore_bos:
        labels[:, 0] = -100
    counted = labels != -100
    num_blocks = x_0.shape[1] // bs

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
            p = torch.ones_like(t) if config.always_mask else model.noise_schedule.mask_probability(t)
            x_t = _draw_x_t(x_0, p, config.mask_token_id, bs, counted, generator)
            out = model(
                x_0, noisy_input_ids=x_t, attention_mask=mask, labels=labels, noise_levels=t.to(device), return_dict=True
            )
            token_loss = out.token_loss.float()
            total += token_loss
            per_draw.append(token_loss.sum(1))
    finally:
        model.train(was_training)
    per_token = (total / draws)[:, :seq_len]
    per_draw_t = torch.stack(per_draw).repeat(num_samples // draws, 1)
    return NELBOOutput(per_token, per_token.sum(1), counted[:, :seq_len].sum(1), per_draw_t)


def _draw_x_t(x_0, p, mask_token_id, block_size, maskable, generator: Generators) -> torch.LongTensor:
    """x_t ∼ q(x_t | x_0) drawn on the generator's device (CPU by default: same draws on every accelerator)."""
    if isinstance(generator, list):
        x_t = x_0.clone()
        for i, g in enumerate(generator):
            # only up to the row's last maskable block: the draws must not depend on the batch's padded width
            n = _round_up(int(maskable[i].nonzero().max()) + 1, block_size) if maskable[i].any() else 0
            x_t[i, :n] = add_noise(x_0[i : i + 1, :n].to(g.device), p[i : i + 1, : n // block_size].to(g.device),
                                   mask_token_id, block_size, None, maskable[i : i + 1, :n].to(g.device), g)[0]
        return x_t
    noise_device = generator.device if generator is not None else torch.device("cpu")
    x_t = add_noise(x_0.to(noise_device), p.to(noise_device), mask_token_id, block_size, None,
                    maskable.to(noise_device), generator)
    return x_t.to(x_0.device)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_windows(
    context: Sequence[int], target: Sequence[int], model_length: int, block_size: int, stride: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Cut the scoring of `target` given `context` into windows that fit `model_length`, each target chunk block-aligned.

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
            raise ValueError(f"`stride`={stride} must be in [1, model_length - block_size = {model_length - block_size}].")
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
) -> list[tuple[float, bool | None]]:
    """NELBO of each `target` given its clean `context`: `(nelbo_nats, is_greedy)` per pair.

    The context is left-padded so that the target starts at a block boundary; context tokens stay clean and
    uncounted, so the value bounds -log p_θ(target | context) under the block factorisation (exact at L' = 1 with
    t ≡ 1, Monte-Carlo with `num_samples` draws otherwise). Each window gets its own generator seeded from `seed` and its
    tokens, so scores do not depend on the batch size or on the other requests. `is_greedy` (with `check_greedy`)
    asks whether every target token is the argmax of its prediction with its whole block masked and the previous
    blocks clean: the greedy test of autoregressive models at L' = 1, a one-step (stricter) greedy test for L' > 1.
    """
    config = model.config
    bs, length = config.block_size, config.model_length
    for i, (context, target) in enumerate(pairs):
        if len(target) == 0:
            raise ValueError(f"Pair {i} has an empty target: nothing to score.")
    windows = [
        (i, ctx, tgt) for i, (context, target) in enumerate(pairs) for ctx, tgt in plan_windows(context, target, length, bs, stride)
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
        out = nelbo(model, ids, mask, labels, num_samples, gens)
        hits = _greedy_hits(model, ids, mask, labels) if check_greedy else None
        for r, (i, _, _) in enumerate(chunk):
            totals[i] += float(out.per_sequence[r])
            if hits is not None:
                greedy[i] = bool(greedy[i] and hits[r])
    return list(zip(totals, greedy))


def _row_seed(seed: int, context: Sequence[int], target: Sequence[int]) -> int:
    import zlib

    data = torch.tensor([len(context), *context, *target], dtype=torch.int64).numpy().tobytes()
    return (zlib.crc32(data) + 1_000_003 * seed) % (2**63)


def _greedy_hits(model, ids, mask, labels) -> torch.BoolTensor:
    """Whether each row's labelled tokens are the argmax with their blocks fully masked (see `score_continuations`)."""
    device = model.device
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    scored = labels != -100
    x_t = ids.masked_fill(scored, model.config.mask_token_id)
    logits = model(ids, noisy_input_ids=x_t, attention_mask=mask, return_dict=True).logits.float()
    logits[..., model.config.mask_token_id] = float("-inf")
    return ((logits.argmax(-1) == ids) | ~scored).all(dim=1).cpu()


# ----------------------------------------------------------------------------------------------------------------------
# Datasets and zero-shot perplexity


def load_eval_dataset(dataset: Any, split: str | None = None, config_name: str | None = None):
    """Resolve a `datasets.Dataset`, a `DatasetDict`, a list of strings, `"bd3lm-corpus"` (the embedded corpus), a local
    file or folder, or a Hub dataset name (needs the network or the local cache) to one split.

    The split defaults to `test`, then `validation`, then `train`, whichever exists.
    """
    import datasets

    if isinstance(dataset, os.PathLike):
        dataset = os.fspath(dataset)
    if isinstance(dataset, (list, tuple)):
        return datasets.Dataset.from_dict({"text": list(dataset)})
    if isinstance(dataset, str):
        if dataset == "bd3lm-corpus":
            from .corpus import load_corpus

            return load_corpus(split or "validation")
        from .data import load_text_dataset

        if os.path.isfile(os.path.expanduser(dataset)):
            return load_text_dataset(dataset)
        if os.path.isdir(dataset) and os.path.exists(os.path.join(dataset, "dataset_info.json")):
            dataset = datasets.load_from_disk(dataset)
        elif split is not None:
            return load_text_dataset(dataset, split=split, dataset_config_name=config_name)
        else:  # every split, to pick the evaluation one below
            dataset = datasets.load_dataset(dataset, config_name)
    if isinstance(dataset, datasets.DatasetDict):
        if split is None:
            split = next((s for s in ("test", "validation", "train") if s in dataset), None)
        if split not in dataset:
            raise ValueError(f"`split`={split!r} is not in the dataset; available: {sorted(dataset)}.")
        dataset = dataset[split]
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"Unsupported dataset {type(dataset).__name__}: pass a Dataset, a path, a Hub name or texts.")
    return dataset


def wrap_documents(
    documents: Sequence[Sequence[int]], length: int, eos_token_id: int | None, wrap: bool = True
) -> list[list[int]]:
    """The paper's data wrapping: EOS after every document, concatenate, cut into `length`-token chunks.

    Unlike training, the last partial chunk is kept (every token is scored). With `wrap=False` each document is
    chunked on its own, with no context across documents.
    """
    suffix = [] if eos_token_id is None else [eos_token_id]
    if wrap:
        stream = [tok for doc in documents for tok in (*doc, *suffix)]
        return [stream[i : i + length] for i in range(0, len(stream), length)]
    chunks = []
    for doc in documents:
        doc = [*doc, *suffix]
        chunks.extend(doc[i : i + length] for i in range(0, len(doc), length))
    return chunks


@dataclass
class PerplexityResult:
    """Result of [`dataset_perplexity`]: `nelbo` is the token-mean NELBO (nats), `perplexity` = exp(nelbo) bounds the
    model's perplexity (in expectation over the noise draws)."""

    nelbo: float
    perplexity: float
    num_tokens: int
    num_sequences: int
    num_samples: int
    std_error: float  # of the token-mean over sequences (sampling + noise), nats

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def dataset_perplexity(
    model: torch.nn.Module,
    dataset: Any,
    tokenizer: Any = None,
    batch_size: int = 8,
    num_samples: int = 1,
    seed: int = 0,
    ignore_bos: bool | None = None,
    split: str | None = None,
    text_column: str = "text",
    config_name: str | None = None,
    wrap: bool = True,
    max_documents: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """(Zero-shot) perplexity bound of `model` on a dataset, following the paper's protocol (Sec. 6.1).

    Documents are tokenized without special tokens, EOS is appended, and they are concatenated and wrapped into
    `model_length` chunks; each chunk gets K = `num_samples` noise draws ([`nelbo`]); the result is the token mean of
    the NELBO over the whole split and PPL = exp(mean). A dataset with an `input_ids` column is used as tokenized.

    Args:
        dataset: see [`load_eval_dataset`]. tokenizer: needed for text datasets.
        seed (`int`): seeds the CPU generator of all draws (reproducible across devices).
        ignore_bos (`bool`, *optional*): drop each chunk's first token (kept clean) from the mean; defaults to
            `config.ignore_bos` (the official evaluation does it for OWT).
    """
    num_samples = _check_num_samples(num_samples)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
    data = load_eval_dataset(dataset, split, config_name)
    if max_documents is not None:
        data = data.select(range(min(max_documents, len(data))))
    if "input_ids" in data.column_names:
        documents = [list(ids) for ids in data["input_ids"]]
        eos = getattr(tokenizer, "eos_token_id", None)
    else:
        if text_column not in data.column_names:
            raise ValueError(f"The dataset has no `{text_column}` column (columns: {data.column_names}); set `text_column`.")
        if tokenizer is None:
            raise ValueError("A text dataset needs a `tokenizer`.")
        texts = [text for text in data[text_column] if text]
        documents = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        eos = tokenizer.eos_token_id
    chunks = [c for c in wrap_documents(documents, model.config.model_length, eos, wrap) if c]
    if not chunks:
        raise ValueError("The dataset is empty: no tokens to evaluate.")
    generator = torch.Generator().manual_seed(seed)
    sums, counts = [], []
    for start in tqdm(range(0, len(chunks), batch_size), disable=not progress, desc="perplexity"):
        batch = chunks[start : start + batch_size]
        width = max(len(c) for c in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, c in enumerate(batch):
            ids[r, : len(c)], mask[r, : len(c)] = torch.tensor(c, dtype=torch.long), 1
        out = nelbo(model, ids, mask, None, num_samples, generator, ignore_bos)
        sums.append(out.per_sequence.cpu().double())
        counts.append(out.num_tokens.cpu().double())
    sums_t, counts_t = torch.cat(sums), torch.cat(counts)
    total = float(counts_t.sum())
    if total == 0:
        raise ValueError("No token was scored (every chunk is a single kept BOS); use longer documents.")
    mean = float(sums_t.sum()) / total
    # Ratio-estimator standard error of Σ s_i / Σ n_i over the chunks.
    n = len(sums_t)
    resid = sums_t - mean * counts_t
    std_error = float(resid.pow(2).sum().div(max(n - 1, 1)).sqrt() * math.sqrt(n) / total) if n > 1 else float("nan")
    return PerplexityResult(mean, math.exp(mean), int(total), n, num_samples, std_error)


# ----------------------------------------------------------------------------------------------------------------------
# `bd3lm eval`


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of `bd3lm eval` (likelihood, generative perplexity, lm-eval tasks) to `parser`."""
    parser.add_argument("model", help="A BD3-LM checkpoint folder or Hub id.")
    parser.add_argument("--tokenizer", help="Tokenizer folder or Hub id (default: the model's; `bd3lm-corpus`: embedded).")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="Load the model in this dtype.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every noise draw and of the generated samples.")
    parser.add_argument("--output", help="Write all results to this JSON file.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    g = parser.add_argument_group("likelihood (perplexity bound)")
    g.add_argument("--dataset", action="append", help="Repeatable: a local file/folder, a Hub dataset or `bd3lm-corpus`.")
    g.add_argument("--split", help="Dataset split (default: test, then validation, then train).")
    g.add_argument("--dataset-config", help="Hub dataset configuration name.")
    g.add_argument("--text-column", default="text")
    g.add_argument("--num-samples", type=int, default=1, help="K Monte-Carlo noise draws per sequence (default 1).")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--ignore-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="Exclude each chunk's first token (default: the model config's `ignore_bos`).")
    g.add_argument("--no-wrap", action="store_true", help="Score each document alone instead of wrapping them.")
    g.add_argument("--max-documents", type=int, help="Evaluate only the first N documents.")
    g = parser.add_argument_group("generative perplexity")
    g.add_argument("--judge", help="Causal LM judge: folder or Hub id (the paper: gpt2-large). Enables gen-PPL.")
    g.add_argument("--judge-tokenizer", help="The judge's tokenizer (default: the judge's folder).")
    g.add_argument("--samples", help="Score these samples (.txt: one per line, .jsonl: a `text` field) instead of "
                   "generating them.")
    g.add_argument("--num-gen-samples", type=int, default=8, help="Samples to generate (default 8; the paper: 300).")
    g.add_argument("--gen-length", type=int, help="New tokens per sample (default: model_length).")
    g.add_argument("--gen-batch-size", type=int, default=4)
    g.add_argument("--gen-kwargs", default="{}", help='JSON of extra generate() arguments, e.g. \'{"nucleus_p": 0.9}\'.')
    g.add_argument("--judge-batch-size", type=int, default=8)
    g.add_argument("--judge-max-length", type=int, help="Judge context (default: from its config).")
    g.add_argument("--judge-stride", type=int, help="Sliding-window stride (default: half the judge context).")
    g = parser.add_argument_group("lm-evaluation-harness (pip install 'bd3lm[eval]')")
    g.add_argument("--tasks", help="Comma-separated lm-eval task names.")
    g.add_argument("--include-path", help="Folder of extra lm-eval task YAML files.")
    g.add_argument("--num-fewshot", type=int)
    g.add_argument("--limit", type=float, help="Documents per task (a fraction if < 1).")
    g.add_argument("--mc-samples", type=int, help="Noise draws per loglikelihood request (default: 1 if exact, else 16).")
    return parser


def load_tokenizer(name: str) -> Any:
    """`AutoTokenizer.from_pretrained(name)`, or the embedded corpus tokenizer for `"bd3lm-corpus"`."""
    if name == "bd3lm-corpus":
        from .corpus import load_tokenizer as load_corpus_tokenizer

        return load_corpus_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, trust_remote_code=False)  # a tokenizer never needs remote code


def load_model_and_tokenizer(model: str, tokenizer: str | None = None, device: str | None = None,
                             dtype: str | None = None):
    """Load a BD3-LM checkpoint with this package's code (no remote code) and its tokenizer."""
    from modeling_bd3lm import BD3LMForMaskedDiffusion

    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    net = BD3LMForMaskedDiffusion.from_pretrained(model, **kwargs)
    net.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    try:
        return net, load_tokenizer(tokenizer or model)
    except (OSError, ValueError) as err:
        raise ValueError(f"No tokenizer at `{tokenizer or model}`; pass `--tokenizer` (a folder, a Hub id or "
                         "`bd3lm-corpus`).") from err


def _read_samples(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line)["text"] for line in f if line.strip()]
        return [line.rstrip("\n") for line in f if line.strip()]


def _generate_samples(model, tokenizer, args) -> tuple[list[list[int]], list[Any]]:
    gen_kwargs = json.loads(args.gen_kwargs)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    length = args.gen_length or model.config.model_length
    samples, outputs = [], []
    for start in tqdm(range(0, args.num_gen_samples, args.gen_batch_size), disable=args.no_progress, desc="sampling"):
        rows = min(args.gen_batch_size, args.num_gen_samples - start)
        prompt = torch.full((rows, 1), bos, dtype=torch.long, device=model.device)
        kwargs = {"do_sample": True, "seed": args.seed + start, **gen_kwargs}
        out = model.generate(input_ids=prompt, max_new_tokens=length, return_dict_in_generate=True, **kwargs)
        samples.extend(out.sequences.tolist())
        outputs.append(out)
    return samples, outputs


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Run `bd3lm eval`: perplexity bounds, generative perplexity and lm-eval tasks; print a table, write JSON."""
    if not (args.dataset or args.judge or args.tasks):
        raise ValueError("Nothing to evaluate: pass `--dataset` (perplexity), `--judge` (gen-PPL) or `--tasks` (lm-eval).")
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.device, args.dtype)
    results: dict[str, Any] = {"model": args.model, "block_size": model.config.block_size}
    for name in args.dataset or []:
        result = dataset_perplexity(
            model, name, tokenizer, args.batch_size, args.num_samples, args.seed, args.ignore_bos, args.split,
            args.text_column, args.dataset_config, not args.no_wrap, args.max_documents, not args.no_progress,
        )
        results.setdefault("perplexity", {})[name] = result.to_dict()
    if args.judge:
        outputs = None
        if args.samples:
            samples = _read_samples(args.samples)
        else:
            samples, outputs = _generate_samples(model, tokenizer, args)
        gen = generative_perplexity(
            samples, args.judge, args.judge_tokenizer, tokenizer, args.judge_batch_size, args.judge_max_length,
            args.judge_stride, model.device, generation_outputs=outputs, progress=not args.no_progress,
        )
        results["generative_perplexity"] = {k: v for k, v in gen.to_dict().items() if not k.startswith("per_sample")}
    if args.tasks:
        from .lm_eval_adapter import run_lm_eval

        results["lm_eval"] = run_lm_eval(
            model, tokenizer, args.tasks.split(","), args.include_path, args.num_fewshot, args.limit,
            args.batch_size, args.mc_samples, args.seed,
        )
    print(format_results(results))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table: one `section | name | metric | value` row per number."""
    rows = []
    for name, r in results.get("perplexity", {}).items():
        rows += [("perplexity", name, k, r[k]) for k in ("perplexity", "nelbo", "std_error", "num_tokens")]
    if "generative_perplexity" in results:
        r = results["generative_perplexity"]
        for k in ("gen_ppl", "mean_sample_ppl", "unigram_entropy", "nfe_per_token", "tokens_per_forward", "num_tokens"):
            if r.get(k) is not None:
                rows.append(("gen-ppl", r["judge"], k, r[k]))
    for task, metrics in results.get("lm_eval", {}).items():
        rows += [("lm-eval", task, k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"]
    cells = [(a, str(b), c, f"{d:.4f}" if isinstance(d, float) else str(d)) for a, b, c, d in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(("section", "name", "metric", "value"))]
    line = lambda row: " | ".join(v.ljust(w) for v, w in zip(row, widths))  # noqa: E731
    return "\n".join([line(("section", "name", "metric", "value")), "-+-".join("-" * w for w in widths)] + [line(r) for r in cells])


__all__ = [
    "GenerativePerplexityResult",
    "NELBOOutput",
    "NELBO_METRIC_PATH",
    "PerplexityResult",
    "add_eval_arguments",
    "dataset_perplexity",
    "format_results",
    "generative_perplexity",
    "judge_windows",
    "load_eval_dataset",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "nelbo",
    "network_calls_per_token",
    "plan_windows",
    "run_eval",
    "score_continuations",
    "stratified_noise_levels",
    "unigram_entropy",
    "wrap_documents",
]
