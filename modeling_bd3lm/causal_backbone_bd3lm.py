# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""A transformers causal LM (Llama, Qwen2, Qwen3, GPT-2, ...) as the BD3-LM denoiser.

The backbone is `AutoModelForCausalLM.from_config(config.backbone_config)` (or the loaded causal LM that
`from_causal_lm` hands to `BD3LMForMaskedDiffusion(config, backbone=...)`), stored as `BD3LMForMaskedDiffusion.backbone`
(weights `backbone.model.layers...`, `backbone.lm_head`). [`CausalLMDenoiser`] runs the two passes of the denoiser
interface (`denoiser_bd3lm.py`) through it, with its own attention kernels, fed a 4-D mask and explicit `position_ids`:

* vectorised pass: tokens `x_0 ⊕ x_t` (2L; clean half first, so that the noisy half is last, where a gated adapter
  acts), positions 0..L-1 for both halves, the three-part block-diffusion mask of `masks_bd3lm.block_diffusion_mask`
  (clean stream block-causal or causal, `config.clean_attention`) with padded keys removed;
* sampling pass: the window after the committed tokens of the backbone's own `Cache` (`DynamicCache`), block-causal
  (or, under `clean_attention="causal"`, causal with the last block bidirectional).

A gated adapter (`gating_bd3lm.py`) acts on the `x_t` half of the vectorised pass and on the noisy block of a sampling
pass (`masks_bd3lm.sampling_noisy_length`), never on clean tokens.

Positions count real tokens (`cumsum(attention_mask) - 1`, as transformers' `generate()` does for left padding), so a
row gets the same positions whatever the padding of its batch (this matters for absolute position embeddings, GPT-2).

Token shift (`config.token_shift`, the default): the AR head keeps its meaning, the output at position i - 1 predicts
token i. In the vectorised pass the prediction of token i of block b is the `x_t`-half output at i - 1 when i - 1 lies
in block b, and the `x_0`-half output at i - 1 (the last clean token of block b - 1) when i starts its block; token 0
of the sequence has no predictor (uniform logits, never in the loss). With `block_size=1` and t ≡ 1 every token is
then predicted from the clean tokens before it by the unchanged network: the NELBO is the AR loss of the source model.
In the sampling pass the logits are returned as the backbone gives them (position j predicts j + 1); the committed
window (`cache_bd3lm.CommittedWindow`) pairs them with the positions of the block. Without the shift (SDAR-style)
position i predicts token i and both passes return aligned logits.

Keys are cached after the rotary embedding (or with absolute positions baked in), so a window cannot slide by
dropping cache entries as the DiT's does: `CommittedWindow` re-prefills the kept committed tokens at re-based positions.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers.cache_utils import Cache

from .cache_bd3lm import CACHE_FIELD
from .checks_bd3lm import padded_keys
from .configuration_bd3lm import check_decoder_only
from .denoiser_bd3lm import BD3LMDenoiser, LogitsToKeep, keep_positions
from .gating_bd3lm import adapter_gate
from .masks_bd3lm import flex_block_mask, sampling_attention_mask, sampling_noisy_length, vectorised_attention_mask
from .outputs_bd3lm import BD3LMOutput

# Attention kernels that take a dense 4-D mask as is (boolean for SDPA; additive float for everything else).
_BOOLEAN_MASK_KERNELS = ("sdpa",)


class CausalLMDenoiser(BD3LMDenoiser):
    """A transformers causal LM (`backbone`, stored by the wrapper as `BD3LMForMaskedDiffusion.backbone`) behind the
    denoiser interface of `denoiser_bd3lm.py` (module docstring: masks, positions, token shift). A view: it holds the
    network and the config, and no state of its own."""

    caches_after_positions = True
    gates_adapters = True

    def __init__(self, backbone: torch.nn.Module, config: Any) -> None:
        self.backbone = backbone
        self.config = config

    @property
    def predicts_next_token(self) -> bool:
        return bool(self.config.token_shift)

    @property
    def description(self) -> str:
        shift = "token shift: position i-1 predicts token i" if self.config.token_shift else "no token shift"
        return f"{type(self.backbone).__name__} ({shift})"

    @classmethod
    def build_backbone(cls, config: Any, backbone: torch.nn.Module | None = None) -> torch.nn.Module:
        """`backbone` (a loaded causal LM, marked initialised so that the wrapper's `post_init` leaves its weights
        alone), else `AutoModelForCausalLM.from_config(config.backbone_config)`. Either way the network shares its
        config object with `config.backbone_config` (a later resize or attention switch is what `save_pretrained`
        writes)."""
        if backbone is None:
            from transformers import AutoModelForCausalLM

            implementation = (
                config._attn_implementation or getattr(config.backbone_config, "_attn_implementation", None) or "sdpa"
            )
            backbone = AutoModelForCausalLM.from_config(config.backbone_config, attn_implementation=implementation)
        else:
            for module in backbone.modules():
                module._is_hf_initialized = True
            for tensor in list(backbone.parameters()) + list(backbone.buffers()):
                tensor._is_hf_initialized = True
        config.backbone_config = backbone.config
        return backbone

    @classmethod
    def bind(cls, backbone: torch.nn.Module, config: Any) -> CausalLMDenoiser:
        return cls(backbone, config)

    def check_attention(self) -> None:
        """The 4-D-mask probe ([`check_backbone_attention`]); skipped while the weights are not there yet
        (`from_pretrained` builds on the meta device and probes after loading; ZeRO-3 partitions them)."""
        weight = self.backbone.get_input_embeddings().weight
        if weight.is_meta or weight.numel() == 0:
            return
        check_backbone_attention(self.backbone)

    def __call__(
        self,
        input_ids: torch.LongTensor,
        noisy_input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool = True,
        output_clean_logits: bool = False,
        logits_to_keep: LogitsToKeep = None,
    ) -> BD3LMOutput:
        """Both passes (`BD3LMDenoiser`; `logits_to_keep` in the sampling pass only). `timesteps` is unused: the
        config refuses `time_conditioning` for a causal LM. Attention weights come from the backbone itself: its
        eager kernel returns them, its fused kernels refuse (transformers' own error)."""
        config = self.config
        # True, False, or a list of layer indices, which transformers' backbones capture selectively: passed on as is.
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = bool(config.output_attentions if output_attentions is None else output_attentions)
        if noisy_input_ids is None:
            return self._sampling_pass(
                input_ids, attention_mask, cache, use_cache, output_hidden_states, output_attentions, logits_to_keep
            )
        return self._vectorised_pass(
            input_ids, noisy_input_ids, attention_mask, output_hidden_states, output_attentions, output_clean_logits
        )

    @property
    def _flex(self) -> bool:
        return attention_implementation(self.backbone) == "flex_attention"

    def _vectorised_pass(
        self,
        input_ids: torch.LongTensor,
        noisy_input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        output_hidden_states: bool | list[int],
        output_attentions: bool,
        output_clean_logits: bool = False,
    ) -> BD3LMOutput:
        """Logits `(batch, L, vocab)` of the vectorised pass, aligned with the tokens (row i predicts token i; under the
        shift row 0 is uniform), the `x_t` half of the hidden states and the attention weights of the `x_t` queries
        over all 2L keys, `x_t` keys first (as the DiT returns them). The network runs on `x_0 ⊕ x_t`; a gated
        adapter acts on the `x_t` half only. With `output_clean_logits` also the raw outputs at the `x_0` positions
        (`clean_logits`; under the shift row i predicts token i + 1, as the source's logits)."""
        config, backbone = self.config, self.backbone
        batch, seq_len = input_ids.shape
        device = input_ids.device
        key_padding = padded_keys(attention_mask)  # value-dependent only in eager mode (export, compile)
        positions = token_positions(key_padding, batch, seq_len, device).repeat(1, 2)
        if key_padding is not None:
            key_padding = key_padding.repeat(1, 2)
        mask = vectorised_attention_mask(
            seq_len, config.block_size, key_padding, device, self._flex, config.clean_attention, clean_first=True
        )
        mask = mask if self._flex else dense_mask(mask, backbone)
        arange = torch.arange(seq_len, device=device)
        # rows of the 2L outputs (x_0 half first): the noisy predictions, then (when asked) the clean half
        keep = shifted_rows(seq_len, config.block_size, device) if config.token_shift else seq_len + arange
        if output_clean_logits:
            keep = torch.cat((keep, arange))
        with adapter_gate(backbone, seq_len):
            out, logits = _call_backbone(
                backbone,
                keep,
                input_ids=torch.cat((input_ids, noisy_input_ids), dim=1),
                attention_mask=mask,
                position_ids=positions,
                use_cache=False,
                output_hidden_states=output_hidden_states,
                **({"output_attentions": True} if output_attentions else {}),
                return_dict=True,
            )
        clean_logits = None
        if output_clean_logits:
            logits, clean_logits = logits[:, :-seq_len], logits[:, -seq_len:]
        if config.token_shift:
            logits = torch.cat((logits.new_zeros((batch, 1, logits.shape[-1])), logits), dim=1)
        hidden = getattr(out, "hidden_states", None) if output_hidden_states else None
        if hidden is not None:  # entries not asked for (`output_hidden_states` a list of layer indices) are None
            hidden = tuple(None if h is None else h[:, seq_len:] for h in hidden)
        attentions = getattr(out, "attentions", None) if output_attentions else None
        if attentions is not None:
            attentions = tuple(
                torch.cat((w[:, :, seq_len:, seq_len:], w[:, :, seq_len:, :seq_len]), -1) for w in attentions
            )
        return BD3LMOutput(
            logits=logits, hidden_states=hidden, attentions=attentions, clean_logits=clean_logits, **{CACHE_FIELD: None}
        )

    def _sampling_pass(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        use_cache: bool | None,
        output_hidden_states: bool | list[int],
        output_attentions: bool,
        logits_to_keep: LogitsToKeep = None,
    ) -> BD3LMOutput:
        """Raw logits of the sampling pass over `input_ids` after the committed tokens of `cache` (under the shift row j
        predicts token j + 1), at the positions `logits_to_keep` selects. With `use_cache` this call's keys and values
        are committed; otherwise the cache is left as it was (the backbone writes them, they are cropped again). A
        gated adapter acts on the noisy block only (the trailing `sampling_noisy_length` tokens): tokens committed in
        the same call stay clean."""
        config, backbone = self.config, self.backbone
        batch, seq_len = input_ids.shape
        device = input_ids.device
        past_len = 0 if cache is None else cache.get_seq_length()
        key_padding = padded_keys(attention_mask)  # value-dependent only in eager mode (export, compile)
        positions = token_positions(key_padding, batch, past_len + seq_len, device)[:, past_len:]
        mask = sampling_attention_mask(
            seq_len, config.block_size, past_len, key_padding, device, self._flex, config.clean_attention
        )
        mask = mask if self._flex else dense_mask(mask, backbone)
        noisy = sampling_noisy_length(seq_len, config.block_size, past_len, config.clean_attention)
        out, logits = _cached_call(
            backbone,
            adapter_positions=noisy,
            logits_to_keep=logits_to_keep,
            input_ids=input_ids,
            mask=mask,
            positions=positions,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **({"output_attentions": True} if output_attentions else {}),
        )
        hidden = getattr(out, "hidden_states", None) if output_hidden_states else None
        attentions = getattr(out, "attentions", None) if output_attentions else None
        return BD3LMOutput(logits=logits, hidden_states=hidden, attentions=attentions, **{CACHE_FIELD: cache})

    def causal_pass(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = True,
        logits_to_keep: LogitsToKeep = None,
        allowed: torch.BoolTensor | None = None,
        adapter_positions: int = 0,
        position_ids: torch.LongTensor | None = None,
    ) -> BD3LMOutput:
        """The clean stream as an autoregressive model: `input_ids` after the committed tokens of `cache`, at the
        positions that continue them (`cumsum(attention_mask) - 1`, as transformers' `generate()`), the gated adapter
        off. Row j of the logits predicts token j + 1.

        Without `allowed` the backbone gets the 2-D `attention_mask` (`(batch, past + new)`, zeros at padding and at
        the holes a batched draft-and-verify leaves) and builds its own causal mask: the very call the source model's
        `generate()` makes. `allowed` (`(batch, new, past + new)` boolean) replaces the causal pattern over the new
        tokens for the draft passes of draft-and-verify (padded keys are still removed), `position_ids` (`(batch, new)`)
        replaces the positions (draft groups share positions with the tokens they draft for), and `adapter_positions`
        opens the adapter gate on the last that many positions (the draft positions). `use_cache=False` leaves `cache` as it
        was; `logits_to_keep` projects only the positions it selects on the vocabulary (None or 0: all; n: the last n; a
        1-D index tensor: those, in that order), so the logits are `(batch, kept, vocab)`."""
        backbone = self.backbone
        batch, seq_len = input_ids.shape
        device = input_ids.device
        past_len = 0 if cache is None else cache.get_seq_length()
        if attention_mask is None:
            attention_mask = torch.ones((batch, past_len + seq_len), dtype=torch.long, device=device)
        positions = position_ids
        if positions is None:
            positions = token_positions(attention_mask, batch, past_len + seq_len, device)[:, past_len:]
        mask: Any = attention_mask
        if allowed is not None:
            allowed = allowed & attention_mask.bool()[:, None, :]
            diagonal = torch.arange(seq_len, device=device)
            allowed[:, diagonal, past_len + diagonal] = True  # every query keeps itself: no empty softmax row
            mask = dense_mask(allowed[:, None], backbone)
        _, logits = _cached_call(
            backbone,
            adapter_positions=adapter_positions,
            logits_to_keep=logits_to_keep,
            input_ids=input_ids,
            mask=mask,
            positions=positions,
            cache=cache,
            use_cache=use_cache,
        )
        return BD3LMOutput(logits=logits, **{CACHE_FIELD: cache})


def _cached_call(
    backbone: torch.nn.Module,
    *,
    adapter_positions: int,
    logits_to_keep: LogitsToKeep,
    input_ids: torch.LongTensor,
    mask: Any,
    positions: torch.LongTensor,
    cache: Cache | None,
    use_cache: bool,
    **extra: Any,
) -> tuple[Any, torch.Tensor]:
    """One backbone call of a sampling or causal pass: the gated adapter open on the last `adapter_positions`, the
    keys and values written to `cache` when there is one, and cropped again unless `use_cache` (the call then
    commits nothing). Returns the backbone output and the kept logits."""
    with adapter_gate(backbone, adapter_positions):
        out, logits = _call_backbone(
            backbone,
            logits_to_keep,
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            **{cache_kwarg(backbone): cache},
            use_cache=cache is not None,
            return_dict=True,
            **extra,
        )
    if cache is not None and not use_cache:
        cache.crop(-input_ids.shape[1])  # the backbone wrote this call's keys: this call commits nothing
    return out, logits


def attention_implementation(backbone: torch.nn.Module) -> str:
    return getattr(backbone.config, "_attn_implementation", None) or "eager"


def backbone_dtype(backbone: torch.nn.Module) -> torch.dtype:
    embeddings = backbone.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if weight is not None and weight.is_floating_point() else torch.float32


def token_positions(attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Position of every column: the number of real tokens before it (`cumsum(mask) - 1`, clamped at 0 for left
    padding), as transformers' `generate()` computes them; `0..length-1` without a mask."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def dense_mask(allowed: torch.BoolTensor, backbone: torch.nn.Module) -> torch.Tensor:
    """The 4-D mask in the form the backbone's kernel consumes as is: boolean for SDPA, additive float (0 or the
    dtype's minimum) otherwise (eager adds the mask to the scores, so a boolean one would be ignored)."""
    if attention_implementation(backbone) in _BOOLEAN_MASK_KERNELS:
        return allowed
    dtype = backbone_dtype(backbone)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def shifted_rows(seq_len: int, block_size: int, device: torch.device) -> torch.LongTensor:
    """Rows of the 2L outputs (`x_0 ⊕ x_t`) that predict tokens 1..L-1 under the token shift: L + i - 1 (the `x_t`
    half) inside a block, i - 1 (the last clean token of the previous block, `x_0` half) when i starts its block."""
    i = torch.arange(1, seq_len, device=device)
    return torch.where(i % block_size == 0, i - 1, seq_len + i - 1)


def _call_backbone(backbone: torch.nn.Module, keep: LogitsToKeep, **kwargs: Any) -> Any:
    """Run the backbone, projecting only the positions `keep` selects (`denoiser_bd3lm.keep_positions`: None or 0 for
    all, the last n, or a 1-D index tensor) on the vocabulary: the backbone's own `logits_to_keep` (every transformers
    causal LM takes it: it selects the hidden states before the head), else the full logits sliced (same values, no
    saving). Returns `(output, logits)`."""
    if keep is None or (isinstance(keep, int) and keep == 0):
        out = backbone(**kwargs)
        return out, out.logits
    if "logits_to_keep" in _forward_parameters(type(backbone)):
        out = backbone(logits_to_keep=keep, **kwargs)
        return out, out.logits
    out = backbone(**kwargs)
    return out, keep_positions(out.logits, keep)


@functools.cache
def _forward_parameters(backbone_class: type) -> frozenset[str]:
    """The argument names of a backbone class's `forward`, read once per class."""
    import inspect

    try:
        return frozenset(inspect.signature(backbone_class.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def cache_kwarg(backbone: torch.nn.Module) -> str:
    """The name under which the backbone's `forward` takes the KV cache: `cache` from transformers 5.24 on (where
    `past_key_values` is deprecated and logs a warning), `past_key_values` on 4.57 (and remote-code models that keep
    it). Read from the signature, once per backbone class."""
    return "cache" if "cache" in _forward_parameters(type(backbone)) else "past_key_values"


# ----------------------------------------------------------------------------------------------------------------------
# Checks by probing the network (not by a list of families)


def _probe_outputs(backbone: torch.nn.Module, tokens: torch.LongTensor, mask: Any) -> torch.Tensor:
    kwargs = {
        "input_ids": tokens,
        "position_ids": torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens),
    }
    if mask is not None:
        kwargs["attention_mask"] = mask
    return backbone(use_cache=False, return_dict=True, **kwargs).logits.float()


def _probe_tokens(backbone: torch.nn.Module) -> torch.LongTensor:
    vocab = backbone.get_input_embeddings().weight.shape[0]
    a, a2, b, b2 = (torch.tensor([3, 5, 7, 11]) % max(vocab, 1)).tolist()
    return torch.tensor([[a, b], [a2, b], [a, b2]], device=backbone.get_input_embeddings().weight.device)


def _differs(x: torch.Tensor, y: torch.Tensor) -> bool:
    scale = max(float(x.abs().max()), float(y.abs().max()), 1.0)
    return float((x - y).abs().max()) > 1e-4 * scale


@torch.no_grad()
def check_backbone_attention(backbone: torch.nn.Module) -> None:
    """Raise a one-line `ValueError` unless the backbone's attention honours a custom 4-D mask.

    Probe: three 2-token rows `[a, b]`, `[a', b]`, `[a, b']` under the anti-causal mask [[1, 1], [0, 1]] (the first
    query sees both keys, the second only itself). The mask is honoured iff the output at position 1 ignores token 0
    and the output at position 0 depends on token 1. Kernels that apply their own causal mask (or none) fail."""
    was_training = backbone.training
    backbone.eval()
    try:
        tokens = _probe_tokens(backbone)
        allowed = torch.tensor([[True, True], [False, True]], device=tokens.device)[None, None].expand(3, 1, 2, 2)
        implementation = attention_implementation(backbone)
        if implementation == "flex_attention":
            mask = flex_block_mask(lambda b, h, q, k: q <= k, None, 2, 2, tokens.device)
        else:
            mask = dense_mask(allowed, backbone)
        out = _probe_outputs(backbone, tokens, mask)
    finally:
        backbone.train(was_training)
    # Scale-free verdict: a freshly initialised network (or one with large norm epsilons) has outputs that depend
    # only faintly on other tokens, so the differences are compared with each other and with the outputs' own
    # magnitude, never with a fixed floor. Honoured: position 0 sees token 1 (`seen` > 0) while position 1 is blind
    # to token 0 (`leaked` ≈ 0, exactly 0 in practice: masked keys get weight 0).
    scale = float(out.abs().max())
    seen = float((out[0, 0] - out[2, 0]).abs().max())
    leaked = float((out[0, 1] - out[1, 1]).abs().max())
    if not (seen > 1e-6 * scale and leaked <= 1e-3 * seen):
        raise ValueError(
            f"The attention of {type(backbone).__name__} (attn_implementation={implementation!r}) ignores a custom "
            f"4-D attention mask, which block diffusion needs; load it with attn_implementation="
            f"{'eager' if implementation == 'sdpa' else 'sdpa'!r}."
        )


@torch.no_grad()
def check_causal_lm(model: torch.nn.Module) -> None:
    """Raise a one-line `ValueError` unless `model` is a decoder-only causal LM: a transformers model with an LM head
    whose own attention (a plain 2-D mask) is causal, i.e. the output at position 0 does not depend on token 1."""
    from transformers import PreTrainedModel

    name = type(model).__name__
    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or config is None:
        raise ValueError(f"The source ({name}) is not a transformers model; pass a causal LM, a folder or a Hub id.")
    check_decoder_only(config, f"The source ({name})")
    if model.get_output_embeddings() is None:
        raise ValueError(
            f"The source ({name}) has no LM head; load it with AutoModelForCausalLM (e.g. {name.replace('Model', '')}"
            "ForCausalLM), not AutoModel."
        )
    was_training = model.training
    model.eval()
    try:
        tokens = _probe_tokens(model)
        out = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), return_dict=True)
        logits = out.logits.float()
    finally:
        model.train(was_training)
    if _differs(logits[0, 0], logits[2, 0]):
        raise ValueError(
            f"The source ({name}, model_type={config.model_type!r}) attends to later tokens (an encoder such as BERT); "
            "BD3-LM converts decoder-only causal LMs (Llama, Qwen2, Qwen3, GPT-2, ...)."
        )


__all__ = [
    "CausalLMDenoiser",
    "cache_kwarg",
    "check_backbone_attention",
    "check_causal_lm",
    "shifted_rows",
    "token_positions",
]
