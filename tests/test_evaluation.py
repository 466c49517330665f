"""Tests of the perplexity protocol (`bd3lm_trainer.evaluation.perplexity`) and of the `bd3lm eval` command
(`bd3lm_trainer.cli.eval`)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from bd3lm_trainer.cli.eval import add_eval_arguments, evaluate_from_args, run_eval
from bd3lm_trainer.corpus import load_corpus, load_tokenizer
from bd3lm_trainer.evaluation import dataset_perplexity, resolve_device, wrap_documents
from tests.conftest import random_model
from tests.test_likelihood import TEXTS, ar_nll

# ----------------------------------------------------------------------------------------------------------------------
# Datasets and perplexity


def test_wrap_documents_appends_eos_and_keeps_the_remainder():
    assert wrap_documents([[1, 2, 3], [4, 5]], 3, 0) == [[1, 2, 3], [0, 4, 5], [0]]
    assert wrap_documents([[1, 2, 3], [4]], 3, 0, wrap=False) == [[1, 2, 3], [0], [4, 0]]


@pytest.fixture(scope="module")
def corpus_model():
    """A block-size-1 model over the shipped 8192-id tokenizer (mask = 8191 = the tokenizer's mask id)."""
    return random_model(
        vocab_size=8192, hidden_dim=32, n_heads=2, n_blocks=1, cond_dim=16, block_size=1, always_mask=True
    )


def test_dataset_perplexity_is_the_token_mean_over_wrapped_chunks(corpus_model):
    tokenizer = load_tokenizer()
    result = dataset_perplexity(corpus_model, TEXTS, tokenizer, batch_size=1, progress=False)
    documents = tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    chunks = wrap_documents(documents, 32, tokenizer.eos_token_id)
    nlls = [ar_nll(corpus_model, torch.tensor([chunk]))[0] for chunk in chunks]
    total = sum(len(c) for c in chunks)
    assert result.num_tokens == total and result.num_sequences == len(chunks)
    assert result.nelbo == pytest.approx(float(sum(n.sum() for n in nlls)) / total, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.nelbo))
    without_bos = dataset_perplexity(corpus_model, TEXTS, tokenizer, ignore_bos=True, progress=False)
    assert without_bos.num_tokens == total - len(chunks)
    assert without_bos.nelbo == pytest.approx(float(sum(n[1:].sum() for n in nlls)) / (total - len(chunks)), abs=1e-5)


def test_dataset_perplexity_reads_a_local_file_and_is_seeded(tmp_path):
    model = random_model(vocab_size=8192, hidden_dim=32, n_heads=2, n_blocks=1, cond_dim=16, block_size=4)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    tokenizer = load_tokenizer()
    a = dataset_perplexity(model, str(path), tokenizer, num_samples=2, seed=1, progress=False)
    b = dataset_perplexity(model, str(path), tokenizer, batch_size=1, num_samples=2, seed=1, progress=False)
    c = dataset_perplexity(model, str(path), tokenizer, num_samples=2, seed=2, progress=False)
    assert a.num_tokens == b.num_tokens and a.num_samples == 2
    assert a.nelbo != c.nelbo  # Monte-Carlo at L'=4: the seed matters ...
    assert a.nelbo == dataset_perplexity(model, str(path), tokenizer, num_samples=2, seed=1, progress=False).nelbo


def test_dataset_perplexity_bad_input(corpus_model):
    tokenizer = load_tokenizer()
    with pytest.raises(ValueError, match="empty"):
        dataset_perplexity(corpus_model, [], tokenizer, progress=False)
    with pytest.raises(ValueError, match="empty"):
        dataset_perplexity(corpus_model, ["", ""], tokenizer, progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        dataset_perplexity(corpus_model, TEXTS, tokenizer, num_samples=0, progress=False)
    with pytest.raises(ValueError, match="text_column"):
        dataset_perplexity(corpus_model, TEXTS, tokenizer, text_column="body", progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# `bd3lm eval`


def test_run_eval_prints_a_table_and_writes_json(tmp_path, corpus_model, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load_tokenizer()
    corpus_model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    judge = GPT2LMHeadModel(GPT2Config(vocab_size=8192, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    judge.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    (tmp_path / "samples.txt").write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            str(tmp_path / "model"),
            "--dataset",
            str(tmp_path / "docs.jsonl"),
            "--judge",
            str(tmp_path / "judge"),
            "--samples",
            str(tmp_path / "samples.txt"),
            "--output",
            str(tmp_path / "out" / "results.json"),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    results = evaluate_from_args(args)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    ppl = written["perplexity"][str(tmp_path / "docs.jsonl")]
    assert ppl["perplexity"] == pytest.approx(
        dataset_perplexity(corpus_model, TEXTS, tokenizer, progress=False).perplexity, rel=1e-5
    )
    assert written["generative_perplexity"]["num_samples"] == 2
    table = capsys.readouterr().out
    assert "gen_ppl" in table and "perplexity" in table
    assert run_eval(args) == 0  # the command's exit status


def test_run_eval_defaults_to_the_embedded_corpus_validation_split(tmp_path, corpus_model, capsys):
    """`bd3lm eval MODEL` with nothing to evaluate named: the bound on the validation split of the embedded corpus (the
    data `bd3lm train` uses by default), and it says so."""
    load_tokenizer().save_pretrained(tmp_path / "model")
    corpus_model.save_pretrained(tmp_path / "model")
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args(
        [str(tmp_path / "model"), "--max-documents", "1", "--device", "cpu", "--no-progress"]
    )
    results = evaluate_from_args(args)
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line == (
        "bd3lm eval: no --dataset, --judge or --tasks given: the perplexity bound on `bd3lm-corpus` (King James Bible "
        "+ Shakespeare, the embedded English corpus of the bd3lm package), validation split"
    )
    [(name, result)] = results["perplexity"].items()
    first = load_corpus("validation")[0]["text"]  # Proverbs
    expected = dataset_perplexity(corpus_model, [first], load_tokenizer(), progress=False)
    assert name == "bd3lm-corpus" and result == expected.to_dict()
    assert result["num_tokens"] == len(load_tokenizer()(first, add_special_tokens=False)["input_ids"]) + 1  # + EOS


def test_resolve_device(monkeypatch):
    """An absent accelerator: a one-line error naming `--device cpu`, or (lm-eval's default) the CPU after a warning."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'cuda:0' is not available .*; pass `--device cpu`\.$"):
        resolve_device("cuda:0")
    assert resolve_device("cuda:0", fallback=True) == torch.device("cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(None) == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="has 1 cuda device"):
        resolve_device("cuda:1", fallback=True)  # a wrong index is a choice, not lm-eval's default


def test_generated_samples_depend_on_their_index_not_on_the_batch_size():
    """`bd3lm eval` samples for generative perplexity from BOS with one seed per sample: every row of a batch differs,
    and --gen-batch-size changes nothing."""
    from types import SimpleNamespace

    from bd3lm_trainer.cli.eval import _generate_samples

    model = random_model()
    tokenizer = SimpleNamespace(bos_token_id=1, eos_token_id=2)

    def samples(batch_size: int) -> list:
        args = argparse.Namespace(
            gen_kwargs="{}", gen_length=8, num_gen_samples=4, gen_batch_size=batch_size, seed=3, no_progress=True
        )
        return _generate_samples(model, tokenizer, args)[0]

    four = samples(4)
    assert four == samples(3) and len({tuple(s) for s in four}) == 4
