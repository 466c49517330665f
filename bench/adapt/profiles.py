"""The study's profile stage: where the adapted model loses likelihood against the source (loss by position in the
block) and where its decode time goes (network calls against the source's AR steps). Results in
`work_dir/profile.json` and `work_dir/call_cost.json`; `report.py` turns them into tables."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from . import measures
from .measures import Setting
from .study import AdaptConfig, checkpoints, heldout, load_adapted, load_source, log, write


def run_profile(cfg: AdaptConfig, work_dir: Path) -> dict[str, Any]:
    """The by-offset loss profile (`measures.block_position_profile`) of the converted model and of the last
    checkpoint of each finished training, into `work_dir/profile.json` (models already profiled are kept)."""
    torch.set_num_threads(cfg.threads)
    path = work_dir / "profile.json"
    out: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    todo: list[tuple[str, str, Path | None]] = [("converted", "lora", None)]
    for method in cfg.methods:
        found = checkpoints(work_dir / method)
        if found:
            todo.append((f"{method} {found[-1].name}", method, found[-1]))
    todo = [t for t in todo if t[0] not in out]
    if not todo:
        return out
    source, tokenizer = load_source(cfg)
    chunks = heldout(cfg, tokenizer)
    ar = measures.ar_token_nll(source, chunks, cfg.eval_batch_size)
    for name, method, ckpt in todo:
        model = load_adapted(cfg, method, ckpt, source, tokenizer)
        out[name] = measures.block_position_profile(model, chunks, cfg.eval_batch_size, ar)
        log(
            f"profile {name}: "
            + ", ".join(
                f"k={r['offset']} all-masked {r['all_masked']:.2f} left-revealed {r['left_revealed']:.2f} AR {r['ar']:.2f}"
                for r in out[name]["by_offset"]
            )
        )
        write(path, out)
        del model
    return out


def run_call_cost(cfg: AdaptConfig, work_dir: Path) -> dict[str, Any]:
    """Where decode time goes, into `work_dir/call_cost.json`: the source's greedy `generate()` and the last LoRA
    checkpoint's (else the converted model's) `thr0.9_greedy` decode, same prompts and new tokens, at every batch size
    of `cfg.speed_batches`, with the seconds inside the network per call (`measures.network_time`): the whole model,
    the transformer trunk (`LlamaModel`: same code and weights in both), and the rest of `generate()` (the decode
    loop, sampling, cache bookkeeping). Median of `cfg.speed_repeats` interleaved runs after one warm-up."""
    path = work_dir / "call_cost.json"
    if path.exists():
        return json.loads(path.read_text())
    torch.set_num_threads(cfg.threads)
    source, tokenizer = load_source(cfg)
    found = checkpoints(work_dir / "lora")
    model = load_adapted(cfg, "lora", found[-1] if found else None, source, tokenizer)
    setting = Setting("confidence_threshold", 0.9, False)
    out: dict[str, Any] = {"model": f"lora {found[-1].name}" if found else "converted", "setting": setting.name}
    n = cfg.speed_new_tokens
    for batch in cfg.speed_batches:
        prompts = cfg.speed_prompts(batch)
        runs = {
            "ar": (
                lambda: measures.ar_samples(
                    source, tokenizer, prompts, n, False, top_p=cfg.top_p, temperature=cfg.temperature, seed=0
                ),
                {"model": source, "trunk": source.model},
            ),
            "bd3": (
                lambda: measures.bd3_samples(
                    model, tokenizer, prompts, n, setting, top_p=cfg.top_p, temperature=cfg.temperature, seed=0
                ),
                {"model": model, "trunk": model.backbone.model},
            ),
        }
        for fn, _ in runs.values():
            fn()  # warm-up
        repeats: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
        for _ in range(cfg.speed_repeats):
            for name, (fn, modules) in runs.items():
                repeats[name].append(measures.network_time(fn, modules))
        row: dict[str, Any] = {}
        for name, measured in repeats.items():
            median = {k: statistics.median(m[k] for m in measured) for k in measured[0]}
            calls = median["model_calls"]
            row[name] = {
                **median,
                "new_tokens": n * batch,
                "network_s_per_call": median["model_s"] / calls,
                "trunk_s_per_call": median["trunk_s"] / calls,
                "outside_network_s_per_call": (median["total_s"] - median["model_s"]) / calls,
            }
        row["bd3_call_vs_ar_step"] = row["bd3"]["network_s_per_call"] / row["ar"]["network_s_per_call"]
        row["bd3_trunk_call_vs_ar_step"] = row["bd3"]["trunk_s_per_call"] / row["ar"]["trunk_s_per_call"]
        out[f"batch{batch}"] = row
        log(
            f"call cost, batch {batch}: BD3 call {row['bd3_call_vs_ar_step']:.2f}x an AR step in the network "
            f"(trunk {row['bd3_trunk_call_vs_ar_step']:.2f}x); outside it per call: BD3 "
            f"{row['bd3']['outside_network_s_per_call'] * 1e3:.1f} ms, AR {row['ar']['outside_network_s_per_call'] * 1e3:.1f} ms"
        )
    write(path, out)
    return out
