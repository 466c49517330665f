"""The measurements of the fidelity study, built on `bd3lm_trainer.evaluation` and the model's own samplers.

* [`nelbo_per_chunk`]: the unbiased block NELBO (t ∼ U[1e-3, 1], K stratified draws) of every validation chunk, as
  `dataset_perplexity` computes it, but keeping the per-chunk sums so that two models can be compared on the same
  chunks (paired standard errors); [`causal_nll_per_chunk`] is the same for the causal AR baseline.
* [`estimator_variance`]: the variance of the per-sequence NELBO estimate over independent noise draws, under a given
  noise interval (the quantity the clipped schedule minimises; Table 8's "Var. NELBO").
* [`l1_sampling_path_nll`]: the L'=1 model's NLL token by token through the sampling pass (the way it generates),
  to compare with the vectorised t ≡ 1 NELBO (Table 1: they must be the same number).
* [`generate_samples`] / [`judge_samples`]: samples and their generative perplexity under the study's AR model.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList

from bd3lm_trainer.evaluation import generative_perplexity, nelbo
from bd3lm_trainer.utils import noised_nelbo
from bench.stats import wrapped_chunks
from modeling_bd3lm import BlockDenoiser, CommittedWindow
from modeling_bd3lm.sampling_bd3lm import SAMPLERS, build_logits_warpers, sample_categorical, suppress_mask_logit

# ----------------------------------------------------------------------------------------------------------------------
# Validation data and the perplexity bound


def validation_chunks(texts: Sequence[str], tokenizer: Any, model_length: int, max_chunks: int | None = None):
    """The paper's evaluation wrapping (`bench.stats.wrapped_chunks`), i.e. exactly the chunks `dataset_perplexity`
    scores; the first `max_chunks` of them."""
    chunks = wrapped_chunks(texts, tokenizer, model_length)
    return chunks[:max_chunks] if max_chunks is not None else chunks


def _batches(chunks: Sequence[Sequence[int]], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded `(ids, attention_mask)` batches in order (the batching of `dataset_perplexity`)."""
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start : start + batch_size]
        ids = torch.zeros(len(batch), max(len(c) for c in batch), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, c in enumerate(batch):
            ids[r, : len(c)], mask[r, : len(c)] = torch.tensor(c, dtype=torch.long), 1
        yield ids, mask


@torch.no_grad()
def nelbo_per_chunk(model, chunks, num_samples: int, seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(nelbo_sum, num_tokens)` per chunk: the block NELBO (Eq. (8)) averaged over `num_samples` draws, position 0 of
    each chunk kept clean and not counted (the official OWT protocol, and what the causal AR cannot predict either).

    Same generator, order and batching as `dataset_perplexity(..., ignore_bos=True)`, hence the same numbers.
    """
    generator = torch.Generator().manual_seed(seed)
    sums, counts = [], []
    for ids, mask in _batches(chunks, batch_size):
        out = nelbo(model, ids, mask, None, num_samples, generator, ignore_bos=True)
        sums.append(out.per_sequence.double().cpu())
        counts.append(out.num_tokens.double().cpu())
    return torch.cat(sums), torch.cat(counts)


def causal_lm_loss(
    model, input_ids: torch.Tensor, labels: torch.Tensor | None = None, attention_mask=None, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross entropy of the causal AR baseline: the BD3 backbone with L'=1 in its sampling pass (block-causal
    with one-token blocks = causal), position i predicting token i + 1. `reduction="none"` gives `(batch, len - 1)`."""
    labels = input_ids if labels is None else labels
    mask = None if attention_mask is None else attention_mask[:, :-1]
    logits = model(input_ids=input_ids[:, :-1], attention_mask=mask, return_dict=True).logits
    logits = suppress_mask_logit(logits.float(), model.config.mask_token_id)  # SUBS, for the causal AR too
    # (N, V) rows: the class-last layout is much faster on CPU than cross entropy over a transposed (B, V, T) view
    nll = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction=reduction)
    return nll.view(labels.shape[0], -1) if reduction == "none" else nll


@torch.no_grad()
def causal_nll_per_chunk(model, chunks, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(nll_sum, num_tokens)` per chunk for the causal AR: tokens 1..n-1 given their prefix (the same positions the
    BD3 rows are scored on)."""
    model.eval()
    sums, counts = [], []
    for ids, mask in _batches(chunks, batch_size):
        labels = ids.masked_fill(mask == 0, -100)
        nll = causal_lm_loss(model, ids, labels, mask, reduction="none").double()
        sums.append(nll.sum(1))
        counts.append((labels[:, 1:] != -100).sum(1).double())
    return torch.cat(sums), torch.cat(counts)


# ----------------------------------------------------------------------------------------------------------------------
# Variance of the NELBO estimator


@contextlib.contextmanager
def config_overrides(config: Any, **values: Any) -> Iterator[None]:
    """Temporarily set config fields (restored on exit)."""
    old = {k: getattr(config, k) for k in values}
    for k, v in values.items():
        setattr(config, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(config, k, v)


@torch.no_grad()
def estimator_variance(
    model, x_0: torch.Tensor, interval: tuple[float, float] | None, draws: int, seed: int, batch_size: int
) -> dict[str, float]:
    """Variance of the single-draw NELBO estimate of each sequence over `draws` independent noise draws.

    Every draw gives each (sequence, block) an independent t ∼ U[interval] (no stratification across the batch, which
    would correlate a sequence's draws with its row index), masks as in training (with rejection resampling into the
    interval when `config.resample`), and the per-sequence value is the token mean of the weighted terms (the training
    loss of that sequence). `interval=None` means t ≡ 1 (the L'=1 "tuned schedule"), whose variance is zero.

    Returns the mean over sequences of the per-sequence variance (`var`), the mean value (`mean`: the expected
    objective, a biased NELBO under a clipped interval) and the standard error of `var` over sequences.
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    values = torch.zeros(draws, x_0.shape[0], dtype=torch.float64)
    always = interval is None
    with config_overrides(model.config, antithetic_sampling=False, always_mask=always):
        for k in range(draws):
            for start in range(0, x_0.shape[0], batch_size):
                batch = {"input_ids": x_0[start : start + batch_size]}
                out = noised_nelbo(model, batch, interval or (1.0, 1.0), generator)
                values[k, start : start + batch_size] = out.token_loss.double().mean(1)
    per_sequence = values.var(0) if draws > 1 else torch.zeros(x_0.shape[0], dtype=torch.float64)
    n = x_0.shape[0]
    return {
        "var": float(per_sequence.mean()),
        "var_se": float(per_sequence.std() / math.sqrt(n)) if n > 1 else 0.0,
        "mean": float(values.mean()),
        "draws": draws,
        "sequences": n,
    }


# ----------------------------------------------------------------------------------------------------------------------
# L'=1 equivalence


@torch.no_grad()
def l1_sampling_path_nll(model, x_0: torch.Tensor) -> torch.Tensor:
    """-log p(x_i | x_<i) for i >= 1 through the sampling pass, one call per position on `[x_0[:i], MASK]`: how the
    L'=1 model generates. Shape `(batch, seq_len - 1)`."""
    model.eval()
    mask_id = model.config.mask_token_id
    out = torch.zeros(x_0.shape[0], x_0.shape[1] - 1, dtype=torch.float64)
    for i in range(1, x_0.shape[1]):
        window = torch.cat((x_0[:, :i], torch.full((x_0.shape[0], 1), mask_id, dtype=torch.long)), dim=1)
        logits = suppress_mask_logit(model(input_ids=window, return_dict=True).logits[:, -1].float(), mask_id)
        out[:, i - 1] = -torch.log_softmax(logits, -1).gather(-1, x_0[:, i : i + 1])[:, 0].double()
    return out


@torch.no_grad()
def vectorised_token_nll(model, x_0: torch.Tensor) -> torch.Tensor:
    """The per-token terms of the t ≡ 1 NELBO from the vectorised x_t ⊕ x_0 pass (position 0 kept clean), `(batch,
    seq_len - 1)`: at L'=1 with always_mask each term is -log p(x_i | x_<i)."""
    out = nelbo(model, x_0, ignore_bos=True)
    return out.per_token[:, 1:].double()


# ----------------------------------------------------------------------------------------------------------------------
# The causal AR as a judge and as a sampler


class CausalJudge(torch.nn.Module):
    """The causal AR baseline behind the interface `generative_perplexity` expects of a causal LM: `config` with the
    context length, `device`, and `judge(input_ids=, attention_mask=).logits` with position i predicting token i + 1."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = SimpleNamespace(max_position_embeddings=model.config.model_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).logits
        return SimpleNamespace(logits=suppress_mask_logit(logits.float(), self.model.config.mask_token_id))


@torch.no_grad()
def sample_causal(model, num: int, length: int, bos: int, nucleus_p: float | None, generator: torch.Generator) -> dict:
    """Ancestral samples of the causal AR from BOS (one network call per token, the context a sliding window of
    `model_length`), with the same warpers (nucleus rule or none) as the diffusion samplers."""
    model.eval()
    start = time.perf_counter()
    warpers = build_logits_warpers(1.0, 0, 1.0, nucleus_p)
    seq = torch.full((num, 1), bos, dtype=torch.long)
    for _ in range(length):
        window = seq[:, -model.config.model_length :]
        logits = suppress_mask_logit(
            model(input_ids=window, return_dict=True).logits[:, -1].float(), model.config.mask_token_id
        )
        probs = warpers(window, logits.double()).softmax(-1)
        seq = torch.cat((seq, sample_categorical(probs, generator)[:, None]), dim=1)
    return {
        "sequences": seq.tolist(),
        "nfe": num * length,
        "new_tokens": num * length,
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Diffusion sampling


@dataclass
class GenSetting:
    """One sampling configuration: `sampler` is `first_hitting` (one token per call) or `confidence_threshold`."""

    sampler: str
    threshold: float | None = None

    @property
    def name(self) -> str:
        return self.sampler if self.threshold is None else f"{self.sampler}_{self.threshold:g}"


@torch.no_grad()
def _single_block_samples(
    model, num: int, bos: int, setting: GenSetting, nucleus_p: float | None, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """MDLM (L' = L): the whole context is one block, so `generate()` has no room for a prompt block. Denoise one
    block with BOS fixed at position 0 and no committed context, with the same sampler loop `generate()` uses."""
    config = model.config
    mask_id, size = config.mask_token_id, config.block_size
    sampler = SAMPLERS[setting.sampler](
        confidence_threshold=setting.threshold, mask_probability=model.noise_schedule.mask_probability
    )
    block = torch.full((num, size), mask_id, dtype=torch.long)
    block[:, 0] = bos
    empty = torch.zeros(num, 0, dtype=torch.long)  # no committed context: the block is the whole window
    window = CommittedWindow.from_prompt(empty, empty.bool(), size, config.model_length, filler=mask_id)
    denoiser = BlockDenoiser(
        sampler=sampler,
        mask_token_id=mask_id,
        do_sample=True,
        logits_processor=LogitsProcessorList(),
        warpers=build_logits_warpers(1.0, 0, 1.0, nucleus_p),
        generator=generator,
        nfe=torch.zeros(num, dtype=torch.long),
    )
    block, _ = denoiser.denoise(model, block, window, lambda: torch.zeros(num, 0, dtype=torch.long))
    return block, int(denoiser.nfe.sum())


@torch.no_grad()
def generate_samples(
    model, num: int, length: int, bos: int, setting: GenSetting, *, nucleus_p: float | None, seed: int, batch_size: int
) -> dict:
    """`num` samples of `length` new tokens from BOS (nucleus sampling unless `nucleus_p` is None); `nfe` counts the
    denoising calls (the network calls per token of Table 7), `seconds` the wall time of sampling."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sequences, nfe, new_tokens = [], 0, 0
    start = time.perf_counter()
    if model.config.block_size >= model.config.model_length:  # MDLM: one block, BOS inside it
        for first in range(0, num, batch_size):
            rows = min(batch_size, num - first)
            block, calls = _single_block_samples(model, rows, bos, setting, nucleus_p, generator)
            sequences += block.tolist()
            nfe += calls
            new_tokens += rows * (block.shape[1] - 1)
    else:
        kwargs = {"sampler": setting.sampler, "nucleus_p": nucleus_p}
        if setting.threshold is not None:
            kwargs["confidence_threshold"] = setting.threshold
        for first in range(0, num, batch_size):
            rows = min(batch_size, num - first)
            prompt = torch.full((rows, 1), bos, dtype=torch.long)
            out = model.generate(
                input_ids=prompt,
                max_new_tokens=length,
                do_sample=True,
                top_k=0,
                generator=generator,
                return_dict_in_generate=True,
                **kwargs,
            )
            sequences += out.sequences.tolist()
            nfe += int(out.nfe.sum())
            new_tokens += rows * length
    return {"sequences": sequences, "nfe": nfe, "new_tokens": new_tokens, "seconds": time.perf_counter() - start}


def judge_samples(
    samples: Sequence[Sequence[int]],
    judge: Any,
    tokenizer: Any,
    batch_size: int,
    judge_tokenizer: Any = None,
) -> dict:
    """Generative perplexity of token-id samples under a judge (corpus-level exp-mean NLL, EOS targets excluded,
    sliding window over the judge's context), its approximate standard error over samples, and the mean unigram
    entropy of the samples' own tokens (low entropy flags repetitive samples that a judge rewards).

    The judge is the study's AR model (`CausalJudge`, same tokenizer) or, with `judge_tokenizer`, any causal LM: the
    samples are then decoded and re-tokenised with its tokenizer (e.g. SmolLM2-135M, `smollm2_judge()`).
    """
    result = generative_perplexity(
        list(samples),
        judge=judge,
        judge_tokenizer=judge_tokenizer or tokenizer,
        tokenizer=tokenizer,
        batch_size=batch_size,
    )
    logs = torch.tensor([math.log(p) for p in result.per_sample_ppl if not math.isnan(p)], dtype=torch.float64)
    se = float(logs.std() / math.sqrt(len(logs))) if len(logs) > 1 else float("nan")
    return {
        "gen_ppl": result.gen_ppl,
        "log_gen_ppl_se": se,
        "mean_sample_ppl": result.mean_sample_ppl,
        "unigram_entropy": result.unigram_entropy,
        "num_samples": result.num_samples,
        "judge_tokens": result.num_tokens,
    }


def smollm2_judge() -> tuple[Any, Any]:
    """SmolLM2-135M (`bd3lm_trainer.pretrained`) as an independent judge: `(model, tokenizer)` with the tokenizer's
    BOS/EOS set to `<|endoftext|>`, the document separator it was pre-trained with (the GGUF's instruct tokenizer
    uses the chat markers), so that a sample's documents are framed as in pre-training."""
    from bd3lm_trainer.pretrained import load_smollm2

    model, tokenizer = load_smollm2()
    tokenizer.bos_token = tokenizer.eos_token = tokenizer.pad_token = "<|endoftext|>"
    return model, tokenizer
