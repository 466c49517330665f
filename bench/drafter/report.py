"""`--stage report`: `results/drafter.json` (every measurement, the training logs, the data summary) and
`results/tables.md` (acceptance per prompt kind along training; by offset; by block size)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .study import RECIPES, DrafterConfig, checkpoints, read_rows, write


def _order(name: str, row: dict[str, Any]) -> tuple[int, float]:
    return (0, 0.0) if name == "converted" else (1 + RECIPES.index(name.split("/")[0]), row["train_cpu_s"])


def gather(cfg: DrafterConfig, work_dir: Path) -> dict[str, Any]:
    measured = {}
    for path in sorted((work_dir / "measure").glob("*.json")):
        row = json.loads(path.read_text())
        measured[row["name"]] = row
    measured = dict(sorted(measured.items(), key=lambda kv: _order(*kv)))
    training = {}
    for recipe in RECIPES:
        found = [c for c in checkpoints(work_dir / recipe) if (c / "state.json").exists()]
        if found:
            training[recipe] = json.loads((found[-1] / "state.json").read_text())
    data = {}
    for name in ("data", "heldout"):
        if (work_dir / f"{name}.jsonl").exists():
            rows = read_rows(work_dir / f"{name}.jsonl")
            data[name] = {
                "prompts": len(rows), "kinds": sorted({r["kind"] for r in rows}),
                "continuation_tokens": sum(len(r["continuation"]) for r in rows),
                "prompt_tokens": sum(len(r["prompt_ids"]) for r in rows),
                "cpu_s": sum(r["cpu_s"] for r in rows),
            }  # fmt: skip
    speed = {}
    for path in sorted((work_dir / "speed").glob("*.json")):
        row = json.loads(path.read_text())
        speed[row["name"]] = row
    return {"config": cfg, "data": data, "training": training, "measured": measured, "speed": speed}


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.2f}"


def tables(results: dict[str, Any], cfg: DrafterConfig) -> str:
    measured = results["measured"]
    kinds = [k for k in next(iter(measured.values()))["acceptance"]] if measured else []
    k0 = f"k{cfg.block_size}"
    lines = ["# Drafter study: tables (written by `python -m bench.drafter --stage report`)", ""]
    for name, d in results["data"].items():
        lines.append(f"- `{name}.jsonl`: {d['prompts']} prompts ({', '.join(d['kinds'])}), {d['prompt_tokens']} prompt "
                     f"tokens, {d['continuation_tokens']} greedy continuation tokens, {d['cpu_s']:.0f} CPU s")  # fmt: skip
    for recipe, t in results["training"].items():
        lines.append(f"- training `{recipe}`: {t['step']} steps, {t['cpu_s']:.0f} CPU s, "
                     f"{t.get('trainable_parameters', 0):,} trainable parameters, finished: {bool(t.get('finished'))}")  # fmt: skip
    lines += ["", f"## Tokens per cycle (α) at k = {cfg.block_size}, per held-out prompt kind", "",
              "| drafter | training CPU s | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]  # fmt: skip
    for name, row in measured.items():
        cells = [f"{_fmt(row['acceptance'][kd][k0]['tokens_per_cycle'])} ({_fmt(row['acceptance'][kd][k0]['alpha'])})"
                 for kd in kinds]  # fmt: skip
        lines.append(f"| {name} | {row['train_cpu_s']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", f"## Match rate by offset (1..k-1) at k = {cfg.block_size}, and the conditional acceptance (given offsets before all matched)", "",
              "| drafter | kind | blocks | match rate | conditional |", "|---|---|---|---|---|"]  # fmt: skip
    for name, row in measured.items():
        for kd in kinds:
            a = row["acceptance"][kd][k0]
            lines.append(f"| {name} | {kd} | {a['blocks']} | {' / '.join(map(_fmt, a['match_rate']))} | "
                         f"{' / '.join(map(_fmt, a['conditional_acceptance']))} |")  # fmt: skip
    sizes = cfg.measure_block_sizes
    lines += ["", "## Block size: tokens per cycle (α), all held-out kinds pooled", "",
              "| drafter | " + " | ".join(f"k={k}" for k in sizes) + " |", "|---|" + "---|" * len(sizes)]  # fmt: skip
    for name, row in measured.items():
        cells = [f"{_fmt(row['acceptance']['all'][f'k{k}']['tokens_per_cycle'])} "
                 f"({_fmt(row['acceptance']['all'][f'k{k}']['alpha'])})" for k in sizes]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if results["speed"]:
        lines += ["", "## Real greedy draft-and-verify (two-pass, batch 1) against the source's `generate()`", "",
                  "| drafter | kind | prompts | equal to source | new tokens | tokens per cycle (accepted drafts + 1) | "
                  "tokens per forward | draft-verify tok/s | source tok/s | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, run in results["speed"].items():
            for kd in dict.fromkeys(r["kind"] for r in run["rows"]):
                rows = [r for r in run["rows"] if r["kind"] == kd]
                cycles = [a for r in rows for a in r["acceptance_lengths"]]
                new = sum(r["new_tokens"] for r in rows)
                dv, src = sum(r["draft_verify_s"] for r in rows), sum(r["source_s"] for r in rows)
                lines.append(f"| {name} | {kd} | {len(rows)} | {sum(r['equal_to_source'] for r in rows)}/{len(rows)} | "
                             f"{new} | {_fmt(sum(cycles) / max(1, len(cycles)))} | "
                             f"{_fmt(sum(r['tokens_per_forward'] for r in rows) / len(rows))} | {new / dv:.1f} | "
                             f"{new / src:.1f} | {src / dv:.2f} |")  # fmt: skip
    for recipe, t in results["training"].items():
        lines += ["", f"## Training loss, `{recipe}` (every logged step: step, CPU s, loss)", ""]
        lines.append(
            ", ".join(
                f"{r['step']}: {r['cpu_s']:.0f} s {r['loss']:.3f}" for r in t["log"][:: max(1, len(t["log"]) // 25)]
            )
        )
    return "\n".join(lines) + "\n"


def write_report(cfg: DrafterConfig, work_dir: Path, output_dir: Path) -> dict[str, Any]:
    results = gather(cfg, work_dir)
    slim = json.loads(json.dumps(results, default=str))
    write(output_dir / "drafter.json", slim)
    (output_dir / "tables.md").write_text(tables(results, cfg))
    return results
