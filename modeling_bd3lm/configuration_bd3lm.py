# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Configuration of Block Diffusion language models (BD3-LM, Arriola et al., ICLR 2025)."""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .checks_bd3lm import is_int, is_real
from .masks_bd3lm import CLEAN_ATTENTIONS
from .noise_schedule_bd3lm import NOISE_SCHEDULES

# Official `attn_backend` values and our HF `attn_implementation` names, both accepted.
_ATTN_BACKENDS = {
    "sdpa": "sdpa",
    "flex": "flex_attention",
    "flex_attention": "flex_attention",
    "eager": "eager",
}
_BOOL_FIELDS = (
    "cross_attn",
    "adaln",
    "causal",
    "time_conditioning",
    "var_min",
    "always_mask",
    "antithetic_sampling",
    "resample",
    "ignore_bos",
)


class BD3LMConfig(PretrainedConfig):
    r"""
    Configuration of a [`BD3LMForMaskedDiffusion`] model: a DiT-style transformer with adaLN that denoises one block
    of `block_size` tokens at a time, conditioned on the clean blocks before it.

    Field names follow the official `kuleshov-group/bd3lms` `config.json`, so every released checkpoint loads
    unchanged; the Hugging Face names (`hidden_size`, `num_hidden_layers`, `num_attention_heads`,
    `max_position_embeddings`) are aliases of `hidden_dim`, `n_blocks`, `n_heads` and `model_length`, for reading,
    setting and as constructor arguments, and are validated like them. Overrides passed to `from_pretrained` are
    validated too.

    Args:
        block_size (`int`, *optional*, defaults to 4):
            L', the number of tokens denoised together. `1` is an autoregressive model, `model_length` is MDLM.
        vocab_size (`int`, *optional*, defaults to 50258):
            Vocabulary size including the mask token (GPT-2's 50257 plus one mask token in the released models).
        model_length (`int`, *optional*, defaults to 1024):
            L, the training context. It must be a multiple of `block_size`; generation slides a window of this size.
        hidden_dim (`int`, *optional*, defaults to 768):
            Width of the residual stream.
        cond_dim (`int`, *optional*, defaults to 128):
            Width of the noise-level embedding fed to the adaLN layers (the upstream default of 129 is a typo; every
            checkpoint uses 128).
        n_blocks (`int`, *optional*, defaults to 12):
            Number of transformer layers (the official name; not to be confused with the number of sequence blocks).
        n_heads (`int`, *optional*, defaults to 12):
            Number of attention heads; `hidden_dim` must be divisible by it.
        mlp_ratio (`int`, *optional*, defaults to 4):
            Width of the MLP relative to `hidden_dim`.
        dropout (`float`, *optional*, defaults to 0.1):
            Dropout on the residual branches, active in training only.
        cross_attn (`bool`, *optional*, defaults to `True`):
            Train with the vectorised `x_t ⊕ x_0` pass (BD3-LM). Kept for compatibility with the official config.
        adaln (`bool`, *optional*, defaults to `True`):
            Use adaLN modulation driven by the noise-level embedding (all released checkpoints do).
        causal (`bool`, *optional*, defaults to `False`):
            Official field for the AR variant; only `False` is supported by this class.
        time_conditioning (`bool`, *optional*, defaults to `False`):
            Feed the noise level to the network. Off in the paper: the noise level is zeroed, so the adaLN layers see a
            learned constant.
        attn_backend (`str`, *optional*, defaults to `"sdpa"`):
            Official name of the attention kernel (`"sdpa"`, `"flex"` or `"eager"`). It sets the default
            `attn_implementation`; passing `attn_implementation` to `from_pretrained` overrides it. `"sdpa"` is
            transformers' default and leaves `attn_implementation` unset until the model is built, so that
            `output_attentions=True` (config or `from_pretrained` kwarg) selects the eager kernel, which alone
            computes attention weights.
        var_min (`bool`, *optional*, defaults to `True`):
            Register the `sampling_eps_min` / `sampling_eps_max` buffers that hold the clipped noise interval found by
            the data-driven schedule search. Checkpoints carry the searched values in these buffers.
        sampling_eps_min (`float`, *optional*, defaults to 1e-3):
            Initial lower end β of the training noise interval U[β, ω].
        sampling_eps_max (`float`, *optional*, defaults to 0.999):
            Initial upper end ω of the training noise interval.
        noise_schedule (`str`, *optional*, defaults to `"loglinear"`):
            Masking schedule: `"loglinear"` (alias `"linear"`, α_t = 1 - t), `"square"`, `"square_root"`, `"log"`
            or `"cosine"` (reference table of the paper's ablation).
        always_mask (`bool`, *optional*, defaults to `False`):
            The "tuned schedule" of the paper's Table 1: every token is masked (t ≡ 1) with weight 1. With
            `block_size=1` the NELBO is then exactly the autoregressive NLL.
        antithetic_sampling (`bool`, *optional*, defaults to `True`):
            Stratify the per-(sequence, block) noise levels jointly over the batch (low-discrepancy sampler).
        resample (`bool`, *optional*, defaults to `False`):
            Rejection-resample blocks whose realised mask fraction falls outside the clipped interval (the paper's
            training scripts turn it on).
        ignore_bos (`bool`, *optional*, defaults to `False`):
            Never mask the first token of each row and leave it out of the loss average (the paper's perplexity
            protocol). The first *real* token: in a left-padded row the one after the padding, not column 0.
        mask_token_id (`int`, *optional*):
            Id of the absorbing mask token. Defaults to `vocab_size - 1`, the official convention.
        rope_theta (`float`, *optional*, defaults to 10000.0):
            Base of the rotary embedding.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialiser of linear layers.
        backbone_config (`PretrainedConfig` or `dict`, *optional*):
            The config of a transformers decoder-only causal LM (Llama, Qwen2, Qwen3, GPT-2, ...) to use as the
            denoiser instead of the DiT; a dict must carry its `model_type` (it is rebuilt with
            `AutoConfig.for_model`). `None` (the default) is the official DiT. With a backbone the DiT fields
            (`hidden_dim`, `n_blocks`, `n_heads`, `cond_dim`, `mlp_ratio`, `dropout`, `adaln`, `rope_theta`) are unused;
            `hidden_dim`, `n_blocks` and `n_heads` mirror the backbone, and `vocab_size` must equal its vocabulary.
            See `BD3LMForMaskedDiffusion.from_causal_lm`.
        token_shift (`bool`, *optional*, defaults to `True`):
            With a causal backbone: keep the AR head's meaning, the output at position i - 1 predicts token i (the
            first token of a block is predicted from the last clean token before it). `False` reads the prediction of
            token i at position i (SDAR-style, no shift). Unused by the DiT.
        clean_attention (`str`, *optional*, defaults to `"block_causal"`):
            How the clean tokens `x_0` attend to each other (`masks_bd3lm.py`). `"block_causal"` is the paper (every
            released checkpoint): a clean token sees its whole block and the blocks before it. `"causal"` (a causal-LM
            denoiser only): a clean token sees the clean tokens up to itself, as in Nemotron-Labs-Diffusion's mask, so
            that with the backbone's weights untouched (or a gated adapter, `gating_bd3lm.py`) the clean stream is the
            source model and the committed KV cache is the source's. The noisy blocks attend alike under both; the
            NELBO is the same bound, with a different encoding of the clean context.

    Example:

    ```python
    >>> from modeling_bd3lm import BD3LMConfig, BD3LMForMaskedDiffusion
    >>> config = BD3LMConfig(vocab_size=64, hidden_dim=64, cond_dim=16, n_blocks=2, n_heads=4, model_length=32)
    >>> model = BD3LMForMaskedDiffusion(config)
    >>> config.hidden_size, config.mask_token_id
    (64, 63)
    ```
    """

    model_type = "bd3lm"
    attribute_map = {
        "hidden_size": "hidden_dim",
        "num_hidden_layers": "n_blocks",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "model_length",
    }

    def __init__(
        self,
        block_size: int = 4,
        vocab_size: int | None = None,
        model_length: int = 1024,
        hidden_dim: int = 768,
        cond_dim: int = 128,
        n_blocks: int = 12,
        n_heads: int = 12,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
        cross_attn: bool = True,
        adaln: bool = True,
        causal: bool = False,
        time_conditioning: bool = False,
        attn_backend: str = "sdpa",
        var_min: bool = True,
        sampling_eps_min: float = 1e-3,
        sampling_eps_max: float = 0.999,
        noise_schedule: str = "loglinear",
        always_mask: bool = False,
        antithetic_sampling: bool = True,
        resample: bool = False,
        ignore_bos: bool | None = None,
        mask_token_id: int | None = None,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.02,
        backbone_config: PretrainedConfig | dict | None = None,
        token_shift: bool = True,
        clean_attention: str = "block_causal",
        **kwargs: Any,
    ) -> None:
        backbone_config = build_backbone_config(backbone_config)
        self.backbone_config = backbone_config
        self.token_shift = token_shift
        self.clean_attention = clean_attention
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.model_length = model_length
        self.hidden_dim = hidden_dim
        self.cond_dim = cond_dim
        self.n_blocks = n_blocks
        self.n_heads = n_heads
        self.mlp_ratio = mlp_ratio
        self.dropout = dropout
        self.cross_attn = cross_attn
        self.adaln = adaln
        self.causal = causal
        self.time_conditioning = time_conditioning
        self.attn_backend = attn_backend
        self.var_min = var_min
        self.sampling_eps_min = sampling_eps_min
        self.sampling_eps_max = sampling_eps_max
        self.noise_schedule = noise_schedule
        self.always_mask = always_mask
        self.antithetic_sampling = antithetic_sampling
        self.resample = resample
        self.ignore_bos = ignore_bos
        self.mask_token_id = mask_token_id
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        DENOISER_CONFIGS[self.denoiser_type].complete(self)
        if self.vocab_size is None:
            self.vocab_size = 50258  # GPT-2 + one mask token, the released checkpoints
        if self.mask_token_id is None and isinstance(self.vocab_size, int):
            self.mask_token_id = self.vocab_size - 1
        self._take_hf_names(kwargs)
        if attn_backend not in _ATTN_BACKENDS:
            raise ValueError(f"`attn_backend`={attn_backend!r} is not supported; use one of {sorted(_ATTN_BACKENDS)}.")
        if kwargs.get("attn_implementation") is None:
            if kwargs.get("output_attentions"):
                # Attention weights exist only in the eager kernel: asking for them picks it, as for HF's own models.
                kwargs["attn_implementation"] = "eager"
            elif getattr(backbone_config, "_attn_implementation", None):
                # One attention kernel for the whole model: the backbone runs the attention.
                kwargs["attn_implementation"] = backbone_config._attn_implementation
            elif _ATTN_BACKENDS[attn_backend] != "sdpa":
                kwargs["attn_implementation"] = _ATTN_BACKENDS[attn_backend]
            # "sdpa" is transformers' own default: left unset, the model picks it when built, and setting
            # `config.output_attentions = True` later can still select eager (as for Llama).
        for name in self.sub_configs:
            getattr(self, name)._attn_implementation = kwargs.get("attn_implementation")
        # The official output head is not tied; a causal backbone ties (or not) inside itself, by its own config.
        kwargs.setdefault("tie_word_embeddings", False)
        self.validate_bd3lm()  # before the base class, which may already derive values (head_dim) from the fields
        super().__init__(**kwargs)

    def _take_hf_names(self, kwargs: dict[str, Any]) -> None:
        """Move values given under the HF names (`hidden_size`, ...) from `kwargs` into the official fields, so that
        they are validated with the rest; the base class would otherwise set them after validation. Both names with
        different values (the official one not at its default) are a mistake."""
        defaults = _init_defaults()
        for hf_name, field in self.attribute_map.items():
            if hf_name not in kwargs:
                continue
            value = kwargs.pop(hf_name)
            current = getattr(self, field)
            if current != defaults[field] and current != value:
                raise ValueError(
                    f"`{hf_name}`={value!r} and `{field}`={current!r} name the same setting; pass only one of them."
                )
            setattr(self, field, value)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """`PretrainedConfig.from_dict`, then the checks of `validate_bd3lm`: overrides passed to `from_pretrained`
        (`BD3LMConfig.from_pretrained(path, n_heads=5)`) are set after construction and would not be checked."""
        model_type = config_dict.get("model_type")
        if model_type not in (None, cls.model_type):
            # A plain causal LM's folder (Llama, Qwen3, ...): its fields are not BD3-LM fields.
            raise ValueError(
                f"This config is a {model_type!r} model's, not a BD3-LM's; convert the model with "
                "BD3LMForMaskedDiffusion.from_causal_lm(path, block_size=...)."
            )
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        config.validate_bd3lm()
        return result

    def validate_bd3lm(self) -> None:
        """Raise a `ValueError` naming the field and the fix for any inconsistent combination: the rules of every
        BD3-LM here, then those of its kind of denoiser (`DENOISER_CONFIGS[denoiser_type].validate`)."""
        for name in ("block_size", "vocab_size", "model_length"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        for name in ("sampling_eps_min", "sampling_eps_max"):
            value = getattr(self, name)
            if not is_real(value) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        if not is_int(self.mask_token_id) or not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"`mask_token_id`={self.mask_token_id!r} is outside the vocabulary [0, {self.vocab_size}); add the mask "
                "token to the tokenizer and cover it with the embeddings (`vocab_size`; "
                "`BD3LMForMaskedDiffusion.from_causal_lm` does both for a causal LM)."
            )
        if self.model_length % self.block_size != 0:
            raise ValueError(
                f"`model_length`={self.model_length} must be a multiple of `block_size`={self.block_size}; "
                "choose a block size that divides the context length."
            )
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"`noise_schedule`={self.noise_schedule!r} is unknown; use one of {NOISE_SCHEDULES}.")
        if not 0.0 <= self.sampling_eps_min <= self.sampling_eps_max <= 1.0:
            raise ValueError(
                "`sampling_eps_min` and `sampling_eps_max` must satisfy 0 <= min <= max <= 1, got "
                f"({self.sampling_eps_min}, {self.sampling_eps_max})."
            )
        if self.causal:
            raise ValueError("`causal=True` (the official AR variant) is not supported; use `block_size=1` instead.")
        if self.clean_attention not in CLEAN_ATTENTIONS:
            raise ValueError(
                f'`clean_attention`={self.clean_attention!r} is unknown; use one of {CLEAN_ATTENTIONS} ("block_causal", '
                "the paper, is the default)."
            )
        DENOISER_CONFIGS[self.denoiser_type].validate(self)

    @property
    def sub_configs(self) -> dict[str, type]:
        """The denoiser's own configs as sub-configs, as transformers' composite models declare theirs: for a causal
        LM `backbone_config`, so that setting `config._attn_implementation` (or `model.set_attn_implementation`) and
        `dtype` reach the backbone too. Empty for the DiT (transformers 4.57 would try to diff a `None` sub-config when
        saving)."""
        return dict(DENOISER_CONFIGS[self.denoiser_type].sub_configs)

    @property
    def denoiser_type(self) -> str:
        """Which kind of network denoises: `"causal_lm"` when a transformers causal LM is given (`backbone_config`),
        else `"dit"` (the official DiT). The one place this is decided: the model builds `DENOISERS[denoiser_type]`
        (`modeling_bd3lm.py`), and this config applies `DENOISER_CONFIGS[denoiser_type]`."""
        return "dit" if getattr(self, "backbone_config", None) is None else "causal_lm"

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads

    @property
    def num_sequence_blocks(self) -> int:
        """B = L / L', the number of blocks in a full training window."""
        return self.model_length // self.block_size


def check_decoder_only(config: Any, subject: str) -> None:
    """Refuse an encoder-decoder as the denoiser: `subject (model_type=...) is an encoder-decoder; ...`."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{subject} (model_type={config.model_type!r}) is an encoder-decoder; BD3-LM converts decoder-only causal "
            "LMs (Llama, Qwen2, Qwen3, GPT-2, ...)."
        )


class _DiTConfig:
    """The config rules of the official DiT (`denoiser_type="dit"`): its architecture fields."""

    sub_configs: dict[str, type] = {}

    @staticmethod
    def complete(config: BD3LMConfig) -> None:
        if config.ignore_bos is None:
            config.ignore_bos = False

    @staticmethod
    def validate(config: BD3LMConfig) -> None:
        for name in ("hidden_dim", "cond_dim", "n_blocks", "n_heads", "mlp_ratio"):
            value = getattr(config, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if config.vocab_size < 2:
            raise ValueError(
                f"`vocab_size` must be >= 2 (at least one token besides the mask), got {config.vocab_size}."
            )
        for name in ("rope_theta", "initializer_range", "dropout"):
            value = getattr(config, name)
            if not is_real(value) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        if config.rope_theta <= 0:
            raise ValueError(f"`rope_theta` must be > 0 (the base of the rotary frequencies), got {config.rope_theta}.")
        if config.initializer_range < 0:
            raise ValueError(
                f"`initializer_range` must be >= 0 (a standard deviation), got {config.initializer_range}."
            )
        if config.hidden_dim % config.n_heads != 0:
            raise ValueError(
                f"`hidden_dim` (hidden_size)={config.hidden_dim} must be divisible by `n_heads` "
                f"(num_attention_heads)={config.n_heads}; pick a head count that divides it."
            )
        if (config.hidden_dim // config.n_heads) % 2 != 0:
            raise ValueError(
                f"The head dimension `hidden_dim // n_heads`={config.hidden_dim // config.n_heads} must be even for the "
                "rotary embedding; change `hidden_dim` or `n_heads`."
            )
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {config.dropout}.")
        if config.clean_attention != "block_causal":
            raise ValueError(
                f"`clean_attention`={config.clean_attention!r} is for a causal-LM denoiser (`from_causal_lm`), whose "
                'clean stream it keeps equal to the source model; the DiT supports only "block_causal" (the paper).'
            )


class _CausalLMConfig:
    """The config rules of a transformers causal LM as the denoiser (`denoiser_type="causal_lm"`): the DiT's
    architecture fields are unused; `hidden_dim`, `n_blocks` and `n_heads` mirror the backbone."""

    sub_configs: dict[str, type] = {"backbone_config": AutoConfig}

    @staticmethod
    def complete(config: BD3LMConfig) -> None:
        backbone = config.backbone_config
        # The DiT's architecture fields describe the backbone (read by tools that size things by hidden_size).
        config.hidden_dim = backbone.hidden_size
        config.n_blocks = backbone.num_hidden_layers
        config.n_heads = backbone.num_attention_heads
        if config.vocab_size is None:
            config.vocab_size = backbone.vocab_size
        if config.ignore_bos is None:
            # Under the token shift the first token has no predictor: never mask it, never score it.
            config.ignore_bos = config.token_shift is True

    @staticmethod
    def validate(config: BD3LMConfig) -> None:
        backbone = config.backbone_config
        if not isinstance(config.token_shift, bool):
            raise ValueError(f"`token_shift` must be True or False, got {config.token_shift!r}.")
        check_decoder_only(backbone, "`backbone_config`")
        if config.vocab_size != backbone.vocab_size:
            raise ValueError(
                f"`vocab_size`={config.vocab_size} differs from the backbone's vocab_size={backbone.vocab_size}; leave "
                "`vocab_size` unset (it follows the backbone) or resize the backbone's embeddings."
            )
        if config.time_conditioning:
            # σ has no input in a causal LM (the DiT feeds it to adaLN): refused rather than silently dropped.
            raise ValueError(
                "`time_conditioning=True` needs a noise-level input, which a causal-LM backbone does not have; leave "
                "`time_conditioning=False` (the paper's setting: the network is not told the noise level)."
            )
        max_positions = getattr(backbone, "max_position_embeddings", None)
        if is_int(max_positions) and config.model_length > max_positions:
            raise ValueError(
                f"`model_length`={config.model_length} exceeds the backbone's max_position_embeddings={max_positions}; "
                f"use model_length <= {max_positions}."
            )
        window = getattr(backbone, "sliding_window", None)
        layer_types = getattr(backbone, "layer_types", None) or ()
        uses_window = any("sliding" in str(kind) for kind in layer_types) or (
            not layer_types and getattr(backbone, "use_sliding_window", True) and window is not None
        )
        if uses_window and is_int(window) and window < config.model_length:
            raise ValueError(
                f"The backbone has sliding-window attention layers (sliding_window={window}) shorter than "
                f"`model_length`={config.model_length}: the block-diffusion mask would replace the window. Use "
                f"model_length <= {window}."
            )
        if config.token_shift and not config.ignore_bos:
            raise ValueError(
                "`ignore_bos=False` cannot hold with `token_shift=True`: the first token has no predictor under the "
                "shift; leave `ignore_bos` unset (True)."
            )


# Config rules per kind of denoiser, keyed by `BD3LMConfig.denoiser_type` (the model's registry is `DENOISERS`).
DENOISER_CONFIGS: dict[str, type] = {"dit": _DiTConfig, "causal_lm": _CausalLMConfig}


def _init_defaults() -> dict[str, Any]:
    """The default of every named `BD3LMConfig.__init__` argument (read from the function: the bundle imports no
    `inspect`)."""
    code, defaults = BD3LMConfig.__init__.__code__, BD3LMConfig.__init__.__defaults__
    names = code.co_varnames[1 : code.co_argcount]  # after `self`
    return dict(zip(names[len(names) - len(defaults) :], defaults))


def build_backbone_config(backbone_config: PretrainedConfig | dict | None) -> PretrainedConfig | None:
    """The nested backbone config as a transformers config object (a dict is rebuilt from its `model_type`)."""
    if backbone_config is None or isinstance(backbone_config, PretrainedConfig):
        return backbone_config
    if not isinstance(backbone_config, dict):
        raise ValueError(
            f"`backbone_config` must be a transformers config or a dict, got {type(backbone_config).__name__}."
        )
    values = dict(backbone_config)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise ValueError("`backbone_config` (a dict) needs its `model_type` (e.g. 'llama') to be rebuilt.")
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    values.pop("transformers_version", None)
    rope = values.get("rope_parameters")
    if (
        isinstance(rope, dict)
        and model_type in CONFIG_MAPPING
        and not _knows_rope_parameters(CONFIG_MAPPING[model_type])
    ):
        # Saved by transformers 5 (`rope_parameters`), read by 4.x, which only knows `rope_theta` / `rope_scaling`.
        values.pop("rope_parameters")
        rope = dict(rope)
        if "rope_theta" in rope:
            values.setdefault("rope_theta", rope.pop("rope_theta"))
        if rope.get("rope_type", "default") != "default":
            values.setdefault("rope_scaling", rope)
    return AutoConfig.for_model(model_type, **values)


def _knows_rope_parameters(config_class: type) -> bool:
    """Whether a config class takes the transformers 5 `rope_parameters` field."""
    import inspect

    if "rope_parameters" in getattr(config_class, "__dataclass_fields__", {}):
        return True
    try:
        return "rope_parameters" in inspect.signature(config_class.__init__).parameters
    except (TypeError, ValueError):
        return False


__all__ = ["BD3LMConfig", "DENOISER_CONFIGS", "build_backbone_config", "check_decoder_only"]
