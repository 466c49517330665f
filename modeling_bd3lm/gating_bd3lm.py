# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""The gate of an adapter that acts only where the model denoises: [`adapter_gate`].

A gated adapter is a PEFT LoRA of the activated-LoRA variant (aLoRA: `LoraConfig(alora_invocation_tokens=[...])`,
`bd3lm_trainer.peft_presets.gated_lora_config`). PEFT applies such a layer's update only on the last `alora_offsets[i]`
positions of row i (its `ALoraLinearVariant`); PEFT itself derives those offsets from where the invocation tokens occur
in the input. A block-diffusion pass knows better which positions are noisy, so the causal-LM denoiser sets the offsets
itself, inside `adapter_gate`: the `x_t` half of the vectorised pass (laid out last, `x_0 ⊕ x_t`) and the noisy block
of a sampling pass. Clean positions never get the update, so after any amount of training the clean stream is still
the source model (with `clean_attention="causal"`) and the committed KV cache is the source's.

A leaf of the package: it imports only torch (no peft: it ships inside checkpoints and must load without it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# The name of PEFT's activated-LoRA variant class (peft/tuners/lora/variants.py), matched by name so that peft is not
# imported here.
_GATED_VARIANT = "ALoraLinearVariant"


def gated_layers(backbone: nn.Module) -> list[nn.Module]:
    """The LoRA layers of `backbone` that hold at least one gated (aLoRA) adapter."""
    found = []
    for module in backbone.modules():
        variants = getattr(module, "lora_variant", None)
        if isinstance(variants, dict) and any(type(v).__name__ == _GATED_VARIANT for v in variants.values()):
            found.append(module)
    return found


# backbone id -> its gated layers, while `frozen_gated_layers(backbone)` is open (one `generate()` call).
_FROZEN: dict[int, list[nn.Module]] = {}


@contextmanager
def frozen_gated_layers(backbone: nn.Module) -> Iterator[None]:
    """Within this context `adapter_gate(backbone, ...)` uses the gated layers found on entry instead of walking every
    module of `backbone` at each network call (about as long as a small model's forward pass on one CPU core). For
    one `generate()` call: adapters are not added or removed while it runs. Re-entrant."""
    key = id(backbone)
    if key in _FROZEN:
        yield
        return
    _FROZEN[key] = gated_layers(backbone)
    try:
        yield
    finally:
        del _FROZEN[key]


def has_gated_adapter(model: nn.Module) -> bool:
    """Whether `model` (a BD3-LM, its backbone or a `PeftModel` around it) carries a gated adapter."""
    return bool(gated_layers(model))


def _checkpointed_modules(backbone: nn.Module) -> list[str]:
    """Modules that will recompute their forward in the backward pass (transformers' gradient checkpointing)."""
    return [name for name, m in backbone.named_modules() if getattr(m, "gradient_checkpointing", False) and m.training]


@contextmanager
def adapter_gate(backbone: nn.Module, active_last: int | None) -> Iterator[None]:
    """Inside this context every gated LoRA layer of `backbone` applies its update only on the last `active_last`
    positions of each row (0: nowhere, the base network exactly; None: PEFT's own behaviour, nothing is changed). A
    no-op when `backbone` has no gated adapter. Plain (ungated) LoRA layers are not affected.

    Raises a `ValueError` when gradients would flow through layers that recompute their forward in the backward pass
    (gradient checkpointing): the recomputation runs after this context has closed, without the gate."""
    if active_last is None:
        yield
        return
    if not isinstance(active_last, int) or isinstance(active_last, bool) or active_last < 0:
        raise ValueError(f"`active_last` must be None or an integer >= 0, got {active_last!r}.")
    layers = _FROZEN.get(id(backbone))
    if layers is None:
        layers = gated_layers(backbone)
    if not layers:
        yield
        return
    if torch.is_grad_enabled():
        checkpointed = _checkpointed_modules(backbone)
        if checkpointed:
            raise ValueError(
                f"A gated adapter cannot be trained with gradient checkpointing (on {checkpointed[0]}, ...): the "
                "backward pass recomputes those layers outside the gate. Turn gradient checkpointing off "
                "(`gradient_checkpointing=False`)."
            )

    bypass: list[nn.Module] = []
    if active_last == 0:
        # The update acts nowhere: a layer whose every adapter is gated runs its base layer alone for this call (the
        # same values: the gated update would add nothing), which saves the adapter's per-layer work in every
        # clean-stream call (autoregressive steps, verify calls). Layers with other adapters keep the hook below.
        hooked = []
        for layer in layers:
            (bypass if _runs_as_base(layer) else hooked).append(layer)
        for layer in bypass:
            layer.forward = layer.base_layer.__call__  # a bound method: set on the instance, not as a submodule
        layers = hooked

    def set_offsets(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        rows = args[0].shape[0] if args else kwargs["x"].shape[0]
        # ALoraLinearVariant clips an offset to the sequence length and applies the update on the last offset
        # positions of each row.
        kwargs["alora_offsets"] = [active_last] * rows
        return args, kwargs

    # Registered after any hook PEFT's own forward installs (PeftModel.forward / generate wrap this call), so these
    # offsets are the ones the layers see.
    handles = [layer.register_forward_pre_hook(set_offsets, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer in bypass:
            del layer.forward


def _runs_as_base(layer: nn.Module) -> bool:
    """Whether calling `layer.base_layer` gives exactly `layer`'s output when no gated update applies: every adapter
    of the layer is gated, none is merged into the base weights, and nothing (an accelerate hook) already replaced
    the layer's `forward` on the instance."""
    variants = getattr(layer, "lora_variant", {})
    gated = {name for name, v in variants.items() if type(v).__name__ == _GATED_VARIANT}
    adapters = set(getattr(layer, "lora_A", {}).keys())
    return (
        adapters <= gated
        and not getattr(layer, "merged", False)
        and "forward" not in vars(layer)
        and isinstance(getattr(layer, "base_layer", None), nn.Module)
    )


__all__ = ["adapter_gate", "frozen_gated_layers", "gated_layers", "has_gated_adapter"]
