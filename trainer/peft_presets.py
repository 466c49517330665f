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
"""

from __future__ import annotations

_LAYER = r"(?:.*\.)?blocks\.\d+\."

# Causal-LM backbones: Llama-style decoder layers (`layers.<i>.`) and GPT-2 blocks (`h.<i>.`).
_CAUSAL_ATTENTION = (
    r"(?:.*\.)?layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj|qkv_proj)"
    r"|(?:.*\.)?h\.\d+\.attn\.(?:c_attn|c_proj)"
)
_CAUSAL_MLP = r"(?:.*\.)?layers\.\d+\.mlp\.(?:gate_proj|up_proj|down_proj|gate_up_proj)|(?:.*\.)?h\.\d+\.mlp\.(?:c_fc|c_proj)"

LORA_TARGET_MODULES: dict[str, str] = {
    "attention": _LAYER + r"(?:attn_qkv|attn_out)|" + _CAUSAL_ATTENTION,
    "attention_mlp": _LAYER + r"(?:attn_qkv|attn_out|mlp\.0|mlp\.2)|" + _CAUSAL_ATTENTION + "|" + _CAUSAL_MLP,
    "all": r"(?:" + _LAYER + r"(?:attn_qkv|attn_out|mlp\.0|mlp\.2|adaLN_modulation)"
    + r"|(?:.*\.)?output_layer\.adaLN_modulation)|" + _CAUSAL_ATTENTION + "|" + _CAUSAL_MLP,
}


def lora_target_modules(preset: str = "attention_mlp") -> str:
    """The `target_modules` regex of a preset; raises a `ValueError` listing the presets for an unknown name."""
    if preset not in LORA_TARGET_MODULES:
        raise ValueError(f"Unknown LoRA preset {preset!r}; use one of {sorted(LORA_TARGET_MODULES)}.")
    return LORA_TARGET_MODULES[preset]


__all__ = ["LORA_TARGET_MODULES", "lora_target_modules"]
