# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""What happens inside one block of BD3-LM generation: the samplers (which masked positions to reveal at a step, and
with which token), logits processing, random draws and stop detection. A leaf of the package, like a diffusers
scheduler: the network call stays in `generation_bd3lm.py`, which runs the loop, and the committed window (the tokens a
block attends to, and the KV cache) in `cache_bd3lm.py`.

All samplers share one loop (`generation_bd3lm.BlockDenoiser.denoise`): the network gives p_θ(x_0 | x_t^b, x^{<b}) for
every position of the current block; the loop draws one candidate token per position (argmax, or a categorical draw
from the processed probabilities) and asks the sampler which masked positions take their candidate now. Unmasked
tokens are always carried over (SUBS), so a sampler only ever selects among masked positions.

Samplers (the official ones of Arriola et al., 2025, plus confidence-based parallel decoding after Fast-dLLM):

* `ddpm`: the reverse step of masked diffusion. Going from t to s < t, a masked token is revealed with probability
  (α_s - α_t) / (1 - α_t), the absorbing-state reverse process under SUBS. The network is time-independent, so
  when a step reveals nothing the probabilities are reused without a network call (MDLM's `ddpm_cache`); the last step
  reveals every remaining token.
* `first_hitting`: exactly one uniformly chosen masked position per call (Zheng et al., 2024); the next unmasking time
  only enters through σ, which the released models ignore, so it is not computed.
* `topk_confidence`, `margin`, `entropy`: the k masked positions with the highest confidence (probability of the
  candidate token), the largest top-1 minus top-2 margin, or the lowest entropy.
* `confidence_threshold`: every masked position whose candidate has probability >= the threshold, and at least one.

Random numbers (`uniform`) come from a `RandomSource`: one `torch.Generator` shared by the batch, torch's global RNG,
or `RowGenerators` (one generator per row: a row's draws, and so its tokens, do not depend on the other rows). The
contract `generate()` offers on top of them is in `generation_bd3lm.py` ("Randomness").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import (
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

# ----------------------------------------------------------------------------------------------------------------------
# Randomness and categorical draws

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th stream derived from `seed`: `seed` itself for index 0, else the SplitMix64 output
    (Steele, Lea and Flood, 2014) for state `seed + index · γ`, a well-mixed 64-bit value, so that nearby seeds and
    indices give unrelated streams (e.g. the repeats of `num_return_sequences`)."""
    if index == 0:
        return seed
    z = (seed + index * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class RowGenerators:
    """One CPU `torch.Generator` per batch row, so that a row's random draws come from its own stream: they depend
    neither on the other rows of the batch nor on torch's global RNG (the per-request seeds of serving engines).

    A row draws only while it still has masked positions in its block (`active`), so the number of draws it consumes
    is a function of its own trajectory; a row generated in a batch then sees the same numbers as alone.

    Args:
        generators (`Sequence[torch.Generator]`): one per row, in batch order.
    """

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)

    @classmethod
    def from_seeds(cls, seeds: Sequence[int]) -> RowGenerators:
        return cls([torch.Generator(device="cpu").manual_seed(seed) for seed in seeds])

    def __len__(self) -> int:
        return len(self.generators)

    def select(self, rows: torch.LongTensor) -> RowGenerators:
        """The generators of the batch rows `rows` (the rows still generating), sharing their state."""
        return RowGenerators([self.generators[row] for row in rows.tolist()])

    def uniform(self, shape: tuple[int, ...], active: torch.BoolTensor | None = None) -> torch.DoubleTensor:
        """`(rows, *shape[1:])` U[0, 1) draws on the CPU, row r from its own generator; inactive rows draw nothing
        (zeros)."""
        if shape[0] != len(self.generators):
            raise RuntimeError(f"{len(self.generators)} row generators for a draw over {shape[0]} rows.")
        flags = [True] * shape[0] if active is None else active.tolist()
        return torch.stack(
            [
                torch.rand(shape[1:], generator=g, dtype=torch.float64)
                if flag
                else torch.zeros(shape[1:], dtype=torch.float64)
                for g, flag in zip(self.generators, flags, strict=True)
            ]
        )


# Where the sampler's uniforms come from: one generator shared by the batch, one per row, or torch's global RNG.
RandomSource = torch.Generator | RowGenerators | None


def uniform(
    shape: tuple[int, ...], generator: RandomSource, device: torch.device, active: torch.BoolTensor | None = None
) -> torch.DoubleTensor:
    """U[0, 1) draws in float64 from `generator` (or torch's global RNG), made on the generator's device and moved to
    `device`, so that a CPU generator drives generation on any accelerator and a fixed seed reproduces the batch.

    With [`RowGenerators`] the first dimension is the batch row, and rows not `active` draw nothing (zeros); a shared
    stream draws for every row whatever `active` says (as it always has, so that a seed keeps its samples)."""
    if isinstance(generator, RowGenerators):
        return generator.uniform(shape, active).to(device)
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source, dtype=torch.float64).to(device)


def sample_categorical(
    probs: torch.Tensor, generator: RandomSource, active: torch.BoolTensor | None = None
) -> torch.LongTensor:
    """One exact draw per row of `probs` (`(..., vocab)`, float64, rows may be unnormalised) by inverting the CDF.

    One uniform per row keeps the draw cheap for large vocabularies; zero-probability tokens are never returned
    because `searchsorted(..., right=True)` skips the flat parts of the CDF. With [`RowGenerators`], `probs` is
    `(batch, ..., vocab)` and `active` (`(batch,)`) says which batch rows draw.
    """
    flat = probs.reshape(-1, probs.shape[-1])
    cdf = flat.cumsum(dim=-1)
    total = cdf[:, -1:]
    if isinstance(generator, RowGenerators):
        u = uniform(tuple(probs.shape[:-1]), generator, flat.device, active).reshape(-1, 1)
    else:
        u = uniform((flat.shape[0], 1), generator, flat.device)
    # u * total < total strictly, except for float rounding at u -> 1, which the clamp guards.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cdf, target, right=True).clamp_max(flat.shape[-1] - 1)
    return index.view(probs.shape[:-1])


# ----------------------------------------------------------------------------------------------------------------------
# Logits processing


class BD3LMNucleusLogitsWarper(LogitsProcessor):
    """The paper's nucleus rule (official `_nucleus_sample`): keep the tokens whose cumulative probability, counted in
    decreasing order and *including the token itself*, is <= p, and always the most likely token.

    This keeps slightly fewer tokens than `TopPLogitsWarper` (HF keeps the token that crosses p).

    Args:
        nucleus_p (`float`): p in (0, 1].
    """

    def __init__(self, nucleus_p: float) -> None:
        if not 0.0 < nucleus_p <= 1.0:
            raise ValueError(f"`nucleus_p` must be in (0, 1], got {nucleus_p}.")
        self.nucleus_p = nucleus_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative > self.nucleus_p
        remove_sorted[..., 0] = False  # the top-1 token always survives
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        return scores.masked_fill(remove, float("-inf"))


def build_logits_warpers(temperature: float, top_k: int, top_p: float, nucleus_p: float | None) -> LogitsProcessorList:
    """HF's sampling warpers (temperature, then top-k, then top-p) and the paper's nucleus rule, in that order."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    if nucleus_p is not None and nucleus_p < 1.0:
        warpers.append(BD3LMNucleusLogitsWarper(nucleus_p))
    return warpers


def suppress_mask_logit(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """SUBS's zero-masking rule (Sahoo et al., 2024, used by Eq. (8) of Arriola et al., 2025): the mask token gets
    logit -inf, so p_θ never predicts it. Out of place, in the dtype given (upcast first where a softmax needs it).
    Every place that turns denoiser logits into probabilities calls this: training loss, sampling, evaluation."""
    return logits.index_fill(-1, torch.tensor([mask_token_id], device=logits.device), float("-inf"))


def block_probabilities(
    logits: torch.Tensor,
    block: torch.LongTensor,
    mask_token_id: int,
    logits_processor: LogitsProcessorList,
    warpers: LogitsProcessorList,
    history: Callable[[], torch.LongTensor],
) -> torch.DoubleTensor:
    """p_θ(x_0 | x_t) of every position of the block, in float64: SUBS (the mask token gets probability 0), then the
    logits processors and the sampling warpers.

    Args:
        logits (`torch.Tensor` of shape `(rows, block_size, vocab)`): raw network output.
        block (`torch.LongTensor` of shape `(rows, block_size)`): the block's current state.
        history (`Callable`): returns the rows' tokens before the block; only called when a processor needs
            `input_ids` (each position sees the row so far with the block's current state appended).
    """
    rows, block_size, vocab = logits.shape
    scores = suppress_mask_logit(logits.double(), mask_token_id)
    scores = scores.view(rows * block_size, vocab)
    if logits_processor:
        context = torch.cat((history(), block), dim=1).repeat_interleave(block_size, dim=0)
        scores = warpers(context, logits_processor(context, scores))
    elif warpers:
        # The warpers `build_logits_warpers` makes never read `input_ids`: skip building the growing history (4-17% of
        # generation time), and hand them the block alone.
        scores = warpers(block.repeat_interleave(block_size, dim=0), scores)
    probs = scores.softmax(dim=-1)
    if bool(probs.isnan().any()):  # NaN, +inf or all -inf scores: no distribution to draw from
        raise ValueError(
            "The scores after the logits processors and sampling warpers are NaN, +inf or all -inf for some position, "
            "so no token can be drawn; check the custom `logits_processor` (it must leave at least one finite score) "
            "and `temperature`."
        )
    return probs.view(rows, block_size, vocab)


# ----------------------------------------------------------------------------------------------------------------------
# Position selection


def select_top(scores: torch.Tensor, masked: torch.BoolTensor, counts: torch.LongTensor) -> torch.BoolTensor:
    """The `counts[r]` masked positions of row r with the highest `scores` (ties broken by position)."""
    scores = scores.masked_fill(~masked, float("-inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return masked & (ranks < counts[:, None])


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats over the last dimension (0 · log 0 = 0)."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


class BD3LMSampler:
    """Chooses which masked positions of the current block take their candidate token at one denoising step.

    Args:
        num_steps (`int`, *optional*): step budget per block. `ddpm` discretises [0, 1] into this many steps; the
            confidence samplers reveal at least ceil(masked / steps left) tokens per step so that a block never takes
            more; `first_hitting` ignores it (one token per call by definition).
        tokens_per_step (`int`): k of the top-k samplers.
        confidence_threshold (`float`, *optional*): threshold of `confidence_threshold`.
        mask_probability (`Callable`, *optional*): 1 - α_t of the model's noise schedule (used by `ddpm`).
    """

    name: str = ""
    # True when a step may reveal nothing, in which case the network output of the unchanged block is reused.
    reuses_probabilities: bool = False

    def __init__(
        self,
        num_steps: int | None = None,
        tokens_per_step: int = 1,
        confidence_threshold: float | None = None,
        mask_probability: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.num_steps = num_steps
        self.tokens_per_step = tokens_per_step
        self.confidence_threshold = confidence_threshold
        self.mask_probability = mask_probability

    def max_steps(self, block_size: int) -> int:
        """Upper bound on the steps of one block (every step reveals at least one token per unfinished row)."""
        return block_size if self.num_steps is None else min(block_size, self.num_steps)

    def min_counts(self, masked: torch.BoolTensor, step: int) -> torch.LongTensor:
        """Per row: tokens to reveal at least, so that the block finishes within `num_steps`."""
        remaining = masked.sum(dim=-1)
        if self.num_steps is None:
            return remaining.clamp_max(1)
        steps_left = max(self.num_steps - step, 1)
        return (remaining + steps_left - 1) // steps_left

    def scores(self, probs: torch.Tensor, tokens: torch.LongTensor) -> torch.Tensor:
        """Confidence of each position, higher = reveal first. Default: probability of the candidate token."""
        return probs.gather(-1, tokens[..., None]).squeeze(-1)

    def select(
        self,
        masked: torch.BoolTensor,
        probs: torch.Tensor,
        tokens: torch.LongTensor,
        step: int,
        generator: RandomSource,
    ) -> torch.BoolTensor:
        """Positions (a subset of `masked`, shape `(batch, block_size)`) that take `tokens` at this step.

        Args:
            masked (`torch.BoolTensor` of shape `(batch, block_size)`): positions still masked.
            probs (`torch.DoubleTensor` of shape `(batch, block_size, vocab)`): processed p_θ(x_0 | x_t), mask token
                excluded.
            tokens (`torch.LongTensor` of shape `(batch, block_size)`): the candidate token of every position.
            step (`int`): index of this step inside the block, from 0.
            generator (`torch.Generator` or [`RowGenerators`], *optional*): source of randomness (torch's global RNG
                when None). With `RowGenerators` a row that has no masked position left draws nothing.
        """
        counts = self.min_counts(masked, step).clamp_min(self.tokens_per_step)
        return select_top(self.scores(probs, tokens), masked, counts)


class DDPMSampler(BD3LMSampler):
    """Ancestral masked-diffusion step on the grid t_i = 1 - i / T, s_i = t_i - 1 / T (i = 0 .. T - 1).

    A masked token stays masked with probability (1 - α_s) / (1 - α_t) and is otherwise revealed with a draw from
    p_θ(x_0 | x_t), i.e. revealed with probability (α_s - α_t) / (1 - α_t) = 1 - mask_prob(s) / mask_prob(t) (the
    absorbing-state reverse step under SUBS; 1 - s/t for the log-linear schedule). At i = T - 1 (s = 0) every remaining
    token is revealed, so the block always finishes (the official grid can reach t = 0 and divide by it).
    """

    name = "ddpm"
    reuses_probabilities = True

    def max_steps(self, block_size: int) -> int:
        return self.num_steps if self.num_steps is not None else block_size

    def select(self, masked, probs, tokens, step, generator):
        num_steps = self.max_steps(masked.shape[-1])
        if step >= num_steps - 1:
            return masked
        t = torch.tensor(1.0 - step / num_steps, dtype=torch.float64)
        s = torch.tensor(1.0 - (step + 1) / num_steps, dtype=torch.float64)
        mask_probability = self.mask_probability or (lambda x: x)
        reveal = float(1.0 - mask_probability(s) / mask_probability(t))
        active = masked.any(dim=-1)
        return masked & (uniform(tuple(masked.shape), generator, masked.device, active) < reveal)


class FirstHittingSampler(BD3LMSampler):
    """One uniformly random masked position per row and call (the official default, vectorised over the batch)."""

    name = "first_hitting"

    def max_steps(self, block_size: int) -> int:
        return block_size

    def select(self, masked, probs, tokens, step, generator):
        active = masked.any(dim=-1)
        u = uniform(tuple(masked.shape), generator, masked.device, active)
        return select_top(u, masked, active.long())


class TopKConfidenceSampler(BD3LMSampler):
    """The `tokens_per_step` masked positions whose candidate token is most probable."""

    name = "topk_confidence"


class MarginSampler(BD3LMSampler):
    """The `tokens_per_step` masked positions with the largest margin p(top-1) - p(top-2)."""

    name = "margin"

    def scores(self, probs, tokens):
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]


class EntropySampler(BD3LMSampler):
    """The `tokens_per_step` masked positions whose predictive distribution has the lowest entropy."""

    name = "entropy"

    def scores(self, probs, tokens):
        return -entropy(probs)


class ConfidenceThresholdSampler(BD3LMSampler):
    """Every masked position whose candidate has probability >= `confidence_threshold`, and at least one per step
    (the most confident), so that each call makes progress."""

    name = "confidence_threshold"

    def select(self, masked, probs, tokens, step, generator):
        confidence = self.scores(probs, tokens)
        at_least = select_top(confidence, masked, self.min_counts(masked, step))
        return at_least | (masked & (confidence >= self.confidence_threshold))


SAMPLERS: dict[str, type[BD3LMSampler]] = {
    cls.name: cls
    for cls in (
        DDPMSampler,
        FirstHittingSampler,
        TopKConfidenceSampler,
        ConfidenceThresholdSampler,
        MarginSampler,
        EntropySampler,
    )
}


# ----------------------------------------------------------------------------------------------------------------------
# Low-entropy stop rule


class UnigramEntropyStoppingCriteria(StoppingCriteria):
    """The paper's degenerate-sample rule (official `_check_stop_conds`): stop a row once the unigram entropy of its
    last `window` generated tokens falls below `threshold` nats.

    Follows the HF `StoppingCriteria` call convention: `(input_ids, scores) -> BoolTensor (batch,)`. Only tokens after
    `prompt_length` count, and a row needs at least `window` of them before the rule can fire. The official code also
    rejects (fixed length) or truncates (variable length) such samples; here the row simply stops.
    """

    def __init__(self, threshold: float, window: int, prompt_length: int) -> None:
        self.threshold = threshold
        self.window = window
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor | None = None, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length :]
        batch = input_ids.shape[0]
        if generated.shape[1] < self.window:
            return torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        tail = generated[:, -self.window :]
        counts = torch.zeros(batch, int(tail.max()) + 1, dtype=torch.float64, device=tail.device)
        counts.scatter_add_(1, tail, torch.ones_like(tail, dtype=torch.float64))
        return entropy(counts / self.window) < self.threshold


def build_stopping_criteria(
    stopping_criteria: Any,
    tokenizer: Any,
    stop_strings: str | list[str] | None,
    entropy_stop: float | None,
    entropy_stop_window: int,
    prompt_length: int,
) -> StoppingCriteriaList:
    """The user's criteria, then `StopStringCriteria` and the opt-in low-entropy rule when configured."""
    criteria = StoppingCriteriaList(stopping_criteria or [])
    if stop_strings:
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    if entropy_stop is not None:
        criteria.append(UnigramEntropyStoppingCriteria(entropy_stop, entropy_stop_window, prompt_length))
    return criteria


def first_stops(
    block: torch.LongTensor,
    eos: torch.LongTensor | None,
    criteria: StoppingCriteriaList,
    sequence_up_to: Callable[[int], torch.LongTensor],
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Where each row of a finished block stops: at its first EOS, or at the first position where a stopping
    criterion fires on the row so far (`sequence_up_to(j)` = the rows up to and including block position j).

    Criteria are asked at every position because a stop string may end inside the block. Returns `(kept, stopped)`:
    the number of block tokens each row keeps (the stop token included) and whether it stopped.
    """
    rows, width = block.shape
    stop_at = torch.zeros((rows, width), dtype=torch.bool, device=block.device)
    if eos is not None:
        stop_at |= torch.isin(block, eos)
    for j in range(width if criteria else 0):
        sequences = sequence_up_to(j)
        for criterion in criteria:  # one by one, so that a wrong answer is reported as the criterion's
            fired = torch.as_tensor(criterion(sequences, None), device=block.device)
            if fired.dim() == 0:  # one answer for the whole batch
                fired = fired.expand(rows)
            if tuple(fired.shape) != (rows,):
                raise ValueError(
                    f"`stopping_criteria` entry {type(criterion).__name__} must return one bool per row (shape "
                    f"({rows},)), got shape {tuple(fired.shape)}."
                )
            stop_at[:, j] |= fired.bool()
    stopped = stop_at.any(dim=1)
    first = stop_at.int().argmax(dim=1)  # index of the first True
    return torch.where(stopped, first + 1, torch.full_like(first, width)), stopped


__all__ = [
    "SAMPLERS",
    "BD3LMNucleusLogitsWarper",
    "BD3LMSampler",
    "ConfidenceThresholdSampler",
    "DDPMSampler",
    "EntropySampler",
    "FirstHittingSampler",
    "MarginSampler",
    "RandomSource",
    "RowGenerators",
    "TopKConfidenceSampler",
    "UnigramEntropyStoppingCriteria",
    "block_probabilities",
    "build_logits_warpers",
    "build_stopping_criteria",
    "derive_seed",
    "entropy",
    "first_stops",
    "sample_categorical",
    "select_top",
    "suppress_mask_logit",
    "uniform",
]
