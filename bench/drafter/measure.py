"""The drafter study's measurements (`--stage measure`, `--stage speed`).

* `measure`: `estimate_acceptance` on the held-out sequences, per prompt kind, block size k and draft variant
  (`two_pass`: the block `[s, M, ..., M]`; `one_forward`: `[M, ..., M]`, the seed unknown), for the bare conversion and
  every checkpoint of every training run; one JSON file per drafter under `measure/`.
* `speed`: real greedy decoding, batch 1, on the first `cfg.speed_prompts_per_kind` held-out prompts of each kind, four
  methods timed side by side with interleaved repeats (the order rotates each repeat): the source's own `generate()`
  (KV cache, `do_sample=False`), the same with `prompt_lookup_num_tokens` (transformers' prompt-lookup drafting, also
  lossless), and draft-and-verify of a drafter, two-pass and one-forward. In float32 and bfloat16 (source and drafter
  in that dtype). Each file `speed/<drafter>--<dtype>.json` holds its own baseline timings, so every ratio is taken
  within one run. Exactness: each method's tokens against `generate()`'s in the same dtype, and bfloat16's
  `generate()` against the float32 continuation of `heldout.jsonl`.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .study import DrafterConfig, checkpoints, load_drafter, load_source, log, read_rows, write

VARIANTS = ("two_pass", "one_forward")
METHODS = ("generate", "prompt_lookup", "two_pass", "one_forward")


def variant_key(variant: str, k: int) -> str:
    """The key of an acceptance entry: `k4` (two-pass, the first slice's key) or `one_forward-k4`."""
    return f"k{k}" if variant == "two_pass" else f"{variant}-k{k}"


def measure_one(cfg: DrafterConfig, model: Any, heldout: list[dict[str, Any]]) -> dict[str, Any]:
    """`estimate_acceptance` per held-out kind, block size and draft variant (and over all kinds together)."""
    from bd3lm_trainer.evaluation import estimate_acceptance

    out: dict[str, Any] = {}
    kinds = list(dict.fromkeys(d["kind"] for d in heldout))
    keys = [(v, k) for v in VARIANTS for k in cfg.measure_block_sizes]
    for kind in kinds:
        chosen = [d for d in heldout if d["kind"] == kind]
        rows = [d["prompt_ids"] + d["continuation"] for d in chosen]
        out[kind] = {}
        for variant, k in keys:
            est = estimate_acceptance(
                model, rows, [len(d["prompt_ids"]) for d in chosen], block_size=k, draft_variant=variant
            )
            r = est.as_dict()
            for unused in ("drafts", "accepted_at", "cycles"):
                del r[unused]
            out[kind][variant_key(variant, k)] = r
    out["all"] = {variant_key(v, k): pool([out[kind][variant_key(v, k)] for kind in kinds]) for v, k in keys}
    return out


def pool(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several `estimate_acceptance` results (same k) as one over all their blocks, without another model pass:
    match rates weighted by blocks; conditional acceptance at offset j = #(accepted >= j) / #(accepted >= j - 1)."""
    from bd3lm_trainer.evaluation import geometric_alpha

    k = parts[0]["block_size"]
    lengths = [a for p in parts for a in p["accepted_lengths"]]
    blocks = len(lengths)
    match = [sum(p["match_rate"][j] * p["blocks"] for p in parts) / blocks for j in range(k - 1)]
    reached = [sum(a >= j for a in lengths) for j in range(k)]
    conditional = [reached[j + 1] / reached[j] if reached[j] else float("nan") for j in range(k - 1)]
    tokens = sum(lengths) / blocks + 1.0
    return {
        "block_size": k,
        "blocks": blocks,
        "match_rate": match,
        "conditional_acceptance": conditional,
        "tokens_per_cycle": tokens,
        "alpha": geometric_alpha(min(tokens, k), k),
        "accepted_lengths": lengths,
    }


def training_runs(work_dir: Path) -> list[tuple[str, Path, float]]:
    """`(name, checkpoint, training CPU s)` of every complete checkpoint of every run folder under `work_dir`."""
    out = []
    for folder in sorted(p for p in work_dir.iterdir() if p.is_dir()):
        for ckpt in checkpoints(folder):
            if (ckpt / "state.json").exists():
                cpu = json.loads((ckpt / "state.json").read_text())["checkpoints"][ckpt.name]["cpu_s"]
                out.append((f"{folder.name}/{ckpt.name}", ckpt, cpu))
    return out


def run_measure(cfg: DrafterConfig, work_dir: Path) -> dict[str, Any]:
    """Measure the bare conversion (once) and every checkpoint not yet measured (`measure/*.json`)."""
    torch.set_num_threads(cfg.threads)
    heldout = read_rows(work_dir / "heldout.jsonl")
    source, tokenizer = load_source(cfg)
    targets: list[tuple[str, Path | None, float]] = [("converted", None, 0.0), *training_runs(work_dir)]
    results = {}
    for name, ckpt, cpu in targets:
        path = work_dir / "measure" / f"{name.replace('/', '--')}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
            continue
        start = time.process_time()
        with torch.no_grad():
            model = load_drafter(cfg, source, tokenizer, ckpt)
            row = {"name": name, "train_cpu_s": cpu, "acceptance": measure_one(cfg, model, heldout)}
        row["measure_cpu_s"] = time.process_time() - start
        a = row["acceptance"]["all"]
        two, one = a[variant_key("two_pass", cfg.block_size)], a[variant_key("one_forward", cfg.block_size)]
        log(f"{name}: k={cfg.block_size} tokens/cycle two-pass {two['tokens_per_cycle']:.3f}, one-forward "
            f"{one['tokens_per_cycle']:.3f}")  # fmt: skip
        write(path, row)
        results[name] = row
    return results


def best_checkpoints(cfg: DrafterConfig, work_dir: Path) -> list[str]:
    """The measured checkpoint with the most tokens per cycle (all kinds, k = `cfg.block_size`) for each variant.
    Picked on the held-out prompts themselves: slightly optimistic (there is no separate validation split)."""
    measured = [json.loads(p.read_text()) for p in sorted((work_dir / "measure").glob("*.json"))]
    measured = [m for m in measured if m["name"] != "converted"]
    chosen = []
    for variant in VARIANTS:
        key = variant_key(variant, cfg.block_size)
        scored = [m for m in measured if key in m["acceptance"]["all"]]
        if scored:
            best = max(scored, key=lambda m: m["acceptance"]["all"][key]["tokens_per_cycle"])
            chosen.append(best["name"])
    return list(dict.fromkeys(chosen))


def drafter_folder(work_dir: Path, name: str) -> Path | None:
    """The adapter of drafter `name`: None for "converted", a checkpoint `<run>/checkpoint-N` of the work folder, or
    any folder holding a gated adapter (e.g. the packaged one, `trainer/drafters/smollm2-135m-k4`)."""
    if name == "converted":
        return None
    for folder in (work_dir / name, Path(name)):
        if (folder / "state.json").exists() or (folder / "drafter.json").exists():
            return folder
    raise FileNotFoundError(
        f"{name} is neither a complete checkpoint of {work_dir} (<run>/checkpoint-N with state.json) nor a drafter "
        "folder (with drafter.json); train it or pick another drafter."
    )


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _timed_drafters(
    cfg: DrafterConfig, work_dir: Path, folder: str, drafters: list[str] | None, dtypes: tuple[str, ...], body: Any
) -> dict[str, Any]:
    """For the conversion and each of `drafters` (default: the best measured checkpoint of each variant), in each of
    `dtypes` (source and drafter cast to it): `body(source, model, tokenizer, heldout)` -> the rows of
    `work_dir/<folder>/<drafter>--<dtype>.json`, written with the run's settings; a file that exists is kept."""
    torch.set_num_threads(cfg.threads)
    heldout = read_rows(work_dir / "heldout.jsonl")
    source32, tokenizer = load_source(cfg)
    names = ["converted", *(best_checkpoints(cfg, work_dir) if drafters is None else drafters)]
    results = {}
    for dtype in dtypes:
        source = source32 if dtype == "float32" else copy.deepcopy(source32).to(getattr(torch, dtype))
        for name in names:
            path = work_dir / folder / f"{name.replace('/', '--')}--{dtype}.json"
            if not path.exists():
                model = load_drafter(cfg, source, tokenizer, drafter_folder(work_dir, name))
                result = {"name": name, "dtype": dtype, "threads": cfg.threads, "repeats": cfg.speed_repeats,
                          "prompt_lookup_num_tokens": cfg.prompt_lookup_num_tokens}  # fmt: skip
                result["rows"] = body(source, model, tokenizer, heldout, f"{name} {dtype}")
                write(path, result)
            results[f"{name}--{dtype}"] = json.loads(path.read_text())
    return results


def run_speed(
    cfg: DrafterConfig,
    work_dir: Path,
    drafters: list[str] | None = None,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
) -> dict[str, Any]:
    """Time `METHODS` side by side at batch 1 on the first `cfg.speed_prompts_per_kind` held-out prompts of each kind
    (module docstring); files `speed/<drafter>--<dtype>.json`."""

    def body(source: Any, model: Any, tokenizer: Any, heldout: list[dict[str, Any]], label: str) -> list[dict]:
        kinds = list(dict.fromkeys(d["kind"] for d in heldout))
        chosen = [d for k in kinds for d in [d for d in heldout if d["kind"] == k][: cfg.speed_prompts_per_kind]]
        rows = [_time_prompt(cfg, source, model, d, label) for d in chosen]
        new = sum(r["new_tokens"] for r in rows)
        log(f"{label}: " + ", ".join(f"{m} {new / sum(r['methods'][m]['seconds'] for r in rows):.1f} tok/s"
                                     for m in METHODS))  # fmt: skip
        return rows

    return _timed_drafters(cfg, work_dir, "speed", drafters, dtypes, body)


def run_speed_batch(
    cfg: DrafterConfig, work_dir: Path, drafters: list[str] | None = None, dtypes: tuple[str, ...] = ("float32",)
) -> dict[str, Any]:
    """Batched decoding: all held-out prompts of a kind in one left-padded batch (8 rows), `generate()` against
    draft-and-verify (both variants; prompt lookup runs at batch 1 only), interleaved repeats. Exactness per row:
    against the batch's `generate()` and against the row's float32 greedy continuation alone (`heldout.jsonl`): left
    padding can move the source's own batched text. Files `speed-batch/<drafter>--<dtype>.json`."""

    def body(source: Any, model: Any, tokenizer: Any, heldout: list[dict[str, Any]], label: str) -> list[dict]:
        rows = []
        for kind in dict.fromkeys(d["kind"] for d in heldout):
            rows.append(_time_batch(cfg, source, model, [d for d in heldout if d["kind"] == kind], tokenizer))
            log(
                f"batch {label} {kind}: "
                + ", ".join(f"{m} {v['seconds']:.1f}s" for m, v in rows[-1]["methods"].items())
            )
        return rows

    return _timed_drafters(cfg, work_dir, "speed-batch", drafters, dtypes, body)


def _interleaved(
    calls: dict[str, Any], new_tokens: int, repeats: int, warm_up: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Each call once with `warm_up` new tokens, then `repeats` rounds of every call with `new_tokens`, the order
    rotated by one each round. Returns the wall seconds of each call's rounds and its first output."""
    methods = list(calls)
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    outputs: dict[str, Any] = {}
    with torch.no_grad():
        for m in methods:
            calls[m](warm_up)
        for rep in range(repeats):
            for m in methods[rep % len(methods) :] + methods[: rep % len(methods)]:
                start = time.perf_counter()
                out = calls[m](new_tokens)
                seconds[m].append(time.perf_counter() - start)
                outputs.setdefault(m, out)
    return seconds, outputs


def _time_batch(cfg: DrafterConfig, source: Any, model: Any, chosen: list[dict[str, Any]], tokenizer: Any) -> dict:
    """One kind's prompts as one left-padded batch: each method `cfg.speed_repeats` times, interleaved."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(d["prompt_ids"]) for d in chosen)
    ids = torch.tensor([[pad] * (width - len(d["prompt_ids"])) + d["prompt_ids"] for d in chosen])
    mask = torch.tensor([[0] * (width - len(d["prompt_ids"])) + [1] * len(d["prompt_ids"]) for d in chosen])
    common = {"max_new_tokens": cfg.new_tokens, "do_sample": False, "attention_mask": mask, "pad_token_id": pad}
    calls = {"generate": lambda n: source.generate(ids, **{**common, "max_new_tokens": n})}
    for v in VARIANTS:
        calls[v] = lambda n, v=v: model.generate(
            ids, **{**common, "max_new_tokens": n}, generation_mode="draft_verify", draft_variant=v,
            return_dict_in_generate=True,
        )  # fmt: skip
    methods = list(calls)
    seconds, outputs = _interleaved(calls, cfg.new_tokens, cfg.speed_repeats, warm_up=4)

    def new_tokens(sequences: torch.Tensor) -> list[list[int]]:
        return [row[width:].tolist() for row in sequences]

    reference = new_tokens(outputs["generate"])
    alone = [d["continuation"] for d in chosen]

    entry: dict[str, Any] = {"kind": chosen[0]["kind"], "rows": len(chosen), "methods": {}}
    for m in methods:
        out = outputs[m]
        got = new_tokens(out.sequences if hasattr(out, "sequences") else out)
        equal_batch = sum(g[: len(a)] == r[: len(a)] for g, r, a in zip(got, reference, alone))  # up to EOS
        equal_alone = sum(g[: len(a)] == a for g, a in zip(got, alone))
        e = {"seconds": _median(seconds[m]), "all_seconds": seconds[m], "rows_equal_to_batched_generate": equal_batch,
             "rows_equal_to_alone_float32": equal_alone}  # fmt: skip
        e["tokens"] = sum(len(a) for a in alone)
        e["tokens_per_s"] = e["tokens"] / e["seconds"]
        if hasattr(out, "nfe"):
            e.update(num_forwards=int(out.num_forwards), mean_acceptance=float(
                torch.cat(out.acceptance_lengths).double().mean()))  # fmt: skip
        entry["methods"][m] = e
    return entry


def _time_prompt(cfg: DrafterConfig, source: Any, model: Any, d: dict[str, Any], label: str) -> dict[str, Any]:
    """One held-out prompt: every method `cfg.speed_repeats` times, interleaved (rotated order), median seconds."""
    ids = torch.tensor([d["prompt_ids"]])
    common = {"max_new_tokens": cfg.new_tokens, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    calls = {
        "generate": lambda n: source.generate(ids, **{**common, "max_new_tokens": n}),
        "prompt_lookup": lambda n: source.generate(
            ids, **{**common, "max_new_tokens": n}, prompt_lookup_num_tokens=cfg.prompt_lookup_num_tokens
        ),
        **{
            v: (
                lambda n, v=v: model.generate(
                    ids, **{**common, "max_new_tokens": n}, generation_mode="draft_verify", draft_variant=v,
                    return_dict_in_generate=True,
                )
            )
            for v in VARIANTS
        },
    }  # fmt: skip
    seconds, outputs = _interleaved(calls, cfg.new_tokens, cfg.speed_repeats, warm_up=8)
    reference = outputs["generate"]
    new = reference.shape[1] - ids.shape[1]
    row: dict[str, Any] = {"kind": d["kind"], "text": d["text"], "new_tokens": new, "methods": {}}
    # the float32 greedy continuation (heldout.jsonl): what bfloat16 does to the text
    expected = d["prompt_ids"] + d["continuation"]
    row["generate_equal_to_float32"] = (
        reference[0].tolist() == expected[: reference.shape[1]] and len(expected) >= reference.shape[1]
    )
    for method in METHODS:
        out = outputs[method]
        sequences = out.sequences if hasattr(out, "sequences") else out
        entry = {"seconds": _median(seconds[method]), "all_seconds": seconds[method],
                 "equal_to_generate": bool(torch.equal(sequences, reference))}  # fmt: skip
        entry["tokens_per_s"] = new / entry["seconds"]
        if hasattr(out, "acceptance_lengths"):
            entry.update(nfe=int(out.nfe[0]), tokens_per_forward=float(out.tokens_per_forward[0]),
                         acceptance_lengths=out.acceptance_lengths[0].tolist())  # fmt: skip
        row["methods"][method] = entry
    log(f"{label} {d['kind']}: " + ", ".join(f"{m} {row['methods'][m]['seconds']:.2f}s" for m in METHODS)
        + f" equal {[row['methods'][m]['equal_to_generate'] for m in METHODS]}")  # fmt: skip
    return row
