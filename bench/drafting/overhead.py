"""`python -m bench.drafting.overhead`: what one `generate()` network call costs outside and inside the network, per
decoding mode and batch size (issue 25 item 5, "call cost reductions").

For each setting (mode in diffusion / autoregressive / draft_verify two-pass / one-forward, batch in 1 and 8) one
greedy `generate()` of `max_new_tokens` tokens (no EOS, so every row runs to the end) on the converted SmolLM2-135M
(`block_size=4`, `clean_attention="causal"`, as `verify_smollm2.py`). A forward pre-hook and hook on the backbone (the
HF causal LM, LM head included) time every network call; outside = the whole `generate()` minus the time inside those
calls. Reported per call (ms): outside, network, and the number of calls. Settings are timed once per repeat, in an
order rotated every repeat; medians over repeats. 1 torch thread.

Before/after a code change: run it once per code version with `--label`, the "before" against the old package
(`git archive <commit> modeling_bd3lm | tar -x -C /tmp/before`, then `PYTHONPATH=/tmp/before python -m
bench.drafting.overhead --label before`; the script prints which `modeling_bd3lm` it imported), then `--report` puts the
labels side by side (after/before ratios).

python -m bench.drafting.overhead --label after            # SmolLM2 (about 2 minutes on 1 thread)
python -m bench.drafting.overhead --tiny --label after     # the smoke run: the tiny random Llama, seconds
python -m bench.drafting.overhead --report                 # overhead.md from every overhead-*.json in --work-dir
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import write_json

from .measures import CHAT_PROMPTS, load_average, log

HERE = Path(__file__).resolve().parent
MODES = {
    "diffusion": {"generation_mode": "diffusion"},
    "autoregressive": {"generation_mode": "autoregressive"},
    "two_pass": {"generation_mode": "draft_verify", "draft_variant": "two_pass"},
    "one_forward": {"generation_mode": "draft_verify", "draft_variant": "one_forward"},
}


@dataclass(frozen=True)
class OverheadConfig:
    source: str = "smollm2"  # or "tiny-random" (the smoke run)
    modes: tuple[str, ...] = tuple(MODES)
    batches: tuple[int, ...] = (1, 8)
    max_new_tokens: int = 8
    block_size: int = 4
    repeats: int = 5
    threads: int = 1


TINY = OverheadConfig(source="tiny-random", max_new_tokens=8, repeats=2)


def _model_and_prompts(cfg: OverheadConfig) -> tuple[Any, dict[int, dict[str, torch.Tensor]]]:
    from modeling_bd3lm import BD3LMForMaskedDiffusion

    from .measures import DraftingConfig, load_source

    source, tokenizer = load_source(DraftingConfig(source=cfg.source))
    model = BD3LMForMaskedDiffusion.from_causal_lm(
        source, tokenizer=tokenizer, block_size=cfg.block_size, clean_attention="causal"
    ).eval()
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    prompts = {}
    for batch in cfg.batches:
        texts = [CHAT_PROMPTS[i % len(CHAT_PROMPTS)] for i in range(batch)]
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
        prompts[batch] = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    return model, prompts


class NetworkClock:
    """Seconds spent inside the backbone's forward calls, and their number (hooks on the backbone module)."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        self.seconds, self.calls, self._start = 0.0, 0, 0.0
        backbone.register_forward_pre_hook(self._enter)
        backbone.register_forward_hook(self._leave)

    def _enter(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _leave(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


@torch.no_grad()
def run(cfg: OverheadConfig, label: str, work_dir: Path) -> dict[str, Any]:
    import modeling_bd3lm

    torch.set_num_threads(cfg.threads)
    log(f"overhead [{label}]: modeling_bd3lm from {Path(modeling_bd3lm.__file__).parent}")
    model, prompts = _model_and_prompts(cfg)
    clock = NetworkClock(model.backbone)
    settings = [(mode, batch) for mode in cfg.modes for batch in cfg.batches]
    samples: dict[str, dict[str, list[float]]] = {
        f"{m}/b{b}": {"total": [], "network": [], "calls": []} for m, b in settings
    }
    outputs: dict[str, list[list[int]]] = {}

    def once(mode: str, batch: int) -> tuple[float, float, int]:
        clock.reset()
        start = time.perf_counter()
        out = model.generate(
            **prompts[batch], max_new_tokens=cfg.max_new_tokens, do_sample=False, eos_token_id=None, **MODES[mode]
        )
        total = time.perf_counter() - start
        outputs[f"{mode}/b{batch}"] = out.tolist()
        return total, clock.seconds, clock.calls

    for s in settings:  # warm-up: allocator, kernels, the attention probe
        once(*s)
    load_before = load_average()
    for r in range(cfg.repeats):
        shift = (r * 3) % len(settings)
        for mode, batch in settings[shift:] + settings[:shift]:
            total, network, calls = once(mode, batch)
            entry = samples[f"{mode}/b{batch}"]
            entry["total"].append(total)
            entry["network"].append(network)
            entry["calls"].append(calls)
        log(f"repeat {r + 1}/{cfg.repeats}")
    summary = {}
    for key, entry in samples.items():
        calls = statistics.median(entry["calls"])
        outside = [(t - n) / c for t, n, c in zip(entry["total"], entry["network"], entry["calls"], strict=True)]
        network = [n / c for n, c in zip(entry["network"], entry["calls"], strict=True)]
        summary[key] = {
            "calls": calls,
            "outside_ms_per_call": 1e3 * statistics.median(outside),
            "network_ms_per_call": 1e3 * statistics.median(network),
            "total_s": statistics.median(entry["total"]),
        }
    result = {
        "label": label,
        "config": asdict(cfg),
        "modeling_bd3lm": str(Path(modeling_bd3lm.__file__).parent),
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "summary": summary,
        "samples": samples,
        "sequences": outputs,
    }
    work_dir.mkdir(parents=True, exist_ok=True)
    write_json(work_dir / f"overhead-{label}.json", result, indent=1)
    return result


def report(work_dir: Path) -> str:
    """A markdown table of every `overhead-*.json` in `work_dir`, labels side by side; with "before" and "after",
    their ratios and whether the generated tokens are identical."""
    runs = {
        p.stem.removeprefix("overhead-"): json.loads(p.read_text()) for p in sorted(work_dir.glob("overhead-*.json"))
    }
    labels = [x for x in ("before", "after") if x in runs] + [x for x in runs if x not in ("before", "after")]
    keys = list(next(iter(runs.values()))["summary"]) if runs else []
    head = "| setting | calls | " + " | ".join(f"outside ms/call ({x}) | network ms/call ({x})" for x in labels)
    pair = "before" in runs and "after" in runs
    head += " | outside after/before | network after/before | same tokens |" if pair else " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in keys:
        cells = [key, f"{runs[labels[0]]['summary'][key]['calls']:g}"]
        for x in labels:
            s = runs[x]["summary"].get(key)
            cells += [f"{s['outside_ms_per_call']:.2f}", f"{s['network_ms_per_call']:.2f}"] if s else ["", ""]
        if pair:
            b, a = runs["before"]["summary"][key], runs["after"]["summary"][key]
            cells += [
                f"{a['outside_ms_per_call'] / b['outside_ms_per_call']:.2f}",
                f"{a['network_ms_per_call'] / b['network_ms_per_call']:.2f}",
                str(runs["before"]["sequences"][key] == runs["after"]["sequences"][key]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (work_dir / "overhead.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drafting.overhead", description=__doc__)
    parser.add_argument("--label", default="after", help="name of this run (overhead-<label>.json)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random Llama (smoke run)")
    parser.add_argument("--repeats", type=int, help="repeats per setting")
    parser.add_argument("--work-dir", default=str(HERE / "results"), help="where overhead-*.json and overhead.md go")
    parser.add_argument("--report", action="store_true", help="only write overhead.md from the stored runs")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir)
    if not args.report:
        cfg = TINY if args.tiny else OverheadConfig()
        if args.repeats is not None:
            if args.repeats < 1:
                parser.error(f"--repeats must be >= 1, got {args.repeats}")
            cfg = OverheadConfig(**{**asdict(cfg), "repeats": args.repeats})
        run(cfg, args.label, work_dir)
    print(report(work_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
