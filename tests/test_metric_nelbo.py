"""The per-token NELBO as an `evaluate` metric module, loaded offline from its folder in the package."""

from __future__ import annotations

import math

import evaluate
import pytest
import torch

from bd3lm_trainer.corpus import load_tokenizer
from bd3lm_trainer.evaluation import NELBO_METRIC_PATH, nelbo
from tests.conftest import random_model

TEXTS = ["In the beginning God created the heaven and the earth.", "To be, or not to be"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = random_model(
        vocab_size=8192, hidden_dim=32, n_heads=2, n_blocks=1, cond_dim=16, block_size=1, always_mask=True
    )
    path = tmp_path_factory.mktemp("bd3lm")
    model.save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return model, str(path)


def test_metric_loads_from_a_local_path_and_equals_the_nelbo_of_each_text(checkpoint):
    model, path = checkpoint
    metric = evaluate.load(NELBO_METRIC_PATH)
    result = metric.compute(predictions=TEXTS, model_id=path, device="cpu")
    tokenizer = load_tokenizer()
    expected, total_nll, total = [], 0.0, 0
    for text in TEXTS:
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        out = nelbo(model, torch.tensor([ids]))
        value = float(out.per_token[0, 1:].sum())  # the BOS is context, not scored
        expected.append(value / (len(ids) - 1))
        total_nll += value
        total += len(ids) - 1
    assert result["nelbos"] == pytest.approx(expected, abs=1e-5)
    assert result["perplexities"] == pytest.approx([math.exp(v) for v in expected], rel=1e-5)
    assert result["num_tokens"] == total
    assert result["mean_nelbo"] == pytest.approx(total_nll / total, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total_nll / total), rel=1e-5)


def test_metric_accepts_token_ids_and_a_loaded_model(checkpoint):
    model, _ = checkpoint
    tokenizer = load_tokenizer()
    metric = evaluate.load(NELBO_METRIC_PATH)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    from_ids = metric.compute(predictions=ids, model=model, tokenizer=tokenizer)
    from_text = metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer)
    assert from_ids["nelbos"] == pytest.approx(from_text["nelbos"], abs=1e-6)


def test_metric_bad_input(checkpoint):
    model, _ = checkpoint
    metric = evaluate.load(NELBO_METRIC_PATH)
    with pytest.raises(ValueError, match="model_id"):
        metric.compute(predictions=TEXTS)
    with pytest.raises(ValueError, match="no tokens"):
        metric.compute(predictions=[""], model=model, tokenizer=load_tokenizer())
