# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""`bd3lm generate`: generate from a model, streaming each finished block."""

from __future__ import annotations

import argparse
from typing import Any

from ..utils import check_model_reference
from .common import DRAFT_VARIANT_NAMES, GENERATION_MODE_NAMES, SAMPLER_NAMES, CLIError, check_positive


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a trained model folder or Hub id")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for a batch; none = unconditional)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument(
        "--generation-mode",
        default=None,
        choices=GENERATION_MODE_NAMES,
        help="how to decode: %(choices)s (default: the model's generation config, else diffusion); autoregressive "
        "and draft_verify decode through the clean stream (converted causal LMs only)",
    )
    parser.add_argument(
        "--draft-variant",
        default=None,
        choices=DRAFT_VARIANT_NAMES,
        help="with --generation-mode draft_verify: %(choices)s (default: two_pass)",
    )
    parser.add_argument(
        "--sampler",
        default=None,
        choices=SAMPLER_NAMES,
        help="how a block is denoised: %(choices)s (default: the model's generation config)",
    )
    parser.add_argument("--num-steps", type=int, help="denoising steps per block")
    parser.add_argument("--confidence-threshold", type=float, help="commit every token above this confidence")
    parser.add_argument("--tokens-per-step", type=int, help="tokens committed per step (topk_confidence)")
    parser.add_argument("--temperature", type=float, help="sampling temperature")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="nucleus sampling")
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--no-stream", action="store_true", help="print only at the end")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole window every step")
    parser.add_argument("--revision", help="Hub revision to pin")


def run_generate(args: argparse.Namespace) -> int:
    check_positive("max-new-tokens", args.max_new_tokens)
    check_positive("num-samples", args.num_samples)
    if args.greedy and any(getattr(args, name) is not None for name in ("temperature", "top_k", "top_p")):
        raise CLIError("--greedy takes the argmax: drop --temperature, --top-k and --top-p")
    if args.draft_variant is not None and args.generation_mode != "draft_verify":
        raise CLIError("--draft-variant applies to --generation-mode draft_verify only")
    check_model_reference(args.model, "model", need_config=True)

    import torch
    from transformers import TextStreamer

    from modeling_bd3lm import BD3LMForMaskedDiffusion

    from ..corpus import resolve_tokenizer

    model = BD3LMForMaskedDiffusion.from_pretrained(args.model, revision=args.revision).eval()
    tokenizer = resolve_tokenizer(args.model, revision=args.revision)
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "use_cache": not args.no_cache}
    for name in (
        "generation_mode",
        "draft_variant",
        "sampler",
        "num_steps",
        "confidence_threshold",
        "tokens_per_step",
        "temperature",
        "top_k",
        "top_p",
    ):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    # Sampling unless --greedy: HF's do_sample defaults to False, which would silently drop the sampling options.
    kwargs["do_sample"] = not args.greedy
    prompts = args.prompt or [None]
    generator = torch.Generator().manual_seed(args.seed)
    for prompt in prompts:
        for _ in range(args.num_samples):
            inputs = {}
            if prompt is not None:
                inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            streamer = None if args.no_stream else TextStreamer(tokenizer, skip_special_tokens=True)
            with torch.no_grad():
                out = model.generate(
                    **inputs, streamer=streamer, generator=generator, return_dict_in_generate=True, **kwargs
                )
            if args.no_stream:
                print(tokenizer.decode(out.sequences[0], skip_special_tokens=True))
            nfe = out.nfe[0].item() if hasattr(out.nfe, "__getitem__") else out.nfe
            accepted = ""
            if getattr(out, "acceptance_lengths", None) is not None and len(out.acceptance_lengths[0]) > 0:
                accepted = f", {out.acceptance_lengths[0].double().mean().item():.2f} tokens accepted per verify call"
            print(f"\n[{args.max_new_tokens} tokens, {nfe} network calls{accepted}]", flush=True)
    return 0


__all__ = ["add_generate_arguments", "run_generate"]
