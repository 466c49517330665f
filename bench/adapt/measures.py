"""Measurements of the adaptation study: held-out likelihood, samples judged by the unadapted source, decode speed.

Everything here takes the source causal LM (an `AutoModelForCausalLM`) and/or the adapted `BD3LMForMaskedDiffusion`
with the source's tokenizer (the conversion keeps it, plus a mask token):

* [`heldout_chunks`]: evenly spaced `model_length`-token chunks of the embedded corpus' validation split, wrapped the
  way `dataset_perplexity` wraps documents (EOS after each).
* [`ar_nll_per_chunk`] / [`bd3_nelbo_per_chunk`]: -log p of tokens 1..n-1 of every chunk under the source (exact) and
  the block NELBO bound of the adapted model (Eq. (8), unbiased U[0, 1] noise), on the same tokens.
* [`ar_samples`] / [`bd3_samples`]: continuations of the same prompts (left-padded batches) with HF `generate()` +
  KV cache and with the BD3 samplers; special tokens are suppressed by the same `SuppressTokensLogitsProcessor` in
  both, so every row has exactly `max_new_tokens` new tokens.
* `judge_continuations` (the package's, `bd3lm_trainer.evaluation`): gen-PPL of continuations under the unadapted source (the text is decoded and re-tokenised,
  the prompt is context and never scored) and the unigram entropy of the continuation tokens.
* [`decode_speed`]: tokens/s of AR `generate()` and of BD3 settings, timed side by side (interleaved repeats).
* [`network_time`]: where a `generate()` call's wall time goes: the forward calls of named modules and their seconds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

from bd3lm_trainer.evaluation import judge_continuations, nelbo
from bench.common import interleaved_times
from bench.stats import evenly_spaced, paired_difference, summarise, wrapped_chunks

# ----------------------------------------------------------------------------------------------------------------------
# Held-out text


def heldout_chunks(texts: Sequence[str], tokenizer: Any, model_length: int, num_chunks: int | None) -> list[list[int]]:
    """`num_chunks` full chunks of `model_length` tokens of `bench.stats.wrapped_chunks`, evenly spaced over the
    wrapped documents (so every validation document is represented), or all full chunks when `num_chunks` is None."""
    full = [c for c in wrapped_chunks(texts, tokenizer, model_length) if len(c) == model_length]
    return evenly_spaced(full, num_chunks)


def _stack(chunks: Sequence[Sequence[int]]) -> torch.Tensor:
    return torch.tensor([list(c) for c in chunks], dtype=torch.long)


@torch.no_grad()
def ar_nll_per_chunk(model, chunks: Sequence[Sequence[int]], batch_size: int) -> torch.Tensor:
    """Σ_{i>=1} -log p(x_i | x_<i) per chunk under a causal LM (float64), exactly what its `labels=` loss averages."""
    return ar_token_nll(model, chunks, batch_size).sum(1)


@torch.no_grad()
def bd3_nelbo_per_chunk(model, chunks: Sequence[Sequence[int]], draws: int, seed: int, batch_size: int) -> torch.Tensor:
    """The block NELBO (Eq. (8), t ∼ U[0, 1] with `draws` stratified draws, `nelbo`'s unbiased estimator) of tokens
    1..n-1 of every chunk, position 0 clean and not counted: the same tokens `ar_nll_per_chunk` scores."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sums = []
    for start in range(0, len(chunks), batch_size):
        out = nelbo(model, _stack(chunks[start : start + batch_size]), None, None, draws, generator, ignore_bos=True)
        sums.append(out.per_sequence.double().cpu())
    return torch.cat(sums)


def summarise_nll(sums: torch.Tensor, tokens_per_chunk: int) -> dict[str, float]:
    """Token-mean NLL, its standard error over chunks and the perplexity exp(mean) with its ±1 SE range
    (`bench.stats.summarise` of equal-length chunks, under this study's key names)."""
    shared = summarise(sums, torch.full_like(sums, float(tokens_per_chunk)))
    return {
        "nll": shared["nelbo"],
        "nll_se": shared["nelbo_se"],
        "ppl": shared["ppl"],
        "ppl_lo": shared["ppl_lo"],
        "ppl_hi": shared["ppl_hi"],
        "chunks": shared["num_chunks"],
        "tokens": shared["num_tokens"],
    }


def paired_ratio(sums_a: torch.Tensor, sums_b: torch.Tensor, tokens_per_chunk: int) -> dict[str, float]:
    """exp(NLL_a - NLL_b) per token on the same chunks, with the SE of the paired difference (chunk difficulty
    cancels): `bench.stats.paired_difference` of equal-length chunks."""
    diff = paired_difference(sums_a, sums_b, torch.full_like(sums_a, float(tokens_per_chunk)))
    return {"ratio": diff["ppl_ratio"], "diff": diff["diff"], "diff_se": diff["diff_se"]}


@torch.no_grad()
def ar_token_nll(model, chunks: Sequence[Sequence[int]], batch_size: int) -> torch.Tensor:
    """-log p(x_i | x_<i) of every token i >= 1 under a causal LM, `(chunks, length - 1)` float64."""
    model.eval()
    rows = []
    for start in range(0, len(chunks), batch_size):
        ids = _stack(chunks[start : start + batch_size])
        logits = model(input_ids=ids).logits[:, :-1].float()
        rows.append(F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").double())
    return torch.cat(rows)


@torch.no_grad()
def block_position_profile(model, chunks: Sequence[Sequence[int]], batch_size: int, ar_nll: torch.Tensor) -> dict:
    """Where the BD3-LM loses to the AR model, by offset k of a token in its block (blocks 1.. of every chunk; block 0
    stays clean). Mean -log p_θ(x_k | x_t, clean earlier blocks) from the vectorised `x_t ⊕ x_0` pass when

    * `all_masked`: the whole block is masked (the first call on a fresh block: what confidence decoding chooses from);
    * `left_revealed`: the tokens before k in the block are clean, the rest masked (left-to-right decoding, one token
      per call: k = 0 is the AR position);

    beside the AR model's -log p(x_k | x_<k) on the same tokens (`ar_nll`: `ar_token_nll` of the same chunks)."""
    model.eval()
    size, mask_id = model.config.block_size, model.config.mask_token_id
    x0 = _stack(chunks)
    length = x0.shape[1]
    offset = torch.arange(length) % size
    scored = torch.arange(length) >= size  # blocks 1..

    def nll(x_t: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(x0), batch_size):
            logits = model(input_ids=x0[start : start + batch_size], noisy_input_ids=x_t[start : start + batch_size])
            logp = logits.logits.float().log_softmax(-1)
            out.append(-logp.gather(-1, x0[start : start + batch_size, :, None])[..., 0].double())
        return torch.cat(out)

    all_masked = nll(torch.where(scored, torch.full_like(x0, mask_id), x0))
    left = torch.zeros_like(all_masked)
    for k in range(size):
        x_t = torch.where(scored & (offset >= k), torch.full_like(x0, mask_id), x0)
        left[:, offset == k] = nll(x_t)[:, offset == k]
    ar = torch.cat((torch.zeros(len(x0), 1, dtype=torch.float64), ar_nll), dim=1)  # ar_nll starts at token 1
    rows = []
    for k in range(size):
        sel = scored & (offset == k)
        rows.append(
            {
                "offset": k,
                "all_masked": float(all_masked[:, sel].mean()),
                "left_revealed": float(left[:, sel].mean()),
                "ar": float(ar[:, sel].mean()),
                "tokens": int(sel.sum()) * len(x0),
            }
        )
    return {
        "by_offset": rows,
        "all_masked": float(all_masked[:, scored].mean()),
        "left_revealed": float(left[:, scored].mean()),
        "ar": float(ar[:, scored].mean()),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and sampling


def special_ids(tokenizer: Any) -> list[int]:
    """Every special token id the tokenizer knows (BOS, EOS, PAD, the chat markers, the mask): never sampled here."""
    return sorted({i for i in tokenizer.all_special_ids if i is not None})


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids` / `attention_mask` of the prompts, no special tokens added (SmolLM2 adds none)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return dict(tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False))
    finally:
        tokenizer.padding_side = side


@dataclass(frozen=True)
class Setting:
    """One decoding configuration of the adapted model. `sampler` is a BD3 sampler name; `value` is the threshold of
    `confidence_threshold` or k of `topk_confidence`; `do_sample` False takes the argmax candidate."""

    sampler: str
    value: float | int | None = None
    do_sample: bool = True

    @property
    def name(self) -> str:
        short = {"confidence_threshold": "thr", "topk_confidence": "top", "first_hitting": "one"}.get(self.sampler)
        value = "" if self.value is None else f"{self.value:g}"
        return f"{short or self.sampler}{value}_{'sampled' if self.do_sample else 'greedy'}"

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sampler": self.sampler, "do_sample": self.do_sample}
        if self.sampler == "confidence_threshold":
            out["confidence_threshold"] = float(self.value)
        elif self.value is not None:
            out["tokens_per_step"] = int(self.value)
        return out


def _suppress(tokenizer: Any) -> LogitsProcessorList:
    return LogitsProcessorList([SuppressTokensLogitsProcessor(special_ids(tokenizer))])


@torch.no_grad()
def ar_samples(
    model,
    tokenizer,
    prompts: Sequence[str],
    new_tokens: int,
    do_sample: bool,
    *,
    top_p: float,
    temperature: float,
    seed: int,
) -> dict[str, Any]:
    """Continuations of every prompt by HF `generate()` with the KV cache (one row per prompt, left-padded)."""
    inputs = encode_prompts(tokenizer, prompts)
    torch.manual_seed(seed)  # HF sampling draws from the global generator
    kwargs = {"top_p": top_p, "temperature": temperature, "top_k": 0} if do_sample else {}
    out = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        do_sample=do_sample,
        logits_processor=_suppress(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    return {"continuations": out[:, inputs["input_ids"].shape[1] :].tolist(), "calls": new_tokens * len(prompts)}


@torch.no_grad()
def bd3_samples(
    model,
    tokenizer,
    prompts: Sequence[str],
    new_tokens: int,
    setting: Setting,
    *,
    top_p: float,
    temperature: float,
    seed: int,
) -> dict[str, Any]:
    """Continuations by the adapted model's `generate()` (blocks left to right on the KV cache) under one setting;
    `calls` is the total number of network calls of the rows (`out.nfe`)."""
    inputs = encode_prompts(tokenizer, prompts)
    kwargs = {"top_p": top_p, "temperature": temperature, "top_k": 0} if setting.do_sample else {}
    out = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        logits_processor=_suppress(tokenizer),
        seed=seed,
        return_dict_in_generate=True,
        **setting.kwargs(),
        **kwargs,
    )
    continuations = out.sequences[:, inputs["input_ids"].shape[1] :].tolist()
    if any(len(c) != new_tokens for c in continuations):
        raise RuntimeError(f"{setting.name}: expected {new_tokens} new tokens per row")
    return {"continuations": continuations, "calls": int(torch.as_tensor(out.nfe).sum())}


@torch.no_grad()
def sample_and_judge(
    sampler: Callable[[int], dict[str, Any]],
    judge,
    tokenizer,
    prompts: Sequence[str],
    seeds: Sequence[int],
    new_tokens: int,
) -> dict[str, Any]:
    """Run `sampler(seed)` for every seed (one batch of all prompts each), judge every continuation, and report
    tokens per network call (new tokens / calls), the judge's gen-PPL, entropy and two example texts."""
    conts, calls, start = [], 0, time.perf_counter()
    for seed in seeds:
        out = sampler(seed)
        conts += out["continuations"]
        calls += out["calls"]
    seconds = time.perf_counter() - start
    all_prompts = list(prompts) * len(seeds)
    judged = judge_continuations(judge, tokenizer, all_prompts, conts)
    judged.pop("per_sample_ppl")
    examples = [
        all_prompts[i] + tokenizer.decode(conts[i], skip_special_tokens=True) for i in range(min(2, len(conts)))
    ]
    return {
        "tokens_per_call": len(conts) * new_tokens / calls,
        "samples": len(conts),
        "seconds": seconds,
        **judged,
        "examples": examples,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Decode speed


def decode_speed(
    candidates: dict[str, Callable[[], Any]], new_tokens_per_call: int, repeats: int, warmups: dict | None = None
) -> dict[str, dict[str, float]]:
    """Interleaved timing (`bench.common.interleaved_times`): per candidate, the median seconds of one `generate()`
    and new tokens per second; each candidate makes `new_tokens_per_call` new tokens (all rows together)."""
    times, _ = interleaved_times(candidates, repeats=repeats, warmup=1, warmup_candidates=warmups)
    return {
        name: {
            "seconds": statistics.median(t),
            "tokens_per_s": new_tokens_per_call / statistics.median(t),
            "all_seconds": t,
        }
        for name, t in times.items()
    }


def network_time(run: Callable[[], Any], modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """Run `run()` once and report its wall seconds (`total_s`) and, for every named module, how many times its
    `forward` ran and the wall seconds spent inside it (forward pre/post hooks; a module nested in another is timed on
    its own, so `model_s - backbone_s` is what the wrapper adds around its backbone)."""
    spent = {name: [0, 0.0] for name in modules}
    started: dict[str, float] = {}
    handles = []
    for name, module in modules.items():

        def pre(_module, _args, name=name):
            started[name] = time.perf_counter()

        def post(_module, _args, _output, name=name):
            spent[name][0] += 1
            spent[name][1] += time.perf_counter() - started.pop(name)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        start = time.perf_counter()
        run()
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    out: dict[str, Any] = {"total_s": total}
    for name, (calls, seconds) in spent.items():
        out[f"{name}_calls"], out[f"{name}_s"] = calls, seconds
    return out


__all__ = [
    "Setting",
    "ar_nll_per_chunk",
    "ar_samples",
    "ar_token_nll",
    "block_position_profile",
    "bd3_nelbo_per_chunk",
    "bd3_samples",
    "decode_speed",
    "encode_prompts",
    "heldout_chunks",
    "network_time",
    "paired_ratio",
    "sample_and_judge",
    "special_ids",
    "summarise_nll",
]
