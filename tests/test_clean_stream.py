"""The clean stream as a config choice (`BD3LMConfig.clean_attention`) and an adapter that never touches it.

* `"causal"` masks: noisy↔noisy block-diagonal, noisy→clean of strictly earlier blocks, clean→clean causal; the
  sampling pass: clean tokens causal, the last block bidirectional.
* With `"causal"` and an untouched backbone the clean half of the vectorised pass is the source model (its logits, for
  every converted family) and the committed KV cache of generate() is the source's KV cache; the vectorised pass
  equals a per-block loop of sampling passes under both (tests/test_causal_backbone.py, parametrized).
* A gated adapter (`gating_bd3lm.adapter_gate`, PEFT's activated LoRA) acts only at noisy positions: after training,
  the clean-half logits and the L'=1 t≡1 loss are still the source's (tests/test_peft.py trains one with the Trainer).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_bd3lm import BD3LMConfig, BD3LMForMaskedDiffusion
from modeling_bd3lm.masks_bd3lm import (
    block_diffusion_mask,
    causal_sampling_mask,
    sampling_noisy_length,
)
from tests.conftest import random_model, tiny_training_args
from tests.test_causal_backbone import FAMILIES, LENGTH, VOCAB, _convert, _source, _tokens

# ----------------------------------------------------------------------------------------------------------------------
# Masks


def reference_causal_mask(seq_len: int, block_size: int) -> torch.BoolTensor:
    """Nemotron's mask over `x_t ⊕ x_0`, written out index by index."""
    out = torch.zeros(2 * seq_len, 2 * seq_len, dtype=torch.bool)
    for q in range(2 * seq_len):
        for k in range(2 * seq_len):
            q_clean, k_clean = q >= seq_len, k >= seq_len
            iq, ik = q - seq_len * q_clean, k - seq_len * k_clean
            bq, bk = iq // block_size, ik // block_size
            noisy_noisy = not q_clean and not k_clean and bq == bk
            noisy_clean = not q_clean and k_clean and bq > bk
            clean_clean = q_clean and k_clean and iq >= ik
            out[q, k] = noisy_noisy or noisy_clean or clean_clean
    return out


@st.composite
def lengths_and_block_sizes(draw) -> tuple[int, int]:
    block_size = draw(st.integers(1, 6))
    return block_size * draw(st.integers(1, 6)), block_size


@settings(max_examples=30, deadline=None)
@given(lengths_and_block_sizes())
def test_causal_vectorised_mask_equals_the_formula_in_both_layouts(shape):
    seq_len, block_size = shape
    expected = reference_causal_mask(seq_len, block_size)
    assert torch.equal(block_diffusion_mask(seq_len, block_size, clean_attention="causal"), expected)
    # x_0 ⊕ x_t (the causal-LM denoiser's layout) is the same mask with the halves swapped
    swap = torch.cat((torch.arange(seq_len, 2 * seq_len), torch.arange(seq_len)))
    for clean_attention in ("causal", "block_causal"):
        x_t_first = block_diffusion_mask(seq_len, block_size, clean_attention=clean_attention)
        x_0_first = block_diffusion_mask(seq_len, block_size, clean_attention=clean_attention, clean_first=True)
        assert torch.equal(x_0_first, x_t_first[swap][:, swap])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(0, 20), st.integers(1, 20))
def test_causal_sampling_mask(block_size, past_len, q_len):
    mask = causal_sampling_mask(q_len, block_size, past_len)
    noisy = sampling_noisy_length(q_len, block_size, past_len, "causal")
    assert noisy == min(block_size, q_len)
    q = torch.arange(past_len, past_len + q_len)[:, None]
    k = torch.arange(past_len + q_len)[None, :]
    start = past_len + q_len - noisy
    assert torch.equal(mask, (q >= k) | ((q >= start) & (k >= start)))
    # under block_causal the noisy tokens are the new ones in the block of the last token (blocks from the window start)
    new = torch.arange(past_len, past_len + q_len)
    in_last_block = new // block_size == (past_len + q_len - 1) // block_size
    assert sampling_noisy_length(q_len, block_size, past_len, "block_causal") == int(in_last_block.sum())


# ----------------------------------------------------------------------------------------------------------------------
# Config


def test_clean_attention_default_validation_and_round_trip(tmp_path):
    assert BD3LMConfig().clean_attention == "block_causal"  # the paper; official checkpoints unchanged
    with pytest.raises(ValueError, match="`clean_attention`='bidirectional' is unknown"):
        BD3LMConfig(clean_attention="bidirectional")
    with pytest.raises(ValueError, match="the DiT supports only"):
        random_model(clean_attention="causal")
    _, model = _convert("llama", 4, clean_attention="causal")
    assert model.config.clean_attention == "causal"
    model.save_pretrained(tmp_path)
    assert BD3LMForMaskedDiffusion.from_pretrained(tmp_path).config.clean_attention == "causal"
    with pytest.raises(ValueError, match="`clean_attention`"):
        _convert("llama", 4, clean_attention="Causal")


def test_output_clean_logits_needs_the_vectorised_pass():
    _, model = _convert("llama", 4)
    with pytest.raises(ValueError, match="output_clean_logits"):
        model(input_ids=_tokens(1, 8), output_clean_logits=True)
    x = _tokens(1, LENGTH)
    assert model(input_ids=x, noisy_input_ids=x).clean_logits is None  # only when asked


# ----------------------------------------------------------------------------------------------------------------------
# The clean stream is the source


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_clean_half_is_the_source_model(family):
    reference, model = _convert(family, 4, clean_attention="causal")
    _, block_causal = _convert(family, 4)
    x_0 = _tokens(2, LENGTH)
    x_t = torch.where(torch.rand(2, LENGTH, generator=torch.Generator().manual_seed(3)) < 0.5, VOCAB, x_0)
    with torch.no_grad():
        expected = reference(x_0).logits
        clean = model(input_ids=x_0, noisy_input_ids=x_t, output_clean_logits=True).clean_logits
        paper = block_causal(input_ids=x_0, noisy_input_ids=x_t, output_clean_logits=True).clean_logits
    # the source's vocabulary has no mask row: compare its columns
    torch.testing.assert_close(clean[..., :VOCAB], expected, rtol=0, atol=1e-5)
    # the paper's block-causal clean stream is not the source (inside a block a clean token sees later ones)
    assert float((paper[..., :VOCAB] - expected).abs().max()) > 1e-3


def test_causal_clean_half_matches_a_padded_source():
    reference, model = _convert("qwen3", 4, clean_attention="causal")
    x_0 = _tokens(2, LENGTH)
    mask = torch.ones_like(x_0)
    mask[1, -5:] = 0  # right padding
    with torch.no_grad():
        expected = reference(x_0, attention_mask=mask).logits
        clean = model(input_ids=x_0, noisy_input_ids=x_0, attention_mask=mask, output_clean_logits=True).clean_logits
    valid = mask.bool()
    torch.testing.assert_close(clean[..., :VOCAB][valid], expected[valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize("clean_attention", ["block_causal", "causal"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_nelbo_at_block_size_1_and_t_1_is_the_source_ar_loss(family, clean_attention):
    reference, model = _convert(family, 1, clean_attention=clean_attention)
    x = _tokens(3, LENGTH)
    with torch.no_grad():
        expected = reference(x, labels=x).loss
        loss = model(input_ids=x, labels=x, noise_levels=torch.ones(3, LENGTH)).loss
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_sampling_pass_commits_the_source_kv_cache(family):
    """generate() under "causal": the committed cache (prompt and clean blocks, written lazily with the next block)
    holds the source model's keys and values for the committed tokens."""
    reference, model = _convert(family, 4, clean_attention="causal", model_length=32)
    prompt = _tokens(1, 8, seed=9)
    out = model.generate(
        prompt,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        use_cache=True,
        return_dict_in_generate=True,
        sampler="topk_confidence",
    )
    from modeling_bd3lm import CACHE_FIELD

    cache = getattr(out, CACHE_FIELD)
    committed = cache.get_seq_length()
    assert committed == 8 + 8  # the prompt and two blocks; the last block is not committed
    with torch.no_grad():
        source = reference(out.sequences[:, :committed], use_cache=True)
    source_cache = source.past_key_values
    for layer, source_layer in zip(cache.layers, source_cache.layers):
        torch.testing.assert_close(layer.keys, source_layer.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.values, source_layer.values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("sampler", ["first_hitting", "confidence_threshold"])
def test_causal_cached_generation_equals_uncached_also_beyond_model_length(family, sampler):
    _, model = _convert(family, 4, clean_attention="causal")
    prompts = _tokens(2, 5, seed=6)
    kwargs = dict(max_new_tokens=30, do_sample=True, sampler=sampler, eos_token_id=None, return_dict_in_generate=True)
    cached = model.generate(prompts, seed=7, use_cache=True, **kwargs)
    uncached = model.generate(prompts, seed=7, use_cache=False, **kwargs)
    assert cached.sequences.shape[1] == 5 + 30 > LENGTH
    assert torch.equal(cached.sequences, uncached.sequences)


def test_causal_and_block_causal_differ_in_what_the_noisy_block_sees():
    """The switch is real: the same weights give other noisy-half logits under the other clean stream."""
    _, causal = _convert("llama", 4, clean_attention="causal")
    _, paper = _convert("llama", 4)
    x_0 = _tokens(2, LENGTH)
    x_t = torch.full_like(x_0, VOCAB)
    with torch.no_grad():
        a = causal(input_ids=x_0, noisy_input_ids=x_t).logits
        b = paper(input_ids=x_0, noisy_input_ids=x_t).logits
    # block 0 sees no clean tokens (equal); later blocks see a differently encoded clean context
    torch.testing.assert_close(a[:, 1:4], b[:, 1:4], rtol=0, atol=1e-5)
    assert float((a[:, 5:] - b[:, 5:]).abs().max()) > 1e-3


def test_trainer_step_under_causal(tmp_path):
    from datasets import Dataset

    from bd3lm_trainer import BD3LMTrainer

    _, model = _convert("llama", 4, clean_attention="causal")
    data = Dataset.from_dict({"input_ids": _tokens(8, LENGTH).tolist()})
    args = tiny_training_args(tmp_path, max_steps=2, learning_rate=1e-3, schedule_search=False)
    before = _source("llama").model.layers[0].self_attn.q_proj.weight.clone()
    BD3LMTrainer(model.train(), args, train_dataset=data).train()
    assert not torch.allclose(model.backbone.model.layers[0].self_attn.q_proj.weight, before)
