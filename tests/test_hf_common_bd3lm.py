"""transformers' own common model and config tests (`ModelTesterMixin`, `ConfigTester`, vendored verbatim from the
transformers sdist named in tests/hf_common/VENDORED.json) run against BD3-LM. With another transformers
installed, the module is skipped with the command that re-vendors them (tests/hf_common/__init__.py).

`make_model_test` builds one unittest class per model family from a `BD3LMModelTester`-like object. Flags of the mixin
are set only where a test cannot apply to a diffusion LM, each with its reason; expected failures are
`xfail(strict=True)` with the reason, never skips.

Adding another backbone (a model converted from a causal LM, say): subclass `BD3LMModelTester`, override `get_config`
(and `loss_inputs` if its loss takes other inputs), and add one line at the end of this file:

    ConvertedModelTest = make_model_test(
        "ConvertedModelTest", (ConvertedForMaskedDiffusion,), ConvertedModelTester, is_training=True,
        config_class=ConvertedConfig, config_kwargs={...},  # ConfigTester's inputs, in the config's own field names
    )
"""

from __future__ import annotations

import json
import unittest

import pytest
import torch
import transformers

from modeling_bd3lm import BD3LMConfig, BD3LMForMaskedDiffusion, BD3LMModel
from tests.hf_common import mismatch_reason

if mismatch_reason(transformers.__version__):
    pytest.skip(mismatch_reason(transformers.__version__), allow_module_level=True)

from tests.hf_common.test_configuration_common import ConfigTester
from tests.hf_common.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask

# The mask token of the testers: id 0 rather than the last id, so that the mixin's resize tests, which shrink the
# vocabulary by 15 rows, keep it (resize_token_embeddings refuses to drop the mask token's row).
MASK_ID = 0


class BD3LMModelTester:
    """Tiny BD3-LM configs and inputs for the common tests (names follow transformers' model testers)."""

    def __init__(
        self,
        parent,
        batch_size: int = 2,
        seq_length: int = 8,
        vocab_size: int = 40,
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        cond_dim: int = 16,
        block_size: int = 4,
        model_length: int = 16,
        is_training: bool = True,
        use_attention_mask: bool = True,
    ) -> None:
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.cond_dim = cond_dim
        self.block_size = block_size
        self.model_length = model_length
        self.is_training = is_training
        self.use_attention_mask = use_attention_mask

    def get_config(self) -> BD3LMConfig:
        # HF names on purpose: the config must understand them (attribute_map).
        return BD3LMConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            max_position_embeddings=self.model_length,
            cond_dim=self.cond_dim,
            block_size=self.block_size,
            dropout=0.0,
            mask_token_id=MASK_ID,
        )

    def prepare_config_and_inputs(self):
        # ids other than the mask token (id 0): the clean data never contains it
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 1) + 1
        attention_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_attention_mask else None
        return self.get_config(), input_ids, attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask = self.prepare_config_and_inputs()
        inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return config, inputs

    def loss_inputs(self, inputs: dict) -> dict:
        """What the NELBO needs besides `input_ids`: the target is the clean sequence itself, and `x_t` with its noise
        levels is drawn here from a fixed seed, so that two calls give the same loss (the common tests compare
        outputs of separate calls; left to the model the draw would differ between them)."""
        x_0 = inputs["input_ids"]
        g = torch.Generator().manual_seed(0)
        t = 0.1 + 0.9 * torch.rand(x_0.shape[0], x_0.shape[1] // self.block_size, generator=g)
        masked = torch.rand(x_0.shape, generator=g) < t.repeat_interleave(self.block_size, dim=1)
        x_t = torch.where(masked, torch.full_like(x_0, MASK_ID), x_0)
        return {"labels": x_0.clone(), "noisy_input_ids": x_t, "noise_levels": t}


STRICT_LOADING = (
    "strict from_pretrained: weights missing tensors of the model raise a ValueError instead of leaving them randomly "
    "initialised"
)


def make_model_test(
    name: str,
    model_classes: tuple,
    tester_factory,
    *,
    is_training: bool,
    config_class: type = BD3LMConfig,
    config_kwargs: dict | None = None,
    **flags,
) -> type:
    """A `unittest.TestCase` running `ModelTesterMixin` for `model_classes`, built on `tester_factory(parent)`, and
    `ConfigTester` for `config_class(**config_kwargs)`; `flags` set further mixin attributes (give the reason)."""
    # the official field names, as a saved config.json spells them (to_json_string is compared key by key)
    config_kwargs = {"hidden_dim": 32, "n_heads": 4} if config_kwargs is None else config_kwargs

    class _Test(ModelTesterMixin, unittest.TestCase):
        all_model_classes = model_classes

        # Not applicable to a diffusion LM (or to any model of its kind); the reason is beside each flag.
        # No position-embedding table to resize: positions are rotary (computed, not learned).
        test_resize_position_embeddings = False
        # `generate` is BD3-LM's own block-diffusion sampler (tests/test_generation_bd3lm.py); transformers'
        # GenerationTesterMixin drives autoregressive decoding, so the tester is not a generation tester.
        all_generative_model_classes = ()

        def setUp(self):
            self.model_tester = tester_factory(self)
            self.model_tester.is_training = is_training
            self.config_tester = ConfigTester(self, config_class=config_class, **config_kwargs)

        def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
            inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
            # transformers adds labels only for the model types it registers; ours takes the clean sequence.
            if return_labels and hasattr(model_class, "block_nelbo"):
                inputs.update(self.model_tester.loss_inputs(inputs))
            return inputs

        def test_config(self):
            self.config_tester.run_common_tests()

        # The strict-loading pair: both load weights that do not cover the model (an empty state dict; a file holding
        # one unrelated tensor) and expect the missing tensors to be initialised with a warning. BD3-LM's
        # `from_pretrained` refuses such weights with a ValueError instead, by design (README, "Loading and saving").
        @pytest.mark.xfail(strict=True, raises=ValueError, reason=STRICT_LOADING)
        def test_can_init_all_missing_weights(self):
            super().test_can_init_all_missing_weights()

        @pytest.mark.xfail(strict=True, raises=ValueError, reason=STRICT_LOADING)
        def test_model_weights_reload_no_missing_tied_weights(self):
            super().test_model_weights_reload_no_missing_tied_weights()

    for key, value in flags.items():
        setattr(_Test, key, value)
    _Test.__name__ = _Test.__qualname__ = name
    return _Test


# BD3LMForMaskedDiffusion: the model with the NELBO loss (the training tests need it).
BD3LMForMaskedDiffusionModelTest = make_model_test(
    "BD3LMForMaskedDiffusionModelTest", (BD3LMForMaskedDiffusion,), BD3LMModelTester, is_training=True
)
# BD3LMModel: the denoiser alone returns logits and no loss, like transformers' base models, which the training tests
# leave out through MODEL_MAPPING_NAMES (where a library model is registered; ours is not).
BD3LMModelModelTest = make_model_test("BD3LMModelModelTest", (BD3LMModel,), BD3LMModelTester, is_training=False)


class CausalBackboneModelTester(BD3LMModelTester):
    """A BD3-LM whose denoiser is a tiny random transformers causal LM (`backbone_config`, issue 17): the model
    `from_causal_lm` builds, made from its config alone (the common tests construct models from configs)."""

    family = "llama"

    def get_config(self) -> BD3LMConfig:
        from transformers import LlamaConfig, Qwen3Config

        backbone = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=2 * self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=2,
            max_position_embeddings=self.model_length,
            tie_word_embeddings=False,
        )
        backbone_config = (LlamaConfig if self.family == "llama" else Qwen3Config)(**backbone)
        return BD3LMConfig(
            backbone_config=backbone_config,
            block_size=self.block_size,
            model_length=self.model_length,
            mask_token_id=MASK_ID,
        )


class Qwen3BackboneModelTester(CausalBackboneModelTester):
    family = "qwen3"


def _causal_config_kwargs() -> dict:
    """ConfigTester's inputs for a causal-backbone config: the backbone as the dict a saved config.json holds
    (ConfigTester compares each input with the JSON of the config built from it: a round trip)."""
    tester = CausalBackboneModelTester(None)
    return {
        "backbone_config": json.loads(tester.get_config().to_json_string())["backbone_config"],
        "block_size": tester.block_size,
        "model_length": tester.model_length,
    }


CONVERTED_LOADS_NO_CAUSAL_LM = (
    "a plain causal LM's folder (here the backbone saved alone) is not a BD3-LM checkpoint: from_pretrained refuses it "
    "with a ValueError naming BD3LMForMaskedDiffusion.from_causal_lm, instead of loading it with missing weights"
)
BACKBONE_TIES_ITSELF = (
    "tying is the causal backbone's own setting (backbone_config.tie_word_embeddings, kept from the source model); the "
    "BD3-LM config's tie_word_embeddings, which the test sets, describes the DiT's head and does not tie the backbone"
)


def make_causal_backbone_test(name: str, tester_factory) -> type:
    """The common tests for BD3LMForMaskedDiffusion over a causal LM, with the two by-design expected failures."""
    base = make_model_test(
        name, (BD3LMForMaskedDiffusion,), tester_factory, is_training=True, config_kwargs=_causal_config_kwargs()
    )

    class _Test(base):
        @pytest.mark.xfail(strict=True, raises=ValueError, reason=CONVERTED_LOADS_NO_CAUSAL_LM)
        def test_correct_missing_keys(self):
            super().test_correct_missing_keys()

        @pytest.mark.xfail(strict=True, raises=AssertionError, reason=BACKBONE_TIES_ITSELF)
        def test_tied_weights_keys(self):
            super().test_tied_weights_keys()

    _Test.__name__ = _Test.__qualname__ = name
    return _Test


# BD3LMForMaskedDiffusion over a Llama causal LM (what `from_causal_lm` returns for Llama / SmolLM2) and over Qwen3
# (q/k norms, explicit head_dim).
LlamaBackboneModelTest = make_causal_backbone_test("LlamaBackboneModelTest", CausalBackboneModelTester)
Qwen3BackboneModelTest = make_causal_backbone_test("Qwen3BackboneModelTest", Qwen3BackboneModelTester)
