"""Tests of `BD3LMGenerationConfig` (`generation_config_bd3lm.py`): save/load round trips, the upgrade of a plain
`GenerationConfig`, and one clear error per bad or unsupported field."""

from __future__ import annotations

import pytest
from transformers import GenerationConfig

from modeling_bd3lm import BD3LMForMaskedDiffusion
from modeling_bd3lm.generation_bd3lm import BD3LMGenerationConfig
from tests.test_generation_bd3lm import BOS, EOS, make_model


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
