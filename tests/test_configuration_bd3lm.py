"""BD3LMConfig: official fields, HF aliases, validation and round trips."""

from __future__ import annotations

import json

import pytest

from modeling_bd3lm import BD3LMConfig, BD3LMForMaskedDiffusion

OFFICIAL_OWT_CONFIG = {  # config.json of kuleshov-group/bd3lm-owt-block_size4 (reference §e)
    "architectures": ["BD3LM"],
    "model_type": "bd3lm",
    "auto_map": {"AutoConfig": "configuration_bd3lm.BD3LMConfig", "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM"},
    "attn_backend": "sdpa",
    "block_size": 4,
    "cond_dim": 128,
    "cross_attn": True,
    "dropout": 0.1,
    "hidden_dim": 768,
    "model_length": 1024,
    "n_blocks": 12,
    "n_heads": 12,
    "return_dict": False,
    "sampling_eps_max": 0.999,
    "sampling_eps_min": 0.001,
    "time_conditioning": False,
    "torch_dtype": "float32",
    "transformers_version": "4.49.0",
    "var_min": True,
    "vocab_size": 50258,
}


def test_official_config_json_loads_with_hf_aliases(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_OWT_CONFIG))
    config = BD3LMConfig.from_pretrained(tmp_path)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.max_position_embeddings == 1024 and config.vocab_size == 50258
    assert config.mask_token_id == 50257  # GPT-2's 50257 tokens + the mask
    assert config.head_dim == 64 and config.num_sequence_blocks == 256
    assert config._attn_implementation is None  # "sdpa" is transformers' default: the model picks it when built
    small = BD3LMConfig(vocab_size=64, hidden_dim=64, cond_dim=16, n_blocks=1, n_heads=4, model_length=32)
    assert BD3LMForMaskedDiffusion(small).config._attn_implementation == "sdpa"


def test_fixed_upstream_defaults():
    config = BD3LMConfig()
    assert config.cond_dim == 128  # upstream default 129 is a typo
    assert config.attn_backend == "sdpa"  # upstream defaults to flex, which has no CPU backward


def test_hf_names_set_official_fields():
    config = BD3LMConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64)
    assert (config.hidden_dim, config.n_blocks, config.n_heads, config.model_length) == (128, 3, 4, 64)


def test_round_trip(tmp_path):
    config = BD3LMConfig(block_size=8, vocab_size=100, hidden_dim=64, n_heads=4, model_length=64, ignore_bos=True)
    config.save_pretrained(tmp_path)
    loaded = BD3LMConfig.from_pretrained(tmp_path)
    for key in ("block_size", "vocab_size", "hidden_dim", "model_length", "mask_token_id", "ignore_bos", "cond_dim"):
        assert getattr(loaded, key) == getattr(config, key)


def test_flex_backend_maps_to_attn_implementation():
    assert BD3LMConfig(attn_backend="flex")._attn_implementation == "flex_attention"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_dim": 100, "n_heads": 12}, "divisible"),
        ({"vocab_size": 10, "mask_token_id": 10}, "mask_token_id"),
        ({"model_length": 30, "block_size": 4}, "multiple of `block_size`"),
        ({"attn_backend": "flash"}, "attn_backend"),
        ({"noise_schedule": "zigzag"}, "noise_schedule"),
        ({"sampling_eps_min": 0.9, "sampling_eps_max": 0.1}, "sampling_eps"),
        ({"block_size": 0}, "block_size"),
        ({"dropout": 1.5}, "dropout"),
        ({"causal": True}, "causal"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BD3LMConfig(**kwargs)
