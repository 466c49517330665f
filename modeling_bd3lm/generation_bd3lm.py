# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Block-by-block generation for BD3-LM (Arriola et al., ICLR 2025), following the official block sampler.

One `generate()` for every decoding mode: steps 1-2 below are shared, then `generation_mode` (a field of the generation
config) picks the mode in `modes_bd3lm.DECODING_MODES`: `"diffusion"` (steps 3-5, the default), `"autoregressive"` or
`"draft_verify"` (the clean stream as an autoregressive model: `autoregressive_bd3lm.py`, `draft_verify_bd3lm.py`).

`generate()` outline (the numbered steps in the code follow it; keep both in sync):

1. Resolve a `BD3LMGenerationConfig` from the model's config, the one passed in and the keyword arguments.
2. Prepare the prompt: left padding (a right-padded row is rotated to the left first), and blocks aligned to the END
   of the prompt (extra left padding so that the prompt ends at a block boundary). A row then sees the same block
   boundaries, relative positions and keys whatever the batch it is in. Without a prompt, generation starts from BOS
   (a 1-token prompt).
3. The prompt is the first committed window. With the cache it is written by the first block's first call: that call
   runs `prompt ⊕ block` with `use_cache=True` (the block-causal x_0 stream of training, so the cache is exact) and
   drops the block's own keys and values again.
4. For each new block: slide the window if `committed + block_size > model_length` (drop the oldest blocks; the
   cache holds pre-rotary keys, so positions are re-based), start from `block_size` mask tokens, and denoise
   (`BlockDenoiser`, with a sampler of `sampling_bd3lm.py`), calling the network on the block only through the
   window of `cache_bd3lm.py` (`use_cache=False`: attend to the committed tokens without committing). A clean block
   is checked for EOS and stopping criteria, streamed, and committed: it rides along in the next block's first call
   like the prompt did, so committing costs no call of its own (beyond `model_length` it gets its own call before the
   window slides, so that its keys see the window the official sampler gives them). Rows that stop leave the batch,
   so they cost no further calls.
5. Assemble the output: the prompt as given (its padding kept where it was) followed by the new tokens, padding after
   a stop.

With `use_cache=False` every step runs the whole window instead (nothing is committed to a cache); inside
`model_length` this gives the same logits up to float rounding and, for a fixed seed, the same tokens.

Randomness (the RNG contract; `_resolve_generator`):

* `seed=s` or `seed=[s_0, ..., s_{B-1}]` (one per prompt): every row draws from its own CPU `torch.Generator`
  (`RowGenerators`) seeded with its prompt's seed; the j-th of `num_return_sequences` (j > 0) with
  `derive_seed(s, j)`. A row draws only while its block still has masked positions, so the numbers it consumes depend
  on its own trajectory only: its tokens equal those of the same prompt generated alone with the same seed, in any
  batch, cached or not (batch invariance, as the per-request seeds of serving engines). Equal prompts with equal seeds
  give equal rows.
* `generator=g`: one stream shared by the batch: reproducible for the same batch, but a row's draws depend on the rows
  around it.
* neither, `do_sample=True`: torch's global RNG, one stream shared by the batch (reproducible with `torch.manual_seed`).
* neither, `do_sample=False`: the tokens are the argmax, but `first_hitting` and `ddpm` still draw which positions to
  reveal; they draw from per-row streams seeded with `GREEDY_SEED`, so greedy output depends neither on the global RNG
  nor on the batch. Keeping the samplers' own draws (a uniformly random position; each masked position revealed with
  probability (α_s - α_t) / (1 - α_t)) with a fixed seed keeps their distribution over reveal orders; a deterministic
  rule instead (say left to right) would turn `first_hitting` into autoregressive decoding inside the block. The
  confidence samplers draw nothing when greedy.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
)
from transformers.generation.stopping_criteria import StoppingCriteriaList

from .cache_bd3lm import CACHE_FIELD, CommittedWindow
from .checks_bd3lm import check_attention_mask, check_special_token_ids, check_token_ids, check_tokenizer_fits
from .decoding_bd3lm import BlockDenoiser, DecodingRequest
from .gating_bd3lm import frozen_gated_layers
from .generation_config_bd3lm import BD3LMGenerationConfig
from .modes_bd3lm import DECODING_MODES
from .outputs_bd3lm import BD3LMGenerateOutput
from .sampling_bd3lm import (
    SAMPLERS,
    BD3LMSampler,
    RandomSource,
    RowGenerators,
    build_logits_warpers,
    build_stopping_criteria,
    derive_seed,
    first_stops,
)

# HF defaults applied when a field is None (transformers 5 leaves them unset in the config).
_HF_DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
# Seed of every row's stream under greedy decoding without a `seed`: which positions `first_hitting` and `ddpm` reveal
# is random even when the tokens are the argmax, and must depend neither on torch's global RNG nor on the batch.
GREEDY_SEED = 0


# ----------------------------------------------------------------------------------------------------------------------
# Generation


class BD3LMGenerationMixin:
    """`generate()` for BD3-LM: prompt-conditioned block-by-block sampling with an exact KV cache (module docstring).

    The class name contains `GenerationMixin` so that transformers' `can_generate()` is true; it does not inherit
    `transformers.GenerationMixin`, whose autoregressive machinery does not apply.
    """

    # ---- generation config plumbing (works on transformers 4.57 and 5.x) ----

    @property
    def generation_config(self) -> BD3LMGenerationConfig | None:
        return self.__dict__.get("_bd3lm_generation_config")

    @generation_config.setter
    def generation_config(self, value: GenerationConfig | None) -> None:
        # transformers 4.57 builds and loads plain `GenerationConfig`s; upgrade whatever is assigned.
        if value is not None and not isinstance(value, BD3LMGenerationConfig):
            if not isinstance(value, GenerationConfig):
                raise TypeError(f"`generation_config` must be a GenerationConfig, got {type(value).__name__}.")
            value = BD3LMGenerationConfig.from_dict(value.to_dict())
        self.__dict__["_bd3lm_generation_config"] = value

    def adjust_generation_fn(
        self,
        generation_config: GenerationConfig | None = None,
        from_auto_class: bool = False,
        from_pipeline: Any = None,
        pretrained_model_name_or_path: str | None = None,
        cache_dir: Any = None,
        force_download: bool = False,
        proxies: Any = None,
        local_files_only: bool = False,
        token: Any = None,
        revision: str | None = None,
        subfolder: str = "",
        trust_remote_code: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """Called by transformers 5 `from_pretrained`: load `generation_config.json` as a `BD3LMGenerationConfig`."""
        if generation_config is not None:
            self.generation_config = BD3LMGenerationConfig.from_dict(generation_config.to_dict())
        elif pretrained_model_name_or_path is not None:
            try:
                self.generation_config = BD3LMGenerationConfig.from_pretrained(
                    pretrained_model_name_or_path,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    proxies=proxies,
                    local_files_only=local_files_only,
                    token=token,
                    revision=revision,
                    subfolder=subfolder,
                    _from_auto=from_auto_class,
                    _from_pipeline=from_pipeline,
                )
            except OSError:  # no generation_config.json: keep the one built from the model config
                pass

    def _prepare_generation_config(
        self, generation_config: GenerationConfig | None = None, use_model_defaults: bool | None = None, **kwargs: Any
    ) -> tuple[BD3LMGenerationConfig, dict[str, Any]]:
        """Called by transformers 4.57 pipelines to build their generation config: `generation_config` (the pipeline's
        defaults, e.g. `max_new_tokens=256, do_sample=True, temperature=0.7` for text generation) under the fields the
        model's own generation config sets to non-default values, then `kwargs`. Returns the config and the kwargs it
        does not use. transformers 5 pipelines merge the same way themselves, so a pipeline call gives the same
        tokens on both."""
        model_config = self.generation_config or BD3LMGenerationConfig.from_model_config(self.config)
        if generation_config is None:
            config = copy.deepcopy(model_config)
        else:
            config = BD3LMGenerationConfig.from_dict(generation_config.to_dict())
            if use_model_defaults is not False:
                defaults = BD3LMGenerationConfig()
                for key, value in model_config.to_dict().items():
                    if key.startswith("_") or key == "transformers_version":
                        continue
                    default = getattr(defaults, key, None)
                    if getattr(config, key, None) == default and value != default:
                        setattr(config, key, value)
        unused = config.update(**kwargs)
        return config, unused

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> dict[str, Any]:
        """Identity; present because `peft.PeftModelForCausalLM` reads it (generation does not use it)."""
        return {"input_ids": input_ids, **kwargs}

    # ---- generate ----

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer: Any = None,
        generator: torch.Generator | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> torch.LongTensor | BD3LMGenerateOutput:
        r"""
        Generate block by block (module docstring has the outline).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, prompt_len)`, *optional*):
                Padded prompts, one run of tokens per row (left padding; right padding is accepted too). Without them
                generation starts from `bos_token_id`.
            attention_mask (`torch.Tensor` of shape `(batch, prompt_len)`, *optional*):
                1 for prompt tokens, 0 for padding. Inferred from `pad_token_id` when omitted.
            generation_config (`GenerationConfig`, *optional*):
                Overrides `model.generation_config`; keyword arguments override both (`max_new_tokens`, `do_sample`,
                `temperature`, `sampler`, `num_steps`, `confidence_threshold`, `use_cache`, `seed`, ...; see
                [`BD3LMGenerationConfig`]).
            logits_processor (`LogitsProcessorList`, *optional*):
                Applied to the float64 scores of every position of the block (mask token excluded), before the sampling
                warpers. Each position gets `input_ids` = the row so far with the block's current state appended.
            stopping_criteria (`StoppingCriteriaList`, *optional*):
                Checked at every position of a finished block; a row stops at the first position that fires.
            streamer (`BaseStreamer`, *optional*):
                Receives the prompt, then each committed block (`put`), then `end()`.
            generator (`torch.Generator`, *optional*):
                One stream for all the randomness of the batch (rows then depend on each other's draws); pass `seed`
                instead for per-row streams (batch-invariant). Without either, sampling uses torch's global RNG and
                greedy decoding per-row streams seeded with 0 (module docstring, "Randomness").
            tokenizer (`PreTrainedTokenizerBase`, *optional*):
                Needed for `stop_strings`.

        Returns:
            `torch.LongTensor` of shape `(batch * num_return_sequences, prompt_len + new_len)`, or a
            [`BD3LMGenerateOutput`] when `return_dict_in_generate=True`.
        """
        # 1. configuration
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        kwargs.pop("token_type_ids", None)  # some tokenizers return it; BD3-LM has no segment embeddings
        config = self._resolve_generation_config(generation_config, kwargs)
        model_config = self.config
        device = self.device
        mask_id = (
            config.mask_token_id if config.mask_token_id is not None else getattr(model_config, "mask_token_id", None)
        )
        if mask_id is None:
            raise ValueError("No mask token: set `mask_token_id` in the model config (or the generation config).")
        bos_id, pad_id, eos_ids = self._special_tokens(config)
        check_special_token_ids(
            {"mask_token_id": mask_id, "bos_token_id": bos_id, "pad_token_id": pad_id, "eos_token_id": eos_ids},
            model_config.vocab_size,
        )
        self._check_hooks(logits_processor, stopping_criteria, streamer, tokenizer)
        do_sample = bool(self._value(config, "do_sample"))
        use_cache = config.use_cache is not False
        sampler = self._prepare_sampler(config)

        # 2. prompt: validate, expand, align the blocks to its end
        given, prompt_mask = self._prepare_prompt(input_ids, attention_mask, bos_id, pad_id, eos_ids, device)
        prompt, prompt_mask = self._left_align(given, prompt_mask)  # `given` is what the output starts with
        repeats = config.num_return_sequences or 1
        generator = self._resolve_generator(generator, config.seed, do_sample, prompt.shape[0], repeats)
        if repeats > 1:
            prompt, prompt_mask = prompt.repeat_interleave(repeats, 0), prompt_mask.repeat_interleave(repeats, 0)
            given = given.repeat_interleave(repeats, 0)
        batch, prompt_len = prompt.shape
        if config.max_new_tokens is not None:
            max_new_tokens = config.max_new_tokens
        else:
            max_new_tokens = self._value(config, "max_length") - prompt_len
            if max_new_tokens <= 0:
                raise ValueError(
                    f"`max_length`={self._value(config, 'max_length')} leaves no room after the {prompt_len}-token "
                    "prompt; set `max_new_tokens` (> 0) instead."
                )
        filler = pad_id if pad_id is not None else mask_id  # never attended; any valid id works
        out_pad = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else mask_id)
        logits_processor, warpers = self._prepare_processors(config, logits_processor, do_sample)
        stop_strings = getattr(config, "stop_strings", None)
        if stop_strings and tokenizer is None:
            raise ValueError("`stop_strings` needs the tokenizer: pass `tokenizer=` to generate().")
        criteria = build_stopping_criteria(
            stopping_criteria, tokenizer, stop_strings, config.entropy_stop, config.entropy_stop_window, prompt_len
        )
        request = DecodingRequest(
            config=config,
            prompt=prompt,
            prompt_mask=prompt_mask,
            given=given,
            max_new_tokens=max_new_tokens,
            mask_token_id=mask_id,
            eos_ids=eos_ids,
            out_pad=out_pad,
            filler=filler,
            do_sample=do_sample,
            use_cache=use_cache,
            logits_processor=logits_processor,
            warpers=warpers,
            criteria=criteria,
            streamer=streamer,
            generator=generator,
            sampler=sampler,
        )
        mode = DECODING_MODES[config.generation_mode]  # the config checked the name
        mode.check(self, request)
        with frozen_gated_layers(self.backbone):  # found once per call, not at every network call
            return mode.run(self, request)

    def _generate_blocks(self, request: DecodingRequest) -> torch.LongTensor | BD3LMGenerateOutput:
        """Steps 3-5 of the outline: block diffusion (`generation_mode="diffusion"`)."""
        config, prompt, prompt_mask, given = request.config, request.prompt, request.prompt_mask, request.given
        streamer, max_new_tokens, out_pad, mask_id = (
            request.streamer,
            request.max_new_tokens,
            request.out_pad,
            request.mask_token_id,
        )
        block_size, model_length = self.config.block_size, self.config.model_length
        batch, device = prompt.shape[0], prompt.device
        # 3. the prompt is the first committed window (prefilled by the first block's first call when cached)
        cache = DynamicCache() if request.use_cache else None
        denoiser = self.denoiser
        window = CommittedWindow.from_prompt(
            prompt,
            prompt_mask,
            block_size,
            model_length,
            request.filler,
            cache,
            shift=denoiser.predicts_next_token,
            reprefill=denoiser.caches_after_positions,
        )
        if streamer is not None:
            streamer.put(given.cpu())

        num_forwards = 0
        # 4. block loop
        num_blocks = -(-max_new_tokens // block_size)
        new_tokens = torch.full((batch, num_blocks * block_size), out_pad, dtype=torch.long, device=device)
        new_lengths = torch.zeros(batch, dtype=torch.long, device=device)
        denoiser = BlockDenoiser(
            sampler=request.sampler,
            mask_token_id=mask_id,
            do_sample=request.do_sample,
            logits_processor=request.logits_processor,
            warpers=request.warpers,
            generator=request.generator,
            nfe=torch.zeros(batch, dtype=torch.long, device=device),
            all_logits=[] if config.output_logits else None,
        )
        eos_tensor, criteria = request.eos_tensor, request.criteria
        max_time = getattr(config, "max_time", None)
        start_time = time.time()
        cache_rows = window.rows
        for k in range(num_blocks):
            begin = k * block_size
            num_forwards += window.slide(block_size, model_length, self)
            # a. denoise the block from all-mask
            block = torch.full((len(window.rows), block_size), mask_id, dtype=torch.long, device=device)
            block, calls = denoiser.denoise(
                self,
                block,
                window,
                lambda begin=begin: torch.cat((prompt[window.rows], new_tokens[window.rows, :begin]), 1),
            )
            num_forwards += calls
            # b. stops: EOS, stopping criteria and max_new_tokens
            valid = min(block_size, max_new_tokens - begin)
            new_tokens[window.rows, begin : begin + block_size] = block
            kept, stopped = first_stops(
                block[:, :valid],
                eos_tensor,
                criteria,
                lambda j, begin=begin: torch.cat(
                    (prompt[window.rows], new_tokens[window.rows, : begin + j + 1]), dim=1
                ),
            )
            tail = torch.arange(block_size, device=device)[None, :] >= kept[:, None]
            new_tokens[window.rows, begin : begin + block_size] = block.masked_fill(tail, out_pad)
            new_lengths[window.rows] += kept
            if streamer is not None:
                if batch == 1:
                    streamer.put(new_tokens[0, begin : begin + int(kept[0])].cpu())
                else:
                    streamer.put(new_tokens[:, begin : begin + valid].cpu())
            # c. rows that stopped leave the batch; the others commit the clean block
            cache_rows = window.rows
            timed_out = max_time is not None and time.time() - start_time > max_time
            if k == num_blocks - 1 or timed_out or bool(stopped.all()):
                break
            if bool(stopped.any()):
                keep = (~stopped).nonzero().squeeze(1)
                window.keep(keep)
                block = block[keep]
            window.commit(block)
            cache_rows = window.rows
        if streamer is not None:
            streamer.end()

        # 5. output
        sequences = torch.cat((given, new_tokens[:, : int(new_lengths.max())]), dim=1)
        if not config.return_dict_in_generate:
            return sequences
        return BD3LMGenerateOutput(
            sequences=sequences,
            nfe=denoiser.nfe,
            num_forwards=num_forwards,
            tokens_per_forward=new_lengths.double() / denoiser.nfe.clamp_min(1).double(),
            logits=tuple(denoiser.all_logits) if denoiser.all_logits is not None else None,
            cache_rows=cache_rows,
            generation_mode="diffusion",
            **{CACHE_FIELD: window.cache},
        )

    # ---- input preparation helpers ----

    def _prepare_sampler(self, config: BD3LMGenerationConfig) -> BD3LMSampler:
        """The sampler `config` names (`resolved_sampler`), with its settings and the model's noise schedule."""
        threshold = config.confidence_threshold if config.confidence_threshold is not None else 0.9
        schedule = getattr(self, "noise_schedule", None)
        return SAMPLERS[config.resolved_sampler](
            num_steps=config.num_steps,
            tokens_per_step=config.tokens_per_step,
            confidence_threshold=threshold,
            mask_probability=schedule.mask_probability if schedule is not None else None,
        )

    def _prepare_processors(
        self, config: BD3LMGenerationConfig, logits_processor: LogitsProcessorList | None, do_sample: bool
    ) -> tuple[LogitsProcessorList, LogitsProcessorList]:
        """`(logits processors, sampling warpers)`: the caller's processors plus the repetition penalty, and the
        temperature / top-k / top-p / nucleus warpers when sampling."""
        processors = LogitsProcessorList(logits_processor or [])
        if self._value(config, "repetition_penalty", 1.0) not in (None, 1.0):
            processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
        warpers = LogitsProcessorList()
        if do_sample:
            warpers = build_logits_warpers(
                self._value(config, "temperature"),
                self._value(config, "top_k"),
                self._value(config, "top_p"),
                config.nucleus_p,
            )
        return processors, warpers

    def _resolve_generation_config(
        self, generation_config: GenerationConfig | None, kwargs: dict
    ) -> BD3LMGenerationConfig:
        base = generation_config if generation_config is not None else self.generation_config
        if base is None:
            base = BD3LMGenerationConfig.from_model_config(self.config)
        if isinstance(base, BD3LMGenerationConfig):
            config = copy.deepcopy(base)
        elif isinstance(base, GenerationConfig):
            config = BD3LMGenerationConfig.from_dict(base.to_dict())
        else:
            raise TypeError(f"`generation_config` must be a GenerationConfig, got {type(base).__name__}.")
        unused = config.update(**kwargs)
        if unused:
            raise ValueError(
                f"generate() got arguments it does not use: {sorted(unused)}. See BD3LMGenerationConfig for the "
                "supported fields."
            )
        return config

    @staticmethod
    def _value(config: GenerationConfig, name: str, default: Any = None) -> Any:
        value = getattr(config, name, None)
        return value if value is not None else _HF_DEFAULTS.get(name, default)

    def _special_tokens(self, config: BD3LMGenerationConfig) -> tuple[int | None, int | None, list[int]]:
        """bos, pad and the list of eos ids, from the generation config or else the model config."""

        def pick(name: str) -> Any:
            value = getattr(config, name, None)
            return value if value is not None else getattr(self.config, name, None)

        eos = pick("eos_token_id")
        eos_ids = [] if eos is None else ([int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)])
        return pick("bos_token_id"), pick("pad_token_id"), eos_ids

    def _check_hooks(self, logits_processor: Any, stopping_criteria: Any, streamer: Any, tokenizer: Any) -> None:
        """The user's processors, criteria, streamer and tokenizer are of the right kind, and the tokenizer (also the
        streamer's) produces no id past the model's vocabulary."""
        for name, value in (("logits_processor", logits_processor), ("stopping_criteria", stopping_criteria)):
            if value is None:
                continue
            if not isinstance(value, (list, tuple)):
                raise TypeError(
                    f"`{name}` must be a list (e.g. {'LogitsProcessorList' if name == 'logits_processor' else 'StoppingCriteriaList'}"
                    f"([...])) of callables, got {type(value).__name__}."
                )
            for item in value:
                if not callable(item):
                    raise TypeError(f"Every entry of `{name}` must be callable, got {type(item).__name__}.")
        if streamer is not None and not all(callable(getattr(streamer, m, None)) for m in ("put", "end")):
            raise TypeError(
                f"`streamer` must have `put(value)` and `end()` methods (a transformers BaseStreamer), got "
                f"{type(streamer).__name__}."
            )
        if tokenizer is not None and not callable(getattr(tokenizer, "convert_ids_to_tokens", None)):
            raise TypeError(f"`tokenizer` must be a transformers tokenizer, got {type(tokenizer).__name__}.")
        vocab_size = self.config.vocab_size
        check_tokenizer_fits(tokenizer, vocab_size, "`tokenizer`")
        check_tokenizer_fits(getattr(streamer, "tokenizer", None), vocab_size, "streamer's tokenizer")

    @staticmethod
    def _resolve_generator(
        generator: torch.Generator | None, seed: int | list[int] | None, do_sample: bool, prompts: int, repeats: int
    ) -> RandomSource:
        """The source of the sampler's randomness (module docstring, "Randomness"): the caller's `generator` (one
        stream for the batch), per-row generators from `seed` (or from 0 when greedy), or None (torch's global RNG)."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
        if seed is not None and generator is not None:
            raise ValueError("Pass either `seed` or `generator`, not both.")
        if generator is not None:
            return generator
        if seed is None:
            if do_sample:
                return None
            seed = GREEDY_SEED
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * prompts
        if len(seeds) != prompts:
            raise ValueError(
                f"`seed` has {len(seeds)} entries for {prompts} prompts; pass one seed per row of `input_ids` (or an "
                "int for all)."
            )
        return RowGenerators.from_seeds([derive_seed(s, j) for s in seeds for j in range(repeats)])

    def _prepare_prompt(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        bos_id: int | None,
        pad_id: int | None,
        eos_ids: list[int],
        device: torch.device,
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Validate a padded prompt batch (or build the BOS prompt) and return `(ids, mask)` on `device`: each row must
        be one run of tokens, left-padded or right-padded (`_left_align` moves the padding to the left)."""
        if input_ids is None:
            if attention_mask is not None:
                raise ValueError("`attention_mask` was given without `input_ids`.")
            if bos_id is None:
                raise ValueError(
                    "Unconditional generation starts from BOS, but neither the generation config nor the model config "
                    "has a `bos_token_id`; pass `input_ids` or set `bos_token_id`."
                )
            input_ids = torch.tensor([[bos_id]], dtype=torch.long)
        check_token_ids("input_ids", input_ids, self.config.vocab_size)
        input_ids = input_ids.to(device=device, dtype=torch.long)
        if attention_mask is None:
            if pad_id is not None and pad_id not in eos_ids and bool((input_ids == pad_id).any()):
                attention_mask = input_ids != pad_id
            else:
                attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        check_attention_mask(
            "attention_mask", attention_mask, tuple(input_ids.shape), "the shape of `input_ids`: the tokenizer's mask"
        )
        attention_mask = attention_mask.to(device).bool()
        if not bool(attention_mask.any(dim=1).all()):
            raise ValueError("A row of `attention_mask` is all padding; every prompt needs at least one token.")
        runs = attention_mask[:, 0].int() + (attention_mask[:, 1:].int() > attention_mask[:, :-1].int()).sum(dim=1)
        if bool((runs > 1).any()):
            raise ValueError(
                "`attention_mask` has padding between tokens; each prompt must be one run of tokens, padded on the "
                "left (tokenizer.padding_side = 'left') or on the right."
            )
        return input_ids, attention_mask

    @staticmethod
    def _left_align(ids: torch.LongTensor, mask: torch.BoolTensor) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Rotate every right-padded row so that its tokens end the row (padding first); left-padded rows are
        unchanged. transformers 4.x pipelines pad on the tokenizer's side, which is the right for most tokenizers."""
        width = ids.shape[1]
        shift = mask.int().flip(1).argmax(dim=1, keepdim=True)  # padding columns after each row's last token
        if not bool(shift.any()):
            return ids, mask
        source = (torch.arange(width, device=ids.device)[None, :] - shift) % width
        return ids.gather(1, source), mask.gather(1, source)


__all__ = ["CACHE_FIELD", "BD3LMGenerateOutput", "BD3LMGenerationConfig", "BD3LMGenerationMixin", "BlockDenoiser"]
