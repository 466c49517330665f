"""The issue's targets checked against a results dict, and the markdown tables of `bench/results/<machine>.md`."""

from __future__ import annotations

from typing import Any

AR_MODE = "AR (KV cache)"


def _first(rows: list[dict], **match: Any) -> dict | None:
    for row in rows:
        if all(row.get(key) == value for key, value in match.items()):
            return row
    return None


def _target(name: str, goal: str, measured: str, met: bool | None, where: str, note: str = "") -> dict:
    return {"target": name, "goal": goal, "measured": measured, "met": met, "where": where, "note": note}


def evaluate_targets(results: dict) -> list[dict]:
    """One entry per target of the issue (per device where it applies); `met` is None when not measured."""
    targets = []
    for section in results.get("training", []):
        rows, device = section["rows"], section["device"]
        for preset in ("tiny", "small"):
            row = _first(rows, preset=preset, L=256, block_size=4, attn="sdpa", **{"pass": "vectorised"})
            if row is None or "over_ar" not in row:
                targets.append(
                    _target(
                        f"vectorised / AR step, {preset}",
                        "<= 2.2 at L=256",
                        "not measured",
                        None,
                        device,
                        "run without --quick",
                    )
                )
                continue
            targets.append(
                _target(
                    f"vectorised / AR step, {preset}",
                    "<= 2.2 at L=256",
                    f"{row['over_ar']:.2f}",
                    row["over_ar"] <= 2.2,
                    f"{device}, L'=4, batch {row['batch']}, sdpa",
                )
            )
    for section in results.get("generation", []):
        rows, device = section["rows"], section["device"]
        row = _first(rows, group="cache", mode="cached")
        if row is not None:
            speedup = row["speedup_vs_uncached"]
            full = row["new_tokens"] >= 1024
            targets.append(
                _target(
                    "cached / uncached tokens/s",
                    ">= 5x for 1024 new tokens",
                    f"{speedup:.1f}x",
                    (speedup >= 5) if full else None,
                    f"{device}, L={row['model_length']}, L'={row['block_size']}, {row['new_tokens']} new tokens, batch 1",
                    "" if full else "quick setting: shorter window than the target's",
                )
            )
        memory = section.get("memory", [])
        if memory:
            worst = max(memory, key=lambda m: abs(m["kv_bytes_per_token"] / m["formula_bytes_per_token"] - 1))
            off = worst["kv_bytes_per_token"] / worst["formula_bytes_per_token"] - 1
            targets.append(
                _target(
                    "KV-cache bytes per token",
                    "within 5% of 2·layers·hidden·bytes",
                    f"{worst['kv_bytes_per_token']:.0f} vs {worst['formula_bytes_per_token']} ({off:+.1%})",
                    abs(off) <= 0.05,
                    f"{device}, worst of {len(memory)} runs",
                )
            )
            one, ten = _first(memory, multiple=1), _first(memory, multiple=10)
            if one and ten:
                change = ten["peak_mib"] / one["peak_mib"] - 1
                targets.append(
                    _target(
                        "peak memory at 10x vs 1x model_length",
                        "within 10%",
                        f"{ten['peak_mib']:.1f} vs {one['peak_mib']:.1f} MiB ({change:+.1%})",
                        abs(change) <= 0.10,
                        f"{device}, L={one['model_length']}, {one['measure']}",
                        f"generation's own growth above the loaded model: {one['growth_mib']:.1f} -> "
                        f"{ten['growth_mib']:.1f} MiB",
                    )
                )
        trained = [r for r in rows if r["group"] == "samplers" and r.get("trained")]
        native = section.get("native_block_size")
        row = _first(trained, mode="threshold 0.9", batch=1, block_size=native)
        if row is None:
            targets.append(
                _target(
                    "confidence_threshold 0.9, trained model",
                    ">= 2 tokens/call and faster than AR",
                    "not measured",
                    None,
                    device,
                    "pass --model PATH (a trained checkpoint)",
                )
            )
        else:
            where = f"{device}, {row['model']}, L'={row['block_size']}, batch 1"
            targets.append(
                _target(
                    "confidence_threshold 0.9: tokens per call",
                    ">= 2",
                    f"{row['tokens_per_call']:.2f}",
                    row["tokens_per_call"] >= 2,
                    where,
                )
            )
            targets.append(
                _target(
                    "confidence_threshold 0.9: tokens/s vs AR decode",
                    "> 1x",
                    f"{row['speedup_vs_ar']:.2f}x",
                    row["speedup_vs_ar"] > 1,
                    where,
                )
            )
    return targets


def _fmt_met(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "n/a"}[met]


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"# Benchmark results: `{results['machine_name']}`",
        "",
        (
            f"Machine: {m['cpu']}, {m['cpu_cores']} cores"
            + (f", {m['cuda']}" if m.get("cuda") else "")
            + f"; torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; {m['platform']}."
        ),
        "",
        (
            "Every ratio is measured side by side in one run (candidates interleaved repeat by repeat, after warm-up;"
            " the median of the per-repeat ratios). Absolute times belong to this machine only."
        ),
        "",
        "## Targets",
        "",
        "| target | goal | measured | status | setting | note |",
        "|---|---|---|---|---|---|",
    ]
    for t in results["targets"]:
        lines.append(
            f"| {t['target']} | {t['goal']} | {t['measured']} | {_fmt_met(t['met'])} | {t['where']} | {t['note']} |"
        )
    for section in results.get("training", []):
        lines += [
            "",
            (
                f"## Training step ({section['device']}, torch threads: {section['torch_threads']}, "
                f"`{section['mode']}` run, {section['measured_at']})"
            ),
            "",
            (
                "One step = forward + backward. MFU = counted matmul FLOPs / step time / fp32 matmul peak "
                f"({section['peak_flops_per_s'] / 1e9:.1f} GFLOP/s, measured in the same run)."
            ),
            "",
            "| group | preset | L | L' | batch | pass | attention | step (ms) | / AR | / vectorised | GFLOP | MFU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in section["rows"]:
            lines.append(
                f"| {r['group']} | {r['preset']} | {r['L']} | {r['block_size']} | {r['batch']} | {r['pass']} | "
                f"{r['attn']} | {r['seconds'] * 1e3:.1f} | {_ratio(r, 'over_ar')} | {_ratio(r, 'over_vectorised')} | "
                f"{r['flops'] / 1e9:.2f} | {r['mfu']:.1%} |"
            )
    for section in results.get("generation", []):
        lines += [
            "",
            (
                f"## Generation ({section['device']}, torch threads: {section['torch_threads']}, "
                f"`{section['mode']}` run, {section['measured_at']})"
            ),
            "",
            (
                "Tokens/s count every row of the batch. Calls/token: denoising network calls a row needs per token "
                "(the paper's NFE); tokens/call is its inverse. `cache` rows use random weights and a long window; "
                f"`samplers` and `rng` rows use {section['model']}."
            ),
            "",
            "| group | L | L' | batch | mode | new tokens | tokens/s | calls/token | tokens/call | x uncached | x AR |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in section["rows"]:
            lines.append(
                f"| {r['group']} | {r['model_length']} | {r['block_size']} | {r['batch']} | {r['mode']} | "
                f"{r['new_tokens']} | {r['tokens_per_s']:.1f} | {r['calls_per_token']:.3f} | "
                f"{r['tokens_per_call']:.2f} | {_ratio(r, 'speedup_vs_uncached')} | {_ratio(r, 'speedup_vs_ar')} |"
            )
        rng = [r for r in section["rows"] if "per_row_over_shared" in r]
        if rng:
            lines += [
                "",
                "| `rng`: sampler | batch | L' | time with per-row streams / with one shared stream | "
                "random draws per step, per-row / shared (us) |",
                "|---|---|---|---|---|",
            ]
            for r in rng:
                sampler = r["mode"].replace(", per-row streams", "")
                draws = r.get("draw_cost") or {}
                cost = f"{draws['per_row_us_per_step']:.1f} / {draws['shared_us_per_step']:.1f}" if draws else "-"
                lines.append(
                    f"| {sampler} | {r['batch']} | {r['block_size']} | {r['per_row_over_shared']:.3f} | {cost} |"
                )
        if section.get("memory"):
            lines += [
                "",
                (
                    "| new tokens | L | L' | peak (MiB) | growth (MiB) | measure | cached tokens | KV bytes/token | "
                    "2·layers·hidden·bytes |"
                ),
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for mem in section["memory"]:
                lines.append(
                    f"| {mem['new_tokens']} ({mem['multiple']}x L) | {mem['model_length']} | {mem['block_size']} | "
                    f"{mem['peak_mib']:.1f} | {mem['growth_mib']:.1f} | {mem['measure']} | {mem['cached_tokens']} | "
                    f"{mem['kv_bytes_per_token']:.0f} | {mem['formula_bytes_per_token']} |"
                )
    return "\n".join(lines) + "\n"


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "-"


__all__ = ["evaluate_targets", "markdown"]
