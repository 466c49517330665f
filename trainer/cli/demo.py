# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""`bd3lm demo`: the README's main job, end to end on the embedded corpus and tokenizer.

    bd3lm demo                      # under 8 minutes on 2 CPU cores; everything lands in runs/demo/

1. trains the tiny preset (L'=4) with the HF Trainer: tqdm progress, periodic evaluation, the clipped-schedule search;
2. prints the validation perplexity bound (exp of the NELBO per token);
3. generates from a few prompts with the KV cache, one token per network call (`first_hitting`) and with
   `confidence_threshold` decoding, streaming each finished block; prints tokens per second and network calls per token;
4. assembles a Hub-ready folder (`runs/demo/hub/`: code, config, generation config, safetensors, tokenizer, model card)
   with `bd3lm_trainer.hub.plan_upload`, exactly what `bd3lm upload` would publish;
5. reloads that folder through `AutoModelForMaskedLM.from_pretrained(..., trust_remote_code=True)` — the code bundled in
   the folder, not this package — and checks that it generates the same tokens from the same seed;
6. writes the training and validation loss curve to `runs/demo/loss_curve.png`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..corpus import resolve_tokenizer
from ..evaluation.generative_perplexity import network_calls_per_token
from ..utils import pyplot, save_figure
from .common import CLIError, check_positive
from .train import add_train_arguments, train_from_args

DEFAULT_PROMPTS = ("And God said,", "KING HENRY.", "Blessed are the")
DEMO_REPO_ID = "local/bd3lm-tiny-demo"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)
    parser.set_defaults(output_dir="runs/demo")
    demo = parser.add_argument_group("demo")
    demo.add_argument(
        "--prompt", action="append", help=f"a prompt to continue (repeatable; default: {', '.join(DEFAULT_PROMPTS)})"
    )
    demo.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per prompt (default: 48)")
    demo.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.9,
        help="threshold of the parallel-decoding pass (default: 0.9)",
    )
    demo.add_argument(
        "--top-p", type=float, default=0.9, help="nucleus sampling of every revealed token (default: 0.9)"
    )
    demo.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG (no matplotlib needed)")


def _require_matplotlib() -> None:
    if pyplot() is None:
        raise CLIError("the loss curve needs matplotlib: pip install 'bd3lm[plot]' (or pass --no-plot)")


def _sample(
    model: Any, tokenizer: Any, prompts: list[str], *, seed: int, stream: bool, **generate_kwargs: Any
) -> tuple[list[torch.LongTensor], dict[str, float]]:
    """Generate one continuation per prompt; returns the sequences and the tokens/s and network calls per token."""
    from transformers import TextStreamer

    sequences, outputs, new_tokens, seconds = [], [], 0, 0.0
    for i, prompt in enumerate(prompts):
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        streamer = TextStreamer(tokenizer, skip_special_tokens=True) if stream else None
        if stream:
            print("  > ", end="", flush=True)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **inputs, streamer=streamer, seed=seed + i, return_dict_in_generate=True, **generate_kwargs
            )
        seconds += time.perf_counter() - start
        sequences.append(out.sequences[0])
        outputs.append(out)
        new_tokens += out.sequences.shape[1] - inputs["input_ids"].shape[1]
    calls_per_token, tokens_per_call = network_calls_per_token(outputs)
    return sequences, {
        "tokens_per_second": new_tokens / seconds,
        "calls_per_token": calls_per_token,
        "tokens_per_call": tokens_per_call,
    }


def _hub_folder(output_dir: Path, nfe_tokens: int) -> Path:
    """Stage the repository `bd3lm upload` would publish and move it into `output_dir/hub` in one rename."""
    from ..hub import plan_upload

    target = output_dir / "hub"
    with plan_upload(output_dir, DEMO_REPO_ID, license="apache-2.0", nfe_tokens=nfe_tokens) as plan:
        tmp = Path(tempfile.mkdtemp(prefix=".hub-", dir=output_dir))
        shutil.copytree(plan.staging, tmp, dirs_exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        print(f"  {len(plan.files)} files, {sum(f.size for f in plan.files) / 2**20:.1f} MiB:", end=" ")
        print(", ".join(f.path for f in plan.files))
    return target


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path) -> Path:
    """Training loss (the clipped-interval NELBO the optimizer sees) and validation NELBO against the step."""
    plt = pyplot()
    train = [(log["step"], log["loss"]) for log in log_history if "loss" in log and "step" in log]
    valid = [(log["step"], log["eval_loss"]) for log in log_history if "eval_loss" in log and "step" in log]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="training loss (clipped t)")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation NELBO (t ~ U[0, 1])")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per token")
    ax.set_title("bd3lm demo: tiny preset, L'=4")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path, dpi=120)


def run_demo(args: argparse.Namespace) -> int:
    check_positive("max-new-tokens", args.max_new_tokens)
    if not 0.0 < args.top_p <= 1.0:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0.0 < args.confidence_threshold <= 1.0:
        raise CLIError(f"--confidence-threshold must be in (0, 1], got {args.confidence_threshold}")
    if not args.no_plot:
        _require_matplotlib()
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    output_dir = Path(args.output_dir)
    start = time.perf_counter()

    print("[1/5] training", flush=True)
    trainer, tokenizer, metrics = train_from_args(args)
    model = trainer.model.eval()
    lo, hi = model.training_noise_interval()
    print(
        f"  validation NELBO {metrics['eval_loss']:.3f} nats/token -> perplexity bound {metrics.get('eval_ppl', float('nan')):.1f}; "
        f"training noise interval [{lo:.2f}, {hi:.2f}]  ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )

    print(f"[2/5] generating {args.max_new_tokens} tokens per prompt (KV cache, top-p {args.top_p})", flush=True)
    common = {"max_new_tokens": args.max_new_tokens, "use_cache": True, "do_sample": True, "top_p": args.top_p}
    print("  one token per network call (first_hitting):")
    _, one = _sample(model, tokenizer, prompts, seed=args.seed, stream=True, sampler="first_hitting", **common)
    print(f"  confidence_threshold {args.confidence_threshold}:")
    threshold = {"sampler": "confidence_threshold", "confidence_threshold": args.confidence_threshold, **common}
    sequences, fast = _sample(model, tokenizer, prompts, seed=args.seed, stream=True, **threshold)
    for name, stats in (("first_hitting", one), (f"threshold {args.confidence_threshold}", fast)):
        print(
            f"  {name:>14}: {stats['tokens_per_second']:.0f} tokens/s, "
            f"{stats['calls_per_token']:.2f} network calls per token ({stats['tokens_per_call']:.2f} tokens per call)"
        )

    print(f"[3/5] Hub-ready folder {output_dir / 'hub'}", flush=True)
    hub_dir = _hub_folder(output_dir, nfe_tokens=args.max_new_tokens)

    print("[4/5] reloading it with AutoModelForMaskedLM (trust_remote_code=True) and generating again", flush=True)
    from transformers import AutoModelForMaskedLM

    reloaded = AutoModelForMaskedLM.from_pretrained(hub_dir, trust_remote_code=True).eval()
    reloaded_tokenizer = resolve_tokenizer(hub_dir)
    again, _ = _sample(reloaded, reloaded_tokenizer, prompts, seed=args.seed, stream=False, **threshold)
    same = all(torch.equal(a, b) for a, b in zip(sequences, again))
    print(f"  {type(reloaded).__module__}.{type(reloaded).__name__}: ", end="")
    if not same:
        raise RuntimeError("the reloaded Hub folder generated different tokens from the same seed")
    print("same tokens from the same seed")

    if args.no_plot:
        print("[5/5] loss curve skipped (--no-plot)")
    else:
        path = plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png")
        print(f"[5/5] loss curve -> {path}")
    print(
        f"bd3lm demo: done in {(time.perf_counter() - start) / 60:.1f} min. Publish with: "
        f"bd3lm upload {output_dir} <namespace>/<name>",
        flush=True,
    )
    return 0


__all__ = ["DEFAULT_PROMPTS", "add_demo_arguments", "plot_loss_curve", "run_demo"]
