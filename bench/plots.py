"""PNG plots of a results dict: training step time against L, generation speed per mode, memory against length.

matplotlib is optional (`pip install "bd3lm[plot]"`); without it `write_plots` prints one line and writes nothing.
"""

from __future__ import annotations

from pathlib import Path

from bd3lm_trainer.utils import pyplot, save_figure


def plot_training(plt, section: dict, path: Path) -> Path | None:
    """Left: step time against L per pass (tiny preset, sdpa). Right: vectorised / AR for every measured setting."""
    rows = [r for r in section["rows"] if r["preset"] in ("tiny", "test") and r["attn"] == "sdpa"]
    by_length: dict[str, dict[int, float]] = {}
    for r in rows:
        in_sweep = r["pass"] in ("vectorised", "ar", "mdlm") and r["group"] != "compile"
        if r["block_size"] == 4 and r["batch"] == 2 and in_sweep:
            by_length.setdefault(r["pass"], {})[r["L"]] = r["seconds"] * 1e3
    ratios = [r for r in section["rows"] if r["pass"] == "vectorised" and "over_ar" in r]
    if not by_length and not ratios:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, points in sorted(by_length.items()):
        lengths = sorted(points)
        left.plot(lengths, [points[n] for n in lengths], marker="o", label=kind)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="L (tokens)",
        ylabel="step time (ms)",
        title=f"training step, {section['device']} (L'=4, batch 2, sdpa)",
    )
    left.legend()
    labels = [f"{r['preset']} L={r['L']} L'={r['block_size']} B={r['batch']} {r['attn']}" for r in ratios]
    right.barh(range(len(ratios)), [r["over_ar"] for r in ratios], color="tab:blue")
    right.axvline(2.0, color="gray", linestyle=":", label="2.0 (2L tokens)")
    right.axvline(2.2, color="tab:red", linestyle="--", label="target 2.2")
    right.set_yticks(range(len(ratios)), labels, fontsize=7)
    right.set(xlabel="vectorised step / AR step", title="vectorised / AR (same run)")
    right.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def plot_generation(plt, section: dict, path: Path) -> Path | None:
    """Tokens/s of every mode relative to the AR decode timed beside it (1.0 = as fast as AR), one panel per batch
    size, bars grouped by L' (samplers rows). Ratios, not absolute speeds: each group has its own AR run."""
    rows = [r for r in section["rows"] if r["group"] == "samplers" and "speedup_vs_ar" in r]
    if not rows:
        return None
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    for ax, batch in zip(axes[0], batches):
        sizes = sorted({r["block_size"] for r in rows if r["batch"] == batch})
        width = 0.8 / max(len(modes), 1)
        for i, mode in enumerate(modes):
            values = [
                next(
                    (
                        r["speedup_vs_ar"]
                        for r in rows
                        if r["batch"] == batch and r["block_size"] == bs and r["mode"] == mode
                    ),
                    0.0,
                )
                for bs in sizes
            ]
            ax.bar([j + i * width for j in range(len(sizes))], values, width, label=mode)
        ax.axhline(1.0, color="black", linestyle="--", label="AR decode (KV cache)")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [f"L'={bs}" for bs in sizes])
        ax.set(ylabel="tokens/s relative to AR decode", title=f"generation, batch {batch}, {section['device']}")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{section['model']} (ratios measured side by side)", fontsize=9)
    return save_figure(fig, path)


def plot_memory(plt, section: dict, path: Path) -> Path | None:
    """Left: peak memory of the process against new tokens. Right: what generation adds, and the KV cache."""
    memory = section.get("memory") or []
    if not memory:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    tokens = [m["new_tokens"] for m in memory]
    left.plot(tokens, [m["peak_mib"] for m in memory], marker="o")
    left.set(
        xscale="log", xlabel="new tokens", ylabel="MiB", ylim=(0, None), title=f"peak memory ({memory[0]['measure']})"
    )
    right.plot(tokens, [m["growth_mib"] for m in memory], marker="s", label="growth during generate")
    right.plot(tokens, [m["kv_bytes"] / 2**20 for m in memory], marker="^", label="KV cache")
    right.set(xscale="log", xlabel="new tokens", ylabel="MiB", ylim=(0, None), title="generation's own memory")
    right.legend()
    fig.suptitle(
        f"cached generation, L={memory[0]['model_length']}, L'={memory[0]['block_size']}, {section['device']}",
        fontsize=9,
    )
    return save_figure(fig, path)


def write_plots(results: dict, stem: Path) -> list[Path]:
    """Write `<stem>-training-<device>.png`, `-generation-<device>.png` and `-memory-<device>.png`; return the paths."""
    plt = pyplot()
    if plt is None:
        print('bench: matplotlib is not installed, so no plots were written (pip install "bd3lm[plot]").')
        return []
    written = []
    for section in results.get("training", []):
        written.append(plot_training(plt, section, Path(f"{stem}-training-{section['device']}.png")))
    for section in results.get("generation", []):
        written.append(plot_generation(plt, section, Path(f"{stem}-generation-{section['device']}.png")))
        written.append(plot_memory(plt, section, Path(f"{stem}-memory-{section['device']}.png")))
    return [p for p in written if p is not None]


__all__ = ["plot_generation", "plot_memory", "plot_training", "write_plots"]
