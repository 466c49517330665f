# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Tests of bd3lm_trainer.data: loading local files / Hub names, wrapping, special tokens, and the collator."""

from __future__ import annotations

import gzip
import json

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from bd3lm_trainer import BD3LMDataCollator, build_lm_dataset, load_text_dataset
from bd3lm_trainer import data as data_module

DOCS = ["hello world", "a b c", "", "the quick brown fox jumps", "xyz"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per character, plus PAD/BOS/EOS/UNK."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz ")
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------------------------------
# Shaping


def test_wrap_concatenates_with_eos_and_drops_the_remainder(tokenizer):
    eos = tokenizer.eos_token_id
    stream = [t for doc in DOCS for t in ids_of(tokenizer, doc) + [eos]]
    length = 8
    expected = [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]
    dataset = build_lm_dataset(DOCS, tokenizer, model_length=length)
    assert dataset.column_names == ["input_ids"]
    assert dataset["input_ids"] == expected
    assert len(stream) % length != 0  # the test really drops a remainder


def test_wrap_with_special_tokens_frames_every_chunk(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = [t for doc in DOCS for t in ids_of(tokenizer, doc) + [eos]]
    dataset = build_lm_dataset(DOCS, tokenizer, model_length=8, insert_special_tokens=True)
    expected = [[bos] + stream[i : i + 6] + [eos] for i in range(0, len(stream) - 5, 6)]
    assert dataset["input_ids"] == expected
    assert all(len(row) == 8 for row in dataset["input_ids"])


def test_wrap_without_eos_joins_documents(tokenizer):
    stream = [t for doc in DOCS for t in ids_of(tokenizer, doc)]
    dataset = build_lm_dataset(DOCS, tokenizer, model_length=4, insert_eos=False)
    assert dataset["input_ids"] == [stream[i : i + 4] for i in range(0, len(stream) - 3, 4)]


def test_no_wrap_keeps_one_truncated_example_per_document(tokenizer):
    eos = tokenizer.eos_token_id
    dataset = build_lm_dataset(DOCS, tokenizer, model_length=8, wrap=False)
    assert dataset["input_ids"] == [(ids_of(tokenizer, doc) + [eos])[:8] for doc in DOCS]
    framed = build_lm_dataset(DOCS, tokenizer, model_length=8, wrap=False, insert_special_tokens=True)
    bos = tokenizer.bos_token_id
    assert framed["input_ids"][3] == [bos] + ids_of(tokenizer, DOCS[3])[:6] + [eos]


def test_pretokenized_dataset_is_wrapped(tokenizer):
    pre = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]]})
    dataset = build_lm_dataset(pre, tokenizer, model_length=3)
    eos = tokenizer.eos_token_id
    assert dataset["input_ids"] == [[5, 6, 7], [eos, 8, 9]]


def test_iterable_dataset_is_shaped_lazily(tokenizer):
    streamed = build_lm_dataset(datasets.Dataset.from_dict({"text": DOCS}).to_iterable_dataset(), tokenizer, 8)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [row["input_ids"] for row in streamed] == build_lm_dataset(DOCS, tokenizer, 8)["input_ids"]


def test_remainder_is_dropped_per_map_batch(tokenizer):
    docs = ["abc"] * 6  # 4 tokens each with EOS
    whole = build_lm_dataset(docs, tokenizer, model_length=6)
    split = build_lm_dataset(docs, tokenizer, model_length=6, map_batch_size=3)
    assert len(whole) == 4 and len(split) == 4  # 12 tokens per map batch of 3 documents = 2 chunks each
    assert build_lm_dataset(docs, tokenizer, model_length=6, map_batch_size=1).num_rows == 0


# ----------------------------------------------------------------------------------------------------------------------
# Sources


def _write(path, fmt: str) -> None:
    rows = [{"text": doc, "id": i} for i, doc in enumerate(DOCS)]
    if fmt == "txt":
        path.write_text("\n".join(DOCS) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif fmt == "jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "json", "parquet", "csv"])
def test_local_files_give_the_same_dataset(tmp_path, tokenizer, fmt):
    path = tmp_path / f"docs.{fmt}"
    _write(path, fmt)
    expected = build_lm_dataset(DOCS, tokenizer, model_length=8)["input_ids"]
    assert build_lm_dataset(str(path), tokenizer, model_length=8)["input_ids"] == expected


def test_text_file_is_one_document_per_line(tmp_path, tokenizer):
    path = tmp_path / "docs.txt"
    _write(path, "txt")
    loaded = load_text_dataset(path)
    assert loaded["text"] == DOCS
    expected = build_lm_dataset(DOCS, tokenizer, model_length=8)["input_ids"]
    assert build_lm_dataset(path, tokenizer, model_length=8)["input_ids"] == expected


def test_saved_dataset_folder_and_dataset_dict(tmp_path, tokenizer):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": DOCS}),
            "validation": datasets.Dataset.from_dict({"text": ["abc"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    assert load_text_dataset(str(tmp_path / "saved"), split="validation")["text"] == ["abc"]
    assert load_text_dataset(dd, split="train")["text"] == DOCS
    with pytest.raises(ValueError, match="split"):
        load_text_dataset(dd, split="test")


def test_hub_names_go_to_load_dataset(monkeypatch, tokenizer):
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        return datasets.Dataset.from_dict({"text": DOCS})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = build_lm_dataset("some-org/some-corpus", tokenizer, 8, split="validation", dataset_config_name="raw")
    assert calls == [("some-org/some-corpus", "raw", "validation", False)]
    assert len(dataset) > 0


def test_unreachable_hub_name_raises_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="not a local file"):
        load_text_dataset("no-such-org/no-such-dataset")


def test_bad_inputs_raise(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="model_length"):
        build_lm_dataset(DOCS, tokenizer, model_length=0)
    with pytest.raises(ValueError, match="text_column"):
        build_lm_dataset(datasets.Dataset.from_dict({"text": DOCS}), tokenizer, model_length=8, text_column="body")
    with pytest.raises(TypeError, match="strings"):
        load_text_dataset(["ok", 3])
    with pytest.raises(TypeError, match="dataset_or_path"):
        load_text_dataset(42)
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="extension"):
        load_text_dataset(str(tmp_path / "data.xml"))
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="EOS"):
        build_lm_dataset(DOCS, no_eos, model_length=8)
    assert data_module._builder_for_file("x.JSONL.GZ") == "json"


# ----------------------------------------------------------------------------------------------------------------------
# Collator


def test_collator_equal_lengths_needs_no_padding():
    batch = BD3LMDataCollator(pad_token_id=0, block_size=4)([{"input_ids": [1, 2, 3, 4]}, {"input_ids": [5, 6, 7, 8]}])
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]))
    assert bool(batch["attention_mask"].all()) and torch.equal(batch["labels"], batch["input_ids"])


def test_collator_pads_to_a_block_multiple():
    collator = BD3LMDataCollator(pad_token_id=9, block_size=4)
    batch = collator([{"input_ids": [1, 2, 3, 4, 5]}, {"input_ids": torch.tensor([6, 7])}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 9, 9], [6, 7, 9, 9, 9, 9, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 2 + [0] * 6]
    assert batch["labels"].tolist() == [[1, 2, 3, 4, 5] + [-100] * 3, [6, 7] + [-100] * 6]
    # a pre-padded example keeps only its real tokens
    again = collator([{"input_ids": [6, 7, 0, 0], "attention_mask": [1, 1, 0, 0]}])
    assert again["input_ids"].tolist() == [[6, 7, 9, 9]]


def test_collator_errors():
    with pytest.raises(ValueError, match="max_length"):
        BD3LMDataCollator(pad_token_id=0, block_size=4, max_length=8)([{"input_ids": list(range(9))}])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        BD3LMDataCollator(pad_token_id=0, block_size=4, pad_to_multiple_of=6)
    with pytest.raises(ValueError, match="pad_token_id"):
        BD3LMDataCollator(pad_token_id=None, block_size=4)
    with pytest.raises(ValueError, match="return_tensors"):
        BD3LMDataCollator(pad_token_id=0, return_tensors="np")
    with pytest.raises(TypeError, match="input_ids"):
        BD3LMDataCollator(pad_token_id=0)([{"ids": [1]}])


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=6),
    block_size=st.sampled_from([1, 2, 4, 8]),
)
def test_collator_properties(lengths, block_size):
    rows = [[(7 * i + j) % 50 + 1 for j in range(n)] for i, n in enumerate(lengths)]
    batch = BD3LMDataCollator(pad_token_id=0, block_size=block_size, max_length=32)([{"input_ids": r} for r in rows])
    width = batch["input_ids"].shape[1]
    assert width % block_size == 0 and max(lengths) <= width < max(lengths) + block_size
    assert batch["attention_mask"].sum(-1).tolist() == lengths
    for i, row in enumerate(rows):
        assert batch["input_ids"][i, : len(row)].tolist() == row
        assert batch["labels"][i, : len(row)].tolist() == row
        assert bool((batch["labels"][i, len(row) :] == -100).all())
