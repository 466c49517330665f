# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""`generation_mode="autoregressive"`: one token per network call through the clean stream, and the machinery it shares
with `"draft_verify"` (`draft_verify_bd3lm.py`).

The clean stream of a converted causal LM with the token shift, run under a causal mask
(`BD3LMForMaskedDiffusion.causal_forward`, the gated adapter off), is an autoregressive model: while it is untouched (a
fresh conversion, or a frozen base with a gated adapter) it is the source model itself, and this mode is the source's
`generate()`: greedy decoding gives its tokens (fp32), with left padding, EOS, stop strings, streamer and logits
processors as there. The KV cache holds the source's keys and values.

Length: these modes have no window. The whole context is attended, as the source's `generate()` does; `model_length`
(the diffusion window) does not apply. The limit is the clean stream's own: the source's `max_position_embeddings`, which
the prompt plus `max_new_tokens` (plus one draft block for draft-and-verify) must not exceed.

Randomness, keyed per position: every sampled token is drawn by inverting the CDF of its processed distribution at one
uniform taken from a fresh `torch.Generator` seeded with `derive_seed(row_seed ^ POSITION_DOMAIN, position + 1)`, where
`position` is the token's position in its row (real tokens before it, padding not counted) and `row_seed` the first
64-bit draw of the row's stream (its `seed`, per prompt, and the `num_return_sequences` index, as in diffusion mode; one
draw per row from the shared `generator`, or from torch's global RNG without either). A token's draw thus depends on
(seed, row, position) only, not on how many network calls led to it: draft-and-verify sampling and autoregressive
sampling with the same seed give the same text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from .cache_bd3lm import CACHE_FIELD, select_cache_rows
from .decoding_bd3lm import DecodingMode, DecodingRequest
from .outputs_bd3lm import BD3LMGenerateOutput
from .sampling_bd3lm import RandomSource, RowGenerators, derive_seed, first_stops, suppress_mask_logit

# Mixed into a row's seed before the per-position derivation, so that the per-position streams never coincide with the
# streams `derive_seed` gives the repeats of `num_return_sequences`.
POSITION_DOMAIN = 0x5A17_C0DE_D1CE_0001


def position_uniforms(row_seeds: list[int], positions: list[int]) -> torch.DoubleTensor:
    """One U[0, 1) float64 per (row seed, position) pair: the keyed draw of the module docstring."""
    values = []
    for seed, position in zip(row_seeds, positions, strict=True):
        stream = torch.Generator(device="cpu").manual_seed(derive_seed(seed ^ POSITION_DOMAIN, position + 1))
        values.append(torch.rand((), generator=stream, dtype=torch.float64))
    return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64)


def draw_row_seeds(generator: RandomSource, rows: int) -> list[int]:
    """The seed of each row's keyed draws: the first draw of its own stream ([`RowGenerators`]), else `rows` draws of
    the shared `generator` (or torch's global RNG)."""
    high = 2**63 - 1
    if isinstance(generator, RowGenerators):
        return [int(torch.randint(high, (1,), generator=g)) for g in generator.generators]
    return [int(v) for v in torch.randint(high, (rows,), generator=generator)]


@dataclass
class TokenChooser:
    """The next token of each row from the clean stream's logits: the mask token suppressed (SUBS), the logits
    processors on float32 scores (as transformers' `generate()`), then the argmax or, when sampling, the warpers and a
    keyed draw (module docstring)."""

    request: DecodingRequest
    row_seeds: list[int] | None  # per batch row; None when greedy

    def choose(
        self,
        logits: torch.Tensor,
        rows: list[int],
        positions: list[int],
        history: Callable[[int], torch.LongTensor],
    ) -> torch.LongTensor:
        """`logits` `(n, vocab)`: item i belongs to batch row `rows[i]`, its token takes position `positions[i]`, and
        `history(i)` is that row so far (`(1, len)`: the prompt as padded, then its tokens), for the processors."""
        request = self.request
        scores = suppress_mask_logit(logits.float(), request.mask_token_id)
        if request.logits_processor:
            scores = torch.cat(
                [request.logits_processor(history(i), scores[i : i + 1]) for i in range(scores.shape[0])]
            )
        if not request.do_sample:
            return scores.argmax(dim=-1)
        scores = scores.double()
        if request.warpers:
            scores = torch.cat([request.warpers(history(i), scores[i : i + 1]) for i in range(scores.shape[0])])
        probs = scores.softmax(dim=-1)
        if bool(probs.isnan().any()):
            raise ValueError(
                "The scores after the logits processors and sampling warpers are NaN, +inf or all -inf for some "
                "position, so no token can be drawn; check the custom `logits_processor` and `temperature`."
            )
        u = position_uniforms([self.row_seeds[r] for r in rows], positions).to(probs.device)[:, None]
        cdf = probs.cumsum(dim=-1)
        total = cdf[:, -1:]
        target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, target, right=True).clamp_max(probs.shape[-1] - 1).squeeze(1)


@dataclass
class CleanStreamDecoder:
    """The state of decoding through the clean stream: the rows still generating, the causal KV cache and its mask
    (zeros at padding and at the holes a batched draft-and-verify leaves when rows accept different lengths), the new
    tokens of every batch row, and the counters the output reports."""

    model: Any
    request: DecodingRequest
    rows: torch.LongTensor = field(init=False)
    cache: DynamicCache = field(init=False)
    mask: torch.LongTensor = field(init=False)  # (rows, cached columns)
    new_tokens: torch.LongTensor = field(init=False)  # (batch, max_new_tokens)
    new_lengths: torch.LongTensor = field(init=False)  # (batch,)
    nfe: torch.LongTensor = field(init=False)  # (batch,): calls each row took part in
    num_forwards: int = 0
    acceptance: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        request = self.request
        prompt = request.prompt
        batch, device = prompt.shape[0], prompt.device
        self.rows = torch.arange(batch, device=device)
        self.cache = DynamicCache()
        self.mask = request.prompt_mask.long()
        self.new_tokens = torch.full((batch, request.max_new_tokens), request.out_pad, dtype=torch.long, device=device)
        self.new_lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.nfe = torch.zeros(batch, dtype=torch.long, device=device)
        self.acceptance = [[] for _ in range(batch)]
        self.prompt_lengths = request.prompt_mask.sum(dim=1)
        self.eos = request.eos_tensor  # built once (the request builds a new tensor each time it is read)
        self.start_time = time.time()
        if request.streamer is not None:
            request.streamer.put(request.given.cpu())

    # ---- the network ----

    def prefill(self) -> torch.Tensor:
        """Run the prompt (writing the cache); the logits `(batch, vocab)` of its last position."""
        out = self.model.causal_forward(
            self.request.prompt.masked_fill(~self.request.prompt_mask, self.request.filler),
            attention_mask=self.mask,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._count()
        return out.logits[:, -1]

    def forward(
        self,
        input_ids: torch.LongTensor,
        write: bool = True,
        allowed: torch.BoolTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        adapter_positions: int = 0,
        logits_to_keep: int | torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """One call over `input_ids` `(rows, new)` after the cache: causal with the adapter off, or under `allowed`
        (`(new, new)`, the pattern among the new tokens; every cached column is visible) at `position_ids`, with the
        adapter on the last `adapter_positions`. `write` keeps the call's keys and values (then `keep` crops them).
        `logits_to_keep` (the last n, or a 1-D index tensor) projects only the positions the caller reads."""
        rows, width = input_ids.shape
        mask = torch.cat((self.mask, self.mask.new_ones((rows, width))), dim=1)
        full = None
        if allowed is not None:
            past = self.mask.shape[1]
            full = torch.ones((rows, width, past + width), dtype=torch.bool, device=input_ids.device)
            full[:, :, past:] = allowed
        out = self.model.denoiser.causal_pass(
            input_ids,
            mask,
            self.cache,
            write,
            logits_to_keep,
            allowed=full,
            adapter_positions=adapter_positions,
            position_ids=position_ids,
        )
        if write:
            self.mask = mask
        self._count()
        return out.logits

    def keep_written(self, width: int, counts: torch.LongTensor) -> None:
        """Of the last `width` written columns row i keeps the first `counts[i]`: the cache is cropped to the longest,
        the shorter rows' extra columns become holes (mask 0)."""
        drop = width - int(counts.max())
        if drop > 0:
            self.cache.crop(-drop)
            self.mask = self.mask[:, : self.mask.shape[1] - drop]
        kept = int(counts.max())
        if kept > 0:
            columns = torch.arange(kept, device=counts.device)[None, :] < counts[:, None]
            self.mask[:, -kept:] = columns.long()

    def _count(self) -> None:
        self.nfe[self.rows] += 1
        self.num_forwards += 1

    # ---- rows, positions, histories ----

    def positions(self) -> torch.LongTensor:
        """Per row still generating, the position of its next token (real tokens before it)."""
        return self.prompt_lengths[self.rows] + self.new_lengths[self.rows]

    def history(self, row: int, extra: torch.LongTensor | None = None) -> torch.LongTensor:
        """Batch row `row` so far, `(1, len)`: the prompt as padded, its new tokens, then `extra`."""
        parts = [self.request.prompt[row], self.new_tokens[row, : int(self.new_lengths[row])]]
        if extra is not None:
            parts.append(extra)
        return torch.cat(parts)[None]

    def emit(self, tokens: list[torch.LongTensor]) -> torch.BoolTensor:
        """Append `tokens[i]` to the row `rows[i]`, cut at its first stop (EOS, a stopping criterion) and at
        `max_new_tokens`, and stream them. Returns which rows are finished."""
        request = self.request
        # host-side copies read once per call, not once per row (each `int(tensor)` is a sync on an accelerator)
        rows, lengths, done = self.rows.tolist(), self.new_lengths.tolist(), []
        for i, chunk in enumerate(tokens):
            row, start = rows[i], lengths[rows[i]]
            chunk = chunk[: request.max_new_tokens - start]
            stopped = False
            if self.eos is not None or request.criteria:
                kept, stop = first_stops(
                    chunk[None], self.eos, request.criteria, lambda j: self.history(row, chunk[: j + 1])
                )
                chunk, stopped = chunk[: int(kept[0])], bool(stop[0])
            self.new_tokens[row, start : start + len(chunk)] = chunk
            lengths[row] = start + len(chunk)
            done.append(stopped or lengths[row] >= request.max_new_tokens)
            if request.streamer is not None:
                request.streamer.put(chunk.cpu())
        self.new_lengths = torch.tensor(lengths, dtype=torch.long, device=self.new_lengths.device)
        return torch.tensor(done, dtype=torch.bool, device=self.rows.device)

    def drop(self, finished: torch.BoolTensor) -> torch.LongTensor:
        """Rows that finished leave the batch (they cost no further calls). Returns the indices kept."""
        keep = (~finished).nonzero().squeeze(1)
        if bool(finished.any()):
            self.rows, self.mask = self.rows[keep], self.mask[keep]
            select_cache_rows(self.cache, keep)
        return keep

    def out_of_time(self) -> bool:
        max_time = getattr(self.request.config, "max_time", None)
        return max_time is not None and time.time() - self.start_time > max_time

    def output(self, acceptance: bool = False) -> torch.LongTensor | BD3LMGenerateOutput:
        request = self.request
        if request.streamer is not None:
            request.streamer.end()
        sequences = torch.cat((request.given, self.new_tokens[:, : int(self.new_lengths.max())]), dim=1)
        if not request.config.return_dict_in_generate:
            return sequences
        return BD3LMGenerateOutput(
            sequences=sequences,
            nfe=self.nfe,
            num_forwards=self.num_forwards,
            tokens_per_forward=self.new_lengths.double() / self.nfe.clamp_min(1).double(),
            acceptance_lengths=tuple(torch.tensor(a, dtype=torch.long) for a in self.acceptance)
            if acceptance
            else None,
            generation_mode=request.config.generation_mode,
            cache_rows=self.rows,
            **{CACHE_FIELD: self.cache},
        )


def check_clean_stream_request(model: Any, request: DecodingRequest, extra_positions: int) -> None:
    """What the clean-stream modes refuse: no cache, logits output, a streamer over a batch, and a length past the
    source's `max_position_embeddings` (`extra_positions` more for the drafts beyond the last token)."""
    name = request.config.generation_mode
    if not request.use_cache:
        raise ValueError(
            f"generation_mode={name!r} always runs with the KV cache (the clean stream is causal, so the cache is exact); "
            "drop use_cache=False."
        )
    if request.config.output_logits:
        raise ValueError(f"`output_logits` is only available with generation_mode='diffusion', not {name!r}.")
    if request.streamer is not None and request.prompt.shape[0] > 1:
        raise ValueError(
            f"A streamer needs a single sequence with generation_mode={name!r} (rows emit different numbers of tokens "
            "per call); pass one prompt and num_return_sequences=1, or no streamer."
        )
    backbone_config = getattr(model.backbone, "config", None)
    limit = getattr(backbone_config, "max_position_embeddings", None)
    longest = int(request.prompt_mask.sum(dim=1).max()) + request.max_new_tokens + extra_positions
    if limit is not None and longest > limit:
        raise ValueError(
            f"generation_mode={name!r} attends to the whole context (no window): the {longest - request.max_new_tokens - extra_positions}"
            f"-token prompt plus max_new_tokens={request.max_new_tokens}"
            + (f" plus {extra_positions} draft positions" if extra_positions else "")
            + f" exceeds the source model's max_position_embeddings={limit}; lower max_new_tokens or use "
            "generation_mode='diffusion', whose window slides."
        )


class AutoregressiveMode(DecodingMode):
    """One token per network call through the clean stream (`causal_forward`): the source model's own decoding while
    the clean stream is untouched."""

    name = "autoregressive"
    needs_next_token_view = True

    @classmethod
    def check(cls, model: Any, request: DecodingRequest) -> None:
        super().check(model, request)
        check_clean_stream_request(model, request, 0)

    @classmethod
    def run(cls, model: Any, request: DecodingRequest) -> torch.LongTensor | BD3LMGenerateOutput:
        state = CleanStreamDecoder(model, request)
        chooser = TokenChooser(
            request, draw_row_seeds(request.generator, len(state.rows)) if request.do_sample else None
        )
        logits = state.prefill()
        while True:
            rows = state.rows.tolist()
            tokens = chooser.choose(logits, rows, state.positions().tolist(), lambda i: state.history(rows[i]))
            finished = state.emit(list(tokens[:, None]))
            if bool(finished.all()) or state.out_of_time():
                break
            keep = state.drop(finished)
            logits = state.forward(tokens[keep][:, None])[:, -1]
        return state.output()


__all__ = [
    "POSITION_DOMAIN",
    "AutoregressiveMode",
    "CleanStreamDecoder",
    "TokenChooser",
    "check_clean_stream_request",
    "draw_row_seeds",
    "position_uniforms",
]
