# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""How `generate()` decodes once its inputs are prepared: the decoding modes (`generation_mode` of
`BD3LMGenerationConfig`, dispatched through `modes_bd3lm.DECODING_MODES`, the way transformers selects assisted or beam
decoding from its generation config).

* [`DecodingRequest`]: everything `generate()` prepared (prompt, limits, special tokens, processors, stopping
  criteria, streamer, randomness), handed to a mode.
* [`DecodingMode`]: what a mode is: a name, whether it needs the autoregressive view of the denoiser, and `run`.
* [`DiffusionMode`]: today's block diffusion (the mixin's block loop), with [`BlockDenoiser`], the loop inside one
  block that every sampler shares.

The two modes that decode through the clean stream live in `autoregressive_bd3lm.py` and `draft_verify_bd3lm.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList

from .cache_bd3lm import CommittedWindow
from .sampling_bd3lm import BD3LMSampler, RandomSource, RowGenerators, block_probabilities, sample_categorical


@dataclass(kw_only=True)
class DecodingRequest:
    """What `generate()` prepared for a decoding mode (steps 1-2 of its outline).

    Args:
        config: the resolved `BD3LMGenerationConfig`.
        prompt / prompt_mask (`(batch, width)`): the prompts, left-aligned (padding first), with their mask.
        given (`(batch, width)`): the prompts as the caller gave them (the output starts with them).
        max_new_tokens (`int`): the most tokens a row generates.
        mask_token_id / eos_ids / out_pad / filler: the mask token, the EOS ids, the id written after a stop, the id
            of never-attended filler columns.
        do_sample (`bool`): draw instead of the argmax.
        use_cache (`bool`): run with the KV cache.
        logits_processor / warpers: the caller's processors (plus the repetition penalty) and the sampling warpers.
        criteria: the stopping criteria (the caller's, stop strings, the entropy rule).
        streamer: receives the new tokens (the prompt was already put).
        generator: the randomness ([`RowGenerators`], one shared `torch.Generator`, or None: torch's global RNG).
        sampler: the block sampler (diffusion mode).
    """

    config: Any
    prompt: torch.LongTensor
    prompt_mask: torch.BoolTensor
    given: torch.LongTensor
    max_new_tokens: int
    mask_token_id: int
    eos_ids: list[int]
    out_pad: int
    filler: int
    do_sample: bool
    use_cache: bool
    logits_processor: LogitsProcessorList
    warpers: LogitsProcessorList
    criteria: StoppingCriteriaList
    streamer: Any = None
    generator: RandomSource = None
    sampler: BD3LMSampler | None = None

    @property
    def eos_tensor(self) -> torch.LongTensor | None:
        if not self.eos_ids:
            return None
        return torch.tensor(self.eos_ids, dtype=torch.long, device=self.prompt.device)


class DecodingMode:
    """One value of `generation_mode`. A new mode is a subclass in its own file plus one entry in
    `modes_bd3lm.DECODING_MODES`."""

    name: ClassVar[str]
    # The mode runs the clean stream as an autoregressive model (`BD3LMForMaskedDiffusion.causal_forward`), which only
    # a denoiser whose output j predicts token j + 1 has (a converted causal LM with the token shift; not the DiT).
    needs_next_token_view: ClassVar[bool] = False

    @classmethod
    def check(cls, model: Any, request: DecodingRequest) -> None:
        """Refuse, with a `ValueError` naming the fix, what this mode cannot run."""
        if cls.needs_next_token_view and not model.denoiser.predicts_next_token:
            raise ValueError(
                f"generation_mode={cls.name!r} decodes through the clean stream as an autoregressive model, which this "
                f"model's denoiser ({model.config.denoiser_type!r}, token_shift={model.config.token_shift}) does not "
                "have (its output at position j does not predict token j + 1); use generation_mode='diffusion'."
            )

    @classmethod
    def run(cls, model: Any, request: DecodingRequest) -> Any:
        raise NotImplementedError


class DiffusionMode(DecodingMode):
    """Block diffusion (Arriola et al., 2025): `block_size` tokens per block, denoised from all-mask by a sampler,
    committed to an exact KV cache; the window slides beyond `model_length` (`generation_bd3lm.py` outline)."""

    name = "diffusion"

    @classmethod
    def run(cls, model: Any, request: DecodingRequest) -> Any:
        return model._generate_blocks(request)


@dataclass(kw_only=True)
class BlockDenoiser:
    """How every block of one `generate` call is denoised (step 4): the sampler, the logits processors and sampling
    warpers, the randomness, and the counters the output reports. `denoise` is the loop all samplers share.

    Args:
        sampler ([`BD3LMSampler`]): which masked positions take their candidate token at each step.
        mask_token_id (`int`): the absorbing token m.
        do_sample (`bool`): draw each candidate from the processed probabilities, else take the argmax.
        logits_processor / warpers (`LogitsProcessorList`): applied to every position's float64 scores, in this order.
        generator: a stream shared by the rows present, or [`RowGenerators`] over the whole batch (one per row, of
            which the rows still generating draw).
        nfe (`torch.LongTensor` of shape `(batch,)`): per row, the calls it needed (it still had masks and its block had
            changed): the paper's NFE, updated in place.
        all_logits (`list`, *optional*): receives each call's logits laid out over the whole batch (NaN for rows that
            left it), with `output_logits=True`.
    """

    sampler: BD3LMSampler
    mask_token_id: int
    do_sample: bool
    logits_processor: LogitsProcessorList
    warpers: LogitsProcessorList
    generator: RandomSource
    nfe: torch.LongTensor
    all_logits: list[torch.Tensor] | None = None

    def denoise(
        self, model: Any, block: torch.LongTensor, window: CommittedWindow, history: Callable[[], torch.LongTensor]
    ) -> tuple[torch.LongTensor, int]:
        """Denoise one block until no mask is left: a network call (only when the block changed) through the window,
        SUBS-processed float64 probabilities, one candidate token per position (argmax, or a categorical draw), and the
        sampler's choice of the positions that take their candidate. `history()` gives the rows so far, for logits
        processors.

        Returns:
            The clean block and the number of network calls made.
        """
        generator = self.generator
        if isinstance(generator, RowGenerators):  # the streams of the rows still generating
            generator = generator.select(window.rows)
        sampler, mask_token_id = self.sampler, self.mask_token_id
        block_size = block.shape[1]
        probs = None
        changed = torch.ones(block.shape[0], dtype=torch.bool, device=block.device)
        calls = 0
        for step in range(sampler.max_steps(block_size)):
            masked = block == mask_token_id
            if not bool(masked.any()):
                break
            if probs is None or bool(changed.any()):
                logits = window.block_logits(model, block)
                calls += 1
                self.nfe[window.rows] += (changed & masked.any(dim=1)).long()
                if self.all_logits is not None:
                    full = logits.new_full((self.nfe.shape[0], *logits.shape[1:]), float("nan"))
                    full[window.rows] = logits
                    self.all_logits.append(full)
                probs = block_probabilities(logits, block, mask_token_id, self.logits_processor, self.warpers, history)
            if self.do_sample:
                tokens = sample_categorical(probs, generator, masked.any(dim=1))
            else:
                tokens = probs.argmax(dim=-1)
            reveal = sampler.select(masked, probs, tokens, step, generator)
            block = torch.where(reveal, tokens, block)
            changed = reveal.any(dim=1) if sampler.reuses_probabilities else torch.ones_like(changed)
        if bool((block == mask_token_id).any()):
            raise RuntimeError(
                f"Sampler {sampler.name!r} left masked tokens after {sampler.max_steps(block_size)} steps."
            )
        return block, calls


__all__ = ["BlockDenoiser", "DecodingMode", "DecodingRequest", "DiffusionMode"]
