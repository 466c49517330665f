# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Evaluation of BD3-LM: block-NELBO likelihood bounds, (zero-shot) perplexity and generative perplexity.

This module is the public entry point; it re-exports the likelihood API of `likelihood.py` and the judge of
`generative_perplexity.py`.

* [`nelbo`], [`score_continuations`]: per-token and per-sequence block NELBO (Arriola et al., 2025, Eq. (8)), with K
  jointly stratified Monte-Carlo draws of the noise levels t or exactly (`exact=True`); exact AR NLL at L' = 1.
* [`dataset_perplexity`]: the paper's test-perplexity protocol on any local or Hub dataset: documents tokenized
  without specials, EOS appended, concatenated and wrapped to `model_length`; PPL bound = exp(token-mean NELBO).
* [`generative_perplexity`]: sample quality judged by a causal LM (the paper uses GPT-2 large), with a sliding window
  and the corpus-level exp(total NLL / total tokens), plus unigram entropy and network calls per token.
* [`add_eval_arguments`] / [`run_eval`]: the `bd3lm eval` command.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .generative_perplexity import (
    GenerativePerplexityResult,
    generative_perplexity,
    judge_windows,
    network_calls_per_token,
    unigram_entropy,
)
from .likelihood import (
    NELBOOutput,
    _check_num_samples,
    mask_pattern_weights,
    nelbo,
    plan_windows,
    score_continuations,
    stratified_noise_levels,
)

logger = logging.getLogger(__name__)

#: Folder of the `evaluate` metric module of the per-token NELBO: `evaluate.load(NELBO_METRIC_PATH)` (works offline).
NELBO_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "bd3lm_nelbo")


# ----------------------------------------------------------------------------------------------------------------------
# Datasets and zero-shot perplexity


def load_eval_dataset(dataset: Any, split: str | None = None, config_name: str | None = None):
    """Resolve a `datasets.Dataset`, a `DatasetDict`, a list of strings, `"bd3lm-corpus"` (the embedded corpus), a local
    file or folder, or a Hub dataset name (needs the network or the local cache) to one split.

    The split defaults to `test`, then `validation`, then `train`, whichever exists.
    """
    import datasets

    if isinstance(dataset, os.PathLike):
        dataset = os.fspath(dataset)
    if isinstance(dataset, (list, tuple)):
        return datasets.Dataset.from_dict({"text": list(dataset)})
    if isinstance(dataset, str):
        if dataset == "bd3lm-corpus":
            from .corpus import load_corpus

            return load_corpus(split or "validation")
        from .data import load_text_dataset

        if os.path.isfile(os.path.expanduser(dataset)):
            return load_text_dataset(dataset)
        if os.path.isdir(dataset) and os.path.exists(os.path.join(dataset, "dataset_info.json")):
            dataset = datasets.load_from_disk(dataset)
        elif split is not None:
            return load_text_dataset(dataset, split=split, dataset_config_name=config_name)
        else:  # every split, to pick the evaluation one below
            dataset = datasets.load_dataset(dataset, config_name)
    if isinstance(dataset, datasets.DatasetDict):
        if split is None:
            split = next((s for s in ("test", "validation", "train") if s in dataset), None)
        if split not in dataset:
            raise ValueError(f"`split`={split!r} is not in the dataset; available: {sorted(dataset)}.")
        dataset = dataset[split]
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"Unsupported dataset {type(dataset).__name__}: pass a Dataset, a path, a Hub name or texts.")
    return dataset


def wrap_documents(
    documents: Sequence[Sequence[int]], length: int, eos_token_id: int | None, wrap: bool = True
) -> list[list[int]]:
    """The paper's data wrapping: EOS after every document, concatenate, cut into `length`-token chunks.

    Unlike training, the last partial chunk is kept (every token is scored). With `wrap=False` each document is
    chunked on its own, with no context across documents.
    """
    suffix = [] if eos_token_id is None else [eos_token_id]
    if wrap:
        stream = [tok for doc in documents for tok in (*doc, *suffix)]
        return [stream[i : i + length] for i in range(0, len(stream), length)]
    chunks = []
    for doc in documents:
        doc = [*doc, *suffix]
        chunks.extend(doc[i : i + length] for i in range(0, len(doc), length))
    return chunks


@dataclass
class PerplexityResult:
    """Result of [`dataset_perplexity`]: `nelbo` is the token-mean NELBO (nats), `perplexity` = exp(nelbo) bounds the
    model's perplexity (in expectation over the noise draws)."""

    nelbo: float
    perplexity: float
    num_tokens: int
    num_sequences: int
    num_samples: int
    std_error: float  # of the token-mean over sequences (sampling + noise), nats

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def dataset_perplexity(
    model: torch.nn.Module,
    dataset: Any,
    tokenizer: Any = None,
    batch_size: int = 8,
    num_samples: int = 1,
    seed: int = 0,
    ignore_bos: bool | None = None,
    split: str | None = None,
    text_column: str = "text",
    config_name: str | None = None,
    wrap: bool = True,
    max_documents: int | None = None,
    progress: bool = True,
    exact: bool = False,
) -> PerplexityResult:
    """(Zero-shot) perplexity bound of `model` on a dataset, following the paper's protocol (Sec. 6.1).

    Documents are tokenized without special tokens, EOS is appended, and they are concatenated and wrapped into
    `model_length` chunks; each chunk gets K = `num_samples` noise draws ([`nelbo`]); the result is the token mean of
    the NELBO over the whole split and PPL = exp(mean). A dataset with an `input_ids` column is used as tokenized.

    Args:
        dataset: see [`load_eval_dataset`]. tokenizer: needed for text datasets.
        seed (`int`): seeds the CPU generator of all draws (reproducible across devices).
        ignore_bos (`bool`, *optional*): drop each chunk's first token (kept clean) from the mean; defaults to
            `config.ignore_bos` (the official evaluation does it for OWT).
        exact (`bool`): the expectation over the noise by enumeration (see [`nelbo`]) instead of K draws.
    """
    num_samples = _check_num_samples(num_samples)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
    data = load_eval_dataset(dataset, split, config_name)
    if max_documents is not None:
        data = data.select(range(min(max_documents, len(data))))
    if "input_ids" in data.column_names:
        documents = [list(ids) for ids in data["input_ids"]]
        eos = getattr(tokenizer, "eos_token_id", None)
    else:
        if text_column not in data.column_names:
            raise ValueError(
                f"The dataset has no `{text_column}` column (columns: {data.column_names}); set `text_column`."
            )
        if tokenizer is None:
            raise ValueError("A text dataset needs a `tokenizer`.")
        texts = [text for text in data[text_column] if text]
        documents = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        eos = tokenizer.eos_token_id
    chunks = [c for c in wrap_documents(documents, model.config.model_length, eos, wrap) if c]
    if not chunks:
        raise ValueError("The dataset is empty: no tokens to evaluate.")
    generator = torch.Generator().manual_seed(seed)
    sums, counts = [], []
    for start in tqdm(range(0, len(chunks), batch_size), disable=not progress, desc="perplexity"):
        batch = chunks[start : start + batch_size]
        width = max(len(c) for c in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, c in enumerate(batch):
            ids[r, : len(c)], mask[r, : len(c)] = torch.tensor(c, dtype=torch.long), 1
        out = nelbo(model, ids, mask, None, num_samples, generator, ignore_bos, exact=exact)
        sums.append(out.per_sequence.cpu().double())
        counts.append(out.num_tokens.cpu().double())
    sums_t, counts_t = torch.cat(sums), torch.cat(counts)
    total = float(counts_t.sum())
    if total == 0:
        raise ValueError("No token was scored (every chunk is a single kept BOS); use longer documents.")
    mean = float(sums_t.sum()) / total
    # Ratio-estimator standard error of Σ s_i / Σ n_i over the chunks.
    n = len(sums_t)
    resid = sums_t - mean * counts_t
    std_error = float(resid.pow(2).sum().div(max(n - 1, 1)).sqrt() * math.sqrt(n) / total) if n > 1 else float("nan")
    return PerplexityResult(mean, math.exp(mean), int(total), n, num_samples, std_error)


# ----------------------------------------------------------------------------------------------------------------------
# `bd3lm eval`


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
    g.add_argument("--dataset", action="append", help="Repeatable: a local file/folder, a Hub name or `bd3lm-corpus` "
                   "(the default when no --dataset, --judge or --tasks is given: its validation split).")
    g.add_argument("--split", help="Dataset split (default: test, then validation, then train).")
    g.add_argument("--dataset-config", help="Hub dataset configuration name.")
    g.add_argument("--text-column", default="text", help="Column holding the documents (default: text).")
    g.add_argument("--num-samples", type=int, default=1, help="K Monte-Carlo noise draws per sequence (default 1).")
    g.add_argument("--exact", action="store_true", help="Exact expectation over the noise (2^L' - 1 passes, L' <= 8).")
    g.add_argument("--batch-size", type=int, default=8, help="Sequences per likelihood forward (default 8).")
    g.add_argument("--ignore-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="Exclude each chunk's first token (default: the model config's `ignore_bos`).")
    g.add_argument("--no-wrap", action="store_true", help="Score each document alone instead of wrapping them.")
    g.add_argument("--max-documents", type=int, help="Evaluate only the first N documents.")
    g = parser.add_argument_group("generative perplexity")
    g.add_argument("--judge", help="Causal LM judge: folder or Hub id (the paper: gpt2-large). Enables gen-PPL.")
    g.add_argument("--judge-tokenizer", help="The judge's tokenizer (default: the judge's folder).")
    g.add_argument("--samples", help="Score these samples (.txt: one per line, .jsonl: a `text` field) instead of "
                   "generating them.")
    g.add_argument("--num-gen-samples", type=int, default=8, help="Samples to generate (default 8; the paper: 300).")
    g.add_argument("--gen-length", type=int, help="New tokens per sample (default: model_length).")
    g.add_argument("--gen-batch-size", type=int, default=4, help="Samples generated together (default 4).")
    g.add_argument("--gen-kwargs", default="{}", help='JSON of extra generate() arguments: \'{"nucleus_p": 0.9}\'.')
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


def load_tokenizer(name: str) -> Any:
    """`AutoTokenizer.from_pretrained(name)`, or the embedded corpus tokenizer for `"bd3lm-corpus"`."""
    if name == "bd3lm-corpus":
        from .corpus import load_tokenizer as load_corpus_tokenizer

        return load_corpus_tokenizer()
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # A tokenizer never needs remote code; without it transformers warns about the checkpoint's custom config.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(verbosity)


def resolve_device(device: str | torch.device | None, fallback: bool = False) -> torch.device:
    """The device to evaluate on: `device`, or CUDA when available and else the CPU when it is `None`.

    An accelerator this machine lacks (`cuda` on a CPU-only machine or torch build, `mps` off a Mac) raises a one-line
    `ValueError` that names `--device cpu`; with `fallback=True` the CPU is used instead, after one warning line. The
    lm-eval adapter falls back because lm-eval's command line passes `device="cuda:0"` when the user chose none, so it
    cannot tell its default from a choice (lm-eval's own `hf` model falls back too). A device index past the ones
    present is an error either way: that is a choice, not a default.
    """
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device`={device!r} is not a torch device ({err}); use e.g. `cpu` or `cuda:0`.") from None
    kind = resolved.type
    if kind in ("cpu", "meta"):
        return resolved
    check = "backends.mps" if kind == "mps" else kind  # torch.cuda, torch.xpu, ... have `is_available()`
    is_available = getattr(torch.backends.mps if kind == "mps" else getattr(torch, kind, None), "is_available", None)
    if not (callable(is_available) and is_available()):
        why = f"device {str(device)!r} is not available on this machine (torch.{check}.is_available() is False)"
        if not fallback:
            raise ValueError(f"{why}; pass `--device cpu`.")
        logger.warning("bd3lm: %s; evaluating on the CPU instead (pass --device cpu to choose it).", why)
        return torch.device("cpu")
    count = getattr(torch, kind).device_count() if hasattr(getattr(torch, kind, None), "device_count") else 1
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"`device`={str(device)!r}: this machine has {count} {kind} device(s), "
                         f"{kind}:0 to {kind}:{count - 1}.")
    return resolved


def load_model_and_tokenizer(model: str, tokenizer: str | None = None, device: str | None = None,
                             dtype: str | None = None, device_fallback: bool = False):
    """Load a BD3-LM checkpoint with this package's code (no remote code) and its tokenizer, on
    `resolve_device(device, device_fallback)`."""
    from modeling_bd3lm import BD3LMForMaskedDiffusion

    target = resolve_device(device, device_fallback)  # before the weights load: a bad device fails fast
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    net = BD3LMForMaskedDiffusion.from_pretrained(model, **kwargs)
    net.to(target).eval()
    try:
        return net, load_tokenizer(tokenizer or model)
    except (OSError, ValueError) as err:
        raise ValueError(f"No tokenizer at `{tokenizer or model}`; pass `--tokenizer` (a folder, a Hub id or "
                         "`bd3lm-corpus`).") from err


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
    if not os.path.isdir(args.model) and (args.model.count("/") != 1 or args.model.startswith((".", "/"))):
        raise ValueError(f"model {args.model!r} does not exist and is not a Hub id (owner/name)")
    if os.path.isdir(args.model) and not os.path.isfile(os.path.join(args.model, "config.json")):
        raise ValueError(f"{args.model} has no config.json; is it a trained model folder?")
    datasets = list(args.dataset or [])
    if not (datasets or args.judge or args.tasks):
        # What a user most likely wants first, and what `bd3lm train` trains on by default: the held-out split of the
        # embedded corpus (offline, no option needed).
        from .corpus import CORPUS_DESCRIPTION, CORPUS_NAME

        datasets = [CORPUS_NAME]
        print(f"bd3lm eval: no --dataset, --judge or --tasks given: the perplexity bound on `{CORPUS_NAME}` "
              f"({CORPUS_DESCRIPTION}), {args.split or 'validation'} split", flush=True)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.device, args.dtype)
    results: dict[str, Any] = {"model": args.model, "block_size": model.config.block_size}
    for name in datasets:
        result = dataset_perplexity(
            model, name, tokenizer, args.batch_size, args.num_samples, args.seed, args.ignore_bos, args.split,
            args.text_column, args.dataset_config, not args.no_wrap, args.max_documents, not args.no_progress,
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
            samples, args.judge, args.judge_tokenizer, tokenizer, args.judge_batch_size, args.judge_max_length,
            args.judge_stride, model.device, generation_outputs=outputs, progress=not args.no_progress,
        )
        results["generative_perplexity"] = {k: v for k, v in gen.to_dict().items() if not k.startswith("per_sample")}
    if args.tasks:
        from .lm_eval_adapter import run_lm_eval

        results["lm_eval"] = run_lm_eval(
            model, tokenizer, args.tasks.split(","), args.include_path, args.num_fewshot, args.limit,
            args.batch_size, args.mc_samples, args.seed, True if args.exact else None,
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


__all__ = [
    "GenerativePerplexityResult",
    "NELBOOutput",
    "NELBO_METRIC_PATH",
    "PerplexityResult",
    "add_eval_arguments",
    "dataset_perplexity",
    "evaluate_from_args",
    "format_results",
    "generative_perplexity",
    "judge_windows",
    "load_eval_dataset",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "mask_pattern_weights",
    "nelbo",
    "network_calls_per_token",
    "plan_windows",
    "resolve_device",
    "run_eval",
    "score_continuations",
    "stratified_noise_levels",
    "unigram_entropy",
    "wrap_documents",
]
