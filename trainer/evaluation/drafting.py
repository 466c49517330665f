# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""How good a BD3-LM is as a one-step block drafter for its AR source, estimated in one vectorised pass.

Lossless block drafting ("draft with the diffusion view, verify with the AR view"): after a committed prefix the next
token `s` (the seed) is known exactly; the drafter fills the block `[s, M, ..., M]` of length k in one call, the AR
model verifies `[s, d_1 .. d_{k-1}]` and keeps the longest run of drafts equal to its own greedy tokens, plus its own
next token. Output = the AR model's greedy decode whatever the drafter; the drafter only sets the speed, through the
number of tokens each draft-and-verify cycle emits (accepted drafts + 1).

[`estimate_acceptance`] measures that number without a decoding loop. `x_0` = prompts followed by the AR model's own
greedy continuations ([`greedy_continuations`]); `x_t` = the same with every block after the prompt reduced to its
seed followed by masks; one `model(input_ids=x_0, noisy_input_ids=x_t)` call. In that pass the `x_t` copy of a block
attends to itself and to the clean tokens of strictly earlier blocks (Arriola et al., 2025, Eq. (8) / Fig. 2): the
context of a real drafting call, which sees the committed prefix and its own block. The logits it returns are aligned
with the tokens (row i predicts token i; under `config.token_shift` the network's output at i - 1 was moved there),
so the draft for offset j of a block starting at column c is `argmax logits[:, c + j]`, compared with `x_0[:, c + j]`,
the AR model's greedy token at that position.

Blocks are laid out as `generate()` lays them out: each row is left-padded so that its prompt ends on a block
boundary (its first generated token, the first seed, starts a block); only blocks whose k tokens all lie in the row's
continuation are counted.

The clean context the drafts see here is the drafter's own clean stream (`x_0` half). It equals the AR source's KV
cache, which a real draft-and-verify loop would hand the drafter, only when the clean stream is the unmodified source
(a causal clean stream without an adapter on clean positions); for other models it is an estimate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modeling_bd3lm.draft_verify_bd3lm import DRAFT_VARIANTS

__all__ = ["AcceptanceEstimate", "chain_cycles", "estimate_acceptance", "geometric_alpha", "greedy_continuations"]


@dataclass
class AcceptanceEstimate:
    """What [`estimate_acceptance`] measured, over `blocks` complete drafting blocks of `block_size` tokens.

    `match_rate[j - 1]`: fraction of blocks whose draft at offset j (1..k-1) equals the AR greedy token there,
    whatever happened at the other offsets. `conditional_acceptance[j - 1]`: the same among blocks whose drafts at
    offsets 1..j-1 all matched (the probability that a verifier which got that far accepts offset j; NaN when no block
    got that far). `accepted_lengths`: per block, the longest run of matching drafts from offset 1 (0..k-1), in row
    order then block order, and `drafts` the drafted tokens at offsets 1..k-1 of each. `tokens_per_cycle`: mean of
    accepted + 1 (the verifier's own token). `alpha`: the per-position acceptance of the geometric model with the same
    tokens per cycle ([`geometric_alpha`]). With `every_position=True`: `accepted_at[r][i]` = the accepted count of a
    block whose seed is row r's continuation token i (None where the block runs past the row), and `cycles[r]` the
    acceptance lengths of row r's greedy draft-and-verify loop ([`chain_cycles`]).
    """

    block_size: int
    blocks: int
    match_rate: list[float]
    conditional_acceptance: list[float]
    tokens_per_cycle: float
    alpha: float
    accepted_lengths: list[int] = field(repr=False)
    blocks_per_row: list[int] = field(default_factory=list)
    drafts: list[list[int]] = field(default_factory=list, repr=False)
    draft_variant: str = "two_pass"
    accepted_at: list[list[int | None]] = field(default_factory=list, repr=False)
    cycles: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def cycle_tokens_per_cycle(self) -> float:
        """Mean acceptance length over the chained cycles of every row (`every_position=True` only): the tokens per
        call a greedy draft-and-verify loop gets on these rows, which `tokens_per_cycle` (every block alike) only
        approximates (a loop visits the seeds its own acceptances lead to)."""
        lengths = [c for row in self.cycles for c in row]
        if not lengths:
            raise ValueError("No chained cycles: call estimate_acceptance(..., every_position=True).")
        return sum(lengths) / len(lengths)

    def as_dict(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "blocks": self.blocks,
            "match_rate": self.match_rate,
            "conditional_acceptance": self.conditional_acceptance,
            "tokens_per_cycle": self.tokens_per_cycle,
            "alpha": self.alpha,
            "accepted_lengths": self.accepted_lengths,
            "blocks_per_row": self.blocks_per_row,
            "drafts": self.drafts,
            "draft_variant": self.draft_variant,
            "accepted_at": self.accepted_at,
            "cycles": self.cycles,
        }


def geometric_alpha(tokens_per_cycle: float, block_size: int) -> float:
    """The α of the geometric model E(α, k) = 1 + α + ... + α^(k-1) = (1 - α^k) / (1 - α) (each of the k - 1 drafts
    accepted with probability α once the ones before it were) that gives `tokens_per_cycle` = E; solved by bisection
    (E is increasing in α on [0, 1], from 1 to k)."""
    if block_size < 1:
        raise ValueError(f"`block_size` must be >= 1, got {block_size}.")
    if not 1.0 <= tokens_per_cycle <= block_size:
        raise ValueError(f"`tokens_per_cycle` must lie in [1, block_size={block_size}], got {tokens_per_cycle}.")
    if block_size == 1:
        return float("nan")  # no drafts: every α gives one token per cycle
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if sum(mid**i for i in range(block_size)) < tokens_per_cycle:
            low = mid
        else:
            high = mid
    return (low + high) / 2


@torch.no_grad()
def greedy_continuations(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> list[list[int]]:
    """The AR model's own greedy continuation of each prompt (token ids): `model.generate(do_sample=False)` on one
    prompt at a time (no padding, so each is exactly what that prompt gives alone), cut after the first EOS (kept:
    predicting the end is part of the answer). `model` is the HF causal LM the drafts will be verified against;
    `max_new_tokens` may be one number per prompt."""
    if not prompts:
        raise ValueError("`prompts` is empty; pass at least one prompt (a list of token ids).")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts) or any(not isinstance(b, int) or b < 1 for b in budgets):
        raise ValueError(f"`max_new_tokens` must be a positive int or one per prompt, got {max_new_tokens!r}.")
    eos = getattr(model.generation_config, "eos_token_id", None) if eos_token_id is None else eos_token_id
    eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    pad = pad_token_id if pad_token_id is not None else getattr(model.generation_config, "pad_token_id", None)
    device = next(model.parameters()).device
    out = []
    for prompt, budget in zip(prompts, budgets):
        if len(prompt) == 0:
            raise ValueError("Every prompt needs at least one token (a BOS token when there is no text).")
        ids = torch.tensor([list(prompt)], device=device)
        generated = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=budget,
            pad_token_id=pad if pad is not None else (min(eos_ids) if eos_ids else 0),
            **({"eos_token_id": sorted(eos_ids)} if eos_ids else {}),
            top_p=None,
            top_k=None,
            temperature=None,
        )[0, ids.shape[1] :].tolist()
        cut = next((i + 1 for i, t in enumerate(generated) if t in eos_ids), len(generated))
        out.append(generated[:cut])
    return out


@contextlib.contextmanager
def _drafting_block_size(model: torch.nn.Module, block_size: int) -> Iterator[None]:
    """Run the model's vectorised pass with blocks of `block_size` (its mask is built from `config.block_size` at
    every call; a causal-LM backbone has no weight that depends on it)."""
    config = model.config
    if block_size == config.block_size:
        yield
        return
    if not getattr(model, "is_causal_backbone", False):
        raise ValueError(
            f"`block_size`={block_size} differs from the model's block_size={config.block_size}; only a model converted "
            "from a causal LM (from_causal_lm) can draft with another block size. Pass block_size=None."
        )
    saved = config.block_size
    config.block_size = block_size
    try:
        yield
    finally:
        config.block_size = saved


def _check_rows(sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int]) -> list[list[int]]:
    if isinstance(sequences, torch.Tensor):
        if sequences.dim() != 2:
            raise ValueError(f"`sequences` must be a list of token-id lists or a 2-D tensor, got {sequences.dim()}-D.")
        sequences = sequences.tolist()
    rows = [list(map(int, row)) for row in sequences]
    if not rows:
        raise ValueError("`sequences` is empty; pass prompt + continuation token ids, one list per row.")
    if len(prompt_lengths) != len(rows):
        raise ValueError(
            f"`prompt_lengths` has {len(prompt_lengths)} entries for {len(rows)} sequences; pass one "
            "prompt length per row."
        )
    for i, (row, p) in enumerate(zip(rows, prompt_lengths)):
        if not 1 <= int(p) <= len(row):
            raise ValueError(
                f"`prompt_lengths[{i}]`={p} must lie in [1, {len(row)}] (the row's length): every row is "
                "a prompt of at least one token followed by its continuation."
            )
    return rows


def _layout(
    rows: list[list[int]],
    prompt_lengths: Sequence[int],
    k: int,
    model_length: int,
    mask_id: int,
    pad_id: int,
    mask_seed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """`(x_0, x_t, attention_mask, block_starts)`: rows left-padded so that each prompt ends on a block boundary,
    right-padded to a common multiple of k; `block_starts[r]` = the columns where row r's complete blocks start.
    `mask_seed`: the block's first token (the seed) is masked too (the one-forward variant's drafts)."""
    shifts = [(-int(p)) % k for p in prompt_lengths]
    width = max(s + len(r) for s, r in zip(shifts, rows))
    width += (-width) % k
    if width > model_length:
        longest = max(range(len(rows)), key=lambda i: shifts[i] + len(rows[i]))
        raise ValueError(
            f"`sequences` row {longest} needs {width} columns ({len(rows[longest])} tokens, its prompt padded to a "
            f"block boundary), more than the model's model_length={model_length}; shorten the continuations."
        )
    x_0 = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    x_t = x_0.clone()
    starts = []
    first_masked = 0 if mask_seed else 1
    for r, (row, p, shift) in enumerate(zip(rows, prompt_lengths, shifts)):
        x_0[r, shift : shift + len(row)] = torch.tensor(row)
        attention_mask[r, shift : shift + len(row)] = 1
        x_t[r] = x_0[r]
        first, end = shift + int(p), shift + len(row)  # the first seed; one past the continuation
        for c in range(first, end, k):  # every block after the prompt keeps its seed (unless masked), the rest masked
            x_t[r, c + first_masked : min(c + k, end)] = mask_id
        starts.append([c for c in range(first, end - k + 1, k)])
    return x_0, x_t, attention_mask, starts


def _draft_pass(
    model: torch.nn.Module,
    rows: list[list[int]],
    prompt_lengths: Sequence[int],
    k: int,
    step: int,
    mask_seed: bool,
    offset: int = 0,
) -> list[list[tuple[int, list[int], list[bool]]]]:
    """Per row, per complete block whose seed is continuation token `offset`, `offset + k`, ...: `(continuation index
    of its seed, drafts at offsets 1..k-1, whether each equals the row's token there)`, from vectorised passes of at
    most `step` rows. The `offset` tokens before the first seed are laid out as prompt (clean)."""
    config = model.config
    prompt_lengths = [min(int(p) + offset, len(row)) for p, row in zip(prompt_lengths, rows)]
    mask_id = config.mask_token_id
    pad_id = getattr(config, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id  # any valid id: padded columns are never attended to
    x_0, x_t, attention_mask, starts = _layout(
        rows, prompt_lengths, k, config.model_length, mask_id, pad_id, mask_seed=mask_seed
    )
    device = next(model.parameters()).device
    drafts = []
    for i in range(0, len(rows), step):
        logits = model(
            input_ids=x_0[i : i + step].to(device),
            noisy_input_ids=x_t[i : i + step].to(device),
            attention_mask=attention_mask[i : i + step].to(device),
        ).logits.float()
        logits[..., mask_id] = float("-inf")  # a draft is a token, never the mask (as the samplers do)
        drafts.append(logits.argmax(-1).cpu())
    drafted = torch.cat(drafts)
    out = []
    for r, columns in enumerate(starts):
        origin = (-prompt_lengths[r]) % k + prompt_lengths[r]  # the column of this layout's first seed
        blocks = []
        for c in columns:
            hits = (drafted[r, c + 1 : c + k] == x_0[r, c + 1 : c + k]).tolist()
            blocks.append((c - origin + offset, drafted[r, c + 1 : c + k].tolist(), hits))
        out.append(blocks)
    return out


def chain_cycles(accepted_at: Sequence[int | None], first_seed: int = 0) -> list[int]:
    """The acceptance lengths (accepted drafts + 1 per cycle) a greedy draft-and-verify loop reports, from the accepted
    count `accepted_at[i]` of a block whose seed is continuation token i: a cycle at seed i emits
    `accepted_at[i] + 1` tokens and the last of them is the next seed. Stops at the first seed whose block is not
    complete (`None` or past the end): the real loop's last cycles are cut by `max_new_tokens`."""
    cycles, i = [], first_seed
    while i < len(accepted_at) and accepted_at[i] is not None:
        cycles.append(int(accepted_at[i]) + 1)
        i += int(accepted_at[i]) + 1
    return cycles


@torch.no_grad()
def estimate_acceptance(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]] | torch.Tensor,
    prompt_lengths: Sequence[int],
    block_size: int | None = None,
    batch_size: int | None = None,
    draft_variant: str = "two_pass",
    every_position: bool = False,
) -> AcceptanceEstimate:
    """How often the BD3-LM `model`'s one-step drafts equal the AR model's greedy tokens (module docstring).

    Args:
        model: a `BD3LMForMaskedDiffusion` (a PEFT adapter merged or active).
        sequences: per row, the prompt followed by the AR model's greedy continuation (e.g. from
            [`greedy_continuations`]), no padding; a 2-D tensor is read as rows of equal length.
        prompt_lengths: per row, how many of its tokens are prompt; the continuation starts right after.
        block_size: k, the drafting block length (1 seed + k - 1 drafts); default the model's own L'. Another k runs
            the same network under a block mask of width k (models converted from a causal LM only).
        batch_size: rows per vectorised pass (default all rows in one pass).
        draft_variant: the drafts of `generate(generation_mode="draft_verify", draft_variant=...)`: `"two_pass"`
            drafts `[s, M, ..., M]` (the seed known); `"one_forward"` drafts from `[M, ..., M]` (the seed is the token
            the same call verifies, so it is still a mask: every draft is one position further from known text).
        every_position: also score a block at EVERY continuation token as its seed (k vectorised passes, the layout
            shifted by 0..k-1 tokens), so that `accepted_at` holds the accepted count for any seed and `cycles` the
            acceptance lengths a greedy draft-and-verify loop of that variant reports, cycle for cycle
            ([`chain_cycles`]); the statistics then cover every position. Default: blocks at the aligned positions
            0, k, 2k, ... of each continuation, one pass.
    """
    if draft_variant not in DRAFT_VARIANTS:
        raise ValueError(f"`draft_variant` must be one of {DRAFT_VARIANTS}, got {draft_variant!r}.")
    config = model.config
    k = config.block_size if block_size is None else int(block_size)
    if k < 2:
        raise ValueError(f"`block_size` must be >= 2 (a seed and at least one draft), got {k}.")
    rows = _check_rows(sequences, prompt_lengths)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1 or None, got {batch_size}.")
    step = len(rows) if batch_size is None else batch_size
    mask_seed = draft_variant == "one_forward"
    per_row: list[list[tuple[int, list[int], list[bool]]]] = [[] for _ in rows]
    with _drafting_block_size(model, k):
        for offset in range(k if every_position else 1):
            for r, blocks in enumerate(_draft_pass(model, rows, prompt_lengths, k, step, mask_seed, offset)):
                per_row[r].extend(blocks)
    for blocks in per_row:
        blocks.sort(key=lambda block: block[0])
    if not any(per_row):
        raise ValueError(
            f"No row has a complete block of {k} tokens after its prompt; generate continuations of at least {k} tokens."
        )
    hits = torch.tensor([block[2] for blocks in per_row for block in blocks], dtype=torch.bool)
    run = hits.long().cumprod(-1)  # 1 while every draft so far matched
    accepted = run.sum(-1)
    reached = torch.cat((torch.ones_like(run[:, :1]), run[:, :-1]), -1)  # offsets 1..j-1 all matched
    # the mean over no block is NaN: no block got that far
    conditional = [float(hits[:, j][reached[:, j].bool()].float().mean()) for j in range(k - 1)]
    tokens = float(accepted.float().mean()) + 1.0
    estimate = AcceptanceEstimate(
        block_size=k,
        blocks=hits.shape[0],
        match_rate=hits.float().mean(0).tolist(),
        conditional_acceptance=conditional,
        tokens_per_cycle=tokens,
        alpha=geometric_alpha(min(tokens, k), k),
        accepted_lengths=accepted.tolist(),
        blocks_per_row=[len(blocks) for blocks in per_row],
        drafts=[block[1] for blocks in per_row for block in blocks],
        draft_variant=draft_variant,
    )
    if every_position:
        counts = iter(accepted.tolist())
        for r, blocks in enumerate(per_row):
            at: list[int | None] = [None] * (len(rows[r]) - int(prompt_lengths[r]))
            for block in blocks:
                at[block[0]] = next(counts)
            estimate.accepted_at.append(at)
            # one-forward: the first call verifies the first seed alone (no drafts yet), its groups draft after it
            estimate.cycles.append([1] + chain_cycles(at, 1) if mask_seed else chain_cycles(at, 0))
    return estimate
