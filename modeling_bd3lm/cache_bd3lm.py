# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""The KV cache of BD3-LM in one place: HF `Cache` objects holding the keys and values of committed blocks (the DiT
stores them before the rotary embedding), what an output calls its cache field, and the committed window of
block-by-block generation.

* `CACHE_FIELD` / [`with_cache_field`]: transformers 5.24 renamed the `ModelOutput` field `past_key_values` to `cache`
  (keeping a deprecated property); 4.x only knows the old name. Build outputs with `**{CACHE_FIELD: cache}` and read
  them with `getattr(output, CACHE_FIELD)`.
* [`resolve_cache_kwarg`], [`read_cache_layer`]: the cache a forward receives and what a layer reads (the cache is
  checked with the other inputs, `checks_bd3lm.check_cache`).
* [`trim_cache_left`] / [`trim_cache_right`] / [`select_cache_rows`]: drop the oldest or newest tokens, or rows.
* [`CommittedWindow`]: the tokens every new block attends to, as the cache (cached generation) or as ids (uncached),
  with the rows still generating. Commits are lazy in the cached case, and the window slides beyond `model_length` as
  the official cache does.

A leaf of the package: it imports only torch and transformers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import ModelOutput

# ----------------------------------------------------------------------------------------------------------------------
# The cache field of outputs

CACHE_FIELD = "cache" if isinstance(getattr(ModelOutput, "past_key_values", None), property) else "past_key_values"


def with_cache_field(base: type[ModelOutput]) -> type[ModelOutput]:
    """`base` plus a last field `Cache | None = None` named `CACHE_FIELD`, as a dataclass (the field must be declared,
    not only set: `ModelOutput` keys and tuple conversion follow the declared fields)."""
    name = f"{base.__name__}WithCache"
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__annotations__": {CACHE_FIELD: Cache | None},
        CACHE_FIELD: None,
    }
    return dataclass(type(name, (base,), namespace))


# ----------------------------------------------------------------------------------------------------------------------
# The cache a forward receives, and what a layer reads


def resolve_cache_kwarg(past_key_values: Cache | None, cache: Cache | None, owner: str) -> Cache | None:
    """The KV cache a forward received: `cache` (transformers 5's name, which our forward also takes on 4.57), or the
    deprecated `past_key_values`, with the `FutureWarning` transformers' own models give for it."""
    if past_key_values is None:
        return cache
    if cache is not None:
        raise ValueError("Pass the KV cache as `cache` only (`past_key_values` is its deprecated name), not both.")
    warnings.warn(
        f"`past_key_values` is deprecated for `{owner}.forward`; pass the KV cache as `cache` (it works on "
        "transformers 4.57 too).",
        FutureWarning,
        stacklevel=3,
    )
    return past_key_values


def read_cache_layer(cache: Cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached `(keys, values)` of one layer, or None when nothing is committed yet."""
    if layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[layer_idx]
    keys = getattr(layer, "keys", None)
    if keys is None or keys.numel() == 0:
        return None
    return keys, layer.values


def _slice_cache_tokens(cache: Cache, tokens: slice) -> None:
    """Keep the token positions `tokens` of every non-empty layer (keys and values alike)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
            layer.keys = layer.keys[:, :, tokens]
            layer.values = layer.values[:, :, tokens]


def trim_cache_left(cache: Cache, num_tokens: int) -> None:
    """Drop the oldest `num_tokens` committed tokens of every layer (sliding window beyond `model_length`).

    Keys are stored before the rotary embedding, so the remaining ones are re-based to positions 0.. on the next call,
    exactly as the official sliding-window cache does.
    """
    if num_tokens > 0:
        _slice_cache_tokens(cache, slice(num_tokens, None))


def trim_cache_right(cache: Cache, num_tokens: int) -> None:
    """Drop the newest `num_tokens` tokens of every layer: those of a noisy block that was run with `use_cache=True`
    only to write the committed tokens before it in the same call (see `CommittedWindow.block_logits`)."""
    if num_tokens > 0:
        _slice_cache_tokens(cache, slice(None, -num_tokens))


def open_window(
    past_key_values: Cache | None, use_cache: bool, new_tokens: int, model_length: int, how_to_fit: str
) -> tuple[Cache | None, int]:
    """The cache a sampling call attends to and writes into (a fresh `DynamicCache` when `use_cache` and none was
    given) and how many committed tokens it holds. The window (committed + new tokens) must fit in `model_length`,
    the longest sequence the model attends over; `how_to_fit` ends the error with the remedy for this backbone."""
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache()
    past_len = 0 if past_key_values is None else past_key_values.get_seq_length()
    if past_len + new_tokens > model_length:
        raise ValueError(
            f"The window ({past_len} cached + {new_tokens} new tokens) is longer than `model_length`={model_length}; "
            f"{how_to_fit}."
        )
    return past_key_values, past_len


# ----------------------------------------------------------------------------------------------------------------------
# The committed window of generation


def select_cache_rows(cache: Cache, index: torch.LongTensor) -> None:
    """Keep only the batch rows `index` of every layer of a dynamic cache."""
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel() > 0:
            index = index.to(keys.device)
            layer.keys, layer.values = keys.index_select(0, index), layer.values.index_select(0, index)


@dataclass
class CommittedWindow:
    """The rows still generating and the committed tokens they attend to: keys and values in `cache` (cached
    generation) or the ids themselves (uncached), with their padding mask. Row i of every tensor is the sequence
    `rows[i]` of the batch.

    Cached generation writes committed tokens lazily: `pending` holds the ids of the last committed columns whose keys
    and values are not in `cache` yet (the prompt, then each clean block). The next block's first denoising call runs
    `pending ⊕ block` with `use_cache=True` and drops the block's own keys and values again, so that committing costs
    no call of its own. Under the block-causal mask the pending tokens never attend to the block, so their keys and
    values are those a separate commit call would store (the block-causal sampling pass, two blocks at once). Once the
    window slides (beyond `model_length`) a pending block gets its own call before the slide (see `slide`).
    """

    rows: torch.LongTensor
    mask: torch.BoolTensor  # (rows, committed), pending columns included
    ids: torch.LongTensor | None = None  # (rows, committed): uncached generation, or cached with `reprefill`
    cache: Cache | None = None
    pending: torch.LongTensor | None = None  # (rows, the last committed columns not yet in `cache`)
    # Causal-LM backbones (causal_backbone_bd3lm.py). `shift`: the network's output at position j predicts token
    # j + 1, so the block's first token is predicted by the last committed token, whose logits `next_logits` keeps
    # (written with the pending tokens). `reprefill`: keys are cached after the position embedding, so the window
    # slides by re-running the kept committed ids at re-based positions instead of dropping cache entries.
    shift: bool = False
    reprefill: bool = False
    next_logits: torch.Tensor | None = None  # (rows, vocab), cached generation with `shift`

    @classmethod
    def from_prompt(
        cls,
        prompt: torch.LongTensor,
        mask: torch.BoolTensor,
        block_size: int,
        model_length: int,
        filler: int,
        cache: Cache | None = None,
        shift: bool = False,
        reprefill: bool = False,
    ) -> CommittedWindow:
        """The prompt as the first committed window, aligned so that it ends at a block boundary in every row: the
        width becomes the smallest multiple of `block_size` that holds the longest prompt (left padding is added, or
        all-padding columns dropped). A row then has the same blocks whatever the batch it is in. With a `cache`, the
        prompt is pending (prefilled by the first block's first call)."""
        longest = int(mask.sum(dim=1).max())
        width = -(-longest // block_size) * block_size
        if width + block_size > model_length:
            raise ValueError(
                f"The prompt has {longest} tokens ({width} once aligned to block_size={block_size}); with one block to "
                f"generate this exceeds the window `model_length`={model_length}. Truncate the prompt to at most "
                f"{model_length - block_size} tokens."
            )
        prompt, mask = prompt[:, -min(width, prompt.shape[1]) :], mask[:, -min(width, mask.shape[1]) :]
        missing = width - prompt.shape[1]
        if missing > 0:
            prompt = torch.cat((prompt.new_full((prompt.shape[0], missing), filler), prompt), dim=1)
            mask = torch.cat((mask.new_zeros((mask.shape[0], missing)), mask), dim=1)
        rows = torch.arange(prompt.shape[0], device=prompt.device)
        ids = prompt.masked_fill(~mask, filler)
        if cache is None:
            return cls(rows=rows, mask=mask, ids=ids, shift=shift, reprefill=reprefill)
        return cls(
            rows=rows,
            mask=mask,
            ids=ids if reprefill else None,
            cache=cache,
            pending=ids if width > 0 else None,
            shift=shift,
            reprefill=reprefill,
        )

    def keep(self, index: torch.LongTensor) -> None:
        """Drop every row not in `index` (rows that stopped cost no further network calls).

        `next_logits` is not narrowed: `generate()` commits the kept rows' clean block right after, so the next call
        writes pending tokens and replaces it before it is read."""
        self.rows, self.mask = self.rows[index], self.mask[index]
        if self.ids is not None:
            self.ids = self.ids[index]
        if self.pending is not None:
            self.pending = self.pending[index]
        if self.cache is not None:
            select_cache_rows(self.cache, index)

    def slide(self, block_size: int, model_length: int, model: Any) -> int:
        """Drop the oldest committed blocks so that one more block fits in `model_length`. Keys are cached before the
        rotary embedding, so the next call re-bases the positions of the rest to 0.. (as the official cache).

        Pending tokens are first written with a call of their own: the official sampler commits a block while the
        window still holds the blocks about to be dropped, and their keys and values must see that same window.
        Returns the number of network calls made (0 or 1)."""
        overflow = self.mask.shape[1] + block_size - model_length
        if overflow <= 0:
            return 0
        if self.reprefill:
            # Keys hold their old positions: drop them all and let the next call re-prefill the kept committed ids at
            # positions 0.. (the keys an uncached call over the slid window computes).
            self.mask, self.ids = self.mask[:, overflow:], self.ids[:, overflow:]
            if self.cache is not None:
                if self.cache.get_seq_length() > 0:
                    self.cache.crop(-self.cache.get_seq_length())
                self.pending, self.next_logits = self.ids, None
            return 0
        calls = 0
        if self.pending is not None:
            self._write_pending(model)
            calls = 1
        self.mask = self.mask[:, overflow:]
        if self.ids is not None:
            self.ids = self.ids[:, overflow:]
        if self.cache is not None:
            trim_cache_left(self.cache, overflow)
        return calls

    def _write_pending(self, model: Any) -> None:
        """Write the pending tokens' keys and values with a call of their own (no block attached)."""
        logits = model(  # only the last committed token's logits are ever read (and only under the shift)
            input_ids=self.pending,
            attention_mask=self.mask,
            cache=self.cache,
            use_cache=True,
            return_dict=True,
            logits_to_keep=1,
        ).logits
        if self.shift:
            self.next_logits = logits[:, -1]
        self.pending = None

    def commit(self, block: torch.LongTensor) -> None:
        """Append a clean block to the window: its ids (uncached), or pending until the next call (cached)."""
        ones = torch.ones(block.shape, dtype=torch.bool, device=block.device)
        if self.cache is not None:
            self.pending = block if self.pending is None else torch.cat((self.pending, block), dim=1)
        if self.ids is not None:
            self.ids = torch.cat((self.ids, block), dim=1)
        self.mask = torch.cat((self.mask, ones), dim=1)

    def block_logits(self, model: Any, block: torch.LongTensor) -> torch.Tensor:
        """Raw logits `(rows, block_size, vocab)` of the current (noisy) block given the window: the block alone after
        the cache (writing the pending tokens' keys and values on the way), or the whole window when uncached.

        Under the token shift row j of the result comes from the output one position earlier: the last committed
        token for j = 0 (from this call when it writes pending tokens, else from `next_logits`), the block's
        position j - 1 otherwise. Each call projects only those positions on the vocabulary (`logits_to_keep`): the
        committed tokens it runs along, and under the shift the block's last position, are never read."""
        width = block.shape[1]
        device = block.device
        mask = torch.cat((self.mask, torch.ones(block.shape, dtype=torch.bool, device=device)), dim=1)
        if self.cache is None:
            ids = torch.cat((self.ids, block), dim=1)
            return model(
                input_ids=ids, attention_mask=mask, return_dict=True, logits_to_keep=self._kept(ids.shape[1], width)
            ).logits
        if self.pending is None:
            keep = torch.arange(width - 1, device=device) if self.shift else None  # under the shift: 0..width-2
            logits = model(
                input_ids=block,
                attention_mask=mask,
                cache=self.cache,
                use_cache=False,
                return_dict=True,
                logits_to_keep=keep,
            ).logits
            if self.shift:
                return torch.cat((self.next_logits[:, None], logits), dim=1)
            return logits
        ids = torch.cat((self.pending, block), dim=1)
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            cache=self.cache,
            use_cache=True,
            return_dict=True,
            logits_to_keep=self._kept(ids.shape[1], width),
        ).logits
        trim_cache_right(self.cache, width)
        self.pending = None
        if self.shift:
            self.next_logits = logits[:, 0]
        return logits

    def _kept(self, length: int, width: int) -> int | torch.LongTensor:
        """The positions of a `length`-token call ending with the `width`-token block whose logits the block reads: the
        block's (`width`), or under the shift the `width` positions one earlier (the last committed token's first)."""
        if not self.shift:
            return width
        return torch.arange(length - width - 1, length - 1, device=self.mask.device)


__all__ = [
    "CACHE_FIELD",
    "CommittedWindow",
    "read_cache_layer",
    "resolve_cache_kwarg",
    "select_cache_rows",
    "trim_cache_left",
    "trim_cache_right",
    "with_cache_field",
]
