"""Tests of generative perplexity (`bd3lm_trainer.evaluation.generative_perplexity`) with a tiny random GPT-2 judge, offline."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from bd3lm_trainer.corpus import load_tokenizer
from bd3lm_trainer.evaluation.generative_perplexity import (
    generative_perplexity,
    judge_windows,
    network_calls_per_token,
    unigram_entropy,
)

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "To be, or not to be: that is the question: whether 'tis nobler in the mind to suffer the slings and arrows.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _judge(tokenizer, n_positions: int = 64, scale: float = 1.0, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    judge = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        judge.transformer.wte.weight.mul_(scale)  # tied output head: a larger scale gives peakier predictions
    return judge


@torch.no_grad()
def _direct_nll(judge, ids: list[int], eos: int) -> tuple[float, int]:
    """Σ -log p(y_ℓ | y_<ℓ) over one full-context pass, EOS targets excluded."""
    x = torch.tensor([ids])
    logits = judge(input_ids=x).logits[0, :-1].float()
    nll = F.cross_entropy(logits, x[0, 1:], reduction="none")
    keep = x[0, 1:] != eos
    return float(nll[keep].sum()), int(keep.sum())


def _judge_ids(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_sample_that_fits_the_context_equals_one_full_pass(tokenizer):
    judge = _judge(tokenizer)
    result = generative_perplexity(TEXTS[:1], judge, tokenizer, max_length=64, stride=7)
    nll, n = _direct_nll(judge, _judge_ids(tokenizer, TEXTS[0]), tokenizer.eos_token_id)
    assert result.num_tokens == n
    assert result.gen_ppl == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_the_sliding_window_equals_a_per_position_computation(tokenizer):
    judge = _judge(tokenizer)
    ids = _judge_ids(tokenizer, TEXTS[1] * 2)
    max_length, stride = 16, 5
    assert len(ids) > 3 * max_length
    total, cache = 0.0, {}
    for pos in range(1, len(ids)):
        # the window that scores `pos`: the first max_length tokens, else the one whose end is the first of
        # max_length + j·stride (capped at the length) past pos, holding the max_length tokens before that end
        j = 0 if pos < max_length else -(-(pos + 1 - max_length) // stride)
        end = min(max_length + j * stride, len(ids))
        begin = max(0, end - max_length)
        if (begin, end) not in cache:
            with torch.no_grad():
                cache[begin, end] = judge(input_ids=torch.tensor([ids[begin:end]])).logits[0].float()
        total += float(-torch.log_softmax(cache[begin, end][pos - begin - 1], -1)[ids[pos]])
    result = generative_perplexity([TEXTS[1] * 2], judge, tokenizer, max_length=max_length, stride=stride)
    assert result.num_tokens == len(ids) - 1
    assert result.nll == pytest.approx(total / (len(ids) - 1), rel=1e-5)


@settings(max_examples=100, deadline=None)
@given(length=st.integers(0, 200), max_length=st.integers(2, 40), data=st.data())
def test_windows_credit_every_position_once_with_enough_context(length, max_length, data):
    stride = data.draw(st.integers(1, max_length - 1))
    credited = []
    for begin, end, first in judge_windows(length, max_length, stride):
        assert 0 <= begin < first <= end <= length and end - begin <= max_length
        credited.extend(range(first, end))
        if begin > 0:  # after the first window, every credited position has at least max_length - stride of context
            assert first - begin >= max_length - stride
    assert credited == list(range(1, length))


def test_corpus_level_gen_ppl_is_not_the_mean_of_per_sample_ppls(tokenizer):
    judge = _judge(tokenizer, scale=8.0)  # peaky: samples get very different per-token NLLs
    samples = [TEXTS[0][:12], TEXTS[1]]
    result = generative_perplexity(samples, judge, tokenizer)
    per = [_direct_nll(judge, _judge_ids(tokenizer, s), tokenizer.eos_token_id) for s in samples]
    corpus = math.exp(sum(n for n, _ in per) / sum(c for _, c in per))
    mean_of_ppls = sum(math.exp(n / c) for n, c in per) / 2
    assert math.log(result.gen_ppl) == pytest.approx(math.log(corpus), abs=1e-4)
    assert math.log(result.mean_sample_ppl) == pytest.approx(math.log(mean_of_ppls), abs=1e-4)
    assert [math.log(p) for p in result.per_sample_ppl] == pytest.approx([n / c for n, c in per], abs=1e-4)
    assert abs(math.log(result.gen_ppl) - math.log(result.mean_sample_ppl)) > 0.05


def test_token_id_samples_map_document_boundaries_to_the_judges_eos(tokenizer):
    judge = _judge(tokenizer)
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sample = [eos, *enc("Hello there"), eos, *enc(" and more"), pad, pad]
    result = generative_perplexity([torch.tensor(sample)], judge, tokenizer, tokenizer=tokenizer)
    nll, n = _direct_nll(judge, [eos, *enc("Hello there"), eos, *enc(" and more")], eos)
    assert result.num_tokens == n == len(enc("Hello there")) + len(enc(" and more"))  # EOS targets excluded
    assert result.gen_ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert result.unigram_entropy == pytest.approx(unigram_entropy(enc("Hello there") + enc(" and more")))


def test_a_judge_tokenizer_that_cannot_represent_the_samples_is_an_error(tokenizer):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    backend = Tokenizer(WordLevel({"[UNK]": 0, "<eos>": 1, "in": 2, "the": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    word_level = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>")
    judge = GPT2LMHeadModel(GPT2Config(vocab_size=4, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="cannot represent sample 0"):
        generative_perplexity(["In the beginning"], judge, word_level)
    with pytest.raises(ValueError, match="cannot represent sample 0"):  # no unknown token, but lossy ("in the")
        generative_perplexity(["in  the"], judge, word_level)


def test_bad_samples_are_errors(tokenizer):
    judge = _judge(tokenizer)
    with pytest.raises(ValueError, match="empty"):
        generative_perplexity([], judge, tokenizer)
    with pytest.raises(ValueError, match="mask tokens"):
        generative_perplexity([[5, 6, tokenizer.mask_token_id]], judge, tokenizer, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="need `tokenizer`"):
        generative_perplexity([[5, 6, 7]], judge, tokenizer)
    with pytest.raises(ValueError, match="stride"):
        generative_perplexity(TEXTS, judge, tokenizer, max_length=8, stride=8)


def test_unigram_entropy():
    assert unigram_entropy([3, 3, 3]) == 0.0
    assert unigram_entropy([1, 2, 1, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))


def test_network_calls_per_token_from_generate_outputs():
    outputs = [
        SimpleNamespace(nfe=torch.tensor([8, 4]), tokens_per_forward=torch.tensor([1.0, 2.0])),  # 8 + 8 tokens
        SimpleNamespace(nfe=torch.tensor([2]), tokens_per_forward=torch.tensor([4.0])),  # 8 tokens
    ]
    nfe_per_token, tokens_per_forward = network_calls_per_token(outputs)
    assert nfe_per_token == pytest.approx(14 / 24) and tokens_per_forward == pytest.approx(24 / 14)
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        network_calls_per_token(torch.zeros(2, 3))


def test_gen_ppl_of_generated_samples_reports_network_calls(tokenizer):
    from tests.conftest import random_model

    model = random_model(vocab_size=8192, hidden_dim=32, n_heads=2, n_blocks=1, cond_dim=16, block_size=4)
    prompt = torch.full((2, 1), tokenizer.bos_token_id)
    try:
        out = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=True, return_dict_in_generate=True, seed=0)
    except NotImplementedError:
        pytest.skip("generate() has not landed yet")
    result = generative_perplexity(
        out.sequences, _judge(tokenizer), tokenizer, tokenizer=tokenizer, generation_outputs=out
    )
    new_tokens = (out.tokens_per_forward * out.nfe.clamp_min(1)).sum()
    assert result.nfe_per_token == pytest.approx(float(out.nfe.sum() / new_tokens))
    assert result.num_samples == 2
