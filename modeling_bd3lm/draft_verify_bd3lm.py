# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""`generation_mode="draft_verify"`: lossless block drafting. The diffusion view drafts a block, the clean stream (the
autoregressive view, `autoregressive_bd3lm.py`) verifies it; every emitted token is the clean stream's own choice, so
the output is exactly its autoregressive decoding, however poor the drafts (they change the speed only).

Notation: `n` is the position of the seed `s`, the last emitted token (chosen by the clean stream, not yet in the
cache); k = `block_size`. Under the token shift a network output at position j predicts the token at j + 1.

Two-pass variant (`draft_variant="two_pass"`), per cycle:

1. Draft (diffusion view, adapter on, nothing cached): `[s, M, ..., M]` (k tokens) at positions n..n+k-1, attending to
   the whole cache and bidirectionally to itself (the sampling pass of a noisy block whose first token is known). The
   outputs at n..n+k-2 give the drafts d_1..d_{k-1} for positions n+1..n+k-1 (argmax, mask token suppressed).
2. Verify (clean stream, causal, adapter off, writing the cache): `[s, d_1, ..., d_{k-1}]`; the output at n+j gives
   g_j, the clean stream's token for position n+j+1 (argmax, or the keyed draw when sampling, after the processors with
   the row so far `... s d_1..d_j`).
3. Accept: c = the longest run with d_i == g_{i-1} (i = 1..c). Emit g_0..g_c (c + 1 tokens, 1..k); g_j is conditioned
   on s, d_1..d_j = the emitted tokens, so each is exactly the clean stream's next token (greedy) or its keyed sample
   (sampling: a draft is accepted only when it equals the sample, so every token is the autoregressive sample).
   The cache keeps s, d_1..d_c (crop); g_c is the next seed.

One-forward variant (`draft_variant="one_forward"`, TiDAR-style pre-drafting): one call verifies the current drafts and
drafts the next block for every possible outcome. Input `B = [s, d_1..d_m]` (m = k-1, or 0 on the first call) then
m + 1 groups G_0..G_m of k mask tokens; G_c sits at positions n+c+1..n+c+k (its first mask takes the place of the next
seed g_c, unknown during the call). The 4-D mask: B is causal after the cache; G_c sees the cache, B[0..c] and itself
(bidirectionally), nothing else; B never sees a group. The adapter is on the groups only (the last positions). After
accepting c as above, the next drafts are G_c's outputs at n+c+1..n+c+k-1 (for positions n+c+2..n+c+k); only B's
first c + 1 columns stay in the cache. Each call emits 1..k tokens, and drafts are always ready.

Batches: rows accept different lengths. The cache is cropped to the longest accepted run, and the columns a shorter
row did not accept become holes (attention-mask zeros), which positions (`cumsum(mask) - 1`) skip: for each row the
computation is that of the row alone. Rows that stop leave the batch.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .autoregressive_bd3lm import CleanStreamDecoder, TokenChooser, check_clean_stream_request, draw_row_seeds
from .decoding_bd3lm import DecodingMode, DecodingRequest
from .outputs_bd3lm import BD3LMGenerateOutput
from .sampling_bd3lm import suppress_mask_logit

# Values of `BD3LMGenerationConfig.draft_variant`; the first is the default.
DRAFT_VARIANTS = ("two_pass", "one_forward")


@functools.lru_cache(maxsize=64)  # a handful of (m, k, device) per generate(): built once, never written to
def fused_pattern(num_drafts: int, block_size: int, device: torch.device) -> tuple[torch.BoolTensor, torch.LongTensor]:
    """The one-forward call's mask among its new tokens (`(w, w)`, w = (m+1)(k+1)) and each token's offset from the
    seed's position (`(w,)`), for m = `num_drafts` drafts and k = `block_size` (module docstring)."""
    verify = num_drafts + 1
    width = verify * (block_size + 1)
    allowed = torch.zeros((width, width), dtype=torch.bool, device=device)
    allowed[:verify, :verify] = torch.ones((verify, verify), dtype=torch.bool, device=device).tril()
    offsets = torch.empty(width, dtype=torch.long, device=device)
    offsets[:verify] = torch.arange(verify, device=device)
    for c in range(verify):
        start = verify + c * block_size
        group = slice(start, start + block_size)
        allowed[group, : c + 1] = True
        allowed[group, group] = True
        offsets[group] = torch.arange(c + 1, c + 1 + block_size, device=device)
    return allowed, offsets


@functools.lru_cache(maxsize=64)
def fused_logit_positions(num_drafts: int, block_size: int, device: torch.device) -> torch.LongTensor:
    """The positions of the one-forward call that are read, hence projected on the vocabulary: the m + 1 verify
    positions, then the first k - 1 of each group G_c (its last position would draft a token past the block)."""
    verify = num_drafts + 1
    starts = verify + torch.arange(verify, device=device) * block_size
    groups = (starts[:, None] + torch.arange(block_size - 1, device=device)[None]).flatten()
    return torch.cat((torch.arange(verify, device=device), groups))


class DraftVerifyMode(DecodingMode):
    """Draft with the diffusion view, verify with the clean stream (module docstring)."""

    name = "draft_verify"
    needs_next_token_view = True

    @classmethod
    def check(cls, model: Any, request: DecodingRequest) -> None:
        super().check(model, request)
        check_clean_stream_request(model, request, 2 * model.config.block_size)

    @classmethod
    def run(cls, model: Any, request: DecodingRequest) -> torch.LongTensor | BD3LMGenerateOutput:
        block_size = model.config.block_size
        one_forward = (request.config.draft_variant or DRAFT_VARIANTS[0]) == "one_forward"
        state = CleanStreamDecoder(model, request)
        chooser = TokenChooser(
            request, draw_row_seeds(request.generator, len(state.rows)) if request.do_sample else None
        )
        logits = state.prefill()
        rows = state.rows.tolist()
        seed = chooser.choose(logits, rows, state.positions().tolist(), lambda i: state.history(rows[i]))
        finished = state.emit(list(seed[:, None]))
        drafts = None
        while not bool(finished.all()) and not state.out_of_time():
            keep = state.drop(finished)
            seed = seed[keep]
            drafts = None if drafts is None else drafts[keep]
            if one_forward:
                seed, drafts, finished = cls._one_forward_cycle(state, chooser, seed, drafts, block_size)
            else:
                seed, finished = cls._two_pass_cycle(state, chooser, seed, block_size)
        return state.output(acceptance=True)

    @staticmethod
    def _two_pass_cycle(
        state: CleanStreamDecoder, chooser: TokenChooser, seed: torch.LongTensor, block_size: int
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Draft, verify, accept (module docstring). Returns the next seeds and which rows finished."""
        mask_id = state.request.mask_token_id
        num_drafts = block_size - 1
        drafts = seed.new_zeros((len(seed), 0))
        if num_drafts > 0:
            block = torch.cat((seed[:, None], seed.new_full((len(seed), num_drafts), mask_id)), dim=1)
            allowed = torch.ones((block_size, block_size), dtype=torch.bool, device=seed.device)
            # the outputs at the seed and the first k - 2 masks draft d_1..d_{k-1}; the last mask's is never read
            logits = state.forward(
                block,
                write=False,
                allowed=allowed,
                adapter_positions=block_size,
                logits_to_keep=torch.arange(num_drafts, device=seed.device),
            )
            drafts = suppress_mask_logit(logits.float(), mask_id).argmax(dim=-1)
        logits = state.forward(torch.cat((seed[:, None], drafts), dim=1), write=True)
        tokens, accepted = DraftVerifyMode._accept(state, chooser, logits, drafts)
        state.keep_written(num_drafts + 1, accepted + 1)
        return DraftVerifyMode._emit(state, tokens, accepted)

    @staticmethod
    def _one_forward_cycle(
        state: CleanStreamDecoder,
        chooser: TokenChooser,
        seed: torch.LongTensor,
        drafts: torch.LongTensor | None,
        block_size: int,
    ) -> tuple[torch.LongTensor, torch.LongTensor, torch.BoolTensor]:
        """Verify the current drafts and draft the next block for every outcome in one call (module docstring).
        Returns the next seeds, the next drafts and which rows finished."""
        mask_id = state.request.mask_token_id
        rows = len(seed)
        if drafts is None:
            drafts = seed.new_zeros((rows, 0))
        verify = drafts.shape[1] + 1
        allowed, offsets = fused_pattern(drafts.shape[1], block_size, seed.device)
        groups = seed.new_full((rows, verify * block_size), mask_id)
        ids = torch.cat((seed[:, None], drafts, groups), dim=1)
        positions = (state.positions() - 1)[:, None] + offsets[None]  # the seed sits at positions() - 1
        logits = state.forward(
            ids,
            write=True,
            allowed=allowed,
            position_ids=positions,
            adapter_positions=verify * block_size,
            logits_to_keep=fused_logit_positions(drafts.shape[1], block_size, seed.device),
        )
        tokens, accepted = DraftVerifyMode._accept(state, chooser, logits[:, :verify], drafts)
        state.keep_written(ids.shape[1], accepted + 1)
        # G_c's outputs at its first k - 1 positions draft the k - 1 tokens after the next seed g_c; the logits hold
        # the verify positions, then k - 1 rows per group (`fused_logit_positions`)
        first = verify + accepted * (block_size - 1)
        index = first[:, None] + torch.arange(block_size - 1, device=seed.device)[None]
        chosen = logits.gather(1, index[:, :, None].expand(-1, -1, logits.shape[-1]))
        next_drafts = suppress_mask_logit(chosen.float(), mask_id).argmax(dim=-1)
        seed, finished = DraftVerifyMode._emit(state, tokens, accepted)
        return seed, next_drafts, finished

    @staticmethod
    def _accept(
        state: CleanStreamDecoder, chooser: TokenChooser, logits: torch.Tensor, drafts: torch.LongTensor
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """The clean stream's tokens g_0..g_m over the verify positions (`logits` `(rows, m+1, vocab)`), chosen
        position by position while the drafts agree, and the number c of accepted drafts per row."""
        rows = state.rows.tolist()
        positions = state.positions()
        num_drafts = drafts.shape[1]
        tokens = drafts.new_zeros((len(rows), num_drafts + 1))
        accepted = drafts.new_zeros(len(rows))
        alive = torch.ones(len(rows), dtype=torch.bool, device=drafts.device)
        for j in range(num_drafts + 1):
            index = alive.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            items = index.tolist()
            chosen = chooser.choose(
                logits[index, j],
                [rows[i] for i in items],
                (positions[index] + j).tolist(),
                lambda t, j=j, items=items: state.history(rows[items[t]], drafts[items[t], :j]),
            )
            tokens[index, j] = chosen
            if j < num_drafts:
                agree = chosen == drafts[index, j]
                accepted[index] += agree.long()
                alive[index] = agree
        return tokens, accepted

    @staticmethod
    def _emit(
        state: CleanStreamDecoder, tokens: torch.LongTensor, accepted: torch.LongTensor
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Emit g_0..g_c per row, record the acceptance length c + 1; the next seed is g_c."""
        lengths = (accepted + 1).tolist()  # one host copy, not one sync per row
        for row, length in zip(state.rows.tolist(), lengths, strict=True):
            state.acceptance[row].append(length)
        finished = state.emit([tokens[i, :length] for i, length in enumerate(lengths)])
        seed = tokens.gather(1, accepted[:, None]).squeeze(1)
        return seed, finished


__all__ = ["DRAFT_VARIANTS", "DraftVerifyMode", "fused_logit_positions", "fused_pattern"]
