"""`--stage report`: `results/drafter.json` (every measurement, the training logs, the data summary) and
`results/tables.md` (acceptance per prompt kind along training; by offset; by block size)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bd3lm_trainer.utils import pyplot, save_figure

from .measure import METHODS, VARIANTS, variant_key
from .study import DrafterConfig, checkpoints, read_rows, write


def _order(name: str, row: dict[str, Any]) -> tuple[str, float]:
    return ("", 0.0) if name == "converted" else (name.split("/")[0], row["train_cpu_s"])


def gather(cfg: DrafterConfig, work_dir: Path) -> dict[str, Any]:
    measured = {}
    for path in sorted((work_dir / "measure").glob("*.json")):
        row = json.loads(path.read_text())
        measured[row["name"]] = row
    measured = dict(sorted(measured.items(), key=lambda kv: _order(*kv)))
    training = {}
    for folder in sorted(p for p in work_dir.iterdir() if p.is_dir()):
        found = [c for c in checkpoints(folder) if (c / "state.json").exists()]
        if found:
            training[folder.name] = json.loads((found[-1] / "state.json").read_text())
    data = {}
    for name in ("data", "sampled", "heldout"):
        if (work_dir / f"{name}.jsonl").exists():
            rows = read_rows(work_dir / f"{name}.jsonl")
            data[name] = {
                "prompts": len(rows), "kinds": sorted({r["kind"] for r in rows}),
                "continuation_tokens": sum(len(r["continuation"]) for r in rows),
                "prompt_tokens": sum(len(r["prompt_ids"]) for r in rows),
                "cpu_s": sum(r["cpu_s"] for r in rows),
            }  # fmt: skip
    speed, batched = {}, {}
    for folder, into in (("speed", speed), ("speed-batch", batched)):
        for path in sorted((work_dir / folder).glob("*.json")):
            row = json.loads(path.read_text())
            into[f"{row['name']}--{row['dtype']}"] = row
    return {"config": cfg, "data": data, "training": training, "measured": measured, "speed": speed,
            "speed_batch": batched}  # fmt: skip


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.2f}"


def _speed_lines(speed: dict[str, Any]) -> list[str]:
    lines = ["", "## Real greedy decoding, batch 1: tokens/s side by side (median of interleaved repeats)", "",
             "Ratios are against `generate()` in the same run and dtype; 'equal' counts prompts whose tokens equal "
             "`generate()`'s; tokens per call = new tokens / network calls of draft-and-verify; tokens per cycle = "
             "accepted drafts + 1 (the prefill's first token not counted); a cycle's cost in AR steps = tokens per cycle "
             "x generate's tokens/s / draft-and-verify's (what a cycle must emit to break even).", "",
             "| drafter | dtype | kind | prompts | generate tok/s | prompt lookup | two-pass | one-forward | equal (lookup, two-pass, one-forward) | tokens per call (two-pass, one-forward) | tokens per cycle (two-pass, one-forward) | cycle cost in AR steps (two-pass, one-forward) | bf16 text = fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in speed.values():
        for kind in dict.fromkeys(r["kind"] for r in run["rows"]):
            rows = [r for r in run["rows"] if r["kind"] == kind]
            new = sum(r["new_tokens"] for r in rows)
            rate = {m: new / sum(r["methods"][m]["seconds"] for r in rows) for m in METHODS}
            equal = [f"{sum(r['methods'][m]['equal_to_generate'] for r in rows)}/{len(rows)}" for m in METHODS[1:]]
            per_call = [_fmt(new / sum(r["methods"][v]["nfe"] for r in rows)) for v in VARIANTS]
            # a cycle's cost in AR steps = the tokens it emits x (generate's tokens/s) / (draft-and-verify's tokens/s)
            cycles = {v: [a for r in rows for a in r["methods"][v]["acceptance_lengths"]] for v in VARIANTS}
            cost = [_fmt(sum(cycles[v]) / len(cycles[v]) * rate["generate"] / rate[v]) for v in VARIANTS]
            same = (
                f"{sum(r['generate_equal_to_float32'] for r in rows)}/{len(rows)}" if run["dtype"] != "float32" else "-"
            )
            cells = [f"{rate['generate']:.1f}"] + [
                f"{rate[m]:.1f} ({rate[m] / rate['generate']:.2f}x)" for m in METHODS[1:]
            ]
            lines.append(f"| {run['name']} | {run['dtype']} | {kind} | {len(rows)} | " + " | ".join(cells)
                         + f" | {', '.join(equal)} | {', '.join(per_call)} | "
                         + ", ".join(_fmt(sum(cycles[v]) / len(cycles[v])) for v in VARIANTS)
                         + f" | {', '.join(cost)} | {same} |")  # fmt: skip
    return lines


def tables(results: dict[str, Any], cfg: DrafterConfig) -> str:
    measured = results["measured"]
    kinds = [k for k in next(iter(measured.values()))["acceptance"]] if measured else []
    lines = ["# Drafter study: tables (written by `python -m bench.drafter --stage report`)", ""]
    for name, d in results["data"].items():
        lines.append(f"- `{name}.jsonl`: {d['prompts']} sequences ({', '.join(d['kinds'])}), {d['prompt_tokens']} prompt "
                     f"tokens, {d['continuation_tokens']} continuation tokens, {d['cpu_s']:.0f} CPU s")  # fmt: skip
    for run, t in results["training"].items():
        lines.append(f"- training `{run}`: {t['step']} steps, {t['cpu_s']:.0f} CPU s, "
                     f"{t.get('trainable_parameters', 0):,} trainable parameters, finished: {bool(t.get('finished'))}")  # fmt: skip
    for variant in VARIANTS:
        key = variant_key(variant, cfg.block_size)
        lines += ["", f"## Tokens per cycle (α) at k = {cfg.block_size}, {variant} drafts, per held-out prompt kind", "",
                  "| drafter | training CPU s | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]  # fmt: skip
        for name, row in measured.items():
            if key not in row["acceptance"]["all"]:
                continue
            cells = [f"{_fmt(row['acceptance'][kd][key]['tokens_per_cycle'])} ({_fmt(row['acceptance'][kd][key]['alpha'])})"
                     for kd in kinds]  # fmt: skip
            lines.append(f"| {name} | {row['train_cpu_s']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", f"## Match rate by offset (1..k-1) at k = {cfg.block_size}, and the conditional acceptance (given offsets before all matched), all kinds", "",
              "| drafter | variant | blocks | match rate | conditional |", "|---|---|---|---|---|"]  # fmt: skip
    for name, row in measured.items():
        for variant in VARIANTS:
            a = row["acceptance"]["all"].get(variant_key(variant, cfg.block_size))
            if a:
                lines.append(f"| {name} | {variant} | {a['blocks']} | {' / '.join(map(_fmt, a['match_rate']))} | "
                             f"{' / '.join(map(_fmt, a['conditional_acceptance']))} |")  # fmt: skip
    sizes = cfg.measure_block_sizes
    lines += ["", "## Block size: tokens per cycle (α), all held-out kinds pooled", "",
              "| drafter | variant | " + " | ".join(f"k={k}" for k in sizes) + " |", "|---|---|" + "---|" * len(sizes)]  # fmt: skip
    for name, row in measured.items():
        for variant in VARIANTS:
            got = [row["acceptance"]["all"].get(variant_key(variant, k)) for k in sizes]
            if all(got):
                cells = [f"{_fmt(a['tokens_per_cycle'])} ({_fmt(a['alpha'])})" for a in got]
                lines.append(f"| {name} | {variant} | " + " | ".join(cells) + " |")
    if results["speed"]:
        lines += _speed_lines(results["speed"])
    if results.get("speed_batch"):
        lines += ["", "## Batch 8 (a kind's held-out prompts, left-padded): tokens/s side by side", "",
                  "| drafter | dtype | kind | generate tok/s | two-pass | one-forward | rows equal to batched generate (two-pass, one-forward) | rows equal to each alone (generate, two-pass, one-forward) | mean acceptance (two-pass, one-forward) |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for run in results["speed_batch"].values():
            for row in run["rows"]:
                m = row["methods"]
                g = m["generate"]["tokens_per_s"]
                lines.append(f"| {run['name']} | {run['dtype']} | {row['kind']} | {g:.1f} | "
                             + " | ".join(f"{m[v]['tokens_per_s']:.1f} ({m[v]['tokens_per_s'] / g:.2f}x)" for v in VARIANTS)
                             + f" | {', '.join(str(m[v]['rows_equal_to_batched_generate']) for v in VARIANTS)} of {row['rows']}"
                             + f" | {', '.join(str(m[x]['rows_equal_to_alone_float32']) for x in ('generate', *VARIANTS))}"
                             + f" | {', '.join(_fmt(m[v]['mean_acceptance']) for v in VARIANTS)} |")  # fmt: skip
    for run, t in results["training"].items():
        lines += ["", f"## Training loss, `{run}` (every logged step: step, CPU s, loss)", ""]
        lines.append(
            ", ".join(
                f"{r['step']}: {r['cpu_s']:.0f} s {r['loss']:.3f}" for r in t["log"][:: max(1, len(t["log"]) // 25)]
            )
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], cfg: DrafterConfig, path: Path) -> Path | None:
    """Left: held-out tokens per cycle (all kinds, k = `cfg.block_size`) against training CPU seconds, per run and
    variant. Right: tokens/s relative to `generate()` at batch 1 per method, drafter, dtype and prompt kind."""
    plt = pyplot("matplotlib is not installed: no drafter plot")
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    measured = results["measured"]
    runs = sorted({n.split("/")[0] for n in measured if n != "converted"})
    base = measured.get("converted")
    for variant, style in zip(VARIANTS, ("-", "--")):
        key = variant_key(variant, cfg.block_size)
        for i, run in enumerate(runs):
            points = sorted((m["train_cpu_s"], m["acceptance"]["all"][key]["tokens_per_cycle"])
                            for n, m in measured.items() if n.split("/")[0] == run)  # fmt: skip
            if base:
                points = [(0.0, base["acceptance"]["all"][key]["tokens_per_cycle"]), *points]
            left.plot(*zip(*points), style, marker="o", color=f"C{i}", label=f"{run}, {variant}")
    left.set_xlabel("training CPU seconds")
    left.set_ylabel(f"held-out tokens per cycle (k = {cfg.block_size})")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    labels, values, colours = [], [], []
    for run in results["speed"].values():
        for kind in dict.fromkeys(r["kind"] for r in run["rows"]):
            rows = [r for r in run["rows"] if r["kind"] == kind]
            rate = {
                m: sum(r["new_tokens"] for r in rows) / sum(r["methods"][m]["seconds"] for r in rows) for m in METHODS
            }
            for j, method in enumerate(METHODS[1:]):
                labels.append(f"{run['name'].split('/')[-1]} {run['dtype'][:4]} {kind} {method}")
                values.append(rate[method] / rate["generate"])
                colours.append(f"C{j}")
    right.barh(range(len(values)), values, color=colours)
    right.set_yticks(range(len(values)), labels, fontsize=5)
    right.axvline(1.0, color="k", lw=0.8)
    right.set_xlabel("tokens/s relative to generate() (batch 1, same run)")
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(cfg: DrafterConfig, work_dir: Path, output_dir: Path) -> dict[str, Any]:
    results = gather(cfg, work_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    plot(results, cfg, output_dir / "drafter.png")
    slim = json.loads(json.dumps(results, default=str))
    write(output_dir / "drafter.json", slim)
    (output_dir / "tables.md").write_text(tables(results, cfg))
    return results
