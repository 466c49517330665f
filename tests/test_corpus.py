"""Tests for the embedded corpus and tokenizer (``bd3lm_trainer.corpus``); offline and fast."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

import pytest

try:
    from bd3lm_trainer import corpus
except ImportError:  # repository checkout without `pip install -e .`: load the folder directly
    _INIT = Path(__file__).resolve().parents[1] / "trainer" / "corpus" / "__init__.py"
    _SPEC = importlib.util.spec_from_file_location("_bd3lm_trainer_corpus", _INIT)
    assert _SPEC is not None and _SPEC.loader is not None
    corpus = importlib.util.module_from_spec(_SPEC)
    _SPEC.loader.exec_module(corpus)

VOCAB_SIZE = 8192
SENTENCES = [
    "In the beginning God created the heaven and the earth.",
    "To be, or not to be: that is the question:",
    "  Leading spaces,\ttabs,\nnewlines\n\nand trailing spaces.  ",
    "Unicode survives: café, naïve, — “quotes” and 日本語 ✓",
    "Numbers 1234567890 and symbols {}<>@#$%^&*_~|\\",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything here must work with the Hugging Face Hub unreachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    return corpus.load_tokenizer()


def _raw_texts(split: str) -> list[str]:
    with gzip.open(corpus.corpus_files()[split], "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def test_corpus_files_exist() -> None:
    files = corpus.corpus_files()
    assert set(files) == {"train", "validation"}
    for path in files.values():
        assert path.endswith(".jsonl.gz")
        assert os.path.isfile(path)
    readme = Path(files["train"]).with_name("README.md")
    assert readme.is_file()


def test_splits_load_nonempty_and_disjoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))  # no reliance on a warm cache
    train = corpus.load_corpus("train")
    validation = corpus.load_corpus("validation")
    assert train.column_names == ["text"] and validation.column_names == ["text"]
    assert len(train) > 0 and len(validation) > 0
    assert all(isinstance(t, str) and t.strip() for t in train["text"])
    assert all(isinstance(t, str) and t.strip() for t in validation["text"])
    assert set(train["text"]).isdisjoint(validation["text"])
    # The datasets view matches the raw files exactly.
    assert train["text"] == _raw_texts("train")
    assert validation["text"] == _raw_texts("validation")
    # Validation is big enough to be a meaningful held-out set (a few hundred KB).
    assert sum(map(len, validation["text"])) > 200_000


def test_no_document_shared_between_splits_even_in_part() -> None:
    # Documents are whole books/works; no document's opening appears in the other split.
    train, validation = _raw_texts("train"), _raw_texts("validation")
    train_heads = {t[:200] for t in train}
    assert not any(t[:200] in train_heads for t in validation)


@pytest.mark.parametrize("bad", ["test", "Train", "", "valid"])
def test_unknown_split_raises(bad: str) -> None:
    with pytest.raises(ValueError, match="split"):
        corpus.load_corpus(bad)


def test_tokenizer_loads_with_autotokenizer() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(corpus.tokenizer_path())
    assert tok.is_fast
    assert len(tok) == VOCAB_SIZE
    assert tok.backend_tokenizer.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE


def test_special_tokens(tokenizer) -> None:
    assert tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.bos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.mask_token == "<|mask|>"
    assert tokenizer.mask_token_id == len(tokenizer) - 1 == VOCAB_SIZE - 1
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id}
    assert len(ids) == 3
    # Each special token is a single id, also when it appears inside text.
    text = "a<|endoftext|>b<|pad|>c<|mask|>"
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id in encoded
    assert tokenizer.pad_token_id in encoded
    assert encoded[-1] == tokenizer.mask_token_id


@pytest.mark.parametrize("text", SENTENCES)
def test_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    # No post-processor: nothing is added automatically, even with the default arguments.
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.pad_token_id not in ids
    assert tokenizer.mask_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert max(ids) < len(tokenizer)


def test_round_trip_corpus_sample(tokenizer) -> None:
    sample = _raw_texts("validation")[0][:20_000]
    ids = tokenizer(sample)["input_ids"]
    assert tokenizer.decode(ids) == sample
    # BPE trained on this English compresses it well (~4 characters per token).
    assert len(sample) / len(ids) > 3.0


def test_decode_skips_special_tokens(tokenizer) -> None:
    ids = [tokenizer.bos_token_id, *tokenizer("Let there be light.")["input_ids"]]
    ids += [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Let there be light."


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers without a mask token (GPT-2, as the official checkpoints use): one is appended at the next id.


def _gpt2_style_folder(folder: Path) -> Path:
    """A GPT-2-like tokenizer (byte-level BPE, `<|endoftext|>` as BOS/EOS, no mask, no pad) built offline: 400 ids."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_raw_texts("validation")[:1], vocab_size=400, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(folder)
    return folder


def test_gpt2_style_tokenizer_gets_the_mask_at_the_next_id(tmp_path: Path) -> None:
    from bd3lm_trainer.corpus import MASK_TOKEN, load_gpt2_tokenizer

    folder = _gpt2_style_folder(tmp_path / "gpt2-like")
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(folder)
    assert plain.mask_token is None and plain.pad_token is None and len(plain) == 400
    tokenizer = load_gpt2_tokenizer(str(folder))
    assert tokenizer.mask_token == MASK_TOKEN
    assert tokenizer.mask_token_id == len(plain) == len(tokenizer) - 1  # GPT-2: 50257, vocab_size 50258
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    text = "And God said, Let there be light"
    assert tokenizer(text)["input_ids"] == plain(text)["input_ids"]  # ordinary ids unchanged
    tokenizer.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").mask_token_id == tokenizer.mask_token_id


def test_add_mask_token_keeps_an_existing_mask(tokenizer) -> None:
    from bd3lm_trainer.corpus import add_mask_token

    before = (len(tokenizer), tokenizer.mask_token_id, tokenizer.pad_token_id)
    assert add_mask_token(tokenizer) is tokenizer
    assert (len(tokenizer), tokenizer.mask_token_id, tokenizer.pad_token_id) == before


def test_add_mask_token_refuses_an_ordinary_token(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from bd3lm_trainer.corpus import add_mask_token

    tokenizer = AutoTokenizer.from_pretrained(_gpt2_style_folder(tmp_path / "t"))
    ordinary = next(token for token in tokenizer.get_vocab() if token.isalpha())
    with pytest.raises(ValueError, match="mask_token=.*already an ordinary token"):
        add_mask_token(tokenizer, mask_token=ordinary)


def test_gpt2_tokenizer_unavailable_offline_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bd3lm_trainer.corpus import load_gpt2_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not available here.*hf download gpt2"):
        load_gpt2_tokenizer(str(tmp_path / "no-such-folder"))


def test_cli_trains_with_a_tokenizer_that_had_no_mask(tmp_path: Path) -> None:
    import json

    from bd3lm_trainer.cli import main

    folder = _gpt2_style_folder(tmp_path / "gpt2-like")
    data = tmp_path / "train.txt"
    data.write_text(_raw_texts("validation")[0][:3000])
    out = tmp_path / "run"
    argv = [
        "train",
        "--tokenizer",
        str(folder),
        "--dataset",
        str(data),
        "--eval-dataset",
        str(data),
        "--output-dir",
        str(out),
        "--model-length",
        "16",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--warmup-steps",
        "0",
        "--eval-batches",
        "1",
        "--search-batches",
        "1",
        "--no-schedule-search",
    ]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert config["vocab_size"] == config["mask_token_id"] + 1 == 401
    assert saved["mask_token"] == "<|mask|>"
