# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Tests of bd3lm_trainer.peft_presets and of LoRA fine-tuning end to end: train an adapter with BD3LMTrainer, save it,
load it onto a base loaded with trust_remote_code, merge it, and generate from the PeftModel."""

from __future__ import annotations

import pytest
import torch
from bd3lm_trainer import LORA_TARGET_MODULES, BD3LMTrainer, BD3LMTrainingArguments, lora_target_modules
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForMaskedLM

from modeling_bd3lm import BD3LMConfig, BD3LMForMaskedDiffusion
from tests.conftest import random_model

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
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2,
        use_cpu=True, report_to=[], dataloader_num_workers=0, disable_tqdm=True, save_strategy="no",
        schedule_search=False, seed=0,
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
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        eval_strategy="steps", eval_steps=2, use_cpu=True, report_to=[], dataloader_num_workers=0, disable_tqdm=True,
        save_strategy="no", seed=0, use_ema=True, schedule_search_widths=[0.5], schedule_search_step=0.25,
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
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable  # 5.x / 4.57
    enable()
    assert model.is_gradient_checkpointing is True
    assert peft_model is not None
