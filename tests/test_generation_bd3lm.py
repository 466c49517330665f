"""Tests of BD3-LM generation: exactness first (cached == uncached, a row in a batch == the row alone), then samplers
on hand-built probabilities, stopping, streaming, the generation config, PEFT and bad input."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers.cache_utils import DynamicCache
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    StoppingCriteria,
    TextIteratorStreamer,
    TextStreamer,
)
from transformers.generation.logits_process import TopPLogitsWarper

from modeling_bd3lm import BD3LMForMaskedDiffusion
from modeling_bd3lm.layers_bd3lm import trim_cache_left
from modeling_bd3lm.generation_bd3lm import (
    CACHE_FIELD,
    BD3LMGenerateOutput,
    BD3LMGenerationConfig,
)
from modeling_bd3lm.sampling_bd3lm import (
    SAMPLERS,
    BD3LMNucleusLogitsWarper,
    ConfidenceThresholdSampler,
    DDPMSampler,
    EntropySampler,
    FirstHittingSampler,
    MarginSampler,
    TopKConfidenceSampler,
    RowGenerators,
    UnigramEntropyStoppingCriteria,
    derive_seed,
    sample_categorical,
    select_top,
)
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
        cache = kwargs.get("past_key_values")
        self.calls.append((ids.shape[0], ids.shape[1], 0 if cache is None else cache.get_seq_length()))

    def remove(self) -> None:
        self.handle.remove()


def output_cache(out: BD3LMGenerateOutput):
    return getattr(out, CACHE_FIELD)


# ----------------------------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("sampler", ["first_hitting", "ddpm", "confidence_threshold", "topk_confidence"])
def test_cached_equals_uncached(sampler):
    model = make_model()
    ids, mask = prompts([3, 6, 9])
    kwargs = {
        "max_new_tokens": 14,
        "do_sample": True,
        "sampler": sampler,
        "seed": 123,
        "return_dict_in_generate": True,
        "output_logits": True,
        "num_steps": 6 if sampler == "ddpm" else None,
    }
    cached = model.generate(ids, attention_mask=mask, use_cache=True, **kwargs)
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.nfe, uncached.nfe)
    assert len(cached.logits) == len(uncached.logits) > 0
    for a, b in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, equal_nan=True)
    # the prompt and each committed block ride along in the next block's first call: no call of their own
    assert cached.num_forwards == len(cached.logits)
    assert uncached.num_forwards == len(uncached.logits)


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
    kwargs = {"max_new_tokens": 45, "do_sample": True, "temperature": 1.5, "top_k": 0, "sampler": sampler,
              "use_cache": use_cache, **SAMPLER_KWARGS[sampler]}  # fmt: skip
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


@pytest.mark.parametrize("use_cache", [True, False])
def test_beyond_model_length_sliding_window(use_cache):
    model = make_model()
    length = model.config.model_length
    recorder = CallRecorder(model)
    out = model.generate(
        max_new_tokens=4 * length + 3,
        sampler="topk_confidence",
        tokens_per_step=2,
        use_cache=use_cache,
        return_dict_in_generate=True,
    )
    recorder.remove()
    assert out.sequences.shape == (1, 1 + 4 * length + 3)
    assert out.sequences[0, 0] == BOS
    # every call's window (cached + new tokens) stays within model_length: memory is bounded by the window
    assert max(q + past for _, q, past in recorder.calls) <= length
    if use_cache:
        assert output_cache(out).get_seq_length() <= length - model.config.block_size
        assert max(past for _, _, past in recorder.calls) == length - model.config.block_size


def test_lazy_commits_leave_the_cache_of_one_call_over_the_committed_tokens():
    """The prompt and each clean block are written to the cache by the next block's first call (`pending ⊕ block`,
    the block's own keys dropped again). The cache after generation equals the one a single block-causal call over
    the aligned prompt and every committed block writes."""
    model = make_model()
    ids, mask = prompts([3, 6])
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=14, sampler="topk_confidence", return_dict_in_generate=True
    )
    cache = output_cache(out)
    committed = out.sequences[:, ids.shape[1] : ids.shape[1] + 12]  # 4 blocks; the last is never committed
    aligned_ids = torch.cat((torch.full((2, 2), PAD), ids.masked_fill(mask == 0, PAD), committed), dim=1)
    aligned_mask = torch.cat((torch.zeros(2, 2, dtype=torch.long), mask, torch.ones(2, 12, dtype=torch.long)), dim=1)
    reference = DynamicCache()
    with torch.no_grad():
        model(input_ids=aligned_ids, attention_mask=aligned_mask, past_key_values=reference, use_cache=True)
    assert cache.get_seq_length() == reference.get_seq_length() == 8 + 12
    for ours, theirs in zip(cache.layers, reference.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values, rtol=0, atol=1e-5)


def test_beyond_model_length_the_cache_replays_the_official_call_order():
    """Beyond `model_length`, the official sampler commits a block (one call, attending to the whole window) and then
    slides. A replay of that order over the generated tokens (prefill; before each block trim the window; commit every
    block but the last) leaves the same cache as `generate`, whose commits otherwise ride inside denoising calls."""
    model = make_model()
    length, bs = model.config.model_length, model.config.block_size
    ids, mask = prompts([5, 8])  # aligned width 8; 10 blocks of 4 slide the 32-token window from the 6th block on
    recorder = CallRecorder(model)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=40, sampler="topk_confidence", return_dict_in_generate=True
    )
    recorder.remove()
    new = out.sequences[:, ids.shape[1] :]
    assert new.shape[1] == 40
    reference = DynamicCache()
    window_mask = mask.bool()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=reference, use_cache=True)
        for k in range(10):
            overflow = window_mask.shape[1] + bs - length
            if overflow > 0:
                trim_cache_left(reference, overflow)
                window_mask = window_mask[:, overflow:]
            if k == 9:
                break
            window_mask = torch.cat((window_mask, torch.ones(2, bs, dtype=torch.bool)), dim=1)
            block = new[:, k * bs : (k + 1) * bs]
            model(input_ids=block, attention_mask=window_mask, past_key_values=reference, use_cache=True)
    cache = output_cache(out)
    assert cache.get_seq_length() == reference.get_seq_length() == length - bs
    for ours, theirs in zip(cache.layers, reference.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values, rtol=0, atol=1e-5)
    # 4 denoising calls per block; blocks 5-8 are committed by calls of their own (the window slides before blocks
    # 6-9), the prompt and blocks 0-4 ride inside the first call of the next block
    assert out.num_forwards == len(recorder.calls) == 10 * 4 + 4
    assert sorted(q for _, q, _ in recorder.calls if q > bs) == [2 * bs] * 5 + [8 + bs]


def test_sliding_window_keeps_the_latest_blocks():
    """After sliding, the cache holds exactly the keys of the last committed tokens: recomputing them from the same
    cached window gives the same logits as the generate-time call."""
    model = make_model()
    out = model.generate(max_new_tokens=60, sampler="topk_confidence", return_dict_in_generate=True)
    cache = output_cache(out)
    bs = model.config.block_size
    assert cache.get_seq_length() == model.config.model_length - bs
    layer = cache.layers[0]
    assert layer.keys.dtype == model.dtype and layer.keys.shape[0] == 1


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


def test_dtypes_and_cache_dtype():
    for dtype in (torch.bfloat16, torch.float64):
        model = make_model().to(dtype)
        out = model.generate(max_new_tokens=8, do_sample=True, seed=0, return_dict_in_generate=True)
        assert out.sequences.dtype == torch.long and out.sequences.shape == (1, 9)
        assert output_cache(out).layers[0].keys.dtype == dtype


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
# Samplers on hand-built probabilities


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


# ----------------------------------------------------------------------------------------------------------------------
# Generation config


def test_generation_config_round_trip(tmp_path):
    config = BD3LMGenerationConfig(
        sampler="confidence_threshold",
        confidence_threshold=0.7,
        num_steps=8,
        nucleus_p=0.9,
        entropy_stop=4.0,
        max_new_tokens=64,
        eos_token_id=[2, 5],
        seed=3,
    )
    config.save_pretrained(tmp_path)
    loaded = BD3LMGenerationConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, BD3LMGenerationConfig)
    for name in (
        "sampler",
        "confidence_threshold",
        "num_steps",
        "nucleus_p",
        "entropy_stop",
        "max_new_tokens",
        "eos_token_id",
        "seed",
    ):
        assert getattr(loaded, name) == getattr(config, name), name
    # a plain GenerationConfig reads the file too (fields as extra attributes)
    assert GenerationConfig.from_pretrained(tmp_path).sampler == "confidence_threshold"


def test_model_generation_config_class_and_save_load(tmp_path):
    model = make_model(eos_token_id=EOS)
    assert BD3LMForMaskedDiffusion.can_generate()
    assert isinstance(model.generation_config, BD3LMGenerationConfig)
    assert model.generation_config.bos_token_id == BOS and model.generation_config.eos_token_id == EOS
    model.generation_config.sampler = "topk_confidence"
    model.generation_config.tokens_per_step = 2
    model.save_pretrained(tmp_path)
    loaded = BD3LMForMaskedDiffusion.from_pretrained(tmp_path)
    assert isinstance(loaded.generation_config, BD3LMGenerationConfig)
    assert loaded.generation_config.sampler == "topk_confidence" and loaded.generation_config.tokens_per_step == 2
    assert loaded.generate(max_new_tokens=8, return_dict_in_generate=True).nfe.tolist() == [4]


def test_generation_config_survives_copies():
    import copy
    import pickle

    model = make_model()
    model.generation_config.sampler = "entropy"
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert isinstance(clone.generation_config, BD3LMGenerationConfig)
        assert clone.generation_config.sampler == "entropy"
        assert clone.generation_config is not model.generation_config


def test_plain_generation_config_is_upgraded():
    """transformers 4.57 assigns plain GenerationConfig objects; the model upgrades them."""
    model = make_model()
    model.generation_config = GenerationConfig(max_new_tokens=5, do_sample=True)
    assert isinstance(model.generation_config, BD3LMGenerationConfig)
    assert model.generation_config.max_new_tokens == 5
    out = model.generate(generation_config=GenerationConfig(max_new_tokens=6), seed=0)
    assert out.shape == (1, 7)


@pytest.mark.parametrize(
    "field, value",
    [
        ("sampler", "beam"),
        ("num_steps", 0),
        ("tokens_per_step", 0),
        ("confidence_threshold", 0.0),
        ("confidence_threshold", 1.5),
        ("nucleus_p", 0.0),
        ("entropy_stop", -1.0),
        ("entropy_stop_window", 0),
        ("mask_token_id", -1),
        ("seed", 1.5),
        ("seed", []),
        ("seed", [1, 2.0]),
        ("seed", 2**64),
        ("max_new_tokens", 0),
        ("max_new_tokens", -3),
        ("temperature", 0.0),
        ("top_k", -1),
        ("top_p", 1.5),
        ("eos_token_id", "x"),
        ("num_beams", 4),
        ("num_return_sequences", 0),
    ],
)
def test_generation_config_rejects_each_bad_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        BD3LMGenerationConfig(**{field: value})


def test_generation_config_rejects_unknown_and_conflicting_arguments():
    with pytest.raises(ValueError, match="unknown arguments"):
        BD3LMGenerationConfig(num_step=3)
    with pytest.raises(ValueError, match="confidence_threshold"):
        BD3LMGenerationConfig(sampler="ddpm", confidence_threshold=0.9)


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


def test_the_output_classes_share_one_cache_field_switch():
    import dataclasses

    from transformers import DynamicCache

    import modeling_bd3lm
    from modeling_bd3lm import generation_bd3lm, outputs_bd3lm

    assert CACHE_FIELD == outputs_bd3lm.CACHE_FIELD == modeling_bd3lm.CACHE_FIELD
    for cls in (BD3LMGenerateOutput, modeling_bd3lm.BD3LMOutput):
        names = [field.name for field in dataclasses.fields(cls)]
        assert names.count(CACHE_FIELD) == 1 and ({"cache", "past_key_values"} - {CACHE_FIELD}).isdisjoint(names)
    out = BD3LMGenerateOutput(sequences=torch.zeros(1, 2, dtype=torch.long), **{CACHE_FIELD: DynamicCache()})
    assert isinstance(out[CACHE_FIELD], DynamicCache)
    # the split modules keep every public name where it was
    for name in generation_bd3lm.__all__:
        assert getattr(modeling_bd3lm, name) is getattr(generation_bd3lm, name)


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
