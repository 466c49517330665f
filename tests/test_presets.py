"""Named presets build valid configs; the paper's sizes and intervals are what the reference says."""

from __future__ import annotations

import pytest

from bd3lm_configuration import BLOCK_PRESETS, SIZE_PRESETS, load_preset
from modeling_bd3lm import BD3LMForMaskedDiffusion


@pytest.mark.parametrize("size", SIZE_PRESETS)
@pytest.mark.parametrize("block", [None, *BLOCK_PRESETS])
def test_every_combination_is_valid(size, block):
    config = load_preset(size, block=block)
    assert config.model_length % config.block_size == 0


def test_small_is_the_papers_model_with_the_released_parameter_count():
    import torch

    with torch.device("meta"):
        model = BD3LMForMaskedDiffusion(load_preset("small"))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(169.6e6, rel=2e-3)


def test_block_presets_carry_the_papers_intervals():
    assert (load_preset("tiny", "bs4").sampling_eps_min, load_preset("tiny", "bs4").sampling_eps_max) == (0.45, 0.95)
    assert (load_preset("tiny", "bs16").sampling_eps_min, load_preset("tiny", "bs16").sampling_eps_max) == (0.3, 0.8)
    assert load_preset("tiny", "bs1").always_mask
    assert load_preset("tiny", "mdlm").block_size == load_preset("tiny").model_length


def test_overrides_win_and_unknown_names_raise():
    assert load_preset("tiny", "bs4", block_size=8).block_size == 8
    with pytest.raises(ValueError, match="size preset"):
        load_preset("huge")
    with pytest.raises(ValueError, match="block preset"):
        load_preset("tiny", "bs3")


def test_tokenizer_sets_the_vocabulary_and_special_ids():
    from bd3lm_trainer.corpus import load_tokenizer

    tokenizer = load_tokenizer()
    config = load_preset("tiny", block="bs4", tokenizer=tokenizer)
    assert config.vocab_size == len(tokenizer) == 8192
    assert config.mask_token_id == tokenizer.mask_token_id == 8191
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 0, 1)
    assert load_preset("tiny", tokenizer=tokenizer, pad_token_id=0).pad_token_id == 0  # overrides still win


def test_tokenizer_without_a_mask_token_is_refused():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="tokenizer has no mask token.*add_mask_token"):
        load_preset("tiny", tokenizer=SimpleNamespace(mask_token_id=None))
