"""Gather the adaptation study's per-stage JSON into `results/adapt.json`, `results/tables.md` and PNG plots.

The targets table is computed from the numbers, never written by hand: a setting "meets" speed-at-quality when its
samples' gen-PPL (judged by the unadapted source) is within 1.5x of the source's own samples with the same decoding
(top-p or greedy), their unigram entropy is at least 0.9x the source's (repetition lowers gen-PPL too), and its
decode is faster than the source's `generate()` timed beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bd3lm_trainer.utils import pyplot, save_figure

from .study import (
    ENTROPY_FACTOR,
    QUALITY_FACTOR,
    AdaptConfig,
    meta,
    reference_name,
    within_quality_bar,
    write,
)

NELBO_FACTOR = 1.3  # perplexity bound within 1.3x of the source's AR perplexity


def gather(cfg: AdaptConfig, work_dir: Path) -> dict[str, Any]:
    """Every stage's JSON under one dict: `source`, `converted`, and per method its ledger and checkpoint evals."""
    source = json.loads((work_dir / "source.json").read_text())
    out: dict[str, Any] = {"meta": meta(), "config": cfg, "source": source, "methods": {}}
    for name in ("converted", "profile", "call_cost"):
        if (work_dir / f"{name}.json").exists():
            out[name] = json.loads((work_dir / f"{name}.json").read_text())
    for method in ("lora", "full"):
        folder = work_dir / method
        if not (folder / "ledger.json").exists():
            continue
        ledger = json.loads((folder / "ledger.json").read_text())
        evals = {}  # from the evaluation files, not the checkpoints: a checkpoint's weights need not be kept
        for path in sorted(folder.glob("eval-*.json"), key=lambda p: int(p.stem.split("-")[1])):
            step = path.stem.split("-")[1]
            evals[step] = {**json.loads(path.read_text()), **ledger["checkpoints"].get(step, {})}
        out["methods"][method] = {"ledger": ledger, "evals": evals}
    return out


def _final(results: dict[str, Any], method: str) -> dict[str, Any] | None:
    evals = results["methods"].get(method, {}).get("evals", {})
    return evals[max(evals, key=int)] if evals else None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's three targets, judged on the last checkpoint of each method."""
    refs = {n: r["gen_ppl"] for n, r in results["source"]["samples"].items()}
    ar_ppl = results["source"]["heldout"]["ppl"]
    rows = []
    for method in results["methods"]:
        final = _final(results, method)
        if final is None or "speed" not in final:
            continue
        best = None  # the fastest setting within the quality bar, at batch 1 and 8
        for batch, timing in final["speed"].items():
            for name, row in timing.items():
                if name.startswith("ar_") or name not in final["samples"]:
                    continue
                quality = final["samples"][name]["gen_ppl"] / refs[reference_name(name)]
                ok = within_quality_bar(name, final["samples"][name], results["source"]["samples"])
                if ok and (best is None or row["speedup_vs_ar"] > best["speedup"]):
                    best = {
                        "batch": batch,
                        "setting": name,
                        "speedup": row["speedup_vs_ar"],
                        "quality": quality,
                        "tokens_per_call": final["samples"][name]["tokens_per_call"],
                    }
        bound = final["heldout"]["ppl"] / ar_ppl
        rows += [
            {
                "method": method,
                "target": f"speed at quality: gen-PPL <= {QUALITY_FACTOR}x the source's (same "
                f"decoding; entropy >= {ENTROPY_FACTOR}x) and faster than its AR decode",
                "value": "none within the quality bar"
                if best is None
                else f"{best['setting']} at {best['batch']}: {best['speedup']:.2f}x AR, gen-PPL {best['quality']:.2f}x",
                "met": best is not None and best["speedup"] > 1.0,
                "stretch": best is not None and best["speedup"] >= 1.5,
            },
            {
                "method": method,
                "target": ">= 2 tokens per call at that setting",
                "value": "-" if best is None else f"{best['tokens_per_call']:.2f}",
                "met": best is not None and best["tokens_per_call"] >= 2.0,
                "stretch": None,
            },
            {
                "method": method,
                "target": f"NELBO bound <= {NELBO_FACTOR}x the source's AR perplexity",
                "value": f"{final['heldout']['ppl']:.2f} vs {ar_ppl:.2f} ({bound:.2f}x)",
                "met": bound <= NELBO_FACTOR,
                "stretch": None,
            },
        ]
    return rows


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _n(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def tables(results: dict[str, Any]) -> str:
    src = results["source"]
    ref = src["samples"]["ar_sampled"]["gen_ppl"]
    lines = [
        "# Adaptation study: tables (generated by `python -m bench.adapt --stage report`)",
        "",
        f"Source: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32), {src['parameters']:,} parameters. "
        f"Held-out: {src['heldout']['chunks']} chunks x {src['heldout']['tokens'] // src['heldout']['chunks']} "
        "scored tokens of the embedded corpus' validation split.",
        "",
        "## The source model (reference)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| AR perplexity, held-out | {_f(src['heldout']['ppl'])} (±1 SE {_f(src['heldout']['ppl_lo'])}–"
        f"{_f(src['heldout']['ppl_hi'])}) |",
    ]
    for name, row in src["samples"].items():
        lines.append(
            f"| gen-PPL of its own samples, {name} | {_f(row['gen_ppl'])} (entropy {_f(row['unigram_entropy'])}"
            f", {row['samples']} samples) |"
        )
    for batch, timing in src["speed"].items():
        for name, row in timing.items():
            lines.append(f"| HF generate() + KV cache, {name}, {batch} | {_f(row['tokens_per_s'], 1)} tokens/s |")
    lines += [
        "",
        "## Training (the same CPU budget per method)",
        "",
        "| method | trainable params | steps | tokens | CPU s | wall s | last loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, m in results["methods"].items():
        ledger = m["ledger"]
        last = max(ledger["checkpoints"].values(), key=lambda r: r["step"]) if ledger["checkpoints"] else {}
        loss = ledger["log"][-1]["loss"] if ledger.get("log") else None
        lines.append(
            f"| {method} | {_n(ledger.get('trainable_parameters'))} | {_n(last.get('step'))} | "
            f"{_n(last.get('tokens'))} | {_f(last.get('cpu_s'), 0)} | {_f(last.get('wall_s'), 0)} | "
            f"{_f(loss, 3)} |"
        )
    lines += [
        "",
        "## Perplexity bound along training (held-out chunks, paired with the source's AR NLL)",
        "",
        "| method | step | CPU s | NELBO PPL bound | ±1 SE | bound / AR PPL (paired) |",
        "|---|---|---|---|---|---|",
    ]
    conv = results.get("converted")
    if conv:
        h = conv["heldout"]
        lines.append(
            f"| converted, untrained | 0 | 0 | {_f(h['ppl'])} | {_f(h['ppl_lo'])}–{_f(h['ppl_hi'])} | "
            f"{_f(h['vs_ar']['ratio'], 3)} ± {_f(h['vs_ar']['diff_se'], 3)} (log) |"
        )
    for method, m in results["methods"].items():
        for step, e in sorted(m["evals"].items(), key=lambda kv: int(kv[0])):
            h = e["heldout"]
            lines.append(
                f"| {method} | {step} | {_f(e.get('cpu_s'), 0)} | {_f(h['ppl'])} | {_f(h['ppl_lo'])}–"
                f"{_f(h['ppl_hi'])} | {_f(h['vs_ar']['ratio'], 3)} ± {_f(h['vs_ar']['diff_se'], 3)} (log) |"
            )
    lines += [
        "",
        "## Samples: tokens per call against gen-PPL (judge: the unadapted source)",
        "",
        f"The source's own samples: top-p {_f(ref)}, greedy {_f(src['samples']['ar_greedy']['gen_ppl'])}; "
        "'/ source' divides by the one with the same decoding (sampled or greedy).",
        "",
        "| model | setting | tokens / call | gen-PPL | ±1 SE (log) | / source | unigram entropy | samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sections = [("converted", conv)] if conv else []
    sections += [
        (f"{method} step {step}", e)
        for method, m in results["methods"].items()
        for step, e in sorted(m["evals"].items(), key=lambda kv: int(kv[0]))
    ]
    for label, e in sections:
        for name, row in e["samples"].items():
            lines.append(
                f"| {label} | {name} | {_f(row['tokens_per_call'])} | {_f(row['gen_ppl'])} | "
                f"{_f(row.get('log_gen_ppl_se'), 3)} | "
                f"{_f(row['gen_ppl'] / src['samples'][reference_name(name)]['gen_ppl'])} | "
                f"{_f(row['unigram_entropy'])} | {row['samples']} |"
            )
    for method, m in results["methods"].items():
        timed = [(step, e) for step, e in sorted(m["evals"].items(), key=lambda kv: int(kv[0])) if "speed" in e]
        if not timed:
            continue
        lines += [
            "",
            f"## Decode speed, {method}, side by side with the source's generate() (each checkpoint timed "
            "in one run with the source)",
            "",
            "| step | batch | setting | tokens / call | tokens/s | vs AR (same decoding) |",
            "|---|---|---|---|---|---|",
        ]
        for step, e in timed:
            for batch, timing in e["speed"].items():
                for name, row in timing.items():
                    lines.append(
                        f"| {step} | {batch} | {name} | {_f(row['tokens_per_call'])} | "
                        f"{_f(row['tokens_per_s'], 1)} | {_f(row['speedup_vs_ar'])}x |"
                    )
    if results.get("profile"):
        lines += [
            "",
            "## Profile: loss by position in the block (nats/token, held-out chunks, blocks 1..)",
            "",
            "`all masked`: the whole block masked (a fresh block's first call); `left revealed`: the tokens "
            "before it clean (left-to-right decoding); AR: the source on the same tokens.",
            "",
            "| model | offset k | all masked | left revealed | AR |",
            "|---|---|---|---|---|",
        ]
        for name, prof in results["profile"].items():
            for r in prof["by_offset"]:
                lines.append(
                    f"| {name} | {r['offset']} | {_f(r['all_masked'], 3)} | {_f(r['left_revealed'], 3)} | "
                    f"{_f(r['ar'], 3)} |"
                )
            lines.append(
                f"| {name} | all | {_f(prof['all_masked'], 3)} | {_f(prof['left_revealed'], 3)} | {_f(prof['ar'], 3)} |"
            )
    cost = results.get("call_cost")
    if cost:
        lines += [
            "",
            f"## Profile: where decode time goes ({cost['model']}, {cost['setting']}, against the source's "
            "greedy generate())",
            "",
            "Per network call, median of interleaved runs: `network` is the whole model's forward, `trunk` the "
            "transformer (`LlamaModel`, the same code in both), `outside` the rest of `generate()`.",
            "",
            "| batch | decoder | calls | new tokens | network ms/call | trunk ms/call | outside ms/call | total s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for batch, row in ((k, v) for k, v in cost.items() if k.startswith("batch")):
            for name in ("ar", "bd3"):
                r = row[name]
                lines.append(
                    f"| {batch} | {name} | {_f(r['model_calls'], 0)} | {r['new_tokens']} | "
                    f"{_f(r['network_s_per_call'] * 1e3, 1)} | {_f(r['trunk_s_per_call'] * 1e3, 1)} | "
                    f"{_f(r['outside_network_s_per_call'] * 1e3, 1)} | {_f(r['total_s'])} |"
                )
            lines.append(
                f"| {batch} | BD3 call / AR step | | | {_f(row['bd3_call_vs_ar_step'])}x | "
                f"{_f(row['bd3_trunk_call_vs_ar_step'])}x | | |"
            )
    lines += ["", "## Targets", "", "| method | target | value | met |", "|---|---|---|---|"]
    for t in targets(results):
        met = "**met**" if t["met"] else "missed"
        if t["stretch"]:
            met += " (stretch 1.5x met)"
        lines.append(f"| {t['method']} | {t['target']} | {t['value']} | {met} |")
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], folder: Path) -> list[str]:
    plt = pyplot()
    if plt is None:
        print('bench.adapt: matplotlib is not installed, so no plots were written (pip install "bd3lm[plot]").')
        return []
    written = []
    src = results["source"]
    # 1. training loss and the held-out bound against CPU seconds
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method, m in results["methods"].items():
        log = m["ledger"].get("log", [])
        left.plot([r["cpu_s"] for r in log], [r["loss"] for r in log], label=method, alpha=0.8)
        evals = sorted(m["evals"].values(), key=lambda e: e.get("cpu_s", 0))
        xs = [0.0] + [e.get("cpu_s", 0) for e in evals]
        conv = results.get("converted", {}).get("heldout", {}).get("ppl")
        ys = [conv] + [e["heldout"]["ppl"] for e in evals]
        right.plot([x for x, y in zip(xs, ys) if y], [y for y in ys if y], marker="o", label=method)
    left.set(xlabel="training CPU seconds", ylabel="training loss (NELBO / token)", title="training loss")
    right.axhline(src["heldout"]["ppl"], color="black", linestyle="--", label="source AR PPL")
    right.axhline(src["heldout"]["ppl"] * NELBO_FACTOR, color="gray", linestyle=":", label=f"{NELBO_FACTOR}x AR")
    right.set(xlabel="training CPU seconds", ylabel="held-out PPL bound", yscale="log", title="NELBO bound (held-out)")
    left.legend()
    right.legend(fontsize=8)
    save_figure(fig, folder / "training.png")
    written.append("training.png")
    # 2. gen-PPL against tokens per call, every setting of the last checkpoints
    fig, ax = plt.subplots(figsize=(7, 5))
    ref = src["samples"]["ar_sampled"]["gen_ppl"]
    ax.scatter([1.0], [ref], color="black", marker="*", s=120, label="source AR, top-p (reference)", zorder=3)
    ax.scatter([1.0], [src["samples"]["ar_greedy"]["gen_ppl"]], color="black", marker="x", label="source AR, greedy")
    ax.axhline(QUALITY_FACTOR * ref, color="tab:blue", linestyle=":", label=f"{QUALITY_FACTOR}x source, top-p")
    ax.axhline(
        QUALITY_FACTOR * src["samples"]["ar_greedy"]["gen_ppl"],
        color="tab:orange",
        linestyle=":",
        label=f"{QUALITY_FACTOR}x source, greedy",
    )
    cost = results.get("call_cost", {}).get("batch1")
    even = cost["bd3_call_vs_ar_step"] if cost else 1.4  # measured network cost of a call in AR steps, else a guess
    ax.axvline(even, color="tab:red", linestyle=":", label=f"{even:.2f} tokens/call (break-even, batch 1)")
    markers = {"lora": "o", "full": "s"}
    for method in results["methods"]:
        final = _final(results, method)
        if not final:
            continue
        for sampled, color in ((True, "tab:blue"), (False, "tab:orange")):
            rows = [(n, r) for n, r in final["samples"].items() if n.endswith("_sampled") == sampled]
            ax.scatter(
                [r["tokens_per_call"] for _, r in rows],
                [r["gen_ppl"] for _, r in rows],
                color=color,
                marker=markers[method],
                label=f"{method}, {'sampled' if sampled else 'greedy'}",
            )
            for n, r in rows:
                ax.annotate(n.split("_")[0], (r["tokens_per_call"], r["gen_ppl"]), fontsize=7)
    ax.set(
        xlabel="tokens per network call",
        ylabel="gen-PPL (judge: unadapted SmolLM2)",
        yscale="log",
        title="quality against parallelism (last checkpoints)",
    )
    ax.legend(fontsize=7)
    save_figure(fig, folder / "genppl_vs_tokens_per_call.png")
    written.append("genppl_vs_tokens_per_call.png")
    return written


def write_report(cfg: AdaptConfig, work_dir: Path, output_dir: Path) -> dict[str, Any]:
    results = gather(cfg, work_dir)
    results["targets"] = targets(results)
    output_dir.mkdir(parents=True, exist_ok=True)
    write(output_dir / "adapt.json", results)
    (output_dir / "tables.md").write_text(tables(results))
    results["plots"] = plots(results, output_dir)
    return results
