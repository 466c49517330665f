"""A transformers causal LM as the BD3-LM denoiser (`BD3LMForMaskedDiffusion.from_causal_lm`), on tiny random models
built from transformers' own config classes, one per family (Llama, Qwen2, Qwen3: rotary; GPT-2: absolute positions).

The exact properties: at block_size=1 with t = 1 the NELBO is the source's AR loss and greedy generate() is the source's
greedy generate() (the token shift keeps the AR head's meaning); the vectorised x_t ⊕ x_0 pass equals a per-block loop
of sampling passes; cached generation equals uncached generation (also beyond model_length, where the window slides by
re-prefilling); a row of a ragged batch generates what it generates alone.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers import Qwen3Config, Qwen3ForCausalLM

from modeling_bd3lm import BD3LMConfig, BD3LMForMaskedDiffusion

VOCAB = 90  # the source's vocabulary; conversion appends the mask token as id 90
LENGTH = 16  # model_length of the converted models


def _source(family: str, seed: int = 0, tie: bool = False) -> torch.nn.Module:
    """A tiny random causal LM of `family`; weights scaled up so that outputs depend visibly on the inputs."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    rotary = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**rotary, **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**rotary, **common))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**rotary, head_dim=8, **common))
    elif family == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                       **common)
        )
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.mul_(5.0)
    return model.eval()


FAMILIES = ["llama", "qwen2", "qwen3", "gpt2"]


def _convert(family: str, block_size: int, **kwargs) -> tuple[torch.nn.Module, BD3LMForMaskedDiffusion]:
    """(a frozen copy of the source, the converted model): conversion moves the source into the wrapper."""
    reference = _source(family, tie=kwargs.pop("tie", False))
    source = _source(family, tie=reference.config.tie_word_embeddings)
    kwargs.setdefault("model_length", LENGTH)
    model = BD3LMForMaskedDiffusion.from_causal_lm(source, block_size=block_size, **kwargs)
    return reference, model


def _tokens(batch: int, length: int, seed: int = 1) -> torch.LongTensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# block_size = 1: the AR model exactly


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_nelbo_at_block_size_1_and_t_1_is_the_source_ar_loss(family, attn):
    reference, model = _convert(family, 1, attn_implementation=attn)
    assert model.backbone.config._attn_implementation == attn
    assert model.config.mask_token_id == VOCAB and model.config.vocab_size == VOCAB + 1
    x = _tokens(3, LENGTH)
    with torch.no_grad():
        expected = reference(x, labels=x).loss
        out = model(input_ids=x, labels=x, noise_levels=torch.ones(3, LENGTH))
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)
    # every position but the first is masked and scored; token 0 has no predictor
    assert bool((out.noisy_input_ids[:, 1:] == VOCAB).all())
    assert bool((out.token_loss[:, 0] == 0).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_and_eager_agree_on_the_vectorised_pass(family):
    _, sdpa = _convert(family, 4, attn_implementation="sdpa")
    _, eager = _convert(family, 4, attn_implementation="eager")
    x_0 = _tokens(2, LENGTH)
    x_t = torch.where(torch.rand(2, LENGTH, generator=torch.Generator().manual_seed(3)) < 0.5, VOCAB, x_0)
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, -5:] = 0
    with torch.no_grad():
        a = sdpa(input_ids=x_0, noisy_input_ids=x_t, attention_mask=mask).logits
        b = eager(input_ids=x_0, noisy_input_ids=x_t, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_at_block_size_1_is_the_source_greedy_generate(family, use_cache):
    reference, model = _convert(family, 1, model_length=32)
    prompts = _tokens(3, 6, seed=5)
    attention = torch.ones_like(prompts)
    prompts[1, :2], attention[1, :2] = 0, 0  # left padding
    prompts[2, :4], attention[2, :4] = 0, 0
    for ids, mask in ((prompts[:1], attention[:1]), (prompts, attention)):
        expected = reference.generate(
            ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        got = model.generate(
            ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, use_cache=use_cache
        )
        assert torch.equal(got, expected), (got, expected)


# ----------------------------------------------------------------------------------------------------------------------
# block_size = 4: vectorised pass, cache, ragged batches


@pytest.mark.parametrize("family", FAMILIES)
def test_vectorised_pass_equals_a_per_block_loop_of_sampling_passes(family):
    _, model = _convert(family, 4)
    x_0 = _tokens(2, LENGTH)
    x_t = torch.where(torch.rand(2, LENGTH, generator=torch.Generator().manual_seed(4)) < 0.5, VOCAB, x_0)
    with torch.no_grad():
        vectorised = model(input_ids=x_0, noisy_input_ids=x_t).logits
        for b in range(LENGTH // 4):
            window = torch.cat((x_0[:, : 4 * b], x_t[:, 4 * b : 4 * b + 4]), dim=1)
            raw = model(input_ids=window).logits  # row j predicts token j + 1 (the AR convention)
            first = max(4 * b, 1)  # token 0 has no predictor
            torch.testing.assert_close(
                vectorised[:, first : 4 * b + 4], raw[:, first - 1 : 4 * b + 3], rtol=0, atol=1e-5
            )


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_pass_without_use_cache_leaves_the_cache_as_it_was(family):
    _, model = _convert(family, 4)
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=_tokens(1, 8), past_key_values=cache, use_cache=True)
        keys = cache.layers[0].keys.clone()
        model(input_ids=torch.full((1, 4), VOCAB), past_key_values=cache, use_cache=False)
    assert cache.get_seq_length() == 8 and torch.equal(cache.layers[0].keys, keys)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampler", ["first_hitting", "confidence_threshold"])
def test_cached_generation_equals_uncached_also_beyond_model_length(family, sampler):
    _, model = _convert(family, 4)
    prompts = _tokens(2, 5, seed=6)
    kwargs = dict(max_new_tokens=30, do_sample=True, sampler=sampler, eos_token_id=None, return_dict_in_generate=True)
    cached = model.generate(prompts, seed=7, use_cache=True, **kwargs)
    uncached = model.generate(prompts, seed=7, use_cache=False, **kwargs)
    assert cached.sequences.shape[1] == 5 + 30 > LENGTH  # the window slid several times
    assert torch.equal(cached.sequences, uncached.sequences)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_row_of_a_ragged_batch_generates_what_it_generates_alone(family):
    _, model = _convert(family, 4)
    prompts = _tokens(3, 7, seed=8)
    attention = torch.ones_like(prompts)
    prompts[0, :3], attention[0, :3] = 0, 0
    prompts[2, :5], attention[2, :5] = 0, 0
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, sampler="topk_confidence")  # deterministic
    batch = model.generate(prompts, attention_mask=attention, **kwargs)
    for row in range(3):
        alone = model.generate(
            prompts[row : row + 1, attention[row].argmax() :], **kwargs)
        assert torch.equal(batch[row, -12:], alone[0, -12:]), row


# ----------------------------------------------------------------------------------------------------------------------
# Conversion


def test_conversion_moves_the_weights_and_adds_the_mask_row_as_the_mean():
    source = _source("llama")
    old = source.get_input_embeddings().weight.detach().clone()
    layer = source.model.layers[0].self_attn.q_proj.weight
    model = BD3LMForMaskedDiffusion.from_causal_lm(source, block_size=4, model_length=LENGTH)
    assert model.backbone is source and model.backbone.model.layers[0].self_attn.q_proj.weight is layer
    embedding = model.get_input_embeddings().weight
    assert embedding.shape == (VOCAB + 1, 32)
    torch.testing.assert_close(embedding[:VOCAB], old, rtol=0, atol=0)
    torch.testing.assert_close(embedding[VOCAB], old.mean(0), rtol=0, atol=1e-6)
    assert sorted(model.state_dict())[:2] == ["backbone.lm_head.weight", "backbone.model.embed_tokens.weight"]


def test_dit_config_is_unchanged_by_the_backbone_fields():
    config = BD3LMConfig()
    assert config.backbone_config is None and config.vocab_size == 50258 and config.ignore_bos is False
    assert not BD3LMForMaskedDiffusion(
        BD3LMConfig(vocab_size=64, hidden_dim=64, cond_dim=16, n_blocks=1, n_heads=4, model_length=8)
    ).is_causal_backbone
