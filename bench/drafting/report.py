"""Gather the drafting study's stage JSON into `results/drafting.json`, `results/tables.md` and `results/cost_curve.png`.

Every number in the tables is computed here from the stage files (medians, ratios, break-even points); nothing is
written by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bd3lm_trainer.utils import pyplot, save_figure

from .measures import KINDS, break_even, summarise_cost, write

LABELS = {
    "source_all": "source, logits at every position",
    "source_last": "source, logits_to_keep=1",
    "bd3": "converted BD3-LM sampling pass",
}


def gather(work_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("cost", "acceptance"):
        path = work_dir / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    if "cost" in out:
        cost = out["cost"]
        out["cost_summary"] = summarise_cost(cost)
        for name, stat in (("break_even", "median"), ("break_even_min", "min")):
            out[name] = {
                f"{dtype}/b{batch}": break_even(cost["seconds"], dtype, batch, tuple(cost["config"]["ks"]), stat)
                for dtype in cost["key"]["dtypes"]
                for batch in cost["key"]["batches"]
            }
    return out


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _load(values: list[float] | None) -> str:
    return "-" if values is None else " / ".join(f"{v:.2f}" for v in values)


def cost_tables(results: dict[str, Any]) -> list[str]:
    cost, summary = results["cost"], results["cost_summary"]
    key = cost["key"]
    repeats = len(next(iter(cost["seconds"].values())))
    lines = [
        "## Cost of one cached forward with n new positions",
        "",
        f"After a {key['prefix']}-token prefix; {repeats} repeats, every setting once per repeat in a rotated order, "
        f"medians; torch threads: {key['threads']}; machine: {cost['machine']['cpu']} ({cost['machine']['cpu_cores']} "
        f"cores), torch {cost['machine']['torch']}, transformers {cost['machine']['transformers']}. Load average "
        f"(1/5/15 min) before: {_load(cost.get('load_average_before'))}, after: "
        f"{_load(cost.get('load_average_after'))}.",
        "",
    ]
    for sitting in cost.get("sittings", [])[1:]:  # repeats added later by a resumed run
        lines[-2] += (
            f" Repeats from {sitting['from_repeat'] + 1} were added later (load before "
            f"{_load(sitting['load_average_before'])}, after {_load(sitting.get('load_average_after'))})."
        )
    for dtype in key["dtypes"]:
        for batch in key["batches"]:
            lines += [
                f"### {dtype}, batch {batch}: median ms (cost(n)/cost(1)), min ms (min(n)/min(1))",
                "",
                "| n | " + " | ".join(LABELS[k] for k in KINDS) + " |",
                "|---|" + "---|" * len(KINDS),
            ]
            for n in key["ns"]:
                cells = []
                for kind in KINDS:
                    row = {int(m): v for m, v in summary[f"{kind}/{dtype}/b{batch}"].items()}[n]
                    cells.append(
                        f"{row['seconds'] * 1e3:.1f} ({row['ratio']:.2f}), {row['min_seconds'] * 1e3:.1f} "
                        f"({row['min_ratio']:.2f})"
                    )
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += [
        "## Break-even of draft-and-verify, from the timed calls",
        "",
        "Cycle cost in AR steps (the source's 1-position call with logits_to_keep=1; median over repeats of the ratio "
        "within a repeat, and the ratio of the minima) = the tokens per cycle a "
        "draft-and-verify cycle must emit to match AR decoding; α = the per-position acceptance of the geometric model "
        "(1 - α^k)/(1 - α) that emits them ('-' where the call was not measured, 'out of reach' above k tokens). "
        "2-pass: BD3 draft over k + source verify over k (logits at all k); one-forward: one BD3 call over 2k "
        "(the extra draft pass after a rejection not counted: a lower bound); quadratic: one BD3 call over k + k².",
        "",
        "| dtype, batch | k | variant | positions | cycle cost / AR step (median) | break-even α | "
        "from the minima | break-even α |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def alpha(row: dict[str, Any]) -> str:
        return "out of reach" if row["cycle_vs_ar"] is not None and row["alpha"] is None else _f(row["alpha"])

    for setting, rows in results["break_even"].items():
        for row, low in zip(rows, results["break_even_min"][setting]):
            lines.append(
                f"| {setting} | {row['k']} | {row['variant']} | {row['positions'] or '-'} | "
                f"{_f(row['cycle_vs_ar'])} | {alpha(row)} | {_f(low['cycle_vs_ar'])} | {alpha(low)} |"
            )
    return lines + [""]


def acceptance_tables(results: dict[str, Any]) -> list[str]:
    acc = results["acceptance"]
    lines = [
        "## Acceptance of one-step drafts against the source's greedy tokens (`estimate_acceptance`)",
        "",
        f"{len(acc['prompts'])} chat prompts ({', '.join(repr(p) for p in acc['prompts'])}), prompt tokens "
        f"{acc['prompt_tokens']}, greedy continuations of {acc['continuation_tokens']} tokens (to "
        f"{acc['config']['model_length']} columns with the prompt padded to a block boundary, or the first EOS).",
        "",
        "| drafter | k | blocks | match rate at offsets 1..k-1 | conditional acceptance | tokens per cycle | α (geometric) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_k in acc["drafters"].items():
        for k, est in by_k.items():
            lines.append(
                f"| {name} | {k} | {est['blocks']} | {' / '.join(_f(x) for x in est['match_rate'])} | "
                f"{' / '.join(_f(x) for x in est['conditional_acceptance'])} | "
                f"{est['tokens_per_cycle']:.3f} | {est['alpha']:.3f} |"
            )
    return lines + [""]


def plot_cost(results: dict[str, Any], path: Path) -> Path | None:
    plt = pyplot("matplotlib is not installed: no cost-curve plot")
    if plt is None:
        return None
    cost, summary = results["cost"], results["cost_summary"]
    batches = cost["key"]["batches"]
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    styles = {"float32": "-", "bfloat16": "--"}
    colours = {"source_all": "tab:blue", "source_last": "tab:green", "bd3": "tab:red"}
    for ax, batch in zip(axes[0], batches):
        for kind in KINDS:
            for dtype in cost["key"]["dtypes"]:
                curve = {int(m): v for m, v in summary[f"{kind}/{dtype}/b{batch}"].items()}
                ns = sorted(curve)
                ax.plot(
                    ns,
                    [curve[n]["ratio"] for n in ns],
                    styles.get(dtype, ":"),
                    marker="o",
                    markersize=3,
                    color=colours[kind],
                    label=f"{LABELS[kind]}, {dtype}",
                )
        ax.set_xlabel("new positions n in one cached call")
        ax.set_ylabel("cost(n) / cost(1)")
        ax.set_title(f"batch {batch}, {cost['key']['threads']} torch threads")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def write_report(work_dir: Path, output_dir: Path) -> dict[str, Any]:
    results = gather(work_dir)
    if not results:
        raise FileNotFoundError(f"No stage results in {work_dir}; run: python -m bench.drafting --stage cost")
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Drafting: cost curve and acceptance (generated by `python -m bench.drafting --stage report`)", ""]
    if "cost" in results:
        lines += cost_tables(results)
        plot_cost(results, output_dir / "cost_curve.png")
    if "acceptance" in results:
        lines += acceptance_tables(results)
    (output_dir / "tables.md").write_text("\n".join(lines))
    write(output_dir / "drafting.json", results)
    return results
