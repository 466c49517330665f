# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""LoRA `target_modules` presets for BD3-LM (our module names keep the official checkpoint keys).

The transformer layers are `backbone.blocks.<i>` with `attn_qkv` (packed q/k/v), `attn_out`, `mlp.0` / `mlp.2` (the
two MLP linears) and `adaLN_modulation` (shift/scale/gate from the noise-level embedding); the final layer has
`output_layer.linear` (the output head) and `output_layer.adaLN_modulation`.

The presets are regular expressions (PEFT full-matches a string `target_modules` against each module name) because
a suffix list cannot tell the layers' `mlp.0` from the noise embedder's `backbone.sigma_map.mlp.0`, which sees a
constant input while time conditioning is off. The output head is never targeted (as PEFT's `"all-linear"`).

| preset | LoRA on (per layer) |
|---|---|
| `"attention"` | `attn_qkv`, `attn_out` |
| `"attention_mlp"` | + `mlp.0`, `mlp.2` |
| `"all"` | + `adaLN_modulation` (also the final layer's) |

A model converted from a causal LM (`BD3LMForMaskedDiffusion.from_causal_lm`) keeps the transformers names of its
family under `backbone.`; the same presets cover them (the output head is never targeted):

| preset | Llama / Qwen2 / Qwen3 / Mistral / Gemma (`layers.<i>.`) | GPT-2 (`h.<i>.`) |
|---|---|---|
| `"attention"` | `self_attn.q_proj`, `k_proj`, `v_proj`, `o_proj` (Phi-3: `qkv_proj`) | `attn.c_attn`, `attn.c_proj` |
| `"attention_mlp"`, `"all"` | + `mlp.gate_proj`, `up_proj`, `down_proj` (Phi-3: `gate_up_proj`) | + `mlp.c_fc`, `mlp.c_proj` |

Example:

```python
>>> from peft import LoraConfig, get_peft_model
>>> from bd3lm_trainer import LORA_TARGET_MODULES
>>> config = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGET_MODULES["attention_mlp"])
>>> peft_model = get_peft_model(model, config)  # doctest: +SKIP
>>> peft_model.print_trainable_parameters()  # doctest: +SKIP
```

A gated adapter ([`gated_lora_config`]) acts only where the model denoises (the noisy half of the vectorised pass, the
noisy block of a sampling pass) and never at clean positions, so that with `clean_attention="causal"` the clean stream
stays the source model however long the adapter trains. It is PEFT's activated LoRA (aLoRA); the positions are set by
the model (`modeling_bd3lm.gating_bd3lm.adapter_gate`), not by PEFT's invocation-token search. It cannot be merged into
the base weights (the gate would be lost): [`merge_and_unload`] refuses it, and PEFT's own `merge_and_unload()` raises.
"""

from __future__ import annotations

import warnings
from typing import Any

_LAYER = r"(?:.*\.)?blocks\.\d+\."

# Causal-LM backbones: Llama-style decoder layers (`layers.<i>.`) and GPT-2 blocks (`h.<i>.`).
_CAUSAL_ATTENTION = (
    r"(?:.*\.)?layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj|qkv_proj)"
    r"|(?:.*\.)?h\.\d+\.attn\.(?:c_attn|c_proj)"
)
_CAUSAL_MLP = (
    r"(?:.*\.)?layers\.\d+\.mlp\.(?:gate_proj|up_proj|down_proj|gate_up_proj)|(?:.*\.)?h\.\d+\.mlp\.(?:c_fc|c_proj)"
)

LORA_TARGET_MODULES: dict[str, str] = {
    "attention": _LAYER + r"(?:attn_qkv|attn_out)|" + _CAUSAL_ATTENTION,
    "attention_mlp": _LAYER + r"(?:attn_qkv|attn_out|mlp\.0|mlp\.2)|" + _CAUSAL_ATTENTION + "|" + _CAUSAL_MLP,
    "all": r"(?:"
    + _LAYER
    + r"(?:attn_qkv|attn_out|mlp\.0|mlp\.2|adaLN_modulation)"
    + r"|(?:.*\.)?output_layer\.adaLN_modulation)|"
    + _CAUSAL_ATTENTION
    + "|"
    + _CAUSAL_MLP,
}


def lora_target_modules(preset: str = "attention_mlp") -> str:
    """The `target_modules` regex of a preset; raises a `ValueError` listing the presets for an unknown name."""
    if preset not in LORA_TARGET_MODULES:
        raise ValueError(f"Unknown LoRA preset {preset!r}; use one of {sorted(LORA_TARGET_MODULES)}.")
    return LORA_TARGET_MODULES[preset]


def gated_lora_config(model: Any, preset: str = "attention_mlp", r: int = 8, lora_alpha: int = 16, **kwargs: Any):
    """A `peft.LoraConfig` for a gated adapter on `model` (a BD3-LM converted from a causal LM): LoRA on the modules of
    `preset` whose update the model applies only at noisy positions (`gating_bd3lm.adapter_gate`). Other `LoraConfig`
    fields pass through `kwargs`.

    PEFT's activated-LoRA variant is selected by `alora_invocation_tokens`; it is set to the mask token, but the
    positions come from the model: PEFT's own search for the invocation tokens never runs (the adapter is wrapped
    without a task type). PEFT warns that aLoRA is "only supported for CAUSAL_LM task"; that warning is silenced here
    (a `PeftModelForCausalLM` would reshape the inputs of a masked-diffusion model)."""
    from peft import LoraConfig

    config = getattr(model, "config", None)
    denoiser = getattr(model, "denoiser", None)
    if not getattr(denoiser, "gates_adapters", False):
        raise ValueError(
            "gated_lora_config() needs a BD3-LM converted from a causal LM (`BD3LMForMaskedDiffusion.from_causal_lm`): "
            "only that denoiser gates its adapter; use a plain LoraConfig for the DiT."
        )
    for name in ("alora_invocation_tokens", "target_modules"):
        if name in kwargs:
            raise ValueError(f"gated_lora_config() sets `{name}` itself; choose the modules with `preset`.")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="aLoRA is currently only supported for CAUSAL_LM task")
        return LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            target_modules=lora_target_modules(preset),
            alora_invocation_tokens=[int(config.mask_token_id)],
            **kwargs,
        )


def is_gated_adapter_config(peft_config: Any) -> bool:
    """Whether a PEFT config (object or `adapter_config.json` dict) is a gated (activated-LoRA) adapter."""
    value = (
        peft_config.get("alora_invocation_tokens")
        if isinstance(peft_config, dict)
        else getattr(peft_config, "alora_invocation_tokens", None)
    )
    return bool(value)


def merge_and_unload(peft_model: Any) -> Any:
    """`peft_model.merge_and_unload()`, refused with a `ValueError` for a gated adapter: merged into the base weights
    its update would act at every position, the clean ones included, and the model would no longer be the one that was
    trained (nor would its clean stream be the source). Keep a gated adapter unmerged (`PeftModel.from_pretrained(base,
    folder)`)."""
    configs = getattr(peft_model, "peft_config", {}) or {}
    gated = sorted(name for name, config in configs.items() if is_gated_adapter_config(config))
    if gated:
        raise ValueError(
            f"The adapter(s) {gated} are gated (activated LoRA: the update acts only at noisy positions); merging would "
            "apply it at every position and lose the gate. Keep the adapter unmerged: load it with "
            "PeftModel.from_pretrained(base, adapter_folder)."
        )
    return peft_model.merge_and_unload()


__all__ = [
    "LORA_TARGET_MODULES",
    "gated_lora_config",
    "is_gated_adapter_config",
    "lora_target_modules",
    "merge_and_unload",
]
