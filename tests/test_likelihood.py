"""Tests of the likelihood bounds (`bd3lm_trainer.evaluation.likelihood`): NELBO exactness, unbiasedness, stratified
noise, conditional scores and windows, and that evaluation never reads the model's training noise interval."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bd3lm_trainer.corpus import load_tokenizer
from bd3lm_trainer.evaluation import (
    dataset_perplexity,
    nelbo,
    plan_windows,
    score_continuations,
    stratified_noise_levels,
)
from tests.conftest import random_model

ATOL = 1e-5
EPS = 1e-3  # the evaluation noise interval is U[1e-3, 1]


def _ids(batch: int, length: int, vocab: int = 63, seed: int = 0) -> torch.LongTensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def ar_nll(model, x_0: torch.LongTensor) -> torch.Tensor:
    """-log p(x^i | x^{<i}) of a block-size-1 model, one sampling pass per position (mask token at position i)."""
    mask_id = model.config.mask_token_id
    rows = []
    for i in range(x_0.shape[1]):
        window = torch.cat((x_0[:, :i], torch.full((x_0.shape[0], 1), mask_id)), dim=1)
        logits = model(window, return_dict=True).logits[:, -1].float()
        logits[:, mask_id] = float("-inf")
        rows.append(-torch.log_softmax(logits, -1).gather(-1, x_0[:, i : i + 1]))
    return torch.cat(rows, 1)


# ----------------------------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("always_mask", [True, False])
def test_block_size_one_nelbo_is_the_autoregressive_nll(always_mask):
    # always_mask: t ≡ 1 by configuration; otherwise the t-integral of a time-independent L'=1 model is done exactly.
    model = random_model(block_size=1, always_mask=always_mask)
    x_0 = _ids(2, 32)
    out = nelbo(model, x_0, num_samples=3)
    ar = ar_nll(model, x_0)
    torch.testing.assert_close(out.per_token, ar, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.per_sequence, ar.sum(1), rtol=0, atol=1e-4)
    assert out.num_tokens.tolist() == [32, 32] and out.per_draw.shape == (3, 2)
    torch.testing.assert_close(out.per_draw, ar.sum(1).expand(3, 2), rtol=0, atol=1e-4)  # deterministic: no variance


def test_a_single_draw_is_the_models_own_block_nelbo():
    model = random_model(block_size=4)
    x_0 = _ids(3, 32)
    out = nelbo(model, x_0, num_samples=1, generator=torch.Generator().manual_seed(5))
    # Replay the same random stream: noise levels first, then the masks drawn by the model itself.
    replay = torch.Generator().manual_seed(5)
    t = stratified_noise_levels(1, 3, 8, replay)[0]
    reference = model(x_0, labels=x_0, noise_levels=t, generator=replay, return_dict=True).token_loss
    torch.testing.assert_close(out.per_token, reference, rtol=0, atol=ATOL)


def _pattern_weight(n: int, k: int) -> float:
    """∫_ε^1 (1/t) t^k (1-t)^(n-k) dt / (1-ε), by expanding (1-t)^(n-k): the weight of one k-of-n mask pattern."""
    return sum(math.comb(n - k, j) * (-1) ** j * (1 - EPS ** (k + j)) / (k + j) for j in range(n - k + 1)) / (1 - EPS)


@torch.no_grad()
def _enumerated_nelbo(model, x_0: torch.LongTensor, length: int) -> float:
    """The NELBO expectation of one sequence, one block and one mask subset at a time (other blocks clean)."""
    bs = model.config.block_size
    width = -(-length // bs) * bs
    ids = torch.nn.functional.pad(x_0[:, :length], (0, width - length))
    mask = (torch.arange(width) < length).long()[None]
    total = 0.0
    for start in range(0, length, bs):
        positions = list(range(start, min(start + bs, length)))
        for k in range(1, len(positions) + 1):
            for subset in itertools.combinations(positions, k):
                x_t = ids.clone()
                x_t[0, list(subset)] = model.mask_token_id
                logits = model(ids, noisy_input_ids=x_t, attention_mask=mask, return_dict=True).logits.float()
                logits[..., model.mask_token_id] = float("-inf")
                nll = -torch.log_softmax(logits[0, list(subset)], -1).gather(-1, ids[0, list(subset)][:, None])
                total += _pattern_weight(len(positions), k) * float(nll.sum())
    return total


@pytest.mark.parametrize("block_size, length", [(2, 8), (4, 7)])
def test_exact_nelbo_enumerates_every_mask_pattern(block_size, length):
    # (4, 7): the last block has 3 real tokens and one padding position.
    model = random_model(block_size=block_size, model_length=8)
    x_0 = _ids(1, length, seed=3)
    out = nelbo(model, x_0, num_samples=2, exact=True)
    assert float(out.per_sequence[0]) == pytest.approx(_enumerated_nelbo(model, x_0, length), abs=1e-4)
    assert out.per_draw.shape == (2, 1) and bool((out.per_draw == out.per_sequence).all())


def test_monte_carlo_nelbo_is_unbiased():
    model = random_model(block_size=2, model_length=8)
    x_0 = _ids(1, 8, seed=3)
    exact = _enumerated_nelbo(model, x_0, 8)
    # 64 copies × 16 draws = 1024 estimates in 16 passes; the joint strata correlate the rows negatively, so the
    # naive standard error of their mean is conservative.
    out = nelbo(model, x_0.repeat(64, 1), num_samples=16, generator=torch.Generator().manual_seed(0))
    rows = out.per_sequence.double()
    stderr = float(rows.std() / math.sqrt(64))
    assert abs(float(rows.mean()) - exact) < 4 * stderr, (float(rows.mean()), exact, stderr)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 6), batch=st.integers(1, 4), blocks=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_noise_levels_cover_every_stratum_once_and_every_cell_covers_the_k_coarse_strata(k, batch, blocks, seed):
    t = stratified_noise_levels(k, batch, blocks, torch.Generator().manual_seed(seed))
    assert t.shape == (k, batch, blocks) and bool(((t >= EPS) & (t <= 1)).all())
    u = ((t.double() - EPS) / (1 - EPS)).clamp(0, 1 - 1e-12)
    n = k * batch * blocks
    assert sorted((u * n).floor().long().flatten().tolist()) == list(range(n))
    coarse = (u * k).floor().long().view(k, -1)
    assert bool((coarse.sort(dim=0).values == torch.arange(k)[:, None]).all())


def test_every_draw_of_every_cell_is_marginally_uniform():
    # The official sampler gives cell j the stratum j/N every time; ours randomises which cell gets which stratum.
    draws = torch.stack([stratified_noise_levels(2, 2, 2, torch.Generator().manual_seed(s)) for s in range(3000)])
    means = draws.mean(0)  # each (draw, row, block) position: mean of U[ε, 1] is (1 + ε) / 2
    assert float((means - (1 + EPS) / 2).abs().max()) < 0.03


def test_one_generator_per_row_makes_a_row_independent_of_its_batch():
    model = random_model(block_size=4)
    long_target = _ids(1, 45, seed=1)[0].tolist()
    pairs = [([1, 2, 3], [4, 5, 6]), ([7], long_target), ([9] * 10, [10, 11])]
    together = score_continuations(model, pairs, num_samples=3, batch_size=8, seed=4)
    alone = [score_continuations(model, [pair], num_samples=3, batch_size=1, seed=4)[0] for pair in pairs]
    for (a, _), (b, _) in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-4)


def test_conditional_score_is_the_exact_autoregressive_conditional_at_block_size_one():
    model = random_model(block_size=1, always_mask=True)
    x = _ids(1, 20, seed=2)
    [(value, greedy)] = score_continuations(model, [(x[0, :7].tolist(), x[0, 7:].tolist())], check_greedy=True)
    ar = ar_nll(model, x)[0]
    assert value == pytest.approx(float(ar[7:].sum()), abs=1e-4)
    # is_greedy: every target token is the argmax of its AR prediction
    mask_id = model.config.mask_token_id
    greedy_ids = [
        model(torch.cat((x[:, :i], torch.full((1, 1), mask_id)), 1)).logits[0, -1, :mask_id].argmax()
        for i in range(7, 20)
    ]
    assert greedy == all(int(g) == int(t) for g, t in zip(greedy_ids, x[0, 7:]))
    target = [int(g) for g in greedy_ids[:1]]  # the greedy first token alone is greedy
    assert score_continuations(model, [(x[0, :7].tolist(), target)], check_greedy=True)[0][1] is True


def test_context_stays_clean_and_uncounted_and_the_target_starts_on_a_block_boundary():
    model = random_model(block_size=4)
    seen = []
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append({"input_ids": args[0], **kwargs}), with_kwargs=True
    )
    try:
        score_continuations(model, [([1, 2, 3, 4, 5], [6, 7, 8]), ([9, 10], [11] * 6)], num_samples=4)
    finally:
        handle.remove()
    kwargs = seen[0]
    x_0 = kwargs.get("input_ids")
    labels, x_t = kwargs["labels"], kwargs["noisy_input_ids"]
    for row in range(2):
        first = int((labels[row] != -100).nonzero().min())
        assert first % 4 == 0
        assert torch.equal(x_t[row, :first], x_0[row, :first])  # context never masked
    assert sum(len(s["labels"][s["labels"] != -100]) for s in seen[:1]) == 3 + 6


@settings(max_examples=60, deadline=None)
@given(ctx=st.integers(0, 40), tgt=st.integers(1, 100), bs=st.sampled_from([1, 2, 4, 8]), stride=st.integers(1, 24))
def test_windows_fit_score_each_target_token_once_and_keep_the_preceding_text(ctx, tgt, bs, stride):
    length = 32
    context, target = list(range(1000, 1000 + ctx)), list(range(tgt))
    stride = min(stride, length - bs)
    windows = plan_windows(context, target, length, bs, stride)
    assert [tok for _, piece in windows for tok in piece] == target
    text = context + target
    done = 0
    for prefix, piece in windows:
        assert -(-len(prefix) // bs) * bs + -(-len(piece) // bs) * bs <= length
        start = len(context) + done
        assert prefix == text[start - len(prefix) : start]
        done += len(piece)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 1.5}, ValueError, "num_samples"),
        ({"input_ids": torch.zeros(0, 8, dtype=torch.long)}, ValueError, "empty"),
        ({"input_ids": torch.zeros(1, 40, dtype=torch.long)}, ValueError, "model_length"),
        ({"input_ids": torch.zeros(1, 8)}, TypeError, "integer"),
    ],
)
def test_nelbo_bad_input(kwargs, error, match):
    model = random_model()
    kwargs = {"input_ids": _ids(1, 8), **kwargs}
    with pytest.raises(error, match=match):
        nelbo(model, **kwargs)


TEXTS = ["In the beginning God created the heaven and the earth.", "To be, or not to be: that is the question."]


def test_evaluation_does_not_read_the_searched_training_interval():
    """Evaluation is always at t ∼ U[1e-3, 1]: a model whose training interval was searched (here clipped to
    [0.3, 0.8] with resampling, as the schedule search writes it, and left in training mode) scores exactly as before.
    With the default interval an evaluation that wrongly read the training interval would differ by 0.1% only."""
    model = random_model(
        vocab_size=8192, hidden_dim=32, n_heads=2, n_blocks=1, cond_dim=16, block_size=4, resample=True
    )
    tokenizer = load_tokenizer()
    ids = torch.randint(0, 8191, (3, 32), generator=torch.Generator().manual_seed(4))
    pairs = [(ids[0, :5].tolist(), ids[0, 5:20].tolist()), (ids[1, :9].tolist(), ids[1, 9:13].tolist())]

    def scores():
        bound = nelbo(model, ids, num_samples=3, generator=torch.Generator().manual_seed(0))
        perplexity = dataset_perplexity(model, TEXTS, tokenizer, num_samples=2, seed=1, progress=False)
        continuations = score_continuations(model, pairs, num_samples=2, seed=2)
        return bound.per_draw, perplexity.nelbo, continuations

    before = scores()
    model.set_noise_interval(0.3, 0.8)
    model.train()
    after = scores()
    assert model.training and model.training_noise_interval() == pytest.approx((0.3, 0.8))
    assert torch.equal(before[0], after[0])
    assert before[1:] == after[1:]
    # ... and the training estimator does read it: every block's masked fraction is then in [0.3, 0.8].
    out = model(ids, labels=ids, generator=torch.Generator().manual_seed(0), return_dict=True)
    fractions = (out.noisy_input_ids == 8191).view(3, 8, 4).float().mean(-1)
    assert bool(((fractions >= 0.3) & (fractions <= 0.8)).all())
