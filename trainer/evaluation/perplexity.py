# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Zero-shot perplexity bounds of BD3-LM on a dataset, following the paper's protocol (Arriola et al., 2025, Sec. 6.1).

* [`load_eval_dataset`]: a `Dataset`, texts, a local file or folder, a Hub name or the embedded corpus, to one split.
* [`wrap_documents`]: documents tokenized without specials, EOS appended, concatenated and cut into `model_length`.
* [`dataset_perplexity`]: the token-mean block NELBO ([`nelbo`]) over all chunks; PPL bound = exp(mean).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from modeling_bd3lm.checks_bd3lm import is_int

from ..corpus import CORPUS_NAME, load_corpus
from ..data import load_text_dataset
from .likelihood import _check_num_samples, nelbo

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
        if dataset == CORPUS_NAME:
            return load_corpus(split or "validation")

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
    exact: bool = False,
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
        exact (`bool`): the expectation over the noise by enumeration (see [`nelbo`]) instead of K draws.
    """
    num_samples = _check_num_samples(num_samples)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
    data = load_eval_dataset(dataset, split, config_name)
    if max_documents is not None:
        data = data.select(range(min(max_documents, len(data))))
    if "input_ids" in data.column_names:
        documents = [list(ids) for ids in data["input_ids"]]
        eos = getattr(tokenizer, "eos_token_id", None)
    else:
        if text_column not in data.column_names:
            raise ValueError(
                f"The dataset has no `{text_column}` column (columns: {data.column_names}); set `text_column`."
            )
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
        out = nelbo(model, ids, mask, None, num_samples, generator, ignore_bos, exact=exact)
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


__all__ = ["PerplexityResult", "dataset_perplexity", "load_eval_dataset", "wrap_documents"]
