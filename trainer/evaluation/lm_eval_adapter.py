# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""lm-evaluation-harness adapter: registers the model type `bd3lm` with lm-eval.

lm-eval is an optional extra (`pip install 'bd3lm[eval]'`). Importing this module registers the model, so use the
Python API or this module's command line (the `lm_eval` command alone cannot see models of other packages):

    python -m bd3lm_trainer.evaluation.lm_eval_adapter --model bd3lm --model_args pretrained=PATH --tasks lambada_openai

or `bd3lm eval PATH --tasks ...`.

* `loglikelihood(context, continuation)` is minus the block NELBO of the continuation given the clean context
  (Arriola et al., 2025, Eq. (8)): a lower bound on log p_θ(continuation | context) under the block factorisation.
  The expectation over the noise is computed exactly by enumerating each block's 2^L' - 1 mask patterns (`exact`,
  the default for L' <= 4) or estimated with `mc_samples` draws per request; it needs neither at L' = 1 with a
  time-independent log-linear model (t ≡ 1) or for `always_mask` models, where the value is the exact conditional
  log-likelihood. For L' > 1 it stays a bound. The context is left-padded so that the continuation starts on a block
  boundary; context tokens are never masked and never counted. `is_greedy` is the one-step greedy test: every
  continuation token is the argmax with its block fully masked.
* `loglikelihood_rolling(text)`: the same bound for the whole text after a BOS/EOS prefix, with a sliding window of
  `rolling_stride` tokens (default `model_length // 2`) for texts longer than the model's window.
* `generate_until`: the model's `generate` (greedy by default, `do_sample` and temperature from the task), cut at the
  task's stop strings.

Each request's noise is seeded from `seed` and its own tokens: scores do not depend on batch size or request order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "The lm-eval adapter needs lm-evaluation-harness: `pip install 'bd3lm[eval]'` (or `pip install lm-eval`)."
    ) from err

from tqdm.auto import tqdm

from modeling_bd3lm.checks_bd3lm import is_int

from ..corpus import resolve_tokenizer
from .likelihood import _is_deterministic, _row_seed, score_continuations
from .loading import load_model_and_tokenizer, resolve_device

# Sampling fields of lm-eval `gen_kwargs` that `generate` understands; `until` and `max_gen_toks` are handled here.
_GENERATE_FIELDS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


class BD3LMEvalHarness(LM):
    """lm-eval model `bd3lm` (see the module docstring for what each request type computes).

    Args:
        pretrained (`str` or `BD3LMForMaskedDiffusion`): a checkpoint folder / Hub id, or a loaded model.
        tokenizer (`str` or tokenizer, *optional*): defaults to the checkpoint's; `bd3lm-corpus` for the embedded one.
        batch_size (`int`, defaults to 8): windows per forward pass.
        mc_samples (`int`, *optional*): noise draws per loglikelihood request; defaults to 1 where the NELBO is exact,
            else 16. The Monte-Carlo error shrinks as 1/sqrt(mc_samples).
        exact (`bool`, *optional*): enumerate the mask patterns instead of sampling (2^L' - 1 forward passes per
            window); defaults to `True` for L' <= 4 (no more passes than 16 draws) and a time-independent model.
        seed (`int`, defaults to 1234): seed of the noise draws and of sampled generations.
        rolling_stride (`int`, *optional*): chunk size of the sliding window for long texts.
        check_greedy (`bool`, defaults to `True`): compute `is_greedy` (one extra forward per window).
        max_gen_toks (`int`, defaults to 256): default new tokens of `generate_until`.
        **generate_kwargs: passed to `generate` (e.g. `sampler`, `num_steps`, `nucleus_p`).
    """

    def __init__(
        self,
        pretrained: Any,
        tokenizer: Any = None,
        batch_size: int | str | None = 8,
        mc_samples: int | None = None,
        seed: int = 1234,
        device: str | None = None,
        dtype: str | None = None,
        rolling_stride: int | None = None,
        check_greedy: bool = True,
        max_gen_toks: int = 256,
        max_batch_size: int | None = None,
        progress: bool = False,
        exact: bool | None = None,
        **generate_kwargs: Any,
    ) -> None:
        super().__init__()
        # lm-eval's command line passes device="cuda:0" unless told otherwise: without CUDA, fall back to the CPU
        # with one warning line rather than crash (see `resolve_device`).
        if isinstance(pretrained, str):
            model, tokenizer = load_model_and_tokenizer(pretrained, tokenizer, device, dtype, device_fallback=True)
        else:
            model = pretrained.to(resolve_device(device, fallback=True)) if device else pretrained
            if tokenizer is None:
                raise ValueError("Pass `tokenizer` together with a loaded model.")
            if isinstance(tokenizer, str):
                tokenizer = resolve_tokenizer(tokenizer)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        if mc_samples is None:
            mc_samples = 1 if _is_deterministic(model.config) else 16
        if not is_int(mc_samples) or mc_samples < 1:
            raise ValueError(f"`mc_samples` must be an integer >= 1, got {mc_samples!r}.")
        if exact is None:
            exact = model.config.block_size <= 4 and not getattr(model.config, "time_conditioning", False)
        self.exact = bool(exact) and not _is_deterministic(model.config)
        self.mc_samples, self.seed, self.rolling_stride = mc_samples, int(seed), rolling_stride
        self.check_greedy, self.max_gen_toks, self.progress = bool(check_greedy), int(max_gen_toks), bool(progress)
        self.generate_kwargs = generate_kwargs
        self._device = model.device
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError("The tokenizer has no BOS or EOS token to condition empty contexts on.")
        self.prefix_token_id = int(prefix)

    # ---- lm-eval metadata read by its loggers ----

    @property
    def max_length(self) -> int:
        return self.model.config.model_length

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "bd3lm")).replace("/", "__")

    # ---- tokenization ----

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Encode the pair jointly (BPE merges across the boundary stay as in the full text), then split."""
        spaces = len(context) - len(context.rstrip())
        if spaces:  # trailing spaces of the context belong to the continuation's first token
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        split = len(self._encode(context)) if context else 0
        context_ids = whole[:split] or [self.prefix_token_id]
        return context_ids, whole[split:]

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        scorable = [i for i, (_, target) in enumerate(pairs) if target]
        for i in set(range(len(pairs))) - set(scorable):
            results[i] = (0.0, True)  # an empty continuation has probability 1
        scores = score_continuations(
            self.model,
            [pairs[i] for i in scorable],
            num_samples=self.mc_samples,
            batch_size=self.batch_size,
            seed=self.seed,
            stride=self.rolling_stride,
            check_greedy=self.check_greedy,
            pad_token_id=self.tokenizer.pad_token_id or 0,
            progress=self.progress,
            exact=self.exact,
        )
        for i, (value, greedy) in zip(scorable, scores):
            results[i] = (-value, bool(greedy))
        return results  # type: ignore[return-value]

    # ---- requests ----

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        results = self._score([self._encode_pair(*req.args) for req in requests])
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        pairs = [([self.prefix_token_id], self._encode(req.args[0])) for req in requests]
        results = [value for value, _ in self._score(pairs)]
        for req, value in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, value)
        return results

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Generate for each request, batching requests that share their generation arguments (left padding)."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        outputs: list[str] = [""] * len(requests)
        config = self.model.config
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1] or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            kwargs = {k: gen_kwargs[k] for k in _GENERATE_FIELDS if gen_kwargs.get(k) is not None}
            if not kwargs.get("do_sample") or kwargs.get("temperature", 1.0) == 0.0:  # lm-eval's greedy spelling
                kwargs = {k: v for k, v in kwargs.items() if k == "repetition_penalty"}
                kwargs["do_sample"] = False
            kwargs = {**kwargs, **self.generate_kwargs}
            room = config.model_length - config.block_size  # the prompt window must leave a block for generation
            occurrences: dict[tuple[int, ...], int] = {}
            for start in tqdm(range(0, len(indices), self.batch_size), disable=not self.progress, desc="generating"):
                chunk = indices[start : start + self.batch_size]
                prompts = [(self._encode(requests[i].args[0]) or [self.prefix_token_id])[-room:] for i in chunk]
                width = max(len(p) for p in prompts)
                pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prefix_token_id
                ids = torch.full((len(prompts), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                seeds = []
                for r, p in enumerate(prompts):
                    ids[r, width - len(p) :], mask[r, width - len(p) :] = torch.tensor(p), 1
                    # sampling: a per-request seed from `seed`, the prompt and how often it came before (lm-eval's
                    # repeats), so a request's text depends neither on the batch size nor on the order of the
                    # requests; greedy decoding is batch-invariant without one
                    occurrences[tuple(p)] = occurrences.get(tuple(p), -1) + 1
                    seeds.append(_row_seed(self.seed, p, [occurrences[tuple(p)]]))
                out = self.model.generate(
                    input_ids=ids.to(self.model.device),
                    attention_mask=mask.to(self.model.device),
                    max_new_tokens=max_new,
                    return_dict_in_generate=True,
                    eos_token_id=self.tokenizer.eos_token_id,
                    pad_token_id=pad,
                    seed=seeds if kwargs.get("do_sample") else None,
                    **kwargs,
                )
                for r, i in enumerate(chunk):
                    text = self.tokenizer.decode(out.sequences[r, width:].tolist(), skip_special_tokens=True)
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs


# Registered under `bd3lm` when imported as a module; `python -m` runs this file as `__main__`
# and registers the class of the package module instead (below), so that the name is bound once.
if __name__ != "__main__":
    register_model("bd3lm")(BD3LMEvalHarness)


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    mc_samples: int | None = None,
    seed: int = 1234,
    exact: bool | None = None,
) -> dict[str, Any]:
    """Run lm-eval `tasks` on a loaded model; returns lm-eval's per-task `results` dictionary."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    harness = BD3LMEvalHarness(model, tokenizer, batch_size=batch_size, mc_samples=mc_samples, seed=seed, exact=exact)
    out = lm_eval.simple_evaluate(
        model=harness,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=TaskManager(include_path=include_path),
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if out is None:  # non-zero ranks of a distributed run
        return {}
    return out["results"]


def main() -> None:
    """lm-eval's own command line, with the `bd3lm` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":  # run as a script: the package module (imported here) registers the model
    from .lm_eval_adapter import main as registered_main

    registered_main()


__all__ = ["BD3LMEvalHarness", "run_lm_eval"]
