"""What an HF user expects of any transformers model, checked on BD3-LM exactly (each was broken before):

1. a resizable token embedding (an `nn.Embedding`), LoRA on it, and checkpoints that keep the official key;
2. activation checkpointing through transformers' `GradientCheckpointingLayer` (its kwargs and `every_n_layers`);
3. a forward that `torch.export` exports and `torch.compile(fullgraph=True)` traces without graph breaks;
4. attention weights with `output_attentions=True`;
5. config validation of the HF names (`hidden_size`, ...) and of `from_pretrained` overrides.

transformers' own common tests run in tests/test_hf_common_bd3lm.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.export import Dim
from transformers import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer

from modeling_bd3lm import (
    BD3LMConfig,
    BD3LMForMaskedDiffusion,
    BD3LMModel,
    block_diffusion_mask,
    sample_noise_levels,
)
from tests.conftest import random_model, tiny_config

MASK_ID = 63


def _ids(batch: int = 2, length: int = 32, seed: int = 0) -> torch.LongTensor:
    return torch.randint(0, MASK_ID, (batch, length), generator=torch.Generator().manual_seed(seed))


def _noised(x_0: torch.LongTensor, seed: int = 1) -> tuple[torch.LongTensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = 0.1 + 0.9 * torch.rand(x_0.shape[0], x_0.shape[1] // 4, generator=g)
    masked = torch.rand(x_0.shape, generator=g) < t.repeat_interleave(4, dim=1)
    return torch.where(masked, torch.full_like(x_0, MASK_ID), x_0), t


# ----------------------------------------------------------------------------------------------------------------------
# 1. The token embedding


def test_resize_token_embeddings_keeps_the_old_rows_and_grows_both_ends(tmp_path):
    model = random_model()
    table = model.get_input_embeddings().weight.detach().clone()
    head_w = model.get_output_embeddings().weight.detach().clone()
    head_b = model.get_output_embeddings().bias.detach().clone()
    model.resize_token_embeddings(70)  # e.g. chat tokens added after the mask token
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    assert model.config.vocab_size == 70 and model.get_input_embeddings().weight.shape == (70, 64)
    assert model.get_output_embeddings().weight.shape == (70, 64) and model.get_output_embeddings().bias.shape == (70,)
    torch.testing.assert_close(model.get_input_embeddings().weight[:64], table, rtol=0, atol=0)
    torch.testing.assert_close(model.get_output_embeddings().weight[:64], head_w, rtol=0, atol=0)
    torch.testing.assert_close(model.get_output_embeddings().bias[:64], head_b, rtol=0, atol=0)
    x = _ids()
    x[0, 0] = 69  # a new id is a valid input now
    with torch.no_grad():
        logits = model(x, return_dict=True).logits
    assert logits.shape == (2, 32, 70)
    model.save_pretrained(tmp_path)
    assert load_file(tmp_path / "model.safetensors")["backbone.vocab_embed.embedding"].shape == (70, 64)
    reloaded = BD3LMForMaskedDiffusion.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, return_dict=True).logits, logits, rtol=0, atol=0)


def test_lora_on_the_token_embedding_trains_saves_loads_and_merges(tmp_path):
    model = random_model()
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["vocab_embed"]))
    assert peft_model.targeted_module_names == ["backbone.vocab_embed"]
    x_0 = _ids()
    x_t, t = _noised(x_0)
    loss = peft_model(input_ids=x_0, noisy_input_ids=x_t, noise_levels=t, labels=x_0).loss
    loss.backward()
    lora = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and all("lora_embedding_" in name for name in lora)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in lora.values())
    with torch.no_grad():
        for name, p in lora.items():
            if "lora_embedding_A" in name:
                p.normal_()  # B starts at zero; give the adapter an effect to merge
            else:
                p.normal_(std=0.1)
        adapted = peft_model(input_ids=x_t).logits
        peft_model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(random_model(), tmp_path)
        torch.testing.assert_close(loaded(input_ids=x_t).logits, adapted, rtol=0, atol=0)
        merged = peft_model.merge_and_unload()
        assert isinstance(merged.backbone.vocab_embed, torch.nn.Embedding)
        torch.testing.assert_close(merged(input_ids=x_t).logits, adapted, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(random_model()(input_ids=x_t).logits, adapted, atol=1e-3)


def test_an_official_checkpoint_saves_back_to_the_same_keys_and_tensors(official_fixture_dir, tmp_path):
    model = BD3LMForMaskedDiffusion.from_pretrained(official_fixture_dir)
    model.save_pretrained(tmp_path)
    official = load_file(official_fixture_dir / "model.safetensors")
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(official)  # `backbone.vocab_embed.embedding`, as the official code expects
    for key, value in official.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0, msg=key)


def test_torch_load_state_dict_reads_the_saved_key(tmp_path):
    """The Trainer's resume and best-model reload use torch's `load_state_dict` on the saved file."""
    model = random_model()
    model.save_pretrained(tmp_path)
    fresh = BD3LMForMaskedDiffusion(tiny_config())
    result = fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(fresh.backbone.vocab_embed.weight, model.backbone.vocab_embed.weight, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Activation checkpointing


def _loss_and_grads(model, x_0, x_t, t):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=x_0, noisy_input_ids=x_t, noise_levels=t, labels=x_0).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_checkpointed_calls(model) -> list[int]:
    calls = []
    for index, block in enumerate(model.backbone.blocks):
        inner = block._gradient_checkpointing_func

        def counting(*args, _inner=inner, _index=index, **kwargs):
            calls.append(_index)
            return _inner(*args, **kwargs)

        block._gradient_checkpointing_func = counting
    return calls


@pytest.mark.parametrize("every_n_layers, expected", [(1, [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3])])
def test_every_n_layers_checkpoints_exactly_those_layers(every_n_layers, expected):
    model = random_model(n_blocks=4).train()
    assert all(isinstance(block, GradientCheckpointingLayer) for block in model.backbone.blocks)
    x_0 = _ids(3)
    x_t, t = _noised(x_0)
    loss, grads = _loss_and_grads(model, x_0, x_t, t)
    model.activation_checkpointing_enable(every_n_layers=every_n_layers)
    assert [i for i, b in enumerate(model.backbone.blocks) if b.gradient_checkpointing] == expected
    calls = _count_checkpointed_calls(model)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, x_0, x_t, t)
    assert calls == expected
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_kwargs_reach_torch_checkpoint(use_reentrant):
    model = random_model().train()
    x_0 = _ids()
    x_t, t = _noised(x_0)
    loss, grads = _loss_and_grads(model, x_0, x_t, t)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    for block in model.backbone.blocks:
        assert block._gradient_checkpointing_func.keywords == {"use_reentrant": use_reentrant}
    loss_ckpt, grads_ckpt = _loss_and_grads(model, x_0, x_t, t)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpointed_layers_still_read_the_kv_cache():
    """Under checkpointing transformers drops `use_cache`; the committed keys must still be read."""
    model = random_model()
    x = _ids(2, 12)
    cache = DynamicCache()
    with torch.no_grad():
        model(x[:, :8], cache=cache, use_cache=True)
        expected = model(x[:, 8:], cache=cache, return_dict=True).logits
    model.train().activation_checkpointing_enable()
    logits = model(x[:, 8:], cache=cache, return_dict=True).logits
    logits.sum().backward()
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    assert cache.get_seq_length() == 8


# ----------------------------------------------------------------------------------------------------------------------
# 3. torch.export and torch.compile


def _exported_matches_eager(model, kwargs, dynamic_shapes, others):
    program = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    with torch.no_grad():
        for call in (kwargs, *others):
            expected = model(**call, return_dict=True).logits
            got = program.module()(**call)[0]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_export_sampling_pass_static_and_dynamic():
    model = random_model()
    x = _ids(2, 32)
    _exported_matches_eager(model, {"input_ids": x}, None, ())
    batch, seq = Dim("batch", min=1, max=16), Dim("seq", min=1, max=32)
    _exported_matches_eager(model, {"input_ids": x}, {"input_ids": {0: batch, 1: seq}}, ({"input_ids": x[:1, :11]},))


def test_export_vectorised_pass_with_padding_static_and_dynamic():
    model = random_model()
    x_0 = _ids(2, 32)
    x_t, _ = _noised(x_0)
    mask = torch.ones_like(x_0)
    mask[1, :6] = 0  # left padding
    call = {"input_ids": x_0, "noisy_input_ids": x_t, "attention_mask": mask}
    _exported_matches_eager(model, call, None, ())
    batch, blocks = Dim("batch", min=1, max=16), Dim("blocks", min=1, max=8)
    shapes = {name: {0: batch, 1: 4 * blocks} for name in call}
    shorter = {name: value[:1, :12] for name, value in call.items()}
    _exported_matches_eager(model, call, shapes, (shorter, {n: v.repeat(3, 1) for n, v in call.items()}))


@settings(max_examples=40, deadline=None)
@given(lo=st.floats(0.0, 1.0, width=32), width=st.floats(0.0, 1.0, width=32), antithetic=st.booleans())
def test_noise_levels_from_the_buffers_equal_those_from_their_floats(lo, width, antithetic):
    """Training reads the noise interval from the buffers as tensors (no sync, no graph break); the draws must be
    bit-identical to the float path that eval mode and older versions take."""
    lo32 = torch.tensor(lo, dtype=torch.float32)
    hi32 = torch.clamp(lo32 + torch.tensor(width, dtype=torch.float32), max=1.0)
    draws = [
        sample_noise_levels(3, 8, a, b, antithetic, torch.Generator().manual_seed(0))
        for a, b in ((float(lo32), float(hi32)), (lo32, hi32))
    ]
    torch.testing.assert_close(draws[1], draws[0], rtol=0, atol=0)


@pytest.mark.parametrize("padding", [False, True])
def test_compiled_training_forward_has_no_graph_break(padding):
    """fullgraph=True raises on any graph break; aot_eager also traces the backward. The loss matches eager."""
    torch._dynamo.reset()
    model = random_model().train()
    x_0 = _ids(2, 32)
    kwargs = {"input_ids": x_0, "labels": x_0}
    if padding:
        mask = torch.ones_like(x_0)
        mask[0, :5] = 0
        kwargs["attention_mask"] = mask
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    out = compiled(**kwargs)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.manual_seed(3)  # the same noise draw in eager mode
    model.zero_grad(set_to_none=True)
    expected = model(**kwargs)
    expected.loss.backward()
    torch.testing.assert_close(out.noisy_input_ids, expected.noisy_input_ids, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_sampling_calls_have_no_graph_break():
    torch._dynamo.reset()
    model = random_model()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # no backward here: dynamo alone finds breaks
    x = _ids(2, 16)
    with torch.no_grad():
        eager_cache, compiled_cache = DynamicCache(), DynamicCache()
        for cache, fn in ((eager_cache, model), (compiled_cache, compiled)):
            committed = fn(x[:, :8], cache=cache, use_cache=True, return_dict=True).logits
            block = fn(x[:, 8:12], cache=cache, return_dict=True).logits
            window = fn(x, return_dict=True).logits
            if fn is model:
                expected = (committed, block, window)
            else:
                got = (committed, block, window)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert compiled_cache.get_seq_length() == eager_cache.get_seq_length() == 8


# ----------------------------------------------------------------------------------------------------------------------
# 4. Attention weights


def test_output_attentions_returns_the_softmax_of_the_block_diffusion_mask():
    model = random_model()  # sdpa: the call switches to the eager kernel
    assert model.backbone.attn_implementation == "sdpa"
    x_0 = _ids(2, 32)
    x_t, _ = _noised(x_0)
    with torch.no_grad():
        plain = model(x_0, noisy_input_ids=x_t, return_dict=True)
        out = model(x_0, noisy_input_ids=x_t, output_attentions=True, return_dict=True)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-5)
    assert len(out.attentions) == model.config.n_blocks
    allowed = block_diffusion_mask(32, 4)[:32]  # rows of the x_t half, keys of both halves
    for weights in out.attentions:
        assert weights.shape == (2, 4, 32, 64)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 32), rtol=1e-5, atol=1e-5)
        assert bool((weights[..., ~allowed] == 0).all()) and bool((weights[..., allowed] > 0).all())


def test_output_attentions_in_the_sampling_pass_with_a_cache():
    model = random_model()
    x = _ids(1, 12)
    cache = DynamicCache()
    with torch.no_grad():
        model(x[:, :8], cache=cache, use_cache=True)
        out = model(x[:, 8:], cache=cache, output_attentions=True, return_dict=True)
    assert all(w.shape == (1, 4, 4, 12) for w in out.attentions)  # 4 new queries over 8 cached + 4 new keys
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(1, 4, 4), rtol=1e-5, atol=1e-5)


def test_output_attentions_in_the_config_selects_the_eager_kernel(tmp_path):
    assert BD3LMConfig(output_attentions=True)._attn_implementation == "eager"
    random_model().save_pretrained(tmp_path)
    model = BD3LMForMaskedDiffusion.from_pretrained(tmp_path, output_attentions=True)
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        out = model(_ids(1, 8), return_dict=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 4, 8, 8)
    tuple_out = model(_ids(1, 8), return_dict=False)
    assert len(tuple_out) == 2 and len(tuple_out[1]) == 2  # (logits, attentions), as return_dict=True's to_tuple()


# ----------------------------------------------------------------------------------------------------------------------
# 5. Config validation under the HF names


def test_hf_names_are_validated_like_the_official_ones():
    with pytest.raises(ValueError, match="hidden_size"):
        BD3LMConfig(hidden_size=32)  # 12 heads do not divide 32
    config = BD3LMConfig(hidden_dim=32, num_attention_heads=4)
    assert (config.hidden_size, config.n_heads, config.head_dim) == (32, 4, 8)
    with pytest.raises(ValueError, match="`num_attention_heads`=4 and `n_heads`=8"):
        BD3LMConfig(hidden_dim=32, n_heads=8, num_attention_heads=4)
    with pytest.raises(ValueError, match="multiple of `block_size`"):
        BD3LMConfig(max_position_embeddings=30, block_size=4)


@settings(max_examples=60, deadline=None)
@given(hidden=st.integers(1, 96), heads=st.integers(1, 16), layers=st.integers(0, 3), length=st.integers(1, 40))
def test_hf_and_official_names_give_the_same_config_or_the_same_error(hidden, heads, layers, length):
    def build(**kwargs):
        try:
            return BD3LMConfig(block_size=4, **kwargs)
        except ValueError as error:
            return str(error)

    official = build(hidden_dim=hidden, n_heads=heads, n_blocks=layers, model_length=length)
    hf = build(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers, max_position_embeddings=length)
    if isinstance(official, str):
        assert hf == official
    else:
        assert hf.to_dict() == official.to_dict()


@pytest.mark.parametrize("override", [{"n_heads": 5}, {"num_attention_heads": 5}, {"block_size": 5}])
def test_from_pretrained_overrides_are_validated(tmp_path, override):
    random_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="divisible|multiple of `block_size`"):
        BD3LMConfig.from_pretrained(tmp_path, **override)
    with pytest.raises(ValueError, match="divisible|multiple of `block_size`"):
        BD3LMForMaskedDiffusion.from_pretrained(tmp_path, **override)
    assert BD3LMConfig.from_pretrained(tmp_path, num_attention_heads=2).n_heads == 2  # a valid override is applied


def test_base_model_shares_the_renamed_embedding(tmp_path):
    """BD3LMModel loads the backbone of a saved BD3LMForMaskedDiffusion and saves the official key too."""
    model = random_model()
    model.save_pretrained(tmp_path / "full")
    base = BD3LMModel.from_pretrained(tmp_path / "full")
    torch.testing.assert_close(base.vocab_embed.weight, model.backbone.vocab_embed.weight, rtol=0, atol=0)
    base.save_pretrained(tmp_path / "base")
    assert "vocab_embed.embedding" in load_file(tmp_path / "base" / "model.safetensors")
    full = BD3LMForMaskedDiffusion.from_pretrained(tmp_path / "full")
    with torch.no_grad():
        # Bitwise against the full model loaded the same way. Against the model in memory only to float32 rounding:
        # transformers 5.25 keeps loaded tensors where safetensors put them (8-byte rather than 64-byte aligned), so
        # CPU kernels may take other vector paths (differences of ~2e-6 seen).
        torch.testing.assert_close(base(_ids(1, 8)).logits, full(_ids(1, 8)).logits, rtol=0, atol=0)
        torch.testing.assert_close(base(_ids(1, 8)).logits, model(_ids(1, 8)).logits, rtol=1e-5, atol=1e-5)
