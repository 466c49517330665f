# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Evaluation of BD3-LM: block-NELBO likelihood bounds, (zero-shot) perplexity and generative perplexity.

* [`nelbo`], [`score_continuations`] (`likelihood.py`): per-token and per-sequence block NELBO (Arriola et al., 2025,
  Eq. (8)), with K jointly stratified Monte-Carlo draws of the noise levels t or exactly (`exact=True`); exact AR NLL
  at L' = 1.
* [`dataset_perplexity`] (`perplexity.py`): the paper's test-perplexity protocol on any local or Hub dataset:
  documents tokenized without specials, EOS appended, concatenated and wrapped to `model_length`; PPL bound =
  exp(token-mean NELBO).
* [`generative_perplexity`] (`generative_perplexity.py`): sample quality judged by a causal LM (the paper uses GPT-2
  large), with a sliding window and the corpus-level exp(total NLL / total tokens), plus unigram entropy and network
  calls per token.
* [`estimate_acceptance`] (`drafting.py`): how often a BD3-LM's one-step block drafts equal its AR source's greedy
  tokens (lossless draft-and-verify), in one vectorised pass; [`greedy_continuations`] gives the AR tokens.
* `lm_eval_adapter.py`: the lm-evaluation-harness model `bd3lm` (optional extra, imported on its own);
  `metrics/bd3lm_nelbo/`: the per-token NELBO as an `evaluate` metric ([`NELBO_METRIC_PATH`]).

The `bd3lm eval` command that runs them together is `bd3lm_trainer.cli.eval`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from .drafting import AcceptanceEstimate, chain_cycles, estimate_acceptance, geometric_alpha, greedy_continuations
from .generative_perplexity import (
    GenerativePerplexityResult,
    generative_perplexity,
    judge_continuations,
    judge_windows,
    network_calls_per_token,
    unigram_entropy,
)
from .likelihood import (
    NELBOOutput,
    mask_pattern_weights,
    nelbo,
    plan_windows,
    score_continuations,
    stratified_noise_levels,
)
from .loading import load_model_and_tokenizer, resolve_device
from .perplexity import PerplexityResult, dataset_perplexity, load_eval_dataset, wrap_documents

#: Folder of the `evaluate` metric module of the per-token NELBO: `evaluate.load(NELBO_METRIC_PATH)` (works offline).
NELBO_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "bd3lm_nelbo")

# Names this module exported in 0.1 that moved with the split of trainer/ by job; kept for one release.
_MOVED = {
    "add_eval_arguments": "bd3lm_trainer.cli.eval",
    "evaluate_from_args": "bd3lm_trainer.cli.eval",
    "format_results": "bd3lm_trainer.cli.eval",
    "run_eval": "bd3lm_trainer.cli.eval",
    "load_tokenizer": "bd3lm_trainer.corpus (as resolve_tokenizer)",
}


def __getattr__(name: str) -> Any:
    """The 0.1 names of `_MOVED`, with a `DeprecationWarning` that says where they live now."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"bd3lm_trainer.evaluation.{name} moved to {_MOVED[name]}; the old name goes in 0.2.",
        DeprecationWarning,
        stacklevel=2,
    )
    if name == "load_tokenizer":
        from ..corpus import resolve_tokenizer

        return resolve_tokenizer
    from ..cli.eval import add_eval_arguments, evaluate_from_args, format_results, run_eval

    moved = {
        "add_eval_arguments": add_eval_arguments,
        "evaluate_from_args": evaluate_from_args,
        "format_results": format_results,
        "run_eval": run_eval,
    }
    return moved[name]


__all__ = [
    "AcceptanceEstimate",
    "GenerativePerplexityResult",
    "NELBOOutput",
    "NELBO_METRIC_PATH",
    "PerplexityResult",
    "chain_cycles",
    "dataset_perplexity",
    "estimate_acceptance",
    "generative_perplexity",
    "geometric_alpha",
    "greedy_continuations",
    "judge_continuations",
    "judge_windows",
    "load_eval_dataset",
    "load_model_and_tokenizer",
    "mask_pattern_weights",
    "nelbo",
    "network_calls_per_token",
    "plan_windows",
    "resolve_device",
    "score_continuations",
    "stratified_noise_levels",
    "unigram_entropy",
    "wrap_documents",
]
