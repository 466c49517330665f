"""Tests of the samplers (`sampling_bd3lm.py`) on hand-built probabilities, as diffusers tests its schedulers: each
selection rule on distributions of known confidence, margin and entropy, the nucleus rule, the categorical draw."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import TopPLogitsWarper

from modeling_bd3lm.sampling_bd3lm import (
    SAMPLERS,
    BD3LMNucleusLogitsWarper,
    ConfidenceThresholdSampler,
    DDPMSampler,
    EntropySampler,
    FirstHittingSampler,
    MarginSampler,
    TopKConfidenceSampler,
    sample_categorical,
    select_top,
)


def test_nucleus_rule_is_stricter_than_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    scores = probs.log()
    ours = BD3LMNucleusLogitsWarper(0.9)(None, scores)
    hf = TopPLogitsWarper(0.9)(None, scores)
    assert torch.isfinite(ours).tolist() == [[True, True, False, False]]  # 0.5, 0.8 <= 0.9; 0.95 > 0.9
    assert torch.isfinite(hf).tolist() == [[True, True, True, False]]  # HF keeps the token that crosses p
    top1_only = BD3LMNucleusLogitsWarper(0.1)(None, scores)
    assert torch.isfinite(top1_only).tolist() == [[True, False, False, False]]  # the top-1 always survives


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=12), st.integers(0, 2**31 - 1))
def test_sample_categorical_never_picks_zero_probability(weights, seed):
    probs = torch.tensor(weights, dtype=torch.float64)
    if float(probs.sum()) == 0:
        probs[0] = 1.0
    draws = sample_categorical(probs.expand(64, -1), torch.Generator().manual_seed(seed))
    assert bool((probs[draws] > 0).all())


def test_sample_categorical_matches_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    draws = sample_categorical(probs.expand(40000, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / 40000
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.01)


def _block_probs() -> tuple[torch.BoolTensor, torch.DoubleTensor, torch.LongTensor]:
    # two rows of four positions over a 3-token vocabulary; row 1 position 0 is already unmasked
    probs = torch.tensor(
        [
            [[0.9, 0.05, 0.05], [0.5, 0.5, 0.0], [0.4, 0.3, 0.3], [0.6, 0.4, 0.0]],
            [[1.0, 0.0, 0.0], [0.34, 0.33, 0.33], [0.7, 0.2, 0.1], [0.95, 0.05, 0.0]],
        ],
        dtype=torch.float64,
    )
    masked = torch.tensor([[True, True, True, True], [False, True, True, True]])
    return masked, probs, probs.argmax(-1)


def test_confidence_orderings_on_known_distributions():
    masked, probs, tokens = _block_probs()
    top2 = TopKConfidenceSampler(tokens_per_step=2).select(masked, probs, tokens, 0, None)
    assert top2.tolist() == [[True, False, False, True], [False, False, True, True]]
    margin = MarginSampler(tokens_per_step=1).select(masked, probs, tokens, 0, None)
    assert margin.tolist() == [[True, False, False, False], [False, False, False, True]]
    low_entropy = EntropySampler(tokens_per_step=1).select(masked, probs, tokens, 0, None)
    assert low_entropy.tolist() == [[True, False, False, False], [False, False, False, True]]
    # [0.6, 0.4] has a larger margin than [0.5, 0.5] but the same support; entropy ranks it above [.4, .3, .3]
    assert EntropySampler(tokens_per_step=3).select(masked, probs, tokens, 0, None)[0].tolist() == [
        True,
        True,
        False,
        True,
    ]


def test_confidence_threshold_selects_all_above_and_at_least_one():
    masked, probs, tokens = _block_probs()
    sampler = ConfidenceThresholdSampler(confidence_threshold=0.6)
    assert sampler.select(masked, probs, tokens, 0, None).tolist() == [
        [True, False, False, True],
        [False, False, True, True],
    ]
    none_above = ConfidenceThresholdSampler(confidence_threshold=0.99)
    assert none_above.select(masked, probs, tokens, 0, None).tolist() == [
        [True, False, False, False],
        [False, False, False, True],
    ]
    # a step budget forces ceil(masked / steps left) tokens
    budget = ConfidenceThresholdSampler(confidence_threshold=0.99, num_steps=2)
    assert budget.select(masked, probs, tokens, 0, None).sum(-1).tolist() == [2, 2]


def test_first_hitting_and_ddpm_select_masked_positions_only():
    masked, probs, tokens = _block_probs()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        pick = FirstHittingSampler().select(masked, probs, tokens, 0, g)
        assert pick.sum(-1).tolist() == [1, 1] and not bool((pick & ~masked).any())
    ddpm = DDPMSampler(num_steps=5)
    assert torch.equal(ddpm.select(masked, probs, tokens, 4, g), masked)  # the last step reveals everything
    # log-linear schedule: reveal probability 1 - s/t = 1/5 at the first step
    draws = torch.stack(
        [
            ddpm.select(
                torch.ones(200, 4, dtype=torch.bool), probs[:1].expand(200, -1, -1), tokens[:1].expand(200, -1), 0, g
            )
            for _ in range(10)
        ]
    )
    assert abs(draws.double().mean().item() - 0.2) < 0.02
    assert not bool((ddpm.select(masked, probs, tokens, 0, g) & ~masked).any())


def test_select_top_respects_counts_and_mask():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    masked = torch.tensor([[True, False, True, True]])
    assert select_top(scores, masked, torch.tensor([2])).tolist() == [[False, False, True, True]]
    assert select_top(scores, masked, torch.tensor([9])).tolist() == [[True, False, True, True]]
    assert set(SAMPLERS) == {"ddpm", "first_hitting", "topk_confidence", "confidence_threshold", "margin", "entropy"}


def test_block_probabilities_builds_the_history_only_for_logits_processors():
    """Sampling warpers never read `input_ids`, so the growing history is not built for them; processors get it."""
    from transformers import LogitsProcessorList

    from modeling_bd3lm.sampling_bd3lm import block_probabilities, build_logits_warpers

    logits = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0))
    block = torch.full((2, 4), 63)
    calls = []

    def history():
        calls.append(1)
        return torch.zeros(2, 3, dtype=torch.long)

    warpers = build_logits_warpers(temperature=0.7, top_k=10, top_p=0.9, nucleus_p=None)
    probs = block_probabilities(logits, block, 63, LogitsProcessorList(), warpers, history)
    assert calls == [] and torch.allclose(probs.sum(-1), torch.ones(2, 4, dtype=torch.float64))
    seen = []

    def processor(input_ids, scores):
        seen.append(input_ids.shape)
        return scores

    again = block_probabilities(logits, block, 63, LogitsProcessorList([processor]), warpers, history)
    assert calls == [1] and seen == [(8, 7)]  # each of the 2 x 4 positions sees 3 history tokens + the block
    torch.testing.assert_close(again, probs, rtol=0, atol=0)
