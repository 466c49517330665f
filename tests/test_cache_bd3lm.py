"""Tests of `cache_bd3lm.py`, the KV cache and the committed window of generation: the cache helpers on a cache built by
hand, cached == uncached, the sliding window beyond `model_length` replays the official call order, and the cache holds
exactly the committed tokens."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from modeling_bd3lm.cache_bd3lm import (
    CACHE_FIELD,
    open_window,
    read_cache_layer,
    resolve_cache_kwarg,
    select_cache_rows,
    trim_cache_left,
    trim_cache_right,
)
from modeling_bd3lm.checks_bd3lm import check_cache  # checked with the other inputs of a forward
from modeling_bd3lm.generation_bd3lm import BD3LMGenerateOutput
from tests.test_generation_bd3lm import BOS, PAD, CallRecorder, make_model, output_cache, prompts


def _filled_cache(layers: int = 2, rows: int = 3, tokens: int = 5) -> DynamicCache:
    """A cache whose key at (layer, row, token) is 100·layer + 10·row + token (values: its negative)."""
    cache = DynamicCache()
    for layer in range(layers):
        keys = (100 * layer + 10 * torch.arange(rows)[:, None] + torch.arange(tokens)[None]).float()
        keys = keys[:, None, :, None].expand(rows, 1, tokens, 2).contiguous()
        cache.update(keys, -keys, layer)
    return cache


def test_trim_and_select_keep_exactly_the_named_tokens_and_rows():
    cache = _filled_cache()
    trim_cache_left(cache, 2)  # the oldest two tokens go (sliding window)
    trim_cache_right(cache, 1)  # the newest one goes (a noisy block written only to commit the tokens before it)
    select_cache_rows(cache, torch.tensor([2, 0]))
    for layer in range(2):
        keys, values = read_cache_layer(cache, layer)
        expected = 100 * layer + 10 * torch.tensor([2, 0])[:, None] + torch.tensor([2, 3])[None]
        assert torch.equal(keys[..., 0].squeeze(1), expected.float()) and torch.equal(values, -keys)
    trim_cache_left(cache, 0)
    trim_cache_right(cache, 0)  # zero tokens: nothing changes (a slice [:-0] would empty it)
    assert read_cache_layer(cache, 0)[0].shape[2] == 2 and read_cache_layer(cache, 5) is None
    assert read_cache_layer(DynamicCache(), 0) is None


def test_a_sampling_call_opens_its_window_on_the_committed_tokens():
    cache = _filled_cache(tokens=5)
    assert open_window(cache, True, 3, 8, "fix") == (cache, 5)  # exactly model_length fits
    assert open_window(None, False, 8, 8, "fix") == (None, 0)  # uncached: nothing committed, nothing written
    fresh, past_len = open_window(None, True, 4, 8, "fix")
    assert isinstance(fresh, DynamicCache) and past_len == 0
    with pytest.raises(ValueError, match=r"\(5 cached \+ 4 new tokens\) is longer than `model_length`=8; slide it\.$"):
        open_window(cache, False, 4, 8, "slide it")


def test_the_cache_argument_is_checked_and_takes_either_name():
    cache = _filled_cache(rows=3)
    assert resolve_cache_kwarg(None, cache, "M") is cache and resolve_cache_kwarg(None, None, "M") is None
    with pytest.warns(FutureWarning, match="`past_key_values` is deprecated for `M.forward`"):
        assert resolve_cache_kwarg(cache, None, "M") is cache
    with pytest.raises(ValueError, match="not both"):
        resolve_cache_kwarg(cache, DynamicCache(), "M")
    check_cache(cache, 3)
    check_cache(DynamicCache(), 7)  # an empty cache fits any batch
    with pytest.raises(ValueError, match="holds 3 rows but `input_ids` has batch 2"):
        check_cache(cache, 2)
    with pytest.raises(TypeError, match="legacy tuples"):
        check_cache(((torch.zeros(1), torch.zeros(1)),), 1)


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
        model(input_ids=aligned_ids, attention_mask=aligned_mask, cache=reference, use_cache=True)
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
        model(input_ids=ids, attention_mask=mask, cache=reference, use_cache=True)
        for k in range(10):
            overflow = window_mask.shape[1] + bs - length
            if overflow > 0:
                trim_cache_left(reference, overflow)
                window_mask = window_mask[:, overflow:]
            if k == 9:
                break
            window_mask = torch.cat((window_mask, torch.ones(2, bs, dtype=torch.bool)), dim=1)
            block = new[:, k * bs : (k + 1) * bs]
            model(input_ids=block, attention_mask=window_mask, cache=reference, use_cache=True)
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


def test_dtypes_and_cache_dtype():
    for dtype in (torch.bfloat16, torch.float64):
        model = make_model().to(dtype)
        out = model.generate(max_new_tokens=8, do_sample=True, seed=0, return_dict_in_generate=True)
        assert out.sequences.dtype == torch.long and out.sequences.shape == (1, 9)
        assert output_cache(out).layers[0].keys.dtype == dtype


def test_the_output_classes_share_one_cache_field_switch():
    import dataclasses

    from transformers import DynamicCache

    import modeling_bd3lm
    from modeling_bd3lm import generation_bd3lm, outputs_bd3lm

    assert CACHE_FIELD == outputs_bd3lm.CACHE_FIELD == modeling_bd3lm.CACHE_FIELD == generation_bd3lm.CACHE_FIELD
    for cls in (BD3LMGenerateOutput, modeling_bd3lm.BD3LMOutput):
        names = [field.name for field in dataclasses.fields(cls)]
        assert names.count(CACHE_FIELD) == 1 and ({"cache", "past_key_values"} - {CACHE_FIELD}).isdisjoint(names)
    out = BD3LMGenerateOutput(sequences=torch.zeros(1, 2, dtype=torch.long), **{CACHE_FIELD: DynamicCache()})
    assert isinstance(out[CACHE_FIELD], DynamicCache)
    # the split modules keep every public name where it was
    for name in generation_bd3lm.__all__:
        assert getattr(modeling_bd3lm, name) is getattr(generation_bd3lm, name)
