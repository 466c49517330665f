# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Language-modelling data for BD3-LM: load text, tokenize, wrap into `model_length` chunks, and collate.

The paper's protocol (Arriola et al., 2025, Suppl. "Data wrapping"; MDLM's loader): every document is tokenized
without special tokens, an EOS is appended, the documents are concatenated and cut into chunks of exactly L tokens
(the remainder is dropped). With `insert_special_tokens=True` each chunk is `[BOS] + (L - 2) tokens + [EOS]` instead.
Without wrapping every document becomes one (truncated) example and the collator pads the batch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin

from modeling_bd3lm.checks_bd3lm import is_int

# File extensions -> `datasets` packaged builder. Compression suffixes are stripped first (datasets decompresses).
_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")


def _builder_for_file(path: str) -> str:
    name = path.lower()
    for suffix in _COMPRESSION:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    ext = os.path.splitext(name)[1]
    if ext not in _BUILDERS:
        raise ValueError(
            f"Cannot tell the format of `{path}` from its extension; use one of {sorted(_BUILDERS)} (optionally "
            "compressed), or load it with `datasets.load_dataset` and pass the Dataset."
        )
    return _BUILDERS[ext]


def load_text_dataset(
    dataset_or_path: Any,
    split: str = "train",
    text_column: str = "text",
    dataset_config_name: str | None = None,
    streaming: bool = False,
    **load_kwargs: Any,
):
    """Resolve `dataset_or_path` to one `datasets` split.

    Args:
        dataset_or_path: a `datasets.Dataset` / `IterableDataset` (returned as is), a `DatasetDict` (its `split`), a
            list of strings (one document each), a local file (`.txt` = one document per line, `.json`/`.jsonl`,
            `.parquet`, `.csv`, optionally compressed; `split` is ignored), a local folder (`save_to_disk` output or
            a folder of data files) or a Hub dataset name (needs network access or the local `datasets` cache).
        split (`str`, defaults to `"train"`): the split to take from a `DatasetDict`, a folder or a Hub dataset.
        text_column (`str`, defaults to `"text"`): column name used for a list of strings.
        dataset_config_name (`str`, *optional*): the Hub configuration (e.g. `"wikitext-103-raw-v1"`).
        streaming (`bool`, defaults to `False`): stream a Hub dataset instead of downloading it.
        **load_kwargs: passed to `datasets.load_dataset`.
    """
    import datasets

    if isinstance(dataset_or_path, (datasets.Dataset, datasets.IterableDataset)):
        return dataset_or_path
    if isinstance(dataset_or_path, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in dataset_or_path:
            raise ValueError(f"`split`={split!r} is not in the DatasetDict; available: {sorted(dataset_or_path)}.")
        return dataset_or_path[split]
    if isinstance(dataset_or_path, os.PathLike):
        dataset_or_path = os.fspath(dataset_or_path)
    if isinstance(dataset_or_path, Sequence) and not isinstance(dataset_or_path, str):
        documents = list(dataset_or_path)
        if not all(isinstance(doc, str) for doc in documents):
            raise TypeError("A list passed as `dataset_or_path` must hold strings (one document each).")
        return datasets.Dataset.from_dict({text_column: documents})
    if not isinstance(dataset_or_path, str):
        raise TypeError(
            f"`dataset_or_path` must be a datasets Dataset, a path, a Hub name or a list of strings, got "
            f"{type(dataset_or_path).__name__}."
        )
    path = os.path.expanduser(dataset_or_path)
    if os.path.isfile(path):
        return datasets.load_dataset(_builder_for_file(path), data_files=path, split="train", **load_kwargs)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(os.path.join(path, "state.json")):
            return load_text_dataset(datasets.load_from_disk(path), split=split)
        return datasets.load_dataset(path, split=split, **load_kwargs)
    try:
        return datasets.load_dataset(path, dataset_config_name, split=split, streaming=streaming, **load_kwargs)
    except Exception as err:  # the datasets errors for "offline" and "not found" differ across releases
        raise ValueError(
            f"`{dataset_or_path}` is not a local file or folder and could not be loaded from the Hugging Face Hub "
            "(offline, misspelt, or a missing `dataset_config_name`?). Pass a local path or a Dataset instead."
        ) from err


def _special_id(tokenizer: Any, name: str, reason: str) -> int:
    token_id = getattr(tokenizer, f"{name}_token_id", None)
    if token_id is None:
        raise ValueError(
            f"The tokenizer has no {name.upper()} token, which {reason}; set `tokenizer.{name}_token` or turn the "
            "option off."
        )
    return int(token_id)


def build_lm_dataset(
    dataset_or_path: Any,
    tokenizer: Any,
    model_length: int,
    split: str = "train",
    text_column: str = "text",
    wrap: bool = True,
    insert_eos: bool = True,
    insert_special_tokens: bool = False,
    dataset_config_name: str | None = None,
    map_batch_size: int = 1000,
    num_proc: int | None = None,
    streaming: bool = False,
    **load_kwargs: Any,
):
    """Tokenize documents and shape them into BD3-LM training examples (an `input_ids` column).

    Args:
        dataset_or_path: anything [`load_text_dataset`] accepts. A dataset that already has an `input_ids` column
            and no `text_column` is taken as pre-tokenized.
        tokenizer: a `PreTrainedTokenizerBase`. Documents are tokenized without special tokens.
        model_length (`int`): L, the length of every wrapped chunk (and the truncation length without wrapping).
        split (`str`, defaults to `"train"`): see [`load_text_dataset`].
        text_column (`str`, defaults to `"text"`): the column holding the documents.
        wrap (`bool`, defaults to `True`): concatenate documents and cut chunks of exactly `model_length` tokens
            (the paper's `*-wrap` datasets). The concatenation restarts every `map_batch_size` documents, so at most
            one partial chunk per map batch is dropped. Without wrapping, each document is one example truncated to
            `model_length`, and [`BD3LMDataCollator`] pads the batch.
        insert_eos (`bool`, defaults to `True`): append EOS to every document (the document separator).
        insert_special_tokens (`bool`, defaults to `False`): make every example `[BOS] + tokens + [EOS]`, i.e. chunks
            of `model_length - 2` text tokens (the official `insert_train_special`; off for the OWT models).
        dataset_config_name (`str`, *optional*): Hub configuration name.
        map_batch_size (`int`, defaults to 1000): documents per `Dataset.map` batch.
        num_proc (`int`, *optional*): worker processes for `Dataset.map`.
        streaming (`bool`, defaults to `False`): stream a Hub dataset (returns an `IterableDataset`).

    Returns:
        A `datasets.Dataset` (or `IterableDataset`) with one column, `input_ids`.

    Example:

    ```python
    >>> from bd3lm_trainer import build_lm_dataset
    >>> train = build_lm_dataset("train.jsonl", tokenizer, model_length=1024)  # doctest: +SKIP
    >>> len(train[0]["input_ids"])  # doctest: +SKIP
    1024
    ```
    """
    if not is_int(model_length) or model_length < 1:
        raise ValueError(f"`model_length` must be a positive integer, got {model_length!r}.")
    if insert_special_tokens and model_length < 3:
        raise ValueError("`insert_special_tokens=True` needs `model_length` >= 3 ([BOS] + tokens + [EOS]).")
    if map_batch_size < 1:
        raise ValueError(f"`map_batch_size` must be >= 1, got {map_batch_size}.")
    dataset = load_text_dataset(
        dataset_or_path,
        split=split,
        text_column=text_column,
        dataset_config_name=dataset_config_name,
        streaming=streaming,
        **load_kwargs,
    )
    # A streamed dataset may not know its columns before the first row; then trust `text_column`.
    columns = list(dataset.column_names) if dataset.column_names is not None else [text_column]
    pretokenized = text_column not in columns and "input_ids" in columns
    if not pretokenized and text_column not in columns:
        raise ValueError(f"`text_column`={text_column!r} is not a column of the dataset; columns: {columns}.")
    eos_id = _special_id(tokenizer, "eos", "`insert_eos` appends to every document") if insert_eos else None
    bos_id = eos_id_special = None
    if insert_special_tokens:
        bos_id = _special_id(tokenizer, "bos", "`insert_special_tokens` puts at the start of every chunk")
        eos_id_special = _special_id(tokenizer, "eos", "`insert_special_tokens` puts at the end of every chunk")
    body = model_length - 2 if insert_special_tokens else model_length

    def shape(batch: dict[str, list]) -> dict[str, list]:
        if pretokenized:
            documents = [list(ids) for ids in batch["input_ids"]]
        else:
            texts = ["" if text is None else text for text in batch[text_column]]
            # verbose=False: documents longer than the tokenizer's model_max_length are expected (they get chunked)
            documents = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        if eos_id is not None:
            documents = [ids + [eos_id] for ids in documents]
        if wrap:
            stream = [token for ids in documents for token in ids]
            pieces = [stream[i : i + body] for i in range(0, len(stream) - body + 1, body)]
        else:
            pieces = [ids[:body] for ids in documents if ids]
        if insert_special_tokens:
            pieces = [[bos_id] + piece + [eos_id_special] for piece in pieces]
        return {"input_ids": pieces}

    map_kwargs: dict[str, Any] = {"batched": True, "batch_size": map_batch_size, "remove_columns": columns}
    if not streaming and hasattr(dataset, "cache_files"):
        map_kwargs.update(num_proc=num_proc, desc="Tokenizing and wrapping" if wrap else "Tokenizing")
    return dataset.map(shape, **map_kwargs)


@dataclass
class BD3LMDataCollator(DataCollatorMixin):
    """Stack `input_ids` examples into a batch for [`BD3LMForMaskedDiffusion`], padding when lengths differ.

    The block NELBO needs a length that is a multiple of `block_size`, so batches are right-padded to the longest
    example rounded up to `pad_to_multiple_of` (default: `block_size`). `attention_mask` marks real tokens and
    `labels` is `input_ids` (the denoising target is x_0 itself) with `-100` on padding. Wrapped data has equal
    lengths and needs no padding.

    Args:
        pad_token_id (`int`): id written at padded positions (never attended to, never in the loss).
        block_size (`int`, defaults to 1): L' of the model.
        pad_to_multiple_of (`int`, *optional*): defaults to `block_size`; must be a multiple of it.
        max_length (`int`, *optional*): the model's `model_length`; longer examples raise.
        return_tensors (`str`, defaults to `"pt"`): only PyTorch tensors are supported.

    Example:

    ```python
    >>> from bd3lm_trainer import BD3LMDataCollator
    >>> collator = BD3LMDataCollator(pad_token_id=0, block_size=4)
    >>> batch = collator([{"input_ids": [5, 6, 7, 8, 9]}, {"input_ids": [5, 6]}])
    >>> batch["input_ids"]
    tensor([[5, 6, 7, 8, 9, 0, 0, 0],
            [5, 6, 0, 0, 0, 0, 0, 0]])
    >>> batch["attention_mask"]
    tensor([[1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0]])
    >>> batch["labels"][1]
    tensor([   5,    6, -100, -100, -100, -100, -100, -100])
    ```
    """

    pad_token_id: int
    block_size: int = 1
    pad_to_multiple_of: int | None = None
    max_length: int | None = None
    return_tensors: str = "pt"

    def __post_init__(self) -> None:
        if not is_int(self.pad_token_id) or self.pad_token_id < 0:
            raise ValueError(f"`pad_token_id` must be a non-negative integer, got {self.pad_token_id!r}.")
        if self.block_size < 1:
            raise ValueError(f"`block_size` must be >= 1, got {self.block_size}.")
        if self.pad_to_multiple_of is None:
            self.pad_to_multiple_of = self.block_size
        if self.pad_to_multiple_of < 1 or self.pad_to_multiple_of % self.block_size != 0:
            raise ValueError(
                f"`pad_to_multiple_of`={self.pad_to_multiple_of} must be a positive multiple of `block_size`="
                f"{self.block_size}, or the padded batch cannot be split into blocks."
            )
        if self.max_length is not None and self.max_length % self.block_size != 0:
            raise ValueError(f"`max_length`={self.max_length} must be a multiple of `block_size`={self.block_size}.")
        if self.return_tensors != "pt":
            raise ValueError("`BD3LMDataCollator` only returns PyTorch tensors; use `return_tensors='pt'`.")

    def torch_call(self, examples: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("Cannot collate an empty list of examples.")
        rows = []
        for index, example in enumerate(examples):
            if not isinstance(example, Mapping) or "input_ids" not in example:
                raise TypeError("Every example must be a mapping with an `input_ids` entry.")
            ids = _example_ids(example["input_ids"], index)
            mask = example.get("attention_mask")
            if mask is not None:  # honour pre-padded examples
                ids = ids[torch.as_tensor(mask).reshape(-1).bool()]
            if ids.numel() == 0:
                raise ValueError(
                    f"Example {index} has no tokens (empty `input_ids`): nothing to train on; drop empty documents "
                    "(build_lm_dataset does)."
                )
            rows.append(ids)
        longest = max(len(ids) for ids in rows)
        if self.max_length is not None and longest > self.max_length:
            raise ValueError(
                f"An example has {longest} tokens, more than `max_length`={self.max_length}; build the dataset with "
                "`build_lm_dataset(..., model_length=config.model_length)`."
            )
        multiple = self.pad_to_multiple_of
        length = max(multiple, -(-longest // multiple) * multiple)
        if self.max_length is not None:  # both are multiples of block_size, so the cap keeps whole blocks
            length = min(length, self.max_length)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = ids
            attention_mask[i, : len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _example_ids(value: Any, index: int) -> torch.Tensor:
    """One example's `input_ids` as a flat long tensor; floats, strings and nested lists are refused."""
    try:
        ids = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"Example {index}: `input_ids` must be a list of integer token ids, got {type(value).__name__} ({error})."
        ) from error
    if ids.numel() == 0:  # an empty list has no integer dtype to check
        return torch.zeros(0, dtype=torch.long)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex() or ids.dim() > 1:
        raise TypeError(
            f"Example {index}: `input_ids` must be a flat list of integer token ids, got {ids.dtype} of shape "
            f"{tuple(ids.shape)}; tokenize the text first."
        )
    return ids.to(torch.long).reshape(-1)


__all__ = ["BD3LMDataCollator", "build_lm_dataset", "load_text_dataset"]
