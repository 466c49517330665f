"""The evaluation kit both studies share (`bench/fidelity/`, `bench/adapt/`): held-out chunks wrapped as the package's
`dataset_perplexity` wraps documents, and per-chunk sums summarised with standard errors over chunks.

Scoring itself is the package's (`bd3lm_trainer.evaluation.nelbo`, `generative_perplexity`); this module only cuts the
text and does the arithmetic on what the studies measured, so that both report the same statistic the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from bd3lm_trainer.evaluation import wrap_documents


def wrapped_chunks(texts: Sequence[str], tokenizer: Any, model_length: int) -> list[list[int]]:
    """The paper's evaluation wrapping: each document tokenised without specials, EOS appended, concatenated and cut
    into `model_length` chunks (the last partial chunk kept); chunks of one token (nothing to predict) dropped."""
    documents = tokenizer([t for t in texts if t], add_special_tokens=False)["input_ids"]
    return [c for c in wrap_documents(documents, model_length, tokenizer.eos_token_id) if len(c) > 1]


def evenly_spaced(chunks: Sequence[Sequence[int]], num_chunks: int | None) -> list[Sequence[int]]:
    """`num_chunks` of `chunks` spread evenly over them (every part of the data represented), or all of them."""
    if num_chunks is None or num_chunks >= len(chunks):
        return list(chunks)
    return [chunks[(i * len(chunks)) // num_chunks] for i in range(num_chunks)]


def summarise(sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """Token-mean NLL (or NELBO) over chunks, its standard error over chunks (ratio estimator: chunks may differ in
    length; for equal lengths it is the plain SE of the per-chunk means) and the perplexity exp(mean) with its ±1 SE
    range."""
    total = float(counts.sum())
    mean = float(sums.sum()) / total
    n = len(sums)
    se = float((sums - mean * counts).pow(2).sum().div(max(n - 1, 1)).sqrt() * math.sqrt(n) / total) if n > 1 else 0.0
    return {
        "nelbo": mean,
        "nelbo_se": se,
        "ppl": math.exp(mean),
        "ppl_lo": math.exp(mean - se),
        "ppl_hi": math.exp(mean + se),
        "num_tokens": int(total),
        "num_chunks": n,
    }


def paired_difference(sums_a: torch.Tensor, sums_b: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """NLL(a) - NLL(b) per token on the same chunks, with the standard error of the paired difference: much tighter
    than the two separate error bars, because the chunk-to-chunk difficulty cancels."""
    diff = summarise(sums_a - sums_b, counts)
    return {
        "diff": diff["nelbo"],
        "diff_se": diff["nelbo_se"],
        "ppl_ratio": math.exp(diff["nelbo"]),
        "z": diff["nelbo"] / diff["nelbo_se"] if diff["nelbo_se"] > 0 else float("inf"),
    }


__all__ = ["evenly_spaced", "paired_difference", "summarise", "wrapped_chunks"]
