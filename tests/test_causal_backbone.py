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
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from modeling_bd3lm import BD3LMConfig, BD3LMForMaskedDiffusion

VOCAB = 90  # the source's vocabulary; conversion appends the mask token as id 90
LENGTH = 16  # model_length of the converted models


def _source(family: str, seed: int = 0, tie: bool = False) -> torch.nn.Module:
    """A tiny random causal LM of `family`; weights scaled up so that outputs depend visibly on the inputs."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    rotary = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if family == "llama":  # rope_theta 1e5 as SmolLM2 (transformers 4.57 must read it from `rope_parameters`)
        model = LlamaForCausalLM(
            LlamaConfig(**rotary, **common, rope_parameters={"rope_type": "default", "rope_theta": 1e5})
        )
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**rotary, **common))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**rotary, head_dim=8, **common))
    elif family == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **common,
            )
        )
    else:
        raise ValueError(family)
    with torch.no_grad():
        for _name, param in model.named_parameters():
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


def _assert_vectorised_passes_agree(first, second, seed: int, padded: int) -> None:
    """Both models' vectorised pass on the same half-masked x_t, the second row right-padded by `padded` tokens: equal
    logits at every real token."""
    x_0 = _tokens(2, LENGTH)
    x_t = torch.where(torch.rand(2, LENGTH, generator=torch.Generator().manual_seed(seed)) < 0.5, VOCAB, x_0)
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, -padded:] = 0
    with torch.no_grad():
        a = first(input_ids=x_0, noisy_input_ids=x_t, attention_mask=mask).logits
        b = second(input_ids=x_0, noisy_input_ids=x_t, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_and_eager_agree_on_the_vectorised_pass(family):
    _, sdpa = _convert(family, 4, attn_implementation="sdpa")
    _, eager = _convert(family, 4, attn_implementation="eager")
    _assert_vectorised_passes_agree(sdpa, eager, seed=3, padded=5)


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


@pytest.mark.parametrize("clean_attention", ["block_causal", "causal"])
@pytest.mark.parametrize("family", FAMILIES)
def test_vectorised_pass_equals_a_per_block_loop_of_sampling_passes(family, clean_attention):
    _, model = _convert(family, 4, clean_attention=clean_attention)
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
        model(input_ids=_tokens(1, 8), cache=cache, use_cache=True)
        keys = cache.layers[0].keys.clone()
        model(input_ids=torch.full((1, 4), VOCAB), cache=cache, use_cache=False)
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
        alone = model.generate(prompts[row : row + 1, attention[row].argmax() :], **kwargs)
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


@pytest.mark.parametrize("tie", [False, True])
def test_resize_token_embeddings_on_a_converted_model_adds_a_token_and_generation_still_works(tie, tmp_path):
    """The DiT's resizable `nn.Embedding` and the causal backbone's get/set_input/output_embeddings together: adding a
    token after conversion keeps the config, the backbone config and the mask token in step, leaves every old logit
    unchanged, survives save/load, and generation (the new token suppressed) is what it was before."""
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

    _, model = _convert("llama", 4, tie=tie)
    prompt = _tokens(2, 4, seed=7)
    x_0 = _tokens(2, LENGTH, seed=8)
    x_t = torch.where(torch.rand(2, LENGTH, generator=torch.Generator().manual_seed(9)) < 0.5, VOCAB, x_0)
    with torch.no_grad():
        before = model(input_ids=x_0, noisy_input_ids=x_t).logits
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)

    model.resize_token_embeddings(VOCAB + 2)  # one token after the mask token
    new_id = VOCAB + 1
    assert model.config.vocab_size == model.backbone.config.vocab_size == VOCAB + 2
    assert model.config.backbone_config is model.backbone.config and model.config.mask_token_id == VOCAB
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == VOCAB + 2
    tied = model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert tied == tie
    with torch.no_grad():
        after = model(input_ids=x_0, noisy_input_ids=x_t).logits
    assert after.shape[-1] == VOCAB + 2 and torch.equal(after[..., : VOCAB + 1], before)
    suppress = LogitsProcessorList([SuppressTokensLogitsProcessor([new_id])])
    again = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, logits_processor=suppress)
    assert torch.equal(again, generated)
    # the new token is an ordinary input: a prompt holding it generates, and the vocabulary covers the output
    with_new = model.generate(
        torch.cat((prompt, torch.full((2, 1), new_id)), 1)[:, 1:], max_new_tokens=8, do_sample=False, eos_token_id=None
    )
    assert with_new.shape == (2, 12) and int(with_new.max()) < VOCAB + 2 and not bool((with_new[:, 4:] == VOCAB).any())

    model.save_pretrained(tmp_path)
    reloaded = BD3LMForMaskedDiffusion.from_pretrained(tmp_path).eval()
    assert reloaded.config.vocab_size == reloaded.backbone.config.vocab_size == VOCAB + 2
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x_0, noisy_input_ids=x_t).logits, after)
    with pytest.raises(ValueError, match=r"would drop the mask token \(id 90\); keep at least 91 rows"):
        model.resize_token_embeddings(VOCAB)


def test_dit_config_is_unchanged_by_the_backbone_fields():
    config = BD3LMConfig()
    assert config.backbone_config is None and config.vocab_size == 50258 and config.ignore_bos is False
    assert not BD3LMForMaskedDiffusion(
        BD3LMConfig(vocab_size=64, hidden_dim=64, cond_dim=16, n_blocks=1, n_heads=4, model_length=8)
    ).is_causal_backbone


# ----------------------------------------------------------------------------------------------------------------------
# Training: Trainer, gradient checkpointing, LoRA


def _training_args(tmp_path, **overrides):
    from bd3lm_trainer import BD3LMTrainingArguments

    values = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        warmup_steps=0,
        use_cpu=True,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_strategy="no",
        schedule_search=False,
        seed=0,
        logging_steps=1,
    )
    values.update(overrides)
    return BD3LMTrainingArguments(**values)


def _dataset(rows: int = 8):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": _tokens(rows, LENGTH, seed=11).tolist()})


def _fixed_nelbo(model) -> float:
    """The NELBO of fixed data at fixed noise (common random numbers before and after training)."""
    x_0 = _tokens(8, LENGTH, seed=11)
    t = torch.full((8, LENGTH // 4), 0.5)
    x_t = torch.where(torch.rand(8, LENGTH, generator=torch.Generator().manual_seed(12)) < 0.5, VOCAB, x_0)
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=x_0, noisy_input_ids=x_t, labels=x_0, noise_levels=t).loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_bd3lm_trainer_lowers_the_nelbo(family, tmp_path):
    from bd3lm_trainer import BD3LMTrainer

    _, model = _convert(family, 4)
    before = _fixed_nelbo(model)
    trainer = BD3LMTrainer(model, _training_args(tmp_path), train_dataset=_dataset())
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert _fixed_nelbo(model) < 0.9 * before


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_uses_the_backbone_and_changes_nothing(family):
    _, model = _convert(family, 4)
    model.train()
    x_0 = _tokens(2, LENGTH)
    t = torch.full((2, LENGTH // 4), 0.7)
    x_t = torch.where(torch.rand(2, LENGTH, generator=torch.Generator().manual_seed(2)) < 0.7, VOCAB, x_0)

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=x_0, noisy_input_ids=x_t, labels=x_0, noise_levels=t).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert model.backbone.base_model.gradient_checkpointing and model.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads()
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)


LORA_EXPECTED = {
    ("rotary", "attention"): {f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
    ("rotary", "attention_mlp"): {f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    | {f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")},
    ("gpt2", "attention"): {"attn.c_attn", "attn.c_proj"},
    ("gpt2", "attention_mlp"): {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", ["attention", "attention_mlp"])
def test_lora_presets_train_save_reload_merge_generate(family, preset, tmp_path):
    import warnings

    from peft import LoraConfig, PeftModel

    from bd3lm_trainer import LORA_TARGET_MODULES, BD3LMTrainer

    _, base = _convert(family, 4)
    base.save_pretrained(tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGET_MODULES[preset])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT on GPT-2's Conv1D: "fan_in_fan_out" is set for it
        trainer = BD3LMTrainer(
            base, _training_args(tmp_path, max_steps=3, learning_rate=5e-2), train_dataset=_dataset(), peft_config=lora
        )
    trained = trainer.model
    layers = "backbone.transformer.h" if family == "gpt2" else "backbone.model.layers"
    expected = LORA_EXPECTED[("gpt2" if family == "gpt2" else "rotary", preset)]
    assert set(trained.targeted_module_names) == {f"{layers}.{i}.{name}" for i in range(2) for name in expected}
    trainer.train()
    assert any(bool(p.abs().sum() > 0) for n, p in trained.named_parameters() if "lora_B" in n)
    trainer.save_model(str(tmp_path / "adapter"))

    loaded = PeftModel.from_pretrained(BD3LMForMaskedDiffusion.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    loaded.eval()
    trained.eval()
    x = _tokens(2, 8, seed=13)
    with torch.no_grad():
        expected_logits = trained(input_ids=x).logits
        peft_logits = loaded(input_ids=x).logits
        base_logits = BD3LMForMaskedDiffusion.from_pretrained(tmp_path / "base")(input_ids=x).logits
    torch.testing.assert_close(peft_logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(peft_logits, base_logits, atol=1e-4)
    kwargs = dict(max_new_tokens=8, do_sample=False, sampler="topk_confidence", eos_token_id=None)
    generated = loaded.generate(input_ids=x[:, :4], **kwargs)
    merged = loaded.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, peft_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.generate(input_ids=x[:, :4], **kwargs), generated)


# ----------------------------------------------------------------------------------------------------------------------
# Conversion from folders, tokenizers and bad input


def _word_tokenizer(size: int = VOCAB):
    """A word-level fast tokenizer of `size` tokens "t0".. (t0 = pad, t1 = bos, t2 = eos), with no mask token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3"
    )


def test_from_a_folder_the_tokenizer_gets_a_mask_token_and_is_saved(tmp_path):
    from transformers import AutoTokenizer

    reference = _source("qwen3", tie=True)
    reference.save_pretrained(tmp_path / "source")
    _word_tokenizer().save_pretrained(tmp_path / "source")
    model = BD3LMForMaskedDiffusion.from_causal_lm(tmp_path / "source", block_size=4, model_length=LENGTH)
    assert (
        model.tokenizer.mask_token == "<|mask|>"
        and model.tokenizer.mask_token_id == VOCAB == model.config.mask_token_id
    )
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 0)
    model.save_pretrained(tmp_path / "bd3lm")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bd3lm")
    assert tokenizer.mask_token_id == VOCAB and len(tokenizer) == model.config.vocab_size
    reloaded = BD3LMForMaskedDiffusion.from_pretrained(tmp_path / "bd3lm").eval()
    assert reloaded.backbone.lm_head.weight.data_ptr() == reloaded.backbone.model.embed_tokens.weight.data_ptr()
    x = _tokens(2, LENGTH)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
    # the paper's recipe (fine-tune at another block size) applies to converted checkpoints too
    from bd3lm_trainer import load_for_finetuning

    moved = load_for_finetuning(tmp_path / "bd3lm", block_size=8).eval()
    assert moved.config.block_size == 8 and moved.config.backbone_config.model_type == "qwen3"
    with torch.no_grad():
        short = x[:, :4]  # one block under both block sizes: the same attention
        torch.testing.assert_close(moved(input_ids=short).logits, model(input_ids=short).logits, rtol=0, atol=1e-6)


def test_a_vocabulary_padded_past_the_tokenizer_keeps_its_size(tmp_path):
    source = _source("llama")
    model = BD3LMForMaskedDiffusion.from_causal_lm(source, 4, tokenizer=_word_tokenizer(80), model_length=LENGTH)
    assert model.config.mask_token_id == 80 and model.config.vocab_size == VOCAB  # row 80 existed: no resize


def test_no_shift_flag_reads_position_i_for_token_i():
    _, model = _convert("llama", 4, token_shift=False)
    assert model.config.ignore_bos is False
    x_0 = _tokens(2, LENGTH)
    x_t = torch.where(torch.rand(2, LENGTH, generator=torch.Generator().manual_seed(4)) < 0.5, VOCAB, x_0)
    with torch.no_grad():
        vectorised = model(input_ids=x_0, noisy_input_ids=x_t).logits
        for b in range(LENGTH // 4):
            raw = model(input_ids=torch.cat((x_0[:, : 4 * b], x_t[:, 4 * b : 4 * b + 4]), dim=1)).logits
            torch.testing.assert_close(vectorised[:, 4 * b : 4 * b + 4], raw[:, 4 * b :], rtol=0, atol=1e-5)
    prompts = _tokens(2, 5, seed=6)
    kwargs = dict(max_new_tokens=30, do_sample=True, eos_token_id=None)
    assert torch.equal(
        model.generate(prompts, seed=3, **kwargs), model.generate(prompts, seed=3, use_cache=False, **kwargs)
    )


def test_encoders_and_encoder_decoders_are_refused(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    bert = BertForMaskedLM(
        BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    ).eval()
    with pytest.raises(ValueError, match=r"^The source \(BertForMaskedLM.*attends to later tokens"):
        BD3LMForMaskedDiffusion.from_causal_lm(bert, block_size=4)
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="attends to later tokens"):
        BD3LMForMaskedDiffusion.from_causal_lm(tmp_path / "bert", block_size=4)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    with pytest.raises(ValueError, match="is an encoder-decoder"):
        BD3LMForMaskedDiffusion.from_causal_lm(t5, block_size=4)
    t5.save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match=r"model_type='t5'\) is an encoder-decoder"):
        BD3LMForMaskedDiffusion.from_causal_lm(tmp_path / "t5", block_size=4)
    with pytest.raises(ValueError, match="has no LM head; load it with AutoModelForCausalLM"):
        BD3LMForMaskedDiffusion.from_causal_lm(_source("llama").model, block_size=4)


def test_an_attention_that_ignores_the_4d_mask_is_detected_by_the_probe():
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        # a kernel that applies its own causal mask and drops the one it is given
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register("causal_only_test", causal_only)
    source = AutoModelForCausalLM.from_config(_source("llama").config, attn_implementation="causal_only_test")
    with pytest.raises(ValueError, match=r"ignores a custom 4-D attention mask.*attn_implementation='sdpa'\.$"):
        BD3LMForMaskedDiffusion.from_causal_lm(source, block_size=4, model_length=LENGTH)
    # a model built directly from a config is probed where it is built
    config = BD3LMConfig(backbone_config=source.config, block_size=4, model_length=LENGTH, mask_token_id=VOCAB - 1)
    with pytest.raises(ValueError, match="ignores a custom 4-D attention mask"):
        BD3LMForMaskedDiffusion(config)


def test_bad_sizes_and_tokenizers_are_one_line_errors():
    with pytest.raises(ValueError, match=r"`block_size`=3 does not divide `model_length`=16"):
        BD3LMForMaskedDiffusion.from_causal_lm(_source("llama"), block_size=3, model_length=LENGTH)
    with pytest.raises(ValueError, match=r"`model_length`=128 exceeds the source's max_position_embeddings=64"):
        BD3LMForMaskedDiffusion.from_causal_lm(_source("llama"), block_size=4, model_length=128)
    with pytest.raises(ValueError, match=r"The tokenizer has 200 tokens but the model's embedding has 90 rows"):
        BD3LMForMaskedDiffusion.from_causal_lm(_source("llama"), block_size=4, tokenizer=_word_tokenizer(200))
    with pytest.raises(ValueError, match="already a BD3-LM"):
        BD3LMForMaskedDiffusion.from_causal_lm(_convert("llama", 4)[1], block_size=4)
    backbone = _source("llama").config
    with pytest.raises(ValueError, match=r"`vocab_size`=91 differs from the backbone's vocab_size=90"):
        BD3LMConfig(backbone_config=backbone, vocab_size=91, model_length=LENGTH)
    with pytest.raises(ValueError, match="exceeds the backbone's max_position_embeddings=64"):
        BD3LMConfig(backbone_config=backbone, model_length=128)
    with pytest.raises(ValueError, match="needs its `model_type`"):
        BD3LMConfig(backbone_config={"hidden_size": 32})
    with pytest.raises(ValueError, match="`ignore_bos=False` cannot hold with `token_shift=True`"):
        BD3LMConfig(backbone_config=backbone, model_length=LENGTH, ignore_bos=False)
    with pytest.raises(ValueError, match="sliding-window attention layers"):
        BD3LMConfig(
            backbone_config=Qwen2Config(
                vocab_size=VOCAB, use_sliding_window=True, sliding_window=8, max_window_layers=0, num_hidden_layers=2
            ),
            model_length=LENGTH,
        )


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints load with trust_remote_code where this project is not installed (transformers 5.x and 4.57)

REMOTE_CHILD = r"""
import json, torch, transformers
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM
for family in json.loads(FAMILIES):
    folder = ROOT + "/" + family
    io = load_file(folder + "/io.safetensors")
    model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        train = model(input_ids=io["x_0"], noisy_input_ids=io["x_t"]).logits
        sample = model(input_ids=io["x_t"]).logits
    generated = model.generate(io["x_0"][:, :5], max_new_tokens=8, do_sample=False, eos_token_id=None,
                               sampler="topk_confidence")
    assert (train - io["train"]).abs().max() <= 1e-5, family
    assert (sample - io["sample"]).abs().max() <= 1e-5, family
    assert torch.equal(generated, io["generated"]), family
# GPT-2's eager attention applies its own causal mask on transformers 4.57 (not on 5.x): the probe that runs once the
# weights are loaded must refuse it there, and only there
try:
    eager = AutoModelForMaskedLM.from_pretrained(ROOT + "/gpt2", trust_remote_code=True, attn_implementation="eager")
    eager(input_ids=io["x_t"])
    refused = False
except ValueError as error:
    assert "ignores a custom 4-D attention mask" in str(error) and "'sdpa'" in str(error), error
    refused = True
assert refused == transformers.__version__.startswith("4."), (refused, transformers.__version__)
print(transformers.__version__)
"""


def _remote_interpreters():
    from tests.test_remote_code import _interpreters

    return _interpreters()


@pytest.mark.parametrize("python", _remote_interpreters())
def test_converted_checkpoints_load_with_remote_code_without_this_project(python, tmp_path):
    import json

    from safetensors.torch import save_file

    from tests.conftest import run_python_without_project

    if python is None:
        pytest.fail("BD3LM_REQUIRE_TF4=1 but the transformers 4.57 environment is missing: run tests/make_tf4_env.sh")
    for family in FAMILIES:
        # Llama with tied embeddings and rope_theta 1e5 (SmolLM2's): 4.57 must rebuild both from the saved config
        reference = _source(family, tie=family == "llama")
        assert family != "llama" or reference.config.rope_parameters["rope_theta"] == 1e5
        model = BD3LMForMaskedDiffusion.from_causal_lm(reference, block_size=4, model_length=LENGTH)
        model.save_pretrained(tmp_path / family)
        x_0 = _tokens(2, LENGTH)
        x_t = torch.where(torch.rand(2, LENGTH, generator=torch.Generator().manual_seed(2)) < 0.5, VOCAB, x_0)
        with torch.no_grad():
            io = {
                "x_0": x_0,
                "x_t": x_t,
                "train": model(input_ids=x_0, noisy_input_ids=x_t).logits,
                "sample": model(input_ids=x_t).logits,
                "generated": model.generate(
                    x_0[:, :5], max_new_tokens=8, do_sample=False, eos_token_id=None, sampler="topk_confidence"
                ),
            }
        save_file({k: v.contiguous() for k, v in io.items()}, tmp_path / family / "io.safetensors")
    code = REMOTE_CHILD.replace("FAMILIES", repr(json.dumps(FAMILIES))).replace("ROOT", repr(str(tmp_path)))
    result = run_python_without_project(code, cwd=tmp_path, python=python)
    assert result.returncode == 0, result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------------------
# Command line: bd3lm convert, bd3lm train --init-from a causal LM


@pytest.fixture
def source_folder(tmp_path):
    folder = tmp_path / "source"
    _source("llama", tie=True).save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)
    return folder


def test_cli_convert_writes_a_complete_folder_or_nothing(source_folder, tmp_path, capsys):
    from transformers import AutoTokenizer

    from bd3lm_trainer.cli import main

    out = tmp_path / "converted"
    assert main(["convert", str(source_folder), str(out), "--block-size", "4", "--model-length", "16"]) == 0
    assert "mask token id 90" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "causal_backbone_bd3lm.py"} <= {
        p.name for p in out.iterdir()
    }
    model = BD3LMForMaskedDiffusion.from_pretrained(out)
    assert model.config.block_size == 4 and model.config.backbone_config.model_type == "llama"
    assert AutoTokenizer.from_pretrained(out).mask_token_id == model.config.mask_token_id == VOCAB

    assert main(["convert", str(source_folder), str(out), "--block-size", "4"]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad"
    assert main(["convert", str(source_folder), str(bad), "--block-size", "3", "--model-length", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`block_size`=3 does not divide `model_length`=16" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "source"]  # nothing half-written


def test_cli_train_init_from_a_causal_lm(source_folder, tmp_path, capsys):
    import json

    from bd3lm_trainer.cli import main

    data = tmp_path / "train.jsonl"
    words = _tokens(40, 20, seed=14).tolist()
    data.write_text("".join(json.dumps({"text": " ".join(f"t{i}" for i in row)}) + "\n" for row in words))
    out = tmp_path / "run"
    argv = [
        "train",
        "--init-from",
        str(source_folder),
        "--dataset",
        str(data),
        "--output-dir",
        str(out),
        "--model-length",
        "16",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--warmup-steps",
        "0",
        "--eval-steps",
        "2",
        "--save-steps",
        "2",
        "--eval-batches",
        "1",
        "--no-schedule-search",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    model = BD3LMForMaskedDiffusion.from_pretrained(out)
    assert model.is_causal_backbone and model.config.block_size == 4 and model.config.mask_token_id == VOCAB
    assert (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_flex_attention_agrees_with_sdpa():
    """FlexAttention takes a BlockMask built from the same predicate (compiled on CPU: slow)."""
    import warnings

    _, sdpa = _convert("llama", 4, attn_implementation="sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's flex_attention warns when it runs uncompiled code paths on CPU
        _, flex = _convert("llama", 4, attn_implementation="flex_attention")
        _assert_vectorised_passes_agree(sdpa, flex, seed=4, padded=4)


def test_hub_upload_dry_run_accepts_a_converted_model_with_tied_weights(source_folder, tmp_path, capsys):
    import hub_upload

    model = BD3LMForMaskedDiffusion.from_causal_lm(source_folder, block_size=4, model_length=LENGTH)
    model.save_pretrained(tmp_path / "bd3lm")  # the tied head is not written
    assert hub_upload.main([str(tmp_path / "bd3lm"), "someone/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "| Denoiser | LlamaForCausalLM (token shift: position i-1 predicts token i) |" in out
    assert "Dry run: nothing was sent." in out


# ----------------------------------------------------------------------------------------------------------------------
# The seam: the wrapper takes its denoiser network in __init__, probes it once, and refuses σ it cannot feed


def test_the_wrapper_adopts_the_backbone_it_is_given():
    source = _source("llama")
    before = {k: v.clone() for k, v in source.state_dict().items()}
    config = BD3LMConfig(backbone_config=source.config, block_size=4, model_length=LENGTH, mask_token_id=VOCAB - 1)
    model = BD3LMForMaskedDiffusion(config, backbone=source)
    assert model.backbone is source and model.config.backbone_config is source.config
    # post_init left the pretrained weights alone; checkpoint keys are the causal LM's under `backbone.`
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())
    assert {f"backbone.{k}" for k in before} <= set(model.state_dict())
    assert model.denoiser.predicts_next_token and model.denoiser.caches_after_positions
    assert model.tokenizer is None  # only a conversion carries the tokenizer it converted with


def test_the_attention_probe_runs_once_where_the_model_is_built_or_loaded(tmp_path, monkeypatch):
    from modeling_bd3lm import causal_backbone_bd3lm

    calls = []
    probe = causal_backbone_bd3lm.check_backbone_attention
    monkeypatch.setattr(causal_backbone_bd3lm, "check_backbone_attention", lambda b: calls.append(b) or probe(b))
    _, model = _convert("llama", 4)
    assert len(calls) == 1  # built (converted)
    x = _tokens(2, LENGTH)
    with torch.no_grad():
        model(input_ids=x, labels=x)
        model(input_ids=x[:, :4], use_cache=True)
    model.generate(x[:, :5], max_new_tokens=8, do_sample=False)
    assert len(calls) == 1  # forwards and generation probe nothing
    model.save_pretrained(tmp_path)
    loaded = BD3LMForMaskedDiffusion.from_pretrained(tmp_path)
    assert len(calls) == 2 and calls[-1] is loaded.backbone  # loaded: once, with the weights in place
    assert loaded.tokenizer is None
    loaded.set_attn_implementation("eager")
    assert len(calls) == 3 and loaded.backbone.config._attn_implementation == "eager"  # a new kernel is probed


def test_time_conditioning_is_refused_for_a_causal_backbone():
    with pytest.raises(ValueError, match=r"`time_conditioning=True` needs a noise-level input"):
        BD3LMConfig(backbone_config=_source("llama").config, model_length=LENGTH, time_conditioning=True)
    with pytest.raises(ValueError, match=r"`time_conditioning=True` needs a noise-level input"):
        BD3LMForMaskedDiffusion.from_causal_lm(
            _source("llama"), block_size=4, model_length=LENGTH, time_conditioning=True
        )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_calls_log_no_cache_deprecation(family):
    """transformers 5.24 renamed the cache argument and output field to `cache` and logs a deprecation for
    `past_key_values`: the backbone gets the name its forward takes, and our forward takes `cache` too."""
    import warnings

    from transformers.cache_utils import DynamicCache
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as hf_logging

    from modeling_bd3lm import CACHE_FIELD

    _, model = _convert(family, 4)
    x = _tokens(2, 8)
    hf_logging.warning_once.cache_clear()  # an earlier test may have logged it once already
    # transformers says it both ways: its logger (a renamed output field or kwarg) and a FutureWarning (deprecate_kwarg)
    with (
        CaptureLogger(hf_logging.get_logger("transformers")) as captured,
        warnings.catch_warnings(record=True) as raised,
    ):
        warnings.simplefilter("always")
        with torch.no_grad():
            cache = DynamicCache()
            out = model(input_ids=x[:, :4], cache=cache, use_cache=True)
            model(input_ids=x[:, 4:], cache=cache, use_cache=False)
        model.generate(x[:, :5], max_new_tokens=8, do_sample=False)
    assert getattr(out, CACHE_FIELD) is cache and cache.get_seq_length() == 4
    said = [captured.out] + [str(w.message) for w in raised]
    assert not [m for m in said if "deprecated" in m and "cache" in m], said
