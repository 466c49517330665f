# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Layers of the BD3-LM denoiser (a DiT with adaLN and rotary attention); the KV cache they read is `cache_bd3lm.py`.

Class and parameter names reproduce the official checkpoints key for key (`norm1`, `attn_qkv`, `attn_out`, `mlp.0`,
`mlp.2`, `adaLN_modulation`, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer  # 4.57 and 5.x

try:  # the checkpoint key renaming of transformers 5 (4.x uses the `_fix_state_dict_key_on_*` hooks)
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming
except ImportError:
    register_checkpoint_conversion_mapping = None

from .cache_bd3lm import read_cache_layer
from .configuration_bd3lm import BD3LMConfig

# Width of the sinusoidal noise-level features fed to `sigma_map` (fixed by the released checkpoints).
TIMESTEP_FREQUENCY_DIM = 256
# Name of the token-embedding table in the official checkpoints (`backbone.vocab_embed.embedding`); in memory the table
# is `nn.Embedding.weight`.
OFFICIAL_EMBEDDING_NAME = "embedding"


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks


class BD3LMLayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 (as in the official DiT)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class BD3LMRotaryEmbedding(nn.Module):
    """GPT-NeoX style ("rotate half") rotary embedding; `inv_freq` is a persistent buffer, as in the checkpoints."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=True)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def forward(self, positions: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape `(len(positions), head_dim)`, in float32."""
        freqs = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` of shape `(batch, heads, seq, head_dim)` by the angles of its positions."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class BD3LMTimestepEmbedder(nn.Module):
    """Sinusoidal features of the noise level σ followed by an MLP (`sigma_map` in the checkpoints)."""

    def __init__(self, cond_dim: int, frequency_dim: int = TIMESTEP_FREQUENCY_DIM) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class BD3LMEmbedding(nn.Embedding):
    """Token embedding (`EmbeddingLayer` upstream). An `nn.Embedding`, so that `resize_token_embeddings`, PEFT's LoRA
    and `get_input_embeddings` work as for any HF model; its tensor is `weight` in memory, while checkpoints store it
    under the official key `vocab_embed.embedding` (renamed on load and save by `BD3LMPreTrainedModel`)."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        # An uninitialised table, as the official layer: `_init_weights` fills it (kaiming-uniform, as upstream).
        # nn.Embedding's own N(0, 1) draw would shift the RNG stream, so a seeded model would change.
        super().__init__(vocab_size, dim, _weight=torch.empty(vocab_size, dim))

    @property
    def embedding(self) -> nn.Parameter:
        """The official attribute name of the table (read-only alias of `weight`)."""
        return self.weight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # torch's `load_state_dict` (the Trainer's resume and best-model reload use it) sees the saved key.
        if prefix + OFFICIAL_EMBEDDING_NAME in state_dict and prefix + "weight" not in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + OFFICIAL_EMBEDDING_NAME)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# The token embedding is an `nn.Embedding` (key `vocab_embed.weight` in memory) while the official checkpoints, and the
# ones this package saves, store it as `vocab_embed.embedding`. The key is renamed on load and back on save:
# transformers 5 through its checkpoint conversion mapping (registered for BD3LMModel, which every BD3-LM class holds
# or is; scoped to it, so other models' keys are untouched), transformers 4.57 through the `_fix_state_dict_key_on_*`
# hooks of BD3LMPreTrainedModel, and torch's `load_state_dict` through `BD3LMEmbedding._load_from_state_dict`.
_SAVED_EMBEDDING_KEY = f"vocab_embed.{OFFICIAL_EMBEDDING_NAME}"
_MEMORY_EMBEDDING_KEY = "vocab_embed.weight"


def parameter_name(checkpoint_key: str) -> str:
    """The in-memory name of a tensor stored under `checkpoint_key` (the official embedding key is renamed)."""
    if checkpoint_key.endswith(_SAVED_EMBEDDING_KEY):
        return checkpoint_key[: -len(_SAVED_EMBEDDING_KEY)] + _MEMORY_EMBEDDING_KEY
    return checkpoint_key


def checkpoint_key(name: str) -> str:
    """The key under which `save_pretrained` stores the tensor named `name` in memory."""
    if name.endswith(_MEMORY_EMBEDDING_KEY):
        return name[: -len(_MEMORY_EMBEDDING_KEY)] + _SAVED_EMBEDDING_KEY
    return name


if register_checkpoint_conversion_mapping is not None:
    # overwrite=True: the copy of this file bundled with a checkpoint registers again when loaded as remote code.
    register_checkpoint_conversion_mapping(
        "BD3LMModel",
        [WeightRenaming(source_patterns=_SAVED_EMBEDDING_KEY, target_patterns=_MEMORY_EMBEDDING_KEY)],
        overwrite=True,
    )


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------------------------------
# Attention kernels: all take (batch, heads, seq, head_dim) tensors and a boolean mask broadcastable to
# (batch, heads, q_len, kv_len), or a FlexAttention BlockMask, and return `(output, weights)`; only the eager kernel
# computes the weights (softmax probabilities, `(batch, heads, q_len, kv_len)`), and only when asked.


def eager_attention_forward(query, key, value, attention_mask, scaling: float, output_attentions: bool = False):
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    return torch.matmul(probs, value), (probs if output_attentions else None)


def sdpa_attention_forward(query, key, value, attention_mask, scaling: float, output_attentions: bool = False):
    # The fused kernel never materialises the weights; BD3LMModel switches to eager when they are asked for.
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling), None


_COMPILED_FLEX: dict[str, Callable] = {}


def flex_attention_forward(query, key, value, attention_mask, scaling: float, output_attentions: bool = False):
    from torch.nn.attention.flex_attention import flex_attention

    if query.device.type != "cpu":
        # Uncompiled flex materialises the full score matrix; the fused kernel needs torch.compile.
        if "fn" not in _COMPILED_FLEX:
            _COMPILED_FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        return _COMPILED_FLEX["fn"](query, key, value, block_mask=attention_mask, scale=scaling), None
    return flex_attention(query, key, value, block_mask=attention_mask, scale=scaling), None


ATTENTION_FUNCTIONS: dict[str, Callable] = {
    "eager": eager_attention_forward,
    "sdpa": sdpa_attention_forward,
    "flex_attention": flex_attention_forward,
}


class BD3LMBlock(GradientCheckpointingLayer):
    """Pre-LN DiT block with adaLN modulation (`DDiTBlock` upstream).

    A `GradientCheckpointingLayer`, so that `activation_checkpointing_enable(...)` (its kwargs and `every_n_layers`)
    checkpoints it as any HF decoder layer. Under checkpointing transformers forces `use_cache=False`, so the layer
    then only reads `cache`: the backward's replay of the forward reads the same keys (`_can_checkpoint_with_cache`).
    """

    _can_checkpoint_with_cache = True

    def __init__(self, config: BD3LMConfig, layer_idx: int) -> None:
        super().__init__()
        dim = config.hidden_dim
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.norm1 = BD3LMLayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = BD3LMLayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, config.mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(config.mlp_ratio * dim, dim)
        )
        self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * dim) if config.adaln else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask,
        attention_fn: Callable,
        cache: Cache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(x, attention weights or None)`. `x` (and `c`) are positional: the checkpoint function needs the tensors
        that carry gradients as positional arguments."""
        batch, seq_len, _ = x.shape
        if self.adaLN_modulation is not None:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(
                6, dim=2
            )
            h = modulate(self.norm1(x), shift_msa, scale_msa)
        else:
            h = self.norm1(x)

        # (batch, seq, 3·hidden) laid out as [3][heads][head_dim], as in the checkpoints.
        qkv = self.attn_qkv(h).view(batch, seq_len, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # each (batch, heads, seq, head_dim), key still pre-rotary
        if cache is not None:
            past = read_cache_layer(cache, self.layer_idx)
            if use_cache:
                cache.update(key, value, self.layer_idx)
            if past is not None:
                key = torch.cat((past[0], key), dim=2)
                value = torch.cat((past[1], value), dim=2)
        cos, sin = rotary  # positions of every key; the queries are the last `seq_len` of them
        query = apply_rotary(query, cos[-seq_len:], sin[-seq_len:])
        key = apply_rotary(key, cos, sin)
        attn, weights = attention_fn(
            query, key, value, attention_mask, 1.0 / math.sqrt(self.head_dim), output_attentions=output_attentions
        )
        attn = attn.transpose(1, 2).reshape(batch, seq_len, -1)

        if self.adaLN_modulation is not None:
            x = x + gate_msa * self.dropout(self.attn_out(attn))
            x = x + gate_mlp * self.dropout(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        else:
            x = x + self.dropout(self.attn_out(attn))
            x = x + self.dropout(self.mlp(self.norm2(x)))
        return x, weights


class BD3LMFinalLayer(nn.Module):
    """adaLN-modulated LayerNorm followed by the (untied) output projection (`DDitFinalLayer` upstream)."""

    def __init__(self, config: BD3LMConfig) -> None:
        super().__init__()
        self.norm_final = BD3LMLayerNorm(config.hidden_dim)
        self.linear = nn.Linear(config.hidden_dim, config.vocab_size)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * config.hidden_dim) if config.adaln else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if self.adaLN_modulation is not None:
            shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
            return self.linear(modulate(self.norm_final(x), shift, scale))
        return self.linear(self.norm_final(x))


__all__ = [
    "ATTENTION_FUNCTIONS",
    "OFFICIAL_EMBEDDING_NAME",
    "BD3LMBlock",
    "BD3LMEmbedding",
    "BD3LMFinalLayer",
    "BD3LMLayerNorm",
    "BD3LMRotaryEmbedding",
    "BD3LMTimestepEmbedder",
    "apply_rotary",
    "checkpoint_key",
    "parameter_name",
]
