"""Padding and per-row exactness: a row scores and counts the same whatever padding or batch it is in.

* Under the token shift (converted causal LMs: output i - 1 predicts token i) the first real token after LEFT padding
  has no predictor and never enters the loss; at block_size=1, t = 1 a left-padded batch's loss is the source's own
  causal-LM loss with the same attention mask.
* `ignore_bos` keeps the first REAL token of each row clean and uncounted (not column 0, which is padding in a
  left-padded row), so a padded row's first block scores as the unpadded row's, in the model and in `nelbo`.
* `generate()`'s per-row `nfe` counts only the calls that row needed: in a batch whose rows need different numbers of
  calls, each row's `nfe` is that of the row generated alone; a row that stops leaves the batch and is charged nothing
  more (under the shift with the cache this also runs `CommittedWindow.keep` with `next_logits` set).
"""

from __future__ import annotations

import pytest
import torch

from bd3lm_trainer.evaluation import nelbo
from modeling_bd3lm.noise_schedule_bd3lm import first_real_tokens, maskable_positions, nelbo_valid_mask
from tests.conftest import random_model
from tests.test_causal_backbone import LENGTH, VOCAB, _convert, _tokens

ROTARY_FAMILIES = ["llama", "qwen3"]


def _left_pad(ids: torch.LongTensor, width: int, pad_id: int = 0) -> tuple[torch.LongTensor, torch.LongTensor]:
    """`ids` (one row) left-padded with `width` columns of `pad_id`, and its attention mask."""
    pad = torch.full((ids.shape[0], width), pad_id, dtype=torch.long)
    mask = torch.cat((torch.zeros_like(pad), torch.ones_like(ids)), dim=1)
    return torch.cat((pad, ids), dim=1), mask


# ----------------------------------------------------------------------------------------------------------------------
# 1. The token shift: the first real token after left padding is never scored


@pytest.mark.parametrize("family", ROTARY_FAMILIES)
def test_left_padded_row_scores_as_the_unpadded_row_under_the_shift(family):
    """Same noise, pinned: the unpadded row's x_t and t, with one whole block of padding (so that the blocks stay
    aligned) in front. The first real token is masked in x_t on purpose: only the loss mask keeps it out."""
    _, model = _convert(family, 4)
    assert model.config.token_shift and model.config.ignore_bos
    x_0 = _tokens(1, 12, seed=3)
    masked = torch.rand(1, 12, generator=torch.Generator().manual_seed(4)) < 0.5
    masked[0, 0] = True
    x_t = torch.where(masked, VOCAB, x_0)
    t = torch.tensor([[0.7, 0.4, 0.9]])
    padded_x_0, mask = _left_pad(x_0, 4)
    padded_x_t, _ = _left_pad(x_t, 4)
    padded_t = torch.cat((torch.full((1, 1), 0.5), t), dim=1)  # the padding block's t is never used
    with torch.no_grad():
        alone = model(input_ids=x_0, noisy_input_ids=x_t, labels=x_0, noise_levels=t)
        padded = model(
            input_ids=padded_x_0,
            noisy_input_ids=padded_x_t,
            attention_mask=mask,
            labels=padded_x_0,
            noise_levels=padded_t,
        )
    assert padded.token_loss[0, 4] == 0  # the first real token: masked, but it has no predictor
    assert bool((padded.token_loss[0, :4] == 0).all())
    assert bool((alone.token_loss[0, masked[0, 1:].nonzero() + 1] > 0).all())  # the others are scored
    torch.testing.assert_close(padded.token_loss[:, 4:], alone.token_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded.loss, alone.loss, rtol=0, atol=1e-6)


def test_a_token_right_after_padding_inside_a_row_is_not_scored_under_the_shift():
    """A gap of padding inside a row: the token after it would be predicted from a padding position's output."""
    _, model = _convert("llama", 4)
    x_0 = _tokens(1, LENGTH, seed=5)
    mask = torch.ones_like(x_0)
    mask[0, 4:8] = 0
    with torch.no_grad():
        out = model(
            input_ids=x_0,
            noisy_input_ids=torch.full_like(x_0, VOCAB),
            attention_mask=mask,
            labels=x_0,
            noise_levels=torch.ones(1, LENGTH // 4),
        )
    assert out.token_loss[0, 8] == 0
    assert bool((out.token_loss[0, 9:] > 0).all()) and bool((out.token_loss[0, 1:4] > 0).all())


@pytest.mark.parametrize("family", ROTARY_FAMILIES)
def test_left_padded_batch_at_block_size_1_and_t_1_is_the_source_ar_loss(family):
    reference, model = _convert(family, 1)
    x = _tokens(3, LENGTH, seed=6)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    mask[2, :7] = 0
    x = x.masked_fill(mask == 0, 0)
    # The source as transformers' generate() runs a left-padded batch (positions counted from the first real token).
    # Its loss would score each row's first real token from a padding position's output: under the shift that token
    # has no predictor, so its label is left out (as it is for the unpadded row 0, whose token 0 nothing predicts).
    labels = x.masked_fill(mask == 0, -100)
    labels[0, 0] = labels[1, 3] = labels[2, 7] = -100
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = reference(x, attention_mask=mask, position_ids=positions, labels=labels).loss
        out = model(input_ids=x, attention_mask=mask, labels=x, noise_levels=torch.ones(3, LENGTH))
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)
    assert out.token_loss[1, 3] == 0 and out.token_loss[2, 7] == 0


# ----------------------------------------------------------------------------------------------------------------------
# 2. `ignore_bos` keeps the first REAL token clean


def test_first_real_token_of_left_right_and_unpadded_rows():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    first = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(first_real_tokens(mask, mask), first)
    assert torch.equal(first_real_tokens(mask), torch.tensor([[1, 0, 0, 0]] * 4, dtype=torch.bool))
    assert torch.equal(maskable_positions(mask, mask, ignore_bos=True), mask.bool() & ~first)
    assert torch.equal(maskable_positions(mask, mask, ignore_bos=False), mask.bool())
    labels = torch.arange(16).view(4, 4)
    labels[0, 2] = -100
    expected = mask.bool() & ~first & (labels != -100)
    assert torch.equal(nelbo_valid_mask(labels, mask, ignore_bos=True), expected)


def _first_block_losses(model, x_0: torch.LongTensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token losses of the unpadded row and of the row left-padded by one block, both noised by the model itself at
    t = 1 (every maskable token masked, weight 1): the noise is the same without pinning x_t. The token means (the
    loss) agree too: both rows count the same tokens."""
    padded_x_0, mask = _left_pad(x_0, block_size)
    blocks = x_0.shape[1] // block_size
    with torch.no_grad():
        alone = model(input_ids=x_0, labels=x_0, noise_levels=torch.ones(1, blocks))
        padded = model(
            input_ids=padded_x_0, attention_mask=mask, labels=padded_x_0, noise_levels=torch.ones(1, blocks + 1)
        )
    assert padded.noisy_input_ids[0, block_size] == x_0[0, 0]  # kept clean, as column 0 of the unpadded row
    assert torch.equal(padded.noisy_input_ids[:, block_size:], alone.noisy_input_ids)
    torch.testing.assert_close(padded.loss, alone.loss, rtol=0, atol=1e-5)
    return alone.token_loss, padded.token_loss[:, block_size:]


def test_ignore_bos_keeps_the_first_real_token_of_a_left_padded_row_clean_dit():
    model = random_model(ignore_bos=True)
    x_0 = torch.randint(3, 63, (1, 12), generator=torch.Generator().manual_seed(7))
    alone, padded = _first_block_losses(model, x_0, 4)
    assert alone[0, 0] == 0 and bool((alone[0, 1:4] > 0).all())
    torch.testing.assert_close(padded[:, :4].sum(), alone[:, :4].sum(), rtol=0, atol=1e-4)
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ROTARY_FAMILIES)
def test_ignore_bos_keeps_the_first_real_token_of_a_left_padded_row_clean_causal_lm(family):
    _, model = _convert(family, 4)
    alone, padded = _first_block_losses(model, _tokens(1, 12, seed=8), 4)
    torch.testing.assert_close(padded[:, :4].sum(), alone[:, :4].sum(), rtol=0, atol=1e-5)
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)


def test_nelbo_of_a_left_padded_row_equals_the_unpadded_row():
    """The evaluation path (`bd3lm_trainer.evaluation.nelbo`), with the exact expectation over the noise."""
    model = random_model(ignore_bos=True)
    x_0 = torch.randint(3, 63, (1, 12), generator=torch.Generator().manual_seed(9))
    padded_x_0, mask = _left_pad(x_0, 4)
    alone = nelbo(model, x_0, exact=True)
    padded = nelbo(model, padded_x_0, mask, exact=True)
    assert alone.num_tokens.tolist() == padded.num_tokens.tolist() == [11]
    torch.testing.assert_close(padded.per_token[:, 4:], alone.per_token, rtol=0, atol=1e-4)
    torch.testing.assert_close(padded.per_sequence, alone.per_sequence, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Per-row nfe


def _prompts(lengths: list[int], seed: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, 60, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def _dit():
    model = random_model(bos_token_id=1, pad_token_id=0)
    with torch.no_grad():  # as tests/test_generation_bd3lm.py: more varied predictions of the random network
        model.backbone.vocab_embed.embedding[model.config.mask_token_id] = 0
    return model


# Thresholds at which the random models' rows need different numbers of calls (the DiT is more confident).
THRESHOLD = {"dit": 0.1, "llama": 0.035}
SAMPLER_CASES = {
    "threshold": dict(sampler="confidence_threshold"),
    "threshold-3-steps": dict(sampler="confidence_threshold", num_steps=3),
    "ddpm": dict(sampler="ddpm", num_steps=6, do_sample=True),  # a call only when some row's block changed
}


@pytest.mark.parametrize("backbone", ["dit", "llama"])
@pytest.mark.parametrize("case", list(SAMPLER_CASES))
def test_each_rows_nfe_is_that_of_the_row_generated_alone(backbone, case):
    model = _dit() if backbone == "dit" else _convert("llama", 4, model_length=32)[1]
    ids, mask = _prompts([3, 6, 2, 5], seed=11)
    kwargs = dict(max_new_tokens=12, return_dict_in_generate=True, **SAMPLER_CASES[case])
    if kwargs["sampler"] == "confidence_threshold":
        kwargs["confidence_threshold"] = THRESHOLD[backbone]
    seeds = [3, 4, 5, 6]  # per-row streams: ddpm's reveal draws then differ between rows, as alone
    batch = model.generate(ids, attention_mask=mask, seed=seeds, **kwargs)
    alone = [model.generate(ids[r : r + 1, int(mask[r].argmax()) :], seed=seeds[r], **kwargs) for r in range(len(ids))]
    for r, out in enumerate(alone):  # the same tokens (a row that hits EOS stops, alone and in the batch)
        new = out.sequences[0, int(mask[r].sum()) :]
        assert torch.equal(batch.sequences[r, ids.shape[1] : ids.shape[1] + len(new)], new), r
    assert batch.nfe.tolist() == [int(out.nfe[0]) for out in alone]
    # the rows needed different numbers of calls, so a row was done while the batch still called the network
    assert len(set(batch.nfe.tolist())) > 1, batch.nfe
    assert batch.num_forwards > int(batch.nfe.min())


class _StopMarkedRows:
    """Makes EOS the only candidate for rows whose context holds `marker` (a function of the row alone)."""

    def __init__(self, marker: int, eos: int) -> None:
        self.marker, self.eos = marker, eos

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        hit = (input_ids == self.marker).any(dim=1)
        scores = scores.clone()
        scores[hit] = float("-inf")
        scores[hit, self.eos] = 0.0
        return scores


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_row_that_stops_is_charged_nothing_more_and_the_others_generate_as_alone_causal_lm(use_cache):
    """Under the shift with the cache the window keeps the last committed token's logits (`next_logits`): a row that
    stops after the first block leaves the batch, and the rows left go on as they do alone."""
    _, model = _convert("llama", 4, model_length=32)
    ids, mask = _prompts([3, 6, 2, 5], seed=11)
    ids[0, -1] = VOCAB - 1  # row 0 is marked (the other prompts' tokens are < 60)
    kwargs = dict(
        max_new_tokens=12,
        sampler="confidence_threshold",
        confidence_threshold=THRESHOLD["llama"],
        eos_token_id=2,
        logits_processor=[_StopMarkedRows(VOCAB - 1, 2)],
        use_cache=use_cache,
        return_dict_in_generate=True,
    )
    batch = model.generate(ids, attention_mask=mask, **kwargs)
    alone = [model.generate(ids[r : r + 1, int(mask[r].argmax()) :], **kwargs) for r in range(len(ids))]
    assert batch.sequences[0, ids.shape[1]] == 2 and batch.nfe[0] == 1  # stopped at once, after one call
    assert batch.sequences.shape[1] == ids.shape[1] + 12  # the others went on
    for r, out in enumerate(alone):
        new = out.sequences[0, int(mask[r].sum()) :]
        assert torch.equal(batch.sequences[r, ids.shape[1] : ids.shape[1] + len(new)], new), r
    assert batch.nfe.tolist() == [int(out.nfe[0]) for out in alone]
