"""Tests of BD3-LM generation (`generate` of `generation_bd3lm.py`): exactness first (a row in a batch == the row
alone, seeds), then the samplers inside the loop, stopping, streaming, PEFT and bad input. The cache and window, the
samplers on hand-built probabilities and the generation config have their own files (`test_cache_bd3lm.py`,
`test_sampling_bd3lm.py`, `test_generation_config_bd3lm.py`)."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria, TextIteratorStreamer, TextStreamer

from modeling_bd3lm import BD3LMForMaskedDiffusion
from modeling_bd3lm.generation_bd3lm import CACHE_FIELD, BD3LMGenerateOutput, BD3LMGenerationConfig
from modeling_bd3lm.sampling_bd3lm import SAMPLERS, RowGenerators, UnigramEntropyStoppingCriteria, derive_seed
from tests.conftest import random_model

MASK = 63
BOS, EOS, PAD = 1, 2, 0


def make_model(seed: int = 0, **overrides) -> BD3LMForMaskedDiffusion:
    """The shared random tiny model (L=32, L'=4, vocabulary 64) with BOS/PAD set. Its mask embedding is zeroed so
    that the context, not the mask token, dominates the random network's predictions (more varied outputs)."""
    overrides = {"bos_token_id": BOS, "pad_token_id": PAD, **overrides}
    model = random_model(seed, **overrides)
    with torch.no_grad():
        model.backbone.vocab_embed.embedding[model.config.mask_token_id] = 0
    return model


def prompts(lengths: list[int], seed: int = 0) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Left-padded random prompts (ids 3..62) of the given lengths and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, MASK, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


class CallRecorder:
    """Records (batch, query length, cached length) of every network call through a forward pre-hook."""

    def __init__(self, model: BD3LMForMaskedDiffusion) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        cache = kwargs.get("cache")
        self.calls.append((ids.shape[0], ids.shape[1], 0 if cache is None else cache.get_seq_length()))

    def remove(self) -> None:
        self.handle.remove()


def output_cache(out: BD3LMGenerateOutput):
    return getattr(out, CACHE_FIELD)


# ----------------------------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("sampler", ["topk_confidence", "confidence_threshold", "margin", "entropy"])
def test_greedy_batch_rows_equal_rows_alone(sampler):
    """Pad counts 8, 5, 2, 0 (not multiples of block_size=4): each row equals the same prompt generated alone."""
    model = make_model(seed=1)
    lengths = [1, 4, 7, 9]
    ids, mask = prompts(lengths, seed=3)
    batch = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=13,
        sampler=sampler,
        tokens_per_step=2,
        confidence_threshold=0.3 if sampler == "confidence_threshold" else None,
    )
    for row, n in enumerate(lengths):
        alone = model.generate(
            ids[row : row + 1, -n:],
            max_new_tokens=13,
            sampler=sampler,
            tokens_per_step=2,
            confidence_threshold=0.3 if sampler == "confidence_threshold" else None,
        )
        assert torch.equal(batch[row, -13:], alone[0, -13:]), f"row {row}"
        assert torch.equal(batch[row, : ids.shape[1]], ids[row])  # the prompt comes back as given, padding kept


def test_greedy_batch_equals_alone_when_rows_stop_early():
    """Rows that hit EOS leave the batch; the others must be unaffected."""
    model = make_model(seed=1)
    lengths = [2, 5, 8]
    ids, mask = prompts(lengths, seed=4)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=16, sampler="topk_confidence")
    eos = int(free[1, ids.shape[1] + 5])  # a token row 1 produces in its second block
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=16, sampler="topk_confidence", eos_token_id=eos)
    for row, n in enumerate(lengths):
        alone = model.generate(ids[row : row + 1, -n:], max_new_tokens=16, sampler="topk_confidence", eos_token_id=eos)
        width = alone.shape[1] - n
        assert torch.equal(batch[row, ids.shape[1] : ids.shape[1] + width], alone[0, n:]), f"row {row}"
        assert bool((batch[row, ids.shape[1] + width :] == PAD).all())


def test_greedy_batch_equals_alone_beyond_model_length():
    """The window slides by whole blocks from the right, so a row sees the same tokens in a batch and alone."""
    model = make_model(seed=2)
    lengths = [1, 6, 11]
    ids, mask = prompts(lengths, seed=6)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=45, sampler="topk_confidence", tokens_per_step=2)
    for row, n in enumerate(lengths):
        alone = model.generate(ids[row : row + 1, -n:], max_new_tokens=45, sampler="topk_confidence", tokens_per_step=2)
        assert torch.equal(batch[row, -45:], alone[0, -45:]), f"row {row}"


def test_same_seed_reproduces_the_batch_and_the_shared_streams_are_unchanged():
    """A seed reproduces the batch; alone, a seed draws what a generator with that seed draws; without a seed the
    global RNG is one stream shared by the batch, exactly as a `generator=` (the path before per-row seeds)."""
    model = make_model()
    ids, mask = prompts([4, 7])
    kwargs = {
        "max_new_tokens": 12,
        "do_sample": True,
        "temperature": 1.3,
        "top_k": 20,
        "top_p": 0.95,
        "sampler": "ddpm",
    }
    a = model.generate(ids, attention_mask=mask, seed=7, **kwargs)
    b = model.generate(ids, attention_mask=mask, seed=7, **kwargs)
    c = model.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(7), **kwargs)
    torch.manual_seed(7)
    d = model.generate(ids, attention_mask=mask, **kwargs)
    torch.manual_seed(7)
    e = model.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(a, b) and torch.equal(d, e)
    assert torch.equal(c, d)  # the global RNG path and a shared generator: the same stream, the same tokens
    assert not torch.equal(a, c)  # per-row streams differ from one stream shared by the rows
    for sampler in ("ddpm", "first_hitting"):
        one = {**kwargs, "sampler": sampler}
        alone = model.generate(ids[1:, -7:], seed=7, **one)
        shared = model.generate(ids[1:, -7:], generator=torch.Generator().manual_seed(7), **one)
        assert torch.equal(alone, shared), sampler


# Settings that make every sampler do something of its own (several tokens per call for the parallel ones).
SAMPLER_KWARGS = {
    "ddpm": {"num_steps": 3},
    "first_hitting": {},
    "topk_confidence": {"tokens_per_step": 2},
    "margin": {"tokens_per_step": 2},
    "entropy": {"tokens_per_step": 2},
    "confidence_threshold": {"confidence_threshold": 0.3},
}


def test_sampler_kwargs_cover_every_sampler():
    assert set(SAMPLER_KWARGS) == set(SAMPLERS)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_greedy_depends_neither_on_the_global_rng_nor_on_the_batch(sampler, use_cache):
    """do_sample=False: the same prompt gives the same tokens alone and in a left-padded batch at any position, for
    every sampler, cached or not, before and beyond model_length (45 new tokens after prompts of up to 11 tokens: the
    window of 32 slides), whatever torch's global RNG holds; and greedy generation leaves the global RNG alone."""
    model = make_model(seed=2)
    lengths = [1, 6, 11, 6]
    ids, mask = prompts(lengths, seed=6)
    kwargs = {"max_new_tokens": 45, "sampler": sampler, "use_cache": use_cache, **SAMPLER_KWARGS[sampler]}
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    batch = model.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)
    order = [2, 0, 3, 1]
    torch.manual_seed(2)
    shuffled = model.generate(ids[order], attention_mask=mask[order], **kwargs)
    for row, n in enumerate(lengths):
        torch.manual_seed(3 + row)
        alone = model.generate(ids[row : row + 1, -n:], **kwargs)
        assert torch.equal(batch[row, -45:], alone[0, -45:]), f"row {row}"
        assert torch.equal(shuffled[order.index(row), -45:], alone[0, -45:]), f"row {row} moved"
    assert len({tuple(r) for r in batch[:, -45:].tolist()}) == len(lengths)  # the rows really differ


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_seeded_sampling_is_batch_invariant(sampler, use_cache):
    """With `seed=` (an int for all rows, or one per row) a row's samples equal the same prompt sampled alone with its
    seed, for every sampler, cached or not, beyond model_length, also when other rows stop early at EOS and leave the
    batch (each row keeps its own stream)."""
    model = make_model(seed=2)
    lengths = [1, 6, 11, 6]
    seeds = [5, 6, 7, 8]
    ids, mask = prompts(lengths, seed=6)
    kwargs = {
        "max_new_tokens": 45,
        "do_sample": True,
        "temperature": 1.5,
        "top_k": 0,
        "sampler": sampler,
        "use_cache": use_cache,
        **SAMPLER_KWARGS[sampler],
    }
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    same_seed = model.generate(ids, attention_mask=mask, seed=11, **kwargs)
    per_row = model.generate(ids, attention_mask=mask, seed=seeds, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded generation never touches the global RNG
    for row, n in enumerate(lengths):
        torch.manual_seed(3 + row)
        alone = ids[row : row + 1, -n:]
        assert torch.equal(same_seed[row, -45:], model.generate(alone, seed=11, **kwargs)[0, -45:])
        assert torch.equal(per_row[row, -45:], model.generate(alone, seed=seeds[row], **kwargs)[0, -45:])
    assert not torch.equal(per_row[1, -45:], same_seed[1, -45:])
    # rows stopping at EOS: take a token row 1 samples in its third block as EOS (it appears in other rows too)
    eos = int(per_row[1, ids.shape[1] + 9])
    stopped = model.generate(ids, attention_mask=mask, seed=seeds, eos_token_id=eos, **kwargs)
    new = stopped[:, ids.shape[1] :]
    kept = [int((row == eos).int().argmax()) + 1 if bool((row == eos).any()) else 45 for row in new]
    assert kept[1] <= 10 and max(kept) > kept[1]  # row 1 left the batch while another row went on
    for row, n in enumerate(lengths):
        alone = model.generate(ids[row : row + 1, -n:], seed=seeds[row], eos_token_id=eos, **kwargs)[0, n:]
        assert torch.equal(new[row, : len(alone)], alone), f"row {row}"
        assert bool((new[row, len(alone) :] == PAD).all())


def test_num_return_sequences_draw_derived_seeds():
    """Repeat 0 of a prompt uses the prompt's seed (as alone), repeat j > 0 `derive_seed(seed, j)`."""
    model = make_model()
    ids, mask = prompts([3, 5])
    kwargs = {"max_new_tokens": 8, "do_sample": True, "sampler": "first_hitting"}
    out = model.generate(ids, attention_mask=mask, seed=[4, 9], num_return_sequences=3, **kwargs)
    assert out.shape[0] == 6
    for k in range(6):
        prompt, repeat = divmod(k, 3)
        n = [3, 5][prompt]
        alone = model.generate(ids[prompt : prompt + 1, -n:], seed=derive_seed([4, 9][prompt], repeat), **kwargs)
        assert torch.equal(out[k, -8:], alone[0, -8:]), k
    assert len({tuple(r) for r in out[:3, -8:].tolist()}) == 3  # the repeats differ


def test_derive_seed_and_row_generators():
    assert derive_seed(5, 0) == 5 and derive_seed(-3, 0) == -3
    derived = [derive_seed(s, j) for s in range(4) for j in range(1, 4)]
    assert len(set(derived)) == len(derived) and all(0 <= d < 2**64 for d in derived)
    rows = RowGenerators.from_seeds([1, 2, 3])
    draws = rows.uniform((3, 4), torch.tensor([True, False, True]))
    assert torch.equal(draws[1], torch.zeros(4, dtype=torch.float64))  # an inactive row draws nothing...
    assert torch.equal(draws[0], torch.rand(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    again = rows.select(torch.tensor([1])).uniform((1, 4))  # ...so its stream starts where it was
    assert torch.equal(again[0], torch.rand(4, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    with pytest.raises(RuntimeError, match="3 row generators"):
        rows.uniform((2, 4))


def test_seed_list_must_match_the_prompts():
    model = make_model()
    ids, mask = prompts([3, 5])
    with pytest.raises(ValueError, match="`seed` has 3 entries for 2 prompts"):
        model.generate(ids, attention_mask=mask, seed=[1, 2, 3], max_new_tokens=4)
    config = BD3LMGenerationConfig(seed=[1, 2])
    assert config.seed == [1, 2]


def test_right_padded_prompts_generate_as_left_padded():
    """transformers 4.x pipelines pad on the tokenizer's side (usually the right): such rows are left-aligned inside
    generate, and the output keeps the prompt as given."""
    model = make_model()
    ids, mask = prompts([2, 5, 3], seed=2)
    width = ids.shape[1]
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for row in range(3):
        n = int(mask[row].sum())
        right_ids[row, :n], right_mask[row, :n] = ids[row, width - n :], 1
    left = model.generate(ids, attention_mask=mask, max_new_tokens=9, sampler="ddpm")
    right = model.generate(right_ids, attention_mask=right_mask, max_new_tokens=9, sampler="ddpm")
    assert torch.equal(right[:, :width], right_ids) and torch.equal(right[:, width:], left[:, width:])


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 4), st.integers(1, 5), st.integers(0, 4)), min_size=1, max_size=4))
def test_left_align_moves_every_rows_padding_to_the_left(rows):
    """Rows padded on the left, the right or both (one run of tokens each) end with their tokens, in order."""
    width = max(left + n + right for left, n, right in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (left, n, _) in enumerate(rows):
        ids[r, left : left + n] = torch.arange(3, 3 + n) + r
        mask[r, left : left + n] = True
    aligned, aligned_mask = BD3LMForMaskedDiffusion._left_align(ids, mask)
    for r, (_, n, _) in enumerate(rows):
        assert aligned_mask[r].tolist() == [False] * (width - n) + [True] * n
        assert torch.equal(aligned[r, width - n :], ids[r][mask[r]])


def test_prepare_generation_config_for_transformers_457_pipelines():
    """4.57 pipelines build their config with `_prepare_generation_config(pipeline defaults, **kwargs)`: the model's
    own settings override the pipeline's defaults, kwargs override both, and unknown kwargs come back."""
    model = make_model()
    model.generation_config.sampler = "topk_confidence"
    model.generation_config.tokens_per_step = 2
    defaults = GenerationConfig(max_new_tokens=256, do_sample=True, temperature=0.7)
    config, unused = model._prepare_generation_config(defaults, use_model_defaults=True, top_k=5, batch_size=2)
    assert isinstance(config, BD3LMGenerationConfig) and unused == {"batch_size": 2}
    assert (config.sampler, config.tokens_per_step, config.max_new_tokens) == ("topk_confidence", 2, 256)
    assert (config.do_sample, config.temperature, config.top_k, config.bos_token_id) == (True, 0.7, 5, BOS)
    assert model.generation_config.top_k != 5  # the model's own config is untouched


def test_unconditional_starts_from_bos_and_prompt_conditioned_keeps_prompt():
    model = make_model()
    out = model.generate(max_new_tokens=9)
    assert out.shape == (1, 10) and out[0, 0] == BOS
    assert not bool((out == MASK).any())
    ids, mask = prompts([5])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=9, sampler="topk_confidence")
    assert torch.equal(out[:, :5], ids) and out.shape == (1, 14)
    # a tokenizer's full output (HF `inputs=` spelling, token_type_ids) is accepted as is
    same = model.generate(
        inputs=ids,
        attention_mask=mask,
        token_type_ids=torch.zeros_like(ids),
        max_new_tokens=9,
        sampler="topk_confidence",
    )
    assert torch.equal(same, out)


# ----------------------------------------------------------------------------------------------------------------------
# Samplers inside the generate loop


def test_first_hitting_one_token_per_call_batched():
    model = make_model()
    ids, mask = prompts([2, 5, 3])
    recorder = CallRecorder(model)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=8,
        sampler="first_hitting",
        do_sample=True,
        seed=0,
        return_dict_in_generate=True,
    )
    recorder.remove()
    assert out.nfe.tolist() == [8, 8, 8]
    denoise_calls = [c for c in recorder.calls if c[1] == 4][:4]  # the first block's calls
    assert len(denoise_calls) == 4


@pytest.mark.parametrize("num_steps", [1, 4, 50])
def test_ddpm_caching_trick_and_last_step_finishes(num_steps):
    model = make_model()
    out = model.generate(
        max_new_tokens=12, sampler="ddpm", num_steps=num_steps, do_sample=True, seed=1, return_dict_in_generate=True
    )
    assert not bool((out.sequences == MASK).any())
    nfe = int(out.nfe[0])
    assert 3 <= nfe <= 12  # at least one call per block, never a call that reveals nothing
    if num_steps == 1:
        assert nfe == 3  # the single (last) step reveals the whole block


def test_topk_and_threshold_parallel_decoding_counts():
    model = make_model()
    k2 = model.generate(max_new_tokens=16, sampler="topk_confidence", tokens_per_step=2, return_dict_in_generate=True)
    assert k2.nfe.tolist() == [8] and k2.tokens_per_forward.tolist() == [2.0]
    everything = model.generate(max_new_tokens=16, confidence_threshold=1e-9, return_dict_in_generate=True)
    assert everything.nfe.tolist() == [4]  # every masked token is above the threshold: one call per block
    strict = model.generate(max_new_tokens=16, confidence_threshold=1.0, return_dict_in_generate=True)
    assert strict.nfe.tolist() == [16]  # nothing reaches probability 1: the one most confident token per call
    budget = model.generate(max_new_tokens=16, sampler="margin", num_steps=2, return_dict_in_generate=True)
    assert budget.nfe.tolist() == [8]


def test_logits_processor_and_top_k_one_equals_greedy():
    model = make_model()

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            assert input_ids.shape[0] == scores.shape[0]
            forced = torch.full_like(scores, float("-inf"))
            forced[:, 7] = 0
            return forced

    out = model.generate(max_new_tokens=8, logits_processor=[Force()], do_sample=True, seed=0)
    assert out[0, 1:].tolist() == [7] * 8
    # one step reveals the whole block, so only the token choice differs: argmax vs a draw from the top-1
    greedy = model.generate(max_new_tokens=12, sampler="ddpm", num_steps=1)
    top1 = model.generate(max_new_tokens=12, sampler="ddpm", num_steps=1, do_sample=True, top_k=1, seed=3)
    assert torch.equal(greedy, top1)


def test_num_return_sequences_expands_batch():
    model = make_model()
    ids, mask = prompts([3, 6])
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=8,
        num_return_sequences=3,
        do_sample=True,
        seed=0,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (6, 6 + 8) and out.nfe.shape == (6,)
    assert torch.equal(out.sequences[:, :6], ids.repeat_interleave(3, 0))


def test_max_length_used_when_max_new_tokens_unset():
    model = make_model()
    ids, mask = prompts([5])
    assert model.generate(ids, attention_mask=mask, max_length=11).shape == (1, 11)


# ----------------------------------------------------------------------------------------------------------------------
# Stopping


class MarkerEOS(LogitsProcessor):
    """Makes EOS the only candidate for rows whose prompt starts with `marker` (rows are found by their context)."""

    def __init__(self, marker: int, column: int) -> None:
        self.marker, self.column = marker, column

    def __call__(self, input_ids, scores):
        hit = input_ids[:, self.column] == self.marker
        scores = scores.clone()
        scores[hit] = float("-inf")
        scores[hit, EOS] = 0.0
        return scores


def test_eos_per_row_pads_after_and_stops_costing_calls():
    model = make_model()
    ids, mask = prompts([4, 4, 4], seed=5)
    ids[1, 0] = 60  # row 1 is marked
    recorder = CallRecorder(model)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=12,
        sampler="topk_confidence",
        eos_token_id=[EOS, 61],
        logits_processor=[MarkerEOS(60, 0)],
        return_dict_in_generate=True,
    )
    recorder.remove()
    seq = out.sequences
    assert seq[1, 4] == EOS and bool((seq[1, 5:] == PAD).all())  # EOS kept, the rest of the block is padding
    assert out.nfe[1] == 4 and out.nfe[0] == 12 and out.nfe[2] == 12
    assert sorted(out.cache_rows.tolist()) == [0, 2]
    # the first block takes 4 calls of all 3 rows (the first one also prefills the prompt); after it, no call
    # includes row 1
    assert [b for b, _, _ in recorder.calls] == [3] * 4 + [2] * (len(recorder.calls) - 4)


def test_all_rows_stopping_ends_generation_early():
    model = make_model()
    ids, mask = prompts([3, 3], seed=5)
    ids[:, 0] = 60
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=40,
        eos_token_id=EOS,
        sampler="topk_confidence",
        logits_processor=[MarkerEOS(60, 0)],
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (2, 3 + 1)  # each row is its EOS; no further blocks
    assert out.num_forwards == 4


def test_max_time_stops_after_the_current_block():
    model = make_model()
    out = model.generate(max_new_tokens=40, max_time=1e-9, sampler="topk_confidence")
    assert out.shape == (1, 1 + model.config.block_size)


class StopOnToken(StoppingCriteria):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_stopping_criteria_cut_mid_block():
    model = make_model()
    free = model.generate(max_new_tokens=12, sampler="topk_confidence")
    j = 5  # second block, second position
    token = int(free[0, 1 + j])
    first = int((free[0, 1:] == token).nonzero()[0])
    out = model.generate(max_new_tokens=12, sampler="topk_confidence", stopping_criteria=[StopOnToken(token)])
    assert torch.equal(out[0], free[0, : 1 + first + 1])


def test_entropy_stop_rule_is_opt_in():
    model = make_model()
    free = model.generate(max_new_tokens=12, sampler="topk_confidence")
    assert free.shape[1] == 13
    stopped = model.generate(max_new_tokens=12, sampler="topk_confidence", entropy_stop=100.0, entropy_stop_window=6)
    assert stopped.shape[1] == 1 + 6  # the rule fires as soon as 6 tokens exist (every entropy is < 100 nats)
    rule = UnigramEntropyStoppingCriteria(threshold=0.5, window=4, prompt_length=1)
    seqs = torch.tensor([[1, 5, 5, 5, 5], [1, 5, 6, 7, 8], [1, 5, 5, 5, 9]])
    assert rule(seqs, None).tolist() == [True, False, False]  # entropy 0, log 4, 0.56 nats
    assert rule(seqs[:, :4], None).tolist() == [False, False, False]  # fewer than `window` generated tokens


# ----------------------------------------------------------------------------------------------------------------------
# Streaming and stop strings (toy word-level tokenizer)


CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567"  # ids 3..62


@pytest.fixture(scope="module")
def toy_tokenizer():
    return make_toy_tokenizer()


def make_toy_tokenizer():
    """One character per token (ids 3..62), decoded by concatenation: enough for streamers and stop strings."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{c: 3 + i for i, c in enumerate(CHARS)}, "<mask>": MASK}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", mask_token="<mask>"
    )


class RecordingStreamer:
    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []
        self.ended = False

    def put(self, value):
        self.values.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_gets_prompt_then_each_committed_block():
    model = make_model()
    streamer = RecordingStreamer()
    out = model.generate(max_new_tokens=10, sampler="topk_confidence", streamer=streamer)
    assert streamer.ended
    assert streamer.values[0].tolist() == [[BOS]]
    assert [v.numel() for v in streamer.values[1:]] == [4, 4, 2]
    assert torch.cat(streamer.values[1:]).tolist() == out[0, 1:].tolist()


def test_text_streamer_and_iterator_streamer(toy_tokenizer, capsys):
    model = make_model()
    out = model.generate(max_new_tokens=10, sampler="topk_confidence")
    expected = toy_tokenizer.decode(out[0, 1:], skip_special_tokens=True)
    model.generate(
        max_new_tokens=10,
        sampler="topk_confidence",
        streamer=TextStreamer(toy_tokenizer, skip_prompt=True, skip_special_tokens=True),
    )
    assert capsys.readouterr().out.strip() == expected.strip()

    streamer = TextIteratorStreamer(toy_tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=30)
    thread = threading.Thread(
        target=model.generate, kwargs={"max_new_tokens": 10, "sampler": "topk_confidence", "streamer": streamer}
    )
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text.strip() == expected.strip()


def test_stop_strings_with_tokenizer(toy_tokenizer):
    model = make_model()
    free = model.generate(max_new_tokens=12, sampler="topk_confidence")
    text = toy_tokenizer.decode(free[0, 1:])
    assert len(text) == 12
    stop = text[3:5]  # spans the boundary between the first and the second block
    end = text.index(stop) + len(stop)
    out = model.generate(max_new_tokens=12, sampler="topk_confidence", stop_strings=[stop], tokenizer=toy_tokenizer)
    assert torch.equal(out[0], free[0, : 1 + end])
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(max_new_tokens=4, stop_strings=["ab"])


# ----------------------------------------------------------------------------------------------------------------------
# Bad input to generate()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"confidence_threshold": 0.0}, "confidence_threshold"),
        ({"confidence_threshold": 1.01}, "confidence_threshold"),
        ({"sampler": "topk_confidence", "tokens_per_step": 0}, "tokens_per_step"),
        ({"num_steps": 0}, "num_steps"),
        ({"sampler": "nope"}, "sampler"),
        ({"foo": 1}, "does not use"),
        ({"seed": 0, "generator": torch.Generator()}, "seed"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    model = make_model()
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=match):
        model.generate(**kwargs)


def test_generate_rejects_bad_inputs():
    model = make_model()
    ids, mask = prompts([3, 5])
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, attention_mask=mask[:, 1:], max_new_tokens=4)
    holes = mask.clone()
    holes[1, -2] = 0  # padding between tokens
    with pytest.raises(ValueError, match="padding between tokens"):
        model.generate(ids, attention_mask=holes, max_new_tokens=4)
    with pytest.raises(ValueError, match="model_length"):
        model.generate(torch.full((1, 29), 5), max_new_tokens=4)  # 29 -> 32 aligned, no room for a block
    assert model.generate(torch.full((1, 28), 5), max_new_tokens=4).shape == (1, 32)  # 28 + one block fits
    with pytest.raises(ValueError, match="max_length"):
        model.generate(torch.full((1, 25), 5), max_length=20)
    no_bos = make_model(bos_token_id=None)
    with pytest.raises(ValueError, match="bos_token_id"):
        no_bos.generate(max_new_tokens=4)
    no_mask = make_model()
    no_mask.config.mask_token_id = None
    with pytest.raises(ValueError, match="mask token"):
        no_mask.generate(max_new_tokens=4)


# ----------------------------------------------------------------------------------------------------------------------
# PEFT


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_generate_through_peft(task_type):
    from peft import LoraConfig, get_peft_model

    base = make_model()
    expected = base.generate(max_new_tokens=8, do_sample=True, seed=0)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["attn_qkv", "attn_out"], task_type=task_type))
    out = peft_model.generate(max_new_tokens=8, do_sample=True, seed=0)
    assert torch.equal(out, expected)  # LoRA starts as the identity
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    changed = peft_model.generate(max_new_tokens=8, do_sample=True, seed=0, return_dict_in_generate=True)
    assert changed.sequences.shape == expected.shape
