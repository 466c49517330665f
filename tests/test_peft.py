# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Tests of bd3lm_trainer.peft_presets and of LoRA fine-tuning end to end: train an adapter with BD3LMTrainer, save it,
load it onto a base loaded with trust_remote_code, merge it, and generate from the PeftModel."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForMaskedLM

from bd3lm_trainer import LORA_TARGET_MODULES, BD3LMTrainer, BD3LMTrainingArguments, lora_target_modules
from modeling_bd3lm import BD3LMConfig, BD3LMForMaskedDiffusion
from tests.conftest import random_model, tiny_training_args

LAYERS = ("backbone.blocks.0", "backbone.blocks.1")
EXPECTED = {
    "attention": {f"{layer}.{name}" for layer in LAYERS for name in ("attn_qkv", "attn_out")},
    "attention_mlp": {f"{layer}.{name}" for layer in LAYERS for name in ("attn_qkv", "attn_out", "mlp.0", "mlp.2")},
    "all": {
        f"{layer}.{name}" for layer in LAYERS for name in ("attn_qkv", "attn_out", "mlp.0", "mlp.2", "adaLN_modulation")
    }
    | {"backbone.output_layer.adaLN_modulation"},
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_presets_wrap_exactly_the_expected_modules(preset):
    peft_model = get_peft_model(random_model(), LoraConfig(r=2, target_modules=LORA_TARGET_MODULES[preset]))
    assert set(peft_model.targeted_module_names) == EXPECTED[preset]
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)


def test_a_suffix_list_would_also_catch_the_noise_embedder():
    # why the presets are regexes: "mlp.0" as a suffix also matches backbone.sigma_map.mlp.0
    peft_model = get_peft_model(random_model(), LoraConfig(r=2, target_modules=["mlp.0"]))
    assert "backbone.sigma_map.mlp.0" in peft_model.targeted_module_names
    assert "backbone.sigma_map.mlp.0" not in EXPECTED["all"]


def test_lora_target_modules_names_the_presets():
    assert lora_target_modules("attention") == LORA_TARGET_MODULES["attention"]
    with pytest.raises(ValueError, match="attention_mlp"):
        lora_target_modules("everything")


def test_lora_train_save_load_merge_generate(tmp_path):
    # 1. a base checkpoint with its code, so that it loads with trust_remote_code
    BD3LMConfig.register_for_auto_class()
    BD3LMForMaskedDiffusion.register_for_auto_class("AutoModelForMaskedLM")
    base = random_model(bos_token_id=1)
    base.save_pretrained(tmp_path / "base")
    assert (tmp_path / "base" / "modeling_bd3lm.py").is_file()

    # 2. train a LoRA adapter with the trainer and save it
    g = torch.Generator().manual_seed(0)
    train = Dataset.from_dict({"input_ids": torch.randint(0, 63, (16, 32), generator=g).tolist()})
    args = BD3LMTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        use_cpu=True,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_strategy="no",
        schedule_search=False,
        seed=0,
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGET_MODULES["attention_mlp"])
    trainer = BD3LMTrainer(base, args, train_dataset=train, peft_config=lora)
    trained = trainer.model
    assert isinstance(trained, PeftModel)
    trainer.train()
    lora_b = [p for name, p in trained.named_parameters() if "lora_B" in name]
    assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b)  # the adapter learned something
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    # 3. load the base through the Auto class with remote code, attach the adapter, compare with the trained model
    remote_base = AutoModelForMaskedLM.from_pretrained(tmp_path / "base", trust_remote_code=True)
    assert type(remote_base) is not BD3LMForMaskedDiffusion  # really the copied code
    loaded = PeftModel.from_pretrained(remote_base, tmp_path / "adapter").eval()
    x = torch.randint(0, 63, (2, 12), generator=g)
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=x).logits
        peft_logits = loaded(input_ids=x).logits
    torch.testing.assert_close(peft_logits, expected, rtol=1e-5, atol=1e-5)
    without_adapter = BD3LMForMaskedDiffusion.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        assert not torch.allclose(without_adapter(input_ids=x).logits, peft_logits, atol=1e-4)

    # 4. generate from the PeftModel (fixed seed: the sampler draws which positions to reveal), merge and compare
    prompt = x[:, :4]
    generated = loaded.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, seed=0)
    assert generated.shape == (2, 12) and torch.equal(generated[:, :4], prompt)
    merged = loaded.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, peft_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, seed=0), generated)


def test_lora_with_schedule_search_and_ema(tmp_path):
    base = random_model()
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 63, (8, 32), generator=g).tolist()})
    args = BD3LMTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        eval_strategy="steps",
        eval_steps=2,
        use_cpu=True,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        use_ema=True,
        schedule_search_widths=[0.5],
        schedule_search_step=0.25,
        schedule_search_batches=1,
    )
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGET_MODULES["attention"])
    trainer = BD3LMTrainer(base, args, train_dataset=data, eval_dataset=data, peft_config=lora)
    trainer.train()
    assert set(trainer.ema_callback.shadow) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(".lora_" in name for name in trainer.ema_callback.shadow)
    chosen = trainer.state.log_history[-2]
    assert base.training_noise_interval() == pytest.approx(
        (chosen["schedule_search/eps_min"], chosen["schedule_search/eps_max"])
    )


def test_wrapping_raises_no_deprecation_warning():
    """PEFT reads `is_gradient_checkpointing`; the model answers it without transformers 5's FutureWarning."""
    import warnings

    model = random_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=LORA_TARGET_MODULES["attention"]))
    assert model.is_gradient_checkpointing is False
    enable = (
        getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    )  # 5.x / 4.57
    enable()
    assert model.is_gradient_checkpointing is True
    assert peft_model is not None


# ----------------------------------------------------------------------------------------------------------------------
# A gated adapter (activated LoRA): acts only where the model denoises, never at clean positions


def _gated_setup(clean_attention: str = "causal", family: str = "llama", **lora):
    from bd3lm_trainer import gated_lora_config
    from tests.test_causal_backbone import _convert

    reference, model = _convert(family, 4, clean_attention=clean_attention)
    return reference, get_peft_model(model, gated_lora_config(model, r=4, **lora))


def _clean_and_ar_loss(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean-half logits of the vectorised pass (all of x_t masked) and the L'=1 t≡1 NELBO of `model`."""
    from tests.test_causal_backbone import VOCAB

    bd3lm = model.get_base_model() if isinstance(model, PeftModel) else model
    with torch.no_grad():
        clean = model(input_ids=x, noisy_input_ids=torch.full_like(x, VOCAB), output_clean_logits=True).clean_logits
        block_size, bd3lm.config.block_size = bd3lm.config.block_size, 1
        try:
            loss = model(input_ids=x, labels=x, noise_levels=torch.ones(x.shape)).loss
        finally:
            bd3lm.config.block_size = block_size
    return clean[..., :VOCAB], loss


@pytest.mark.parametrize("gated", [True, False])
def test_a_gated_adapter_trained_with_the_trainer_leaves_the_clean_stream_the_source(tmp_path, gated):
    from bd3lm_trainer import gated_lora_config
    from tests.test_causal_backbone import LENGTH, VOCAB, _convert, _tokens

    reference, base = _convert("llama", 4, clean_attention="causal")
    data = Dataset.from_dict({"input_ids": _tokens(16, LENGTH, seed=3).tolist()})
    args = tiny_training_args(tmp_path, max_steps=3, learning_rate=5e-2, schedule_search=False)
    lora = (
        gated_lora_config(base, r=4, lora_dropout=0.0)
        if gated
        else LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGET_MODULES["attention_mlp"])
    )
    trainer = BD3LMTrainer(base, args, train_dataset=data, peft_config=lora)
    trainer.train()
    trained = trainer.model.eval()
    assert any(bool(p.abs().sum() > 0) for n, p in trained.named_parameters() if "lora_B" in n)  # it learned

    x = _tokens(3, LENGTH, seed=11)
    clean, ar_loss = _clean_and_ar_loss(trained, x)
    with torch.no_grad():
        source_logits, source_loss = reference(x).logits, reference(x, labels=x).loss
        noisy = trained(input_ids=x, noisy_input_ids=torch.full_like(x, VOCAB)).logits
        with trained.disable_adapter():
            untouched = trained(input_ids=x, noisy_input_ids=torch.full_like(x, VOCAB)).logits
    assert float((noisy - untouched).abs().max()) > 1e-3  # the adapter changed the denoiser
    if gated:
        torch.testing.assert_close(clean, source_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(ar_loss, source_loss, rtol=0, atol=1e-5)
    else:  # a plain LoRA trained the same way changes the clean stream: the source is gone
        assert float((clean - source_logits).abs().max()) > 1e-3
        assert abs(float(ar_loss - source_loss)) > 1e-4
    if not gated:
        return

    # save / load: the adapter config keeps the gate, the loaded adapter is the trained one
    from bd3lm_trainer import merge_and_unload
    from bd3lm_trainer.peft_presets import is_gated_adapter_config

    trainer.save_model(str(tmp_path / "adapter"))
    _, fresh = _convert("llama", 4, clean_attention="causal")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert is_gated_adapter_config(loaded.peft_config["default"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x, noisy_input_ids=torch.full_like(x, VOCAB)).logits, noisy)
    torch.testing.assert_close(_clean_and_ar_loss(loaded, x)[0], source_logits, rtol=0, atol=1e-5)
    # merging would lose the gate: refused (ours a ValueError naming the alternative; PEFT's own raises too)
    with pytest.raises(ValueError, match="gated.*unmerged"):
        merge_and_unload(loaded)
    with pytest.raises(NotImplementedError, match="aLoRA"):
        loaded.merge_and_unload()


@pytest.mark.parametrize("clean_attention", ["block_causal", "causal"])
def test_a_gated_adapter_keeps_the_vectorised_pass_equal_to_the_per_block_loop(clean_attention):
    """The gate is on the same positions in both passes: the noisy half / the window's last block."""
    from tests.test_causal_backbone import LENGTH, VOCAB, _tokens

    _, peft_model = _gated_setup(clean_attention, init_lora_weights=False)  # random B: the adapter acts
    peft_model.eval()
    x_0 = _tokens(2, LENGTH)
    x_t = torch.where(torch.rand(2, LENGTH, generator=torch.Generator().manual_seed(4)) < 0.5, VOCAB, x_0)
    with torch.no_grad():
        vectorised = peft_model(input_ids=x_0, noisy_input_ids=x_t).logits
        with peft_model.disable_adapter():
            assert float((peft_model(input_ids=x_0, noisy_input_ids=x_t).logits - vectorised).abs().max()) > 1e-3
        for b in range(LENGTH // 4):
            window = torch.cat((x_0[:, : 4 * b], x_t[:, 4 * b : 4 * b + 4]), dim=1)
            raw = peft_model(input_ids=window).logits
            first = max(4 * b, 1)
            torch.testing.assert_close(
                vectorised[:, first : 4 * b + 4], raw[:, first - 1 : 4 * b + 3], rtol=0, atol=1e-5
            )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_a_gated_adapter_commits_the_source_kv_cache(family):
    """PeftModel.generate and the model's own generate(): the adapter acts on the noisy block (other tokens than
    without it) and the committed cache (prompt and clean blocks) is the source model's."""
    from modeling_bd3lm import CACHE_FIELD
    from tests.test_causal_backbone import _tokens

    reference, peft_model = _gated_setup("causal", family, init_lora_weights=False)
    peft_model.eval()
    prompt = _tokens(1, 8, seed=9)
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, sampler="topk_confidence")
    out = peft_model.generate(input_ids=prompt, use_cache=True, return_dict_in_generate=True, **kwargs)
    own = peft_model.get_base_model().generate(prompt, use_cache=True, **kwargs)
    uncached = peft_model.generate(input_ids=prompt, use_cache=False, **kwargs)
    with peft_model.disable_adapter():
        without = peft_model.generate(input_ids=prompt, **kwargs)
    assert torch.equal(out.sequences, own) and torch.equal(out.sequences, uncached)
    assert not torch.equal(out.sequences, without)
    cache = getattr(out, CACHE_FIELD)
    assert cache.get_seq_length() == 12
    with torch.no_grad():
        source = reference(out.sequences[:, :12], use_cache=True).past_key_values
    for layer, source_layer in zip(cache.layers, source.layers):
        torch.testing.assert_close(layer.keys, source_layer.keys, rtol=0, atol=1e-5)


def test_adapter_gate_positions_and_refusals():
    from modeling_bd3lm import adapter_gate
    from tests.test_causal_backbone import _tokens

    reference, peft_model = _gated_setup("causal", init_lora_weights=False)
    backbone = peft_model.get_base_model().backbone
    x = _tokens(2, 6)
    with torch.no_grad():
        source = reference(x).logits
        with adapter_gate(backbone, 0):
            off = backbone(x).logits
        with adapter_gate(backbone, 2):
            last_two = backbone(x).logits
        outside = backbone(x).logits  # no gate: PEFT's aLoRA without offsets leaves the base network
    torch.testing.assert_close(off[..., :90], source, rtol=0, atol=1e-5)
    torch.testing.assert_close(outside[..., :90], source, rtol=0, atol=1e-5)
    torch.testing.assert_close(last_two[:, :4, :90], source[:, :4], rtol=0, atol=1e-5)  # causal: earlier rows untouched
    assert float((last_two[:, 4:, :90] - source[:, 4:]).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="active_last"):
        with adapter_gate(backbone, -1):
            pass
    # gradient checkpointing would recompute the layers outside the gate: refused
    bd3lm = peft_model.get_base_model()
    (getattr(bd3lm, "activation_checkpointing_enable", None) or bd3lm.gradient_checkpointing_enable)()  # 5.x / 4.57
    peft_model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        peft_model(input_ids=x[:, :4], noisy_input_ids=x[:, :4])


def test_a_clean_only_call_runs_the_base_layers_and_a_generate_finds_the_gated_layers_once(monkeypatch):
    """With the update acting nowhere (`adapter_gate(..., 0)`: autoregressive steps, verify calls) a layer whose every
    adapter is gated runs its base layer alone (its LoRA matrices are never called), with the same output, and gets
    its own forward back afterwards; a layer that also holds a plain LoRA keeps the plain update. One `generate()`
    walks the modules for gated layers once, not at every network call."""
    from modeling_bd3lm import adapter_gate, gating_bd3lm
    from tests.test_causal_backbone import _tokens

    reference, peft_model = _gated_setup("causal", init_lora_weights=False)
    bd3lm = peft_model.get_base_model()
    backbone = bd3lm.backbone
    layers = gating_bd3lm.gated_layers(backbone)
    calls = []
    for layer in layers:
        layer.lora_A["default"].register_forward_hook(lambda *a: calls.append(1))
    x = _tokens(2, 6)
    with torch.no_grad():
        with adapter_gate(backbone, 0):
            assert all("forward" in vars(layer) for layer in layers)
            off = backbone(x).logits
        assert calls == [] and not any("forward" in vars(layer) for layer in layers)
        torch.testing.assert_close(off[..., :90], reference(x).logits, rtol=0, atol=1e-5)
        with adapter_gate(backbone, 2):
            backbone(x)
        assert len(calls) == len(layers)  # outside the bypass the layers run their adapter again

        # a plain LoRA beside the gated one on the same layers: not bypassed, its update stays
        peft_model.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        peft_model.base_model.set_adapter(["default", "plain"])
        mixed = [layer for layer in layers if "plain" in layer.lora_A]
        assert mixed and not any(gating_bd3lm._runs_as_base(layer) for layer in mixed)
        with adapter_gate(backbone, 0):
            assert not any("forward" in vars(layer) for layer in mixed)
            with_plain = backbone(x).logits
        assert float((with_plain[..., :90] - reference(x).logits).abs().max()) > 1e-4

    walks = []
    real = gating_bd3lm.gated_layers
    monkeypatch.setattr(gating_bd3lm, "gated_layers", lambda b: walks.append(1) or real(b))
    out = bd3lm.generate(
        x, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
        generation_mode="draft_verify",
    )  # fmt: skip
    assert len(walks) == 1 and int(out.num_forwards) > 2


def test_gated_lora_config_refuses_the_dit_and_its_own_fields():
    from bd3lm_trainer import gated_lora_config

    with pytest.raises(ValueError, match="from_causal_lm"):
        gated_lora_config(random_model())
    reference, peft_model = _gated_setup()
    with pytest.raises(ValueError, match="target_modules"):
        gated_lora_config(peft_model.get_base_model(), target_modules=["q_proj"])


def test_model_cards_record_clean_attention_and_a_gated_adapter(tmp_path):
    from bd3lm_trainer import hub
    from bd3lm_trainer.model_card import CardInfo, build_model_card

    arch = {
        "block_size": 4,
        "model_length": 16,
        "vocab_size": 91,
        "mask_token_id": 90,
        "hidden_dim": 32,
        "n_blocks": 2,
        "n_heads": 4,
        "noise_schedule": "loglinear",
        "parameters": 1,
        "clean_attention": "causal",
    }
    text = build_model_card(CardInfo(repo_id="fake-user/tiny", architecture=arch)).text
    assert "| Clean-stream attention | `causal` (clean tokens attend causally" in text
    assert "Exact decoding" not in text  # the DiT has no autoregressive view
    converted = build_model_card(CardInfo(repo_id="fake-user/tiny", architecture=arch | {"denoiser": "Llama"})).text
    assert "| Exact decoding (`generation_mode` `autoregressive` / `draft_verify`) | greedy text = " in converted
    assert "a frozen base with a gated adapter |" in converted
    for gated in (True, False):
        if gated:
            _, peft_model = _gated_setup()
        else:
            from tests.test_causal_backbone import _convert

            peft_model = get_peft_model(_convert("llama", 4)[1], LoraConfig(r=2, target_modules=["q_proj"]))
        peft_model.save_pretrained(tmp_path / str(gated))
        with hub.plan_upload(tmp_path / str(gated), "fake-user/tiny-lora", base_model="fake-user/tiny") as plan:
            assert plan.card_info.adapter["gated"] is gated
            assert ("| gated | `yes: acts only at noisy positions" in plan.card.text) is gated
