# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""`BD3LMGenerationConfig`: the Hugging Face generation fields BD3-LM uses plus the block-sampler knobs, each checked
against a table of rules so that a bad value raises a `ValueError` naming the field."""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

from transformers import GenerationConfig

from .checks_bd3lm import is_int, is_real
from .modes_bd3lm import DECODING_MODES, DRAFT_VARIANTS
from .sampling_bd3lm import SAMPLERS

# GenerationConfig fields that configure beam search, contrastive search, assisted decoding or processors that this
# sampler does not implement; each must keep its neutral value. Pass a `LogitsProcessor` for custom logit edits.
_UNSUPPORTED_FIELDS = {
    **dict.fromkeys(
        "penalty_alpha dola_layers constraints force_words_ids bad_words_ids min_p top_h suppress_tokens "
        "begin_suppress_tokens sequence_bias forced_bos_token_id forced_eos_token_id exponential_decay_length_penalty "
        "watermarking_config prompt_lookup_num_tokens".split(),
        (None,),
    ),
    **dict.fromkeys("num_beams num_beam_groups".split(), (None, 1)),
    **dict.fromkeys("no_repeat_ngram_size encoder_no_repeat_ngram_size min_length min_new_tokens".split(), (None, 0)),
    **dict.fromkeys("diversity_penalty epsilon_cutoff eta_cutoff".split(), (None, 0.0)),
    **dict.fromkeys("guidance_scale encoder_repetition_penalty typical_p".split(), (None, 1.0)),
    **dict.fromkeys("output_scores output_attentions output_hidden_states".split(), (None, False)),
    "cache_implementation": (None, "dynamic"),
}


@functools.lru_cache(maxsize=1)
def _hf_generation_fields() -> frozenset[str]:
    """Every field the installed `GenerationConfig` knows (differs between transformers 4.57 and 5.x)."""
    return frozenset(vars(GenerationConfig())) | {"transformers_version", "_from_model_config", "_commit_hash"}


def _is_token_ids(value: Any) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return len(values) > 0 and all(is_int(v) and v >= 0 for v in values)


def _is_strings(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))


_POSITIVE_INT = (lambda v: is_int(v) and v >= 1, "must be an integer >= 1")
_UNIT_INTERVAL = (lambda v: is_real(v) and 0.0 < v <= 1.0, "must be a number in (0, 1]")
_POSITIVE = (lambda v: is_real(v) and v > 0, "must be a positive number")
_POSITIVE_FINITE = (lambda v: is_real(v) and 0 < v < math.inf, "must be a positive finite number")
_TOKEN_ID = (lambda v: is_int(v) and v >= 0, "must be a non-negative token id")
_BOOL = (lambda v: isinstance(v, bool), "must be a bool")

# field -> (test of a set value, requirement). None means unset for every field but `_REQUIRED_FIELDS`.
_FIELD_RULES = {
    "generation_mode": (lambda v: v in DECODING_MODES, f"must be one of {sorted(DECODING_MODES)}"),
    "draft_variant": (lambda v: v in DRAFT_VARIANTS, f"must be one of {list(DRAFT_VARIANTS)}"),
    "sampler": (lambda v: v in SAMPLERS, f"must be one of {sorted(SAMPLERS)}"),
    "num_steps": _POSITIVE_INT,
    "tokens_per_step": _POSITIVE_INT,
    "confidence_threshold": _UNIT_INTERVAL,
    "nucleus_p": _UNIT_INTERVAL,
    "entropy_stop": (_POSITIVE[0], "must be a positive number of nats"),
    "entropy_stop_window": _POSITIVE_INT,
    "mask_token_id": _TOKEN_ID,
    "seed": (
        lambda v: all(is_int(s) and -(2**63) <= s < 2**64 for s in (v if isinstance(v, (list, tuple)) and v else [v])),
        "must be an integer in [-2**63, 2**64) or a non-empty list of them (one per prompt)",
    ),
    **dict.fromkeys(("max_new_tokens", "max_length", "num_return_sequences"), _POSITIVE_INT),
    **dict.fromkeys(("temperature", "repetition_penalty"), _POSITIVE_FINITE),
    "max_time": (_POSITIVE[0], "must be a positive number of seconds"),
    "top_k": (lambda v: is_int(v) and v >= 0, "must be an integer >= 0 (0 disables it)"),
    "top_p": _UNIT_INTERVAL,
    **dict.fromkeys(("bos_token_id", "pad_token_id"), _TOKEN_ID),
    "eos_token_id": (_is_token_ids, "must be a token id or a non-empty list of token ids"),
    "stop_strings": (_is_strings, "must be a string or a list of strings"),
    **dict.fromkeys(("do_sample", "use_cache", "return_dict_in_generate", "output_logits"), _BOOL),
}
_REQUIRED_FIELDS = ("generation_mode", "tokens_per_step", "entropy_stop_window")


# ----------------------------------------------------------------------------------------------------------------------
# Configuration and output


class BD3LMGenerationConfig(GenerationConfig):
    r"""
    [`GenerationConfig`] for block diffusion: the usual HF fields plus the block-sampler knobs. Unknown keyword
    arguments and every invalid value raise a `ValueError` naming the field; it round-trips through
    `generation_config.json`.

    Args:
        > The decoding mode

        generation_mode (`str`, *optional*, defaults to `"diffusion"`):
            How `generate()` decodes (`modes_bd3lm.DECODING_MODES`): `"diffusion"` (block diffusion, the paper's
            sampler, configured by the fields below), `"autoregressive"` (one token per call through the clean stream
            run as an autoregressive model) or `"draft_verify"` (the diffusion view drafts a block, the clean stream
            verifies it: the output is exactly the clean stream's autoregressive decoding). The last two need a
            denoiser whose output j predicts token j + 1 (a converted causal LM with the token shift, not the DiT);
            they decode the whole context (no window: `model_length` does not apply, the source's
            `max_position_embeddings` does) and ignore the block-sampler fields. Sampling there draws every token
            from a stream keyed by (seed, row, position) (`autoregressive_bd3lm.py`).
        draft_variant (`str`, *optional*):
            With `generation_mode="draft_verify"`: `"two_pass"` (a draft call and a verify call per cycle, the
            default) or `"one_forward"` (one call verifies the drafts and drafts the next block for every outcome).

        > Parameters of the block sampler

        sampler (`str`, *optional*):
            How a block is denoised: `"first_hitting"` (one token per call, the paper's default), `"ddpm"` (ancestral
            steps with the no-change caching trick), `"topk_confidence"`, `"margin"`, `"entropy"` (the
            `tokens_per_step` most confident masked positions per call) or `"confidence_threshold"` (all masked
            positions above the threshold, at least one). Defaults to `"confidence_threshold"` when
            `confidence_threshold` is set, else `"first_hitting"`.
        num_steps (`int`, *optional*):
            Steps per block. `ddpm` discretises t ∈ [0, 1] into this many steps (default `block_size`); the confidence
            samplers reveal enough tokens per step to finish within it (default: no budget); `first_hitting` ignores it.
        tokens_per_step (`int`, *optional*, defaults to 1):
            k of `topk_confidence`, `margin` and `entropy`.
        confidence_threshold (`float`, *optional*):
            Threshold in (0, 1] of the `confidence_threshold` sampler (default 0.9 when that sampler is chosen).
        nucleus_p (`float`, *optional*):
            The paper's nucleus rule (keep tokens whose cumulative probability including themselves is <= p, always the
            top-1), applied after HF's `top_p` when sampling. The official runs use 0.9.
        entropy_stop (`float`, *optional*):
            Opt-in low-entropy stop rule of the paper: a row stops once the unigram entropy (nats) of its last
            `entropy_stop_window` generated tokens is below this value (the official code uses 4).
        entropy_stop_window (`int`, *optional*, defaults to 256):
            Window of the low-entropy rule.
        mask_token_id (`int`, *optional*):
            Override of the model config's mask token.
        seed (`int` or `list[int]`, *optional*):
            Seeds of per-row CPU `torch.Generator`s that drive all sampling randomness (same draws on every device):
            an int seeds every prompt alike, a list gives one seed per prompt. Each row draws from its own stream, so
            a row's tokens equal the same prompt generated alone with the same seed (batch invariance); the j-th of
            `num_return_sequences` (j > 0) uses a seed derived from the prompt's seed and j. Without a seed,
            sampling uses torch's global RNG, and greedy decoding (`do_sample=False`) seeds every row with 0.

    HF fields used: `max_new_tokens` / `max_length`, `do_sample`, `temperature`, `top_k`, `top_p`,
    `repetition_penalty`, `eos_token_id` (int or list), `pad_token_id`, `bos_token_id`, `use_cache`, `stop_strings`,
    `max_time`, `num_return_sequences`, `return_dict_in_generate`, `output_logits`. Beam search, contrastive search and
    the processor fields listed in `_UNSUPPORTED_FIELDS` must keep their neutral values.
    """

    _diffusion_defaults: ClassVar[dict[str, Any]] = {
        "generation_mode": "diffusion",
        "draft_variant": None,
        "sampler": None,
        "num_steps": None,
        "tokens_per_step": 1,
        "confidence_threshold": None,
        "nucleus_p": None,
        "entropy_stop": None,
        "entropy_stop_window": 256,
        "mask_token_id": None,
        "seed": None,
    }

    def __init__(self, **kwargs: Any) -> None:
        for name, default in self._diffusion_defaults.items():
            setattr(self, name, kwargs.pop(name, default))
        unknown = sorted(key for key in kwargs if key not in _hf_generation_fields())
        if unknown:
            if not kwargs.get("_from_model_config"):
                raise ValueError(
                    f"BD3LMGenerationConfig got unknown arguments {unknown}; use the HF generation fields or "
                    f"{sorted(self._diffusion_defaults)}."
                )
            for key in unknown:  # keys of a model config (block_size, ...) that are not generation parameters
                kwargs.pop(key)
        super().__init__(**kwargs)
        # Never saved as "built from a model config": transformers 4.57 would then drop the diffusion fields when it
        # reads generation_config.json with the base class.
        self._from_model_config = None

    @classmethod
    def from_model_config(cls, model_config: Any) -> BD3LMGenerationConfig:
        """Take the special tokens of a model config; every other field keeps its default."""
        config_dict = model_config if isinstance(model_config, dict) else model_config.to_dict()
        tokens = {
            key: config_dict[key]
            for key in ("bos_token_id", "eos_token_id", "pad_token_id")
            if config_dict.get(key) is not None
        }
        config = cls(**tokens)
        config._original_object_hash = hash(config)  # lets `save_pretrained` tell whether it was modified
        return config

    @property
    def resolved_sampler(self) -> str:
        """The sampler `generate` runs with this config: `sampler`, else `"confidence_threshold"` when a threshold is
        set, else `"first_hitting"`."""
        return self.sampler or ("confidence_threshold" if self.confidence_threshold is not None else "first_hitting")

    def validate(self, strict: bool = False, **kwargs: Any) -> None:
        super().validate(strict=strict, **kwargs)
        self.validate_bd3lm()

    def validate_bd3lm(self) -> None:
        """One `ValueError` per invalid field, naming it (`_FIELD_RULES`, `_UNSUPPORTED_FIELDS`)."""
        for name, (test, requirement) in _FIELD_RULES.items():
            value = getattr(self, name, None)
            if (value is not None or name in _REQUIRED_FIELDS) and not test(value):
                raise ValueError(f"`{name}` {requirement}, got {value!r}.")
        if self.draft_variant is not None and self.generation_mode != "draft_verify":
            raise ValueError(
                f"`draft_variant` only applies to generation_mode='draft_verify', but `generation_mode`="
                f"{self.generation_mode!r}; drop one of them."
            )
        if self.sampler not in (None, "confidence_threshold") and self.confidence_threshold is not None:
            raise ValueError(
                "`confidence_threshold` only applies to sampler='confidence_threshold', but "
                f"`sampler`={self.sampler!r}; drop one of them."
            )
        for name, neutral in _UNSUPPORTED_FIELDS.items():
            value = getattr(self, name, None)
            if not any(value is n or (value == n and not isinstance(value, bool)) for n in neutral):
                raise ValueError(
                    f"`{name}`={value!r} is not supported by BD3-LM block sampling (beam/contrastive search and "
                    "built-in processors other than repetition_penalty); unset it or pass a `LogitsProcessor`."
                )


__all__ = ["BD3LMGenerationConfig"]
