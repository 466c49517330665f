"""`bd3lm_trainer.evaluation.estimate_acceptance`: one vectorised pass gives exactly the drafts of the real drafting
call (the sampling pass `[seed, M, ..., M]` on the committed prefix's cache), and of a per-block loop of vectorised
passes on hand-built `x_t`; ragged prompts are aligned as `generate()` aligns them; a constructed case has a known
answer; bad input is refused with a message naming the argument."""

from __future__ import annotations

import copy

import pytest
import torch

from bd3lm_trainer.evaluation import estimate_acceptance, geometric_alpha, greedy_continuations
from tests.test_causal_backbone import VOCAB, _convert, _source

MASK = VOCAB  # the conversion appends the mask token
LENGTH = 32


def _rows(prompt_lengths: list[int], total: list[int], seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in total]


def _layout_row(row: list[int], prompt_length: int, k: int) -> tuple[list[int], list[int], int]:
    """One row alone, as generate() lays it out: left padding so that the prompt ends on a block boundary."""
    shift = (-prompt_length) % k
    return [0] * shift + row, [0] * shift + [1] * len(row), shift


def _sampling_pass_drafts(model, row: list[int], prompt_length: int, k: int) -> list[list[int]]:
    """The real drafting call, block by block: the committed prefix prefilled into the cache, then `[seed, M...]`
    with `use_cache=False`. Under the token shift the sampling pass's row j predicts token j + 1."""
    ids, mask, shift = _layout_row(row, prompt_length, k)
    out = []
    for c in range(shift + prompt_length, len(ids) - k + 1, k):
        prefix = torch.tensor([ids[:c]])
        cache = model(input_ids=prefix, attention_mask=torch.tensor([mask[:c]]), use_cache=True).cache
        block = torch.tensor([[ids[c]] + [MASK] * (k - 1)])
        logits = model(
            input_ids=block, attention_mask=torch.tensor([mask[:c] + [1] * k]), cache=cache, use_cache=False
        ).logits[0]
        logits[:, MASK] = float("-inf")
        rows = slice(0, k - 1) if model.config.token_shift else slice(1, k)
        out.append(logits[rows].argmax(-1).tolist())
    return out


def _vectorised_loop_drafts(model, row: list[int], prompt_length: int, k: int) -> list[list[int]]:
    """One vectorised pass per block, on a hand-built x_t where only that block is masked (row alone, no right pad)."""
    ids, mask, shift = _layout_row(row, prompt_length, k)
    width = len(ids) + (-len(ids)) % k
    ids, mask = ids + [0] * (width - len(ids)), mask + [0] * (width - len(mask))
    x_0 = torch.tensor([ids])
    out = []
    for c in range(shift + prompt_length, shift + len(row) - k + 1, k):
        x_t = x_0.clone()
        x_t[0, c + 1 : c + k] = MASK
        logits = model(input_ids=x_0, noisy_input_ids=x_t, attention_mask=torch.tensor([mask])).logits[0]
        logits[:, MASK] = float("-inf")
        out.append(logits[c + 1 : c + k].argmax(-1).tolist())
    return out


@pytest.fixture(scope="module")
def llama():
    return _convert("llama", 4, model_length=LENGTH)[1].eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("token_shift", [True, False])
def test_drafts_are_those_of_the_real_drafting_call_and_of_a_per_block_loop(family, token_shift):
    """Ragged prompts (lengths 3, 6, 5: three different left paddings) batched in one pass give, block for block,
    the drafts of the sampling pass on the row's own cache and of a per-block vectorised loop on the row alone."""
    model = _convert(family, 4, model_length=LENGTH, token_shift=token_shift)[1].eval()
    prompts, totals = [3, 6, 5], [19, 22, 14]
    rows = _rows(prompts, totals)
    with torch.no_grad():
        est = estimate_acceptance(model, rows, prompts)
        expected_sampling, expected_loop = [], []
        for row, p in zip(rows, prompts):
            expected_sampling += _sampling_pass_drafts(model, row, p, 4)
            expected_loop += _vectorised_loop_drafts(model, row, p, 4)
    # complete blocks after each prompt: 16 // 4, 16 // 4, 9 // 4
    assert est.blocks_per_row == [4, 4, 2] and est.blocks == 10
    assert est.drafts == expected_sampling == expected_loop
    starts = [[(-p) % 4 + p + 4 * b for b in range(n)] for p, n in zip(prompts, est.blocks_per_row)]
    targets = [row[c - (-p) % 4 + 1 : c - (-p) % 4 + 4] for row, p, cs in zip(rows, prompts, starts) for c in cs]
    matches = torch.tensor(est.drafts) == torch.tensor(targets)
    assert est.match_rate == pytest.approx(matches.float().mean(0).tolist())


def test_another_drafting_block_size_is_the_real_call_at_that_width(llama):
    """k = 2 and 8 on an L'=4 model: the same network under a block mask of width k, also in the sampling pass."""
    prompts, totals = [3, 6], [21, 26]
    rows = _rows(prompts, totals, seed=5)
    for k in (2, 8):
        with torch.no_grad():
            est = estimate_acceptance(llama, rows, prompts, block_size=k)
            llama.config.block_size = k
            try:
                expected = [d for row, p in zip(rows, prompts) for d in _sampling_pass_drafts(llama, row, p, k)]
            finally:
                llama.config.block_size = 4
        assert est.block_size == k and est.drafts == expected and len(est.match_rate) == k - 1
    assert llama.config.block_size == 4


def _self_consistent_rows(model, prompts: list[list[int]], blocks: int, k: int) -> list[list[int]]:
    """Continuations built block by block from the drafter's own drafts (seed random, then d_1..d_{k-1}): a drafter
    that every verifier accepts in full."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for prompt in prompts:
        row = list(prompt)
        for _ in range(blocks):
            row.append(int(torch.randint(3, VOCAB, (1,), generator=g)))
            row += [0] * (k - 1)
            with torch.no_grad():
                drafts = _sampling_pass_drafts(model, row, len(prompt), k)[-1]
            row[-(k - 1) :] = drafts
        rows.append(row)
    return rows


def test_a_drafter_whose_drafts_are_the_text_is_accepted_in_full_and_a_miss_lands_on_its_offset(llama):
    prompts = [[5, 9, 11], [7, 8, 20, 21, 30, 31]]
    rows = _self_consistent_rows(llama, prompts, 3, 4)
    with torch.no_grad():
        est = estimate_acceptance(llama, rows, [3, 6])
    assert est.blocks == 6 and est.match_rate == [1.0, 1.0, 1.0] and est.accepted_lengths == [3] * 6
    assert est.tokens_per_cycle == 4.0 and est.alpha == pytest.approx(1.0, abs=1e-9)
    # the second row's last block with a wrong token at offset 2: only that draft misses, the block accepts 1
    # (the drafts at offset 3 do not see offset 2: the x_t block attends to clean tokens of earlier blocks only)
    bad = copy.deepcopy(rows)
    bad[1][-2] = (bad[1][-2] + 1 - 3) % (VOCAB - 3) + 3
    with torch.no_grad():
        est = estimate_acceptance(llama, bad, [3, 6])
    assert est.match_rate == pytest.approx([1.0, 5 / 6, 1.0])
    assert est.accepted_lengths == [3, 3, 3, 3, 3, 1]
    assert est.conditional_acceptance == pytest.approx([1.0, 5 / 6, 1.0])
    assert est.tokens_per_cycle == pytest.approx(1 + 16 / 6)
    # a miss at offset 1 (first row's last block: earlier blocks would change the later blocks' context) stops the
    # run: the matches at offsets 2 and 3 of that block no longer count
    bad[0][-3] = (bad[0][-3] + 1 - 3) % (VOCAB - 3) + 3
    with torch.no_grad():
        est = estimate_acceptance(llama, bad, [3, 6])
    assert est.accepted_lengths == [3, 3, 0, 3, 3, 1] and est.match_rate == pytest.approx([5 / 6, 5 / 6, 1.0])
    assert est.conditional_acceptance == pytest.approx([5 / 6, 4 / 5, 1.0])


def test_a_draft_is_never_the_mask_token(llama):
    """With the mask token's output row made dominant, every draft would be the mask without the exclusion."""
    model = copy.deepcopy(llama)
    with torch.no_grad():
        model.get_output_embeddings().weight[MASK] *= 0
        model.get_output_embeddings().weight[MASK] += 50 * model.get_output_embeddings().weight[3:].abs().max()
        est = estimate_acceptance(model, _rows([3], [15]), [3])
    assert est.blocks == 3 and MASK not in {t for d in est.drafts for t in d}


def test_geometric_alpha_inverts_the_tokens_per_cycle_formula():
    for alpha, k in ((0.5, 4), (0.2, 2), (0.9, 8)):
        assert geometric_alpha((1 - alpha**k) / (1 - alpha), k) == pytest.approx(alpha, abs=1e-9)
    assert geometric_alpha(1.0, 4) == pytest.approx(0.0, abs=1e-9) and geometric_alpha(4.0, 4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="tokens_per_cycle"):
        geometric_alpha(4.5, 4)


def test_greedy_continuations_are_the_source_argmax_cut_after_eos():
    source = _source("llama")
    prompts = [[5, 9, 11], [7, 8, 20, 21]]
    with torch.no_grad():
        plain = greedy_continuations(source, prompts, 6, eos_token_id=[])  # no EOS: every row runs to 6 tokens
        for prompt, cont in zip(prompts, plain):
            ids = list(prompt)
            for _ in range(6):
                ids.append(int(source(torch.tensor([ids])).logits[0, -1].argmax()))
            assert cont == ids[len(prompt) :]
        eos = plain[0][2]  # make the third token of the first row the EOS: that row ends there, EOS kept
        cut = greedy_continuations(source, prompts, [6, 3], eos_token_id=eos)
    assert cut[0] == plain[0][:3] and len(cut[1]) <= 3
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_continuations(source, prompts, [6])


def test_bad_input_is_refused_with_the_argument_named(llama):
    rows = _rows([3, 4], [14, 14])
    with pytest.raises(ValueError, match="prompt_lengths"):
        estimate_acceptance(llama, rows, [3])
    with pytest.raises(ValueError, match=r"prompt_lengths\[1\]"):
        estimate_acceptance(llama, rows, [3, 0])
    with pytest.raises(ValueError, match=r"prompt_lengths\[0\]"):
        estimate_acceptance(llama, rows, [15, 3])
    with pytest.raises(ValueError, match="model_length"):  # 3 + 31 tokens: the prompt padded to 4 leaves 36 columns
        estimate_acceptance(llama, _rows([3], [34]), [3])
    with pytest.raises(ValueError, match="complete block"):
        estimate_acceptance(llama, _rows([3, 3], [6, 5]), [3, 3])
    with pytest.raises(ValueError, match="block_size"):
        estimate_acceptance(llama, rows, [3, 4], block_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        estimate_acceptance(llama, rows, [3, 4], batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        estimate_acceptance(llama, [], [])
    from tests.conftest import random_model

    dit = random_model()
    with pytest.raises(ValueError, match="from_causal_lm"):
        estimate_acceptance(dit, [list(range(3, 19))], [4], block_size=2)
    assert dit.config.block_size == 4


def test_batching_rows_in_several_passes_changes_nothing(llama):
    prompts, totals = [3, 6, 5], [19, 22, 14]
    rows = _rows(prompts, totals)
    with torch.no_grad():
        one, split = estimate_acceptance(llama, rows, prompts), estimate_acceptance(llama, rows, prompts, batch_size=1)
    assert one.drafts == split.drafts and one.blocks_per_row == split.blocks_per_row


@pytest.mark.parametrize("variant", ["two_pass", "one_forward"])
def test_every_position_estimate_predicts_the_real_loop_cycle_for_cycle(variant):
    """With the clean stream the source (`clean_attention="causal"`), `every_position=True` scores a block at every
    seed, and chaining them (`cycles`) gives the acceptance lengths that greedy `generate(generation_mode=
    "draft_verify")` reports, cycle for cycle, for both variants (the one-forward drafts are those of an all-mask
    block); the aligned estimate is the every-position one restricted to seeds 0, k, 2k, ..."""
    reference, model = _convert("llama", 4, model_length=LENGTH, clean_attention="causal")
    model.eval()
    prompts = [[5, 9, 11], [7, 8, 20, 21, 4], [30, 31]]
    continuations = greedy_continuations(reference, prompts, 24, eos_token_id=[])
    rows = [p + c for p, c in zip(prompts, continuations)]
    lengths = [len(p) for p in prompts]
    with torch.no_grad():
        est = estimate_acceptance(model, rows, lengths, draft_variant=variant, every_position=True)
        aligned = estimate_acceptance(model, rows, lengths, draft_variant=variant)
        real = [
            model.generate(
                torch.tensor([p]),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                generation_mode="draft_verify",
                draft_variant=variant,
                return_dict_in_generate=True,
            )
            for p in prompts
        ]
    for r, out in enumerate(real):
        assert out.sequences[0, lengths[r] :].tolist() == continuations[r]
        cycles = est.cycles[r]
        assert len(cycles) >= 4 and out.acceptance_lengths[0].tolist()[: len(cycles)] == cycles
        assert [est.accepted_at[r][i] for i in range(0, 24 - 4 + 1, 4)] == aligned.accepted_lengths[
            sum(aligned.blocks_per_row[:r]) : sum(aligned.blocks_per_row[: r + 1])
        ]
    assert max(c for row in est.cycles for c in row) > 1  # some drafts accepted: the check is not all ones
    assert est.blocks == sum(24 - 4 + 1 for _ in rows)  # a block at every seed with k tokens left
    assert est.cycle_tokens_per_cycle == pytest.approx(sum(map(sum, est.cycles)) / sum(map(len, est.cycles)))


def test_one_forward_drafts_do_not_see_the_seed():
    """The one-forward estimate masks the seed: changing a continuation token changes the two-pass drafts of the block
    it seeds but not the one-forward drafts of that block (they see only the tokens before it)."""
    reference, model = _convert("llama", 4, model_length=LENGTH, clean_attention="causal")
    model.eval()
    rows = _rows([4], [16])
    changed = [list(rows[0])]
    changed[0][4] = (changed[0][4] + 1 - 3) % (VOCAB - 3) + 3  # the first seed
    with torch.no_grad():
        one = [estimate_acceptance(model, r, [4], draft_variant="one_forward").drafts[0] for r in (rows, changed)]
        two = [estimate_acceptance(model, r, [4], draft_variant="two_pass").drafts[0] for r in (rows, changed)]
    assert one[0] == one[1] and two[0] != two[1]
    with pytest.raises(ValueError, match="draft_variant"):
        estimate_acceptance(model, rows, [4], draft_variant="fused")
