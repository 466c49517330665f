# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Generative perplexity: score samples with a causal-LM judge (Arriola et al., 2025, Sec. 6.2; GPT-2 large there).

The judge re-tokenizes the decoded samples and scores them with a sliding window; the reported value is corpus-level,
exp(total NLL / total tokens). Unigram entropy and network calls per token come with it, as in the paper's tables.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..corpus import resolve_tokenizer


@dataclass
class GenerativePerplexityResult:
    """Result of [`generative_perplexity`].

    `gen_ppl` is corpus-level, exp(Σ NLL / Σ tokens) over all samples; `mean_sample_ppl` is the arithmetic mean of
    per-sample PPLs that `scripts/log_sample_stats.py` of the official code prints; the two differ whenever samples
    differ in length or quality: compare like with like. Entropies are in nats, over each sample's tokens.
    """

    gen_ppl: float
    nll: float
    num_tokens: int
    num_samples: int
    judge: str
    per_sample_ppl: list[float] = field(default_factory=list)
    mean_sample_ppl: float = float("nan")
    unigram_entropy: float = float("nan")
    per_sample_entropy: list[float] = field(default_factory=list)
    nfe_per_token: float | None = None
    tokens_per_forward: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy (nats) of the empirical token distribution of one sample, H = -Σ_v p_v log p_v."""
    if len(tokens) == 0:
        return float("nan")
    counts = torch.bincount(torch.as_tensor(list(tokens), dtype=torch.long)).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def _to_judge_ids(samples, tokenizer, judge_tokenizer, check_roundtrip: bool) -> tuple[list[list[int]], list[list]]:
    """Re-tokenize samples for the judge: `(judge_ids, entropy_tokens)` per sample.

    Our EOS/BOS tokens become the judge's EOS (document boundaries; they are context, never targets), padding is
    dropped, and a leftover mask token is an error; every text piece must survive the judge's tokenizer unchanged.
    """
    j_bos = judge_tokenizer.bos_token_id if judge_tokenizer.bos_token_id is not None else judge_tokenizer.eos_token_id
    j_eos = judge_tokenizer.eos_token_id if judge_tokenizer.eos_token_id is not None else j_bos
    unk = judge_tokenizer.unk_token_id
    results, entropy_tokens = [], []
    for i, sample in enumerate(samples):
        if isinstance(sample, str):
            pieces, own = [sample], None
        else:
            if tokenizer is None:
                raise ValueError("Token-id samples need `tokenizer` (the generating model's) to be decoded.")
            ids = sample.tolist() if isinstance(sample, torch.Tensor) else list(sample)
            boundary = {tokenizer.eos_token_id, tokenizer.bos_token_id} - {None}
            if tokenizer.mask_token_id is not None and tokenizer.mask_token_id in ids:
                raise ValueError(f"Sample {i} still holds mask tokens: generation did not finish.")
            ids = [t for t in ids if t != tokenizer.pad_token_id or t in boundary]
            own = [t for t in ids if t not in boundary]
            pieces, current = [], []
            for t in ids:
                if t in boundary:
                    pieces.append(tokenizer.decode(current))
                    current = []
                    pieces.append(None)
                else:
                    current.append(t)
            pieces.append(tokenizer.decode(current))
        out = [] if j_bos is None else [j_bos]
        for piece in pieces:
            if piece is None:
                if j_eos is None:
                    raise ValueError("The judge tokenizer has no EOS/BOS token to mark the samples' documents.")
                if out != [j_eos]:
                    out.append(j_eos)
                continue
            if not piece:
                continue
            enc = judge_tokenizer(piece, add_special_tokens=False)["input_ids"]
            lossy = judge_tokenizer.decode(enc, clean_up_tokenization_spaces=False) != piece
            if check_roundtrip and ((unk is not None and unk in enc) or lossy):
                raise ValueError(
                    f"The judge tokenizer cannot represent sample {i} ({piece[:60]!r}...): it yields unknown tokens or "
                    "decodes to different text. Use a judge whose tokenizer covers the samples (byte-level BPE, e.g. "
                    "GPT-2), or pass `check_roundtrip=False` to score anyway."
                )
            out.extend(enc)
        results.append(out)
        entropy_tokens.append(own if own is not None else [t for t in out if t not in (j_bos, j_eos)])
    return results, entropy_tokens


def judge_windows(length: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows `(begin, end, first_credited)` over a sequence of `length` judge tokens.

    The first window is the first `max_length` tokens; each next one ends `stride` tokens later and holds the
    `max_length` tokens before its end. Every target position 1..length-1 is credited exactly once, in the first window
    that reaches it, where it sees at least `max_length - stride` tokens of context (or all before it).
    """
    if length < 2:
        return []
    end = min(max_length, length)
    windows = [(0, end, 1)]
    while end < length:
        new_end = min(end + stride, length)
        windows.append((max(0, new_end - max_length), new_end, end))
        end = new_end
    return windows


@torch.no_grad()
def generative_perplexity(
    samples: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    judge: Any = "gpt2-large",
    judge_tokenizer: Any = None,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int | None = None,
    stride: int | None = None,
    device: str | torch.device | None = None,
    exclude_eos: bool = True,
    check_roundtrip: bool = True,
    generation_outputs: Any = None,
    progress: bool = False,
) -> GenerativePerplexityResult:
    """Generative perplexity of samples under a causal-LM judge (Sec. 6.2 of the paper: GPT-2 large, context 1024).

    gen_ppl = exp(Σ_i Σ_ℓ -log p_judge(y_ℓ | y_<ℓ) / Σ_i n_i): corpus-level, not the mean of per-sample PPLs.
    Samples longer than the judge's context are scored with a sliding window of `stride` (default half the context),
    crediting each position once; EOS targets are excluded (as upstream).

    Args:
        samples: texts, or token ids of the generating model (decoded with `tokenizer`).
        judge: a local folder, a Hub id or an `AutoModelForCausalLM` instance.
        judge_tokenizer: its tokenizer (path or instance); defaults to the judge's folder.
        generation_outputs: `generate(..., return_dict_in_generate=True)` output(s), for network calls per token.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(samples, torch.Tensor):
        samples = list(samples)
    if len(samples) == 0:
        raise ValueError("`samples` is empty: nothing to score.")
    judge_name = judge if isinstance(judge, str) else type(judge).__name__
    if judge_tokenizer is None or isinstance(judge_tokenizer, (str, os.PathLike)):
        source = judge_tokenizer or (judge if isinstance(judge, str) else getattr(judge, "name_or_path", None))
        judge_tokenizer = resolve_tokenizer(source)
    if isinstance(judge, (str, os.PathLike)):
        judge = AutoModelForCausalLM.from_pretrained(judge)
    if device is not None:
        judge = judge.to(device)
    judge.eval()
    if max_length is None:
        config = judge.config
        max_length = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if max_length is None:
            raise ValueError("Cannot read the judge's context length from its config; pass `max_length`.")
    stride = max(1, max_length // 2) if stride is None else stride
    if not 1 <= stride < max_length:
        raise ValueError(f"`stride`={stride} must be in [1, max_length - 1] = [1, {max_length - 1}] (windows overlap).")

    sequences, entropy_tokens = _to_judge_ids(samples, tokenizer, judge_tokenizer, check_roundtrip)
    excluded = {judge_tokenizer.eos_token_id, judge_tokenizer.bos_token_id} - {None} if exclude_eos else set()
    windows = [(i, *w) for i, seq in enumerate(sequences) for w in judge_windows(len(seq), max_length, stride)]
    windows.sort(key=lambda w: w[1] - w[2])
    nll_sum = torch.zeros(len(sequences), dtype=torch.float64)
    count = torch.zeros(len(sequences), dtype=torch.long)
    pad_id = judge_tokenizer.pad_token_id if judge_tokenizer.pad_token_id is not None else 0
    for start in tqdm(range(0, len(windows), batch_size), disable=not progress, desc="gen-ppl"):
        chunk = windows[start : start + batch_size]
        width = max(end - begin for _, begin, end, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask, credit = torch.zeros_like(ids), torch.zeros(len(chunk), width, dtype=torch.bool)
        for r, (i, begin, end, first) in enumerate(chunk):
            ids[r, : end - begin] = torch.tensor(sequences[i][begin:end], dtype=torch.long)
            mask[r, : end - begin] = 1
            credit[r, first - begin : end - begin] = True
        if excluded:
            credit &= ~torch.isin(ids, torch.tensor(sorted(excluded)))
        on_device = ids.to(judge.device)
        logits = judge(input_ids=on_device, attention_mask=mask.to(judge.device)).logits
        # float32 log-softmax on the judge's device: only the (batch, width) NLLs come back
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), on_device[:, 1:], reduction="none").double().cpu()
        credit = credit[:, 1:]
        for r, (i, _, _, _) in enumerate(chunk):
            nll_sum[i] += nll[r][credit[r]].sum()
            count[i] += int(credit[r].sum())
    total = int(count.sum())
    if total == 0:
        raise ValueError("No sample has a token to score (each needs at least two judge tokens).")
    mean_nll = float(nll_sum.sum()) / total
    per_sample = [math.exp(float(s) / int(c)) if c > 0 else float("nan") for s, c in zip(nll_sum, count)]
    entropies = [unigram_entropy(t) for t in entropy_tokens]
    scored = [p for p in per_sample if not math.isnan(p)]
    valid_h = [h for h in entropies if not math.isnan(h)]
    result = GenerativePerplexityResult(
        gen_ppl=math.exp(mean_nll),
        nll=mean_nll,
        num_tokens=total,
        num_samples=len(sequences),
        judge=str(judge_name),
        per_sample_ppl=per_sample,
        mean_sample_ppl=sum(scored) / len(scored),
        unigram_entropy=sum(valid_h) / len(valid_h) if valid_h else float("nan"),
        per_sample_entropy=entropies,
    )
    if generation_outputs is not None:
        result.nfe_per_token, result.tokens_per_forward = network_calls_per_token(generation_outputs)
    return result


@torch.no_grad()
def judge_continuations(
    judge: Any, tokenizer: Any, prompts: Sequence[str], continuations: Sequence[Sequence[int]], batch_size: int = 8
) -> dict[str, Any]:
    """Gen-PPL of continuations under a causal-LM judge: each continuation is decoded to text and re-tokenised, the
    prompt's tokens are context only; gen-PPL = exp(Σ NLL / Σ scored tokens) over all samples (corpus level). The
    unigram entropy (nats) is the mean over samples of the entropy of each continuation's own tokens (low = repetitive).
    """
    judge.eval()
    rows = []
    for prompt, cont in zip(prompts, continuations):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(tokenizer.decode(cont, skip_special_tokens=True), add_special_tokens=False)["input_ids"]
        rows.append((p, c))
    nll_sum, count, per_sample = 0.0, 0, []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        for r, (p, c) in enumerate(batch):  # right-padded: positions are 0.. for every row
            ids[r, : len(p) + len(c)] = torch.tensor(p + c)
            mask[r, : len(p) + len(c)] = 1
            scored[r, len(p) : len(p) + len(c)] = True
        logits = judge(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").double()
        scored = scored[:, 1:]
        for r in range(len(batch)):
            s, n = float(nll[r][scored[r]].sum()), int(scored[r].sum())
            nll_sum, count = nll_sum + s, count + n
            per_sample.append(math.exp(s / n) if n else float("nan"))
    logs = torch.tensor([math.log(x) for x in per_sample if not math.isnan(x)], dtype=torch.float64)
    return {
        "gen_ppl": math.exp(nll_sum / count),
        "log_gen_ppl_se": float(logs.std() / math.sqrt(len(logs))) if len(logs) > 1 else float("nan"),
        "judge_tokens": count,
        "unigram_entropy": statistics.mean(unigram_entropy(c) for c in continuations),
        "per_sample_ppl": per_sample,
    }


def network_calls_per_token(generation_outputs: Any) -> tuple[float, float]:
    """`(nfe / token, tokens / nfe)` summed over the rows of one or more `generate(..., return_dict_in_generate=True)`
    outputs (`nfe` and `tokens_per_forward` per row; new tokens = tokens_per_forward · max(nfe, 1))."""
    outputs = generation_outputs if isinstance(generation_outputs, (list, tuple)) else [generation_outputs]
    nfe = tokens = 0.0
    for out in outputs:
        if getattr(out, "nfe", None) is None or getattr(out, "tokens_per_forward", None) is None:
            raise ValueError("`generation_outputs` must come from `generate(..., return_dict_in_generate=True)`.")
        row_nfe = torch.as_tensor(out.nfe).double().flatten()
        nfe += float(row_nfe.sum())
        tokens += float((torch.as_tensor(out.tokens_per_forward).double().flatten() * row_nfe.clamp_min(1)).sum())
    if tokens == 0 or nfe == 0:
        raise ValueError("The generation outputs hold no generated token or no network call.")
    return nfe / tokens, tokens / nfe


__all__ = [
    "GenerativePerplexityResult",
    "generative_perplexity",
    "judge_continuations",
    "judge_windows",
    "network_calls_per_token",
    "unigram_entropy",
]
