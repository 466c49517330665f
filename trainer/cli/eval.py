# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""`bd3lm eval`: perplexity bounds, generative perplexity and lm-eval tasks of a checkpoint, as one table and JSON."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from tqdm.auto import tqdm

from ..corpus import CORPUS_DESCRIPTION, CORPUS_NAME
from ..evaluation.generative_perplexity import generative_perplexity
from ..evaluation.loading import load_model_and_tokenizer
from ..evaluation.perplexity import dataset_perplexity
from ..utils import check_model_reference


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of `bd3lm eval` (likelihood, generative perplexity, lm-eval tasks) to `parser`."""
    parser.add_argument("model", help="A BD3-LM checkpoint folder or Hub id.")
    parser.add_argument("--tokenizer", help="Tokenizer folder or Hub id (default: the model's; `bd3lm-corpus`).")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="Load the model in this dtype.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every noise draw and of the generated samples.")
    parser.add_argument("--output", help="Write all results to this JSON file.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    g = parser.add_argument_group("likelihood (perplexity bound)")
    g.add_argument(
        "--dataset",
        action="append",
        help="Repeatable: a local file/folder, a Hub name or `bd3lm-corpus` "
        "(the default when no --dataset, --judge or --tasks is given: its validation split).",
    )
    g.add_argument("--split", help="Dataset split (default: test, then validation, then train).")
    g.add_argument("--dataset-config", help="Hub dataset configuration name.")
    g.add_argument("--text-column", default="text", help="Column holding the documents (default: text).")
    g.add_argument("--num-samples", type=int, default=1, help="K Monte-Carlo noise draws per sequence (default 1).")
    g.add_argument("--exact", action="store_true", help="Exact expectation over the noise (2^L' - 1 passes, L' <= 8).")
    g.add_argument("--batch-size", type=int, default=8, help="Sequences per likelihood forward (default 8).")
    g.add_argument(
        "--ignore-bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Exclude each chunk's first token (default: the model config's `ignore_bos`).",
    )
    g.add_argument("--no-wrap", action="store_true", help="Score each document alone instead of wrapping them.")
    g.add_argument("--max-documents", type=int, help="Evaluate only the first N documents.")
    g = parser.add_argument_group("generative perplexity")
    g.add_argument("--judge", help="Causal LM judge: folder or Hub id (the paper: gpt2-large). Enables gen-PPL.")
    g.add_argument("--judge-tokenizer", help="The judge's tokenizer (default: the judge's folder).")
    g.add_argument(
        "--samples", help="Score these samples (.txt: one per line, .jsonl: a `text` field) instead of generating them."
    )
    g.add_argument("--num-gen-samples", type=int, default=8, help="Samples to generate (default 8; the paper: 300).")
    g.add_argument("--gen-length", type=int, help="New tokens per sample (default: model_length).")
    g.add_argument("--gen-batch-size", type=int, default=4, help="Samples generated together (default 4).")
    g.add_argument("--gen-kwargs", default="{}", help="JSON of extra generate() arguments: '{\"nucleus_p\": 0.9}'.")
    g.add_argument("--judge-batch-size", type=int, default=8, help="Samples scored together by the judge (default 8).")
    g.add_argument("--judge-max-length", type=int, help="Judge context (default: from its config).")
    g.add_argument("--judge-stride", type=int, help="Sliding-window stride (default: half the judge context).")
    g = parser.add_argument_group("lm-evaluation-harness (pip install 'bd3lm[eval]')")
    g.add_argument("--tasks", help="Comma-separated lm-eval task names.")
    g.add_argument("--include-path", help="Folder of extra lm-eval task YAML files.")
    g.add_argument("--num-fewshot", type=int, help="Few-shot examples per lm-eval request (default: the task's).")
    g.add_argument("--limit", type=float, help="Documents per task (a fraction if < 1).")
    g.add_argument("--mc-samples", type=int, help="Noise draws per loglikelihood request (default 16 when sampled).")
    return parser


def _read_samples(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line)["text"] for line in f if line.strip()]
        return [line.rstrip("\n") for line in f if line.strip()]


def _generate_samples(model, tokenizer, args) -> tuple[list[list[int]], list[Any]]:
    gen_kwargs = json.loads(args.gen_kwargs)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    length = args.gen_length or model.config.model_length
    samples, outputs = [], []
    for start in tqdm(range(0, args.num_gen_samples, args.gen_batch_size), disable=args.no_progress, desc="sampling"):
        rows = min(args.gen_batch_size, args.num_gen_samples - start)
        prompt = torch.full((rows, 1), bos, dtype=torch.long, device=model.device)
        # one seed per sample (its index): the samples do not depend on --gen-batch-size, and the rows of a batch,
        # which all start from BOS, differ (an int seed would give every row the same stream)
        kwargs = {"do_sample": True, "seed": [args.seed + start + r for r in range(rows)], **gen_kwargs}
        out = model.generate(input_ids=prompt, max_new_tokens=length, return_dict_in_generate=True, **kwargs)
        samples.extend(out.sequences.tolist())
        outputs.append(out)
    return samples, outputs


def run_eval(args: argparse.Namespace) -> int:
    """`bd3lm eval`: [`evaluate_from_args`], then exit status 0 (the results are printed and written as JSON)."""
    evaluate_from_args(args)
    return 0


def evaluate_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Perplexity bounds, generative perplexity and lm-eval tasks as `add_eval_arguments` describes them; prints a
    table, writes `--output` as JSON and returns the results."""
    check_model_reference(args.model, "model", need_config=True)
    datasets = list(args.dataset or [])
    if not (datasets or args.judge or args.tasks):
        # What a user most likely wants first, and what `bd3lm train` trains on by default: the held-out split of the
        # embedded corpus (offline, no option needed).
        datasets = [CORPUS_NAME]
        print(
            f"bd3lm eval: no --dataset, --judge or --tasks given: the perplexity bound on `{CORPUS_NAME}` "
            f"({CORPUS_DESCRIPTION}), {args.split or 'validation'} split",
            flush=True,
        )
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.device, args.dtype)
    results: dict[str, Any] = {"model": args.model, "block_size": model.config.block_size}
    for name in datasets:
        result = dataset_perplexity(
            model,
            name,
            tokenizer,
            args.batch_size,
            args.num_samples,
            args.seed,
            args.ignore_bos,
            args.split,
            args.text_column,
            args.dataset_config,
            not args.no_wrap,
            args.max_documents,
            not args.no_progress,
            args.exact,
        )
        results.setdefault("perplexity", {})[name] = result.to_dict()
    if args.judge:
        outputs = None
        if args.samples:
            samples = _read_samples(args.samples)
        else:
            samples, outputs = _generate_samples(model, tokenizer, args)
        gen = generative_perplexity(
            samples,
            args.judge,
            args.judge_tokenizer,
            tokenizer,
            args.judge_batch_size,
            args.judge_max_length,
            args.judge_stride,
            model.device,
            generation_outputs=outputs,
            progress=not args.no_progress,
        )
        results["generative_perplexity"] = {k: v for k, v in gen.to_dict().items() if not k.startswith("per_sample")}
    if args.tasks:
        from ..evaluation.lm_eval_adapter import run_lm_eval  # lm-eval is an optional extra

        results["lm_eval"] = run_lm_eval(
            model,
            tokenizer,
            args.tasks.split(","),
            args.include_path,
            args.num_fewshot,
            args.limit,
            args.batch_size,
            args.mc_samples,
            args.seed,
            True if args.exact else None,
        )
    print(format_results(results))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table: one `section | name | metric | value` row per number."""
    rows = []
    for name, r in results.get("perplexity", {}).items():
        rows += [("perplexity", name, k, r[k]) for k in ("perplexity", "nelbo", "std_error", "num_tokens")]
    if "generative_perplexity" in results:
        r = results["generative_perplexity"]
        for k in ("gen_ppl", "mean_sample_ppl", "unigram_entropy", "nfe_per_token", "tokens_per_forward", "num_tokens"):
            if r.get(k) is not None:
                rows.append(("gen-ppl", r["judge"], k, r[k]))
    for task, metrics in results.get("lm_eval", {}).items():
        rows += [("lm-eval", task, k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"]
    cells = [(a, str(b), c, f"{d:.4f}" if isinstance(d, float) else str(d)) for a, b, c, d in rows]
    header = ("section", "name", "metric", "value")
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(header)]
    lines = [header, tuple("-" * w for w in widths), *cells]
    return "\n".join(" | ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in lines)


__all__ = ["add_eval_arguments", "evaluate_from_args", "format_results", "run_eval"]
