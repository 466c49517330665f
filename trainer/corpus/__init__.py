"""Embedded public-domain English corpus and its byte-level BPE tokenizer.

The package ships, with nothing to download at run time:

* two splits of gzip-compressed JSON Lines (``{"text": ...}`` per line, one document per King
  James Bible book or Shakespeare work) -- see :func:`corpus_files` and :func:`load_corpus`;
* an 8192-id byte-level BPE tokenizer trained on the train split, with ``<|endoftext|>`` as
  BOS/EOS, ``<|pad|>`` for padding and ``<|mask|>`` as the last id (``vocab_size - 1``) -- see
  :func:`tokenizer_path` and :func:`load_tokenizer`.

Provenance, licence, cleaning, the split rule and sizes are in ``README.md`` next to this file;
``build_corpus.py`` is the one-off script that produced the data files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from modeling_bd3lm.tokenization_bd3lm import MASK_TOKEN, add_pad_token, load_pretrained_tokenizer
from modeling_bd3lm.tokenization_bd3lm import add_mask_token as _give_mask_token

if TYPE_CHECKING:  # heavy imports stay lazy: importing this package costs nothing
    import datasets
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "CORPUS_DESCRIPTION",
    "CORPUS_LICENSE",
    "CORPUS_NAME",
    "MASK_TOKEN",
    "SPLITS",
    "add_mask_token",
    "corpus_files",
    "load_corpus",
    "load_gpt2_tokenizer",
    "load_tokenizer",
    "resolve_tokenizer",
    "tokenizer_path",
]

_HERE = Path(__file__).resolve().parent

#: The name that `--dataset`, `--tokenizer`, `load_eval_dataset` and the training-data record use for this corpus and
#: its tokenizer, wherever a folder or Hub id is accepted.
CORPUS_NAME = "bd3lm-corpus"
#: What it is, in a few words, and its licence (README.md next to this file gives provenance and the reasoning).
CORPUS_DESCRIPTION = "King James Bible + Shakespeare, the embedded English corpus of the bd3lm package"
CORPUS_LICENSE = "public domain"

#: The split names, in the order :func:`corpus_files` lists them.
SPLITS: tuple[str, ...] = ("train", "validation")


def corpus_files() -> dict[str, str]:
    """Return the path of each split's ``.jsonl.gz`` file, keyed by split name.

    Returns:
        ``{"train": ".../train.jsonl.gz", "validation": ".../validation.jsonl.gz"}`` as absolute
        path strings inside the installed package.
    """
    return {split: str(_HERE / f"{split}.jsonl.gz") for split in SPLITS}


def load_corpus(split: str) -> datasets.Dataset:
    """Load one split of the embedded corpus as a :class:`datasets.Dataset` (works offline).

    Args:
        split: ``"train"`` or ``"validation"``.

    Returns:
        A dataset with a single string column ``"text"``, one row per document.

    Raises:
        ValueError: if ``split`` is not one of :data:`SPLITS`.
    """
    files = corpus_files()
    if split not in files:
        raise ValueError(f"split must be one of {list(SPLITS)}, got split={split!r}")
    import datasets  # local import: only needed when a corpus is actually loaded

    return datasets.load_dataset("json", data_files={split: files[split]}, split=split)


def tokenizer_path() -> str:
    """Return the folder of the embedded tokenizer, for ``AutoTokenizer.from_pretrained``."""
    return str(_HERE / "tokenizer")


def load_tokenizer() -> PreTrainedTokenizerFast:
    """Load the embedded tokenizer (offline) as a transformers fast tokenizer.

    Returns:
        The byte-level BPE tokenizer: ``len(tokenizer) == 8192``, ``bos_token == eos_token ==
        "<|endoftext|>"``, ``pad_token == "<|pad|>"`` and ``mask_token == "<|mask|>"`` with
        ``mask_token_id == len(tokenizer) - 1``. Encoding adds no special tokens by itself.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path())


def resolve_tokenizer(
    name: str | os.PathLike | None = None,
    *,
    add_mask: bool = False,
    revision: str | None = None,
    gguf_file: str | None = None,
) -> PreTrainedTokenizerBase:
    """The one way this package turns a tokenizer argument into a tokenizer.

    Args:
        name: ``None`` or ``"bd3lm-corpus"`` for the embedded tokenizer; otherwise a folder or Hub id, loaded with
            ``AutoTokenizer`` and never with remote code (a tokenizer needs none; the notice transformers prints about
            a checkpoint's custom config is silenced).
        add_mask: give a tokenizer without a mask token one (:func:`add_mask_token`; GPT-2 -> id 50257).
        revision: the Hub revision to load.
        gguf_file: a GGUF file inside ``name`` whose embedded tokenizer to read.
    """
    if name is None or name == CORPUS_NAME:
        tokenizer = load_tokenizer()
    else:
        extra = {"gguf_file": gguf_file} if gguf_file is not None else {}
        tokenizer = load_pretrained_tokenizer(name, revision=revision, **extra)
    return add_mask_token(tokenizer) if add_mask else tokenizer


def add_mask_token(tokenizer: PreTrainedTokenizerBase, mask_token: str = MASK_TOKEN) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` a mask token at the next free id if it has none; pad with EOS if it has no pad token.

    This is how the released BD3-LM / MDLM checkpoints extend GPT-2: its 50257 ids plus one mask token, id 50257, so
    ``vocab_size == len(tokenizer) == 50258``. A tokenizer that already has a mask token is returned unchanged. The
    work is done by the package's one owner of these rules, :mod:`modeling_bd3lm.tokenization_bd3lm`
    (``add_mask_token`` and ``add_pad_token``); this name returns the tokenizer, as it did in 0.1.

    Args:
        tokenizer: any transformers tokenizer; modified in place.
        mask_token: the string of the new special token.

    Returns:
        The same tokenizer, with ``mask_token_id == len(tokenizer) - 1`` when a token was added.
    """
    _give_mask_token(tokenizer, mask_token=mask_token)
    return add_pad_token(tokenizer)


def load_gpt2_tokenizer(name_or_path: str = "gpt2") -> PreTrainedTokenizerBase:
    """The tokenizer of the official BD3-LM checkpoints: GPT-2's byte-level BPE plus ``<|mask|>`` at id 50257.

    Args:
        name_or_path: a folder with GPT-2's tokenizer files, or a Hub id (``"gpt2"``; needs the network or the local
            Hugging Face cache).

    Raises:
        OSError: the files are not available (offline and not cached), with the way to fix it.
    """
    try:
        return resolve_tokenizer(name_or_path, add_mask=True)
    except OSError as err:
        raise OSError(
            f"The GPT-2 tokenizer {name_or_path!r} is not available here (offline and not in the Hugging Face cache). "
            "Download it once with `hf download gpt2 tokenizer.json vocab.json merges.txt tokenizer_config.json` "
            "or pass a folder that holds those files."
        ) from err
