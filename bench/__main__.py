"""The benchmark suite in one command: training-step and generation speed and memory, side by side with baselines.

    python -m bench                                  # everything, ~15 minutes on 2 idle CPU cores
    python -m bench --quick                          # a ~1 minute version (smaller settings, fewer repeats)
    python -m bench --only generation --model runs/bench-tiny   # with the trained-model rows

Writes `<out>/<machine>.json` (all figures, the machine, the targets), `<out>/<machine>.md` (tables) and PNG plots
(`<out>/<machine>-*.png`, needs matplotlib). A run with `--only` keeps the other section of an existing JSON. Runs on
the CPU, and on CUDA too when present (`--device` to choose).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, machine, machine_name, write_json
from bench.report import evaluate_targets, markdown

SECTIONS = ("training", "generation")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small settings and few repeats (about 1 minute)")
    parser.add_argument("--only", choices=SECTIONS, help="run one section only")
    parser.add_argument(
        "--model",
        help="a trained checkpoint folder for the generation `samplers` rows (the "
        "confidence targets need one; default: the tiny preset with random weights)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"output folder (default: {RESULTS_DIR})")
    parser.add_argument(
        "--device",
        nargs="+",
        choices=("cpu", "cuda"),
        help="devices to measure (default: cpu, and cuda when available)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads of the training section (default: torch's "
        "default, one per core; generation always uses 1: its small calls only slow down with more)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the test suite's tiny setting
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.model is not None and not Path(args.model).is_dir():
        parser.error(f"--model {args.model!r} is not a folder; train one with `bd3lm train --output-dir PATH`.")
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch sees no CUDA device.")
    args.devices = [torch.device(d) for d in devices]
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}.")
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    return args


def run(args: argparse.Namespace) -> dict:
    """Run the asked sections, merge them into the machine's JSON, and write the JSON, markdown and plots."""
    from bench.bench_generation import run_generation
    from bench.bench_training import run_training

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    stem = args.out / machine_name()
    json_path = stem.with_suffix(".json")
    previous = json.loads(json_path.read_text()) if json_path.exists() and args.only else {}
    results = {
        "machine_name": machine_name(),
        "machine": machine(),
        "command": " ".join(["python -m bench", *args.argv]),
        "training": previous.get("training", []),
        "generation": previous.get("generation", []),
    }
    sections = [args.only] if args.only else list(SECTIONS)

    def log(message: str) -> None:
        print(message, flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if torch.get_num_threads() > 1 and load > 0.5:
        log(
            f"warning: load average {load:.1f} on {os.cpu_count()} cores. With {torch.get_num_threads()} threads a "
            "training step mostly waits for descheduled threads; on a shared machine use --threads 1."
        )
    for name in sections:
        measured = []
        for device in args.devices:
            log(f"== {name} on {device.type} ({args.mode})")
            start = time.time()
            section = (
                run_training(args.mode, device, log)
                if name == "training"
                else run_generation(args.mode, device, args.model, log)
            )
            section.update(
                mode=args.mode,
                command=results["command"],
                measured_at=datetime.datetime.now().isoformat(timespec="seconds"),
                duration_s=round(time.time() - start, 1),
                load_average_after=os.getloadavg() if hasattr(os, "getloadavg") else None,
            )
            measured.append(section)
        results[name] = measured
    results["targets"] = evaluate_targets(results)
    write_json(json_path, results)
    stem.with_suffix(".md").write_text(markdown(results))
    log(f"written {json_path} and {stem.with_suffix('.md')}")
    if not args.no_plots:
        from bench.plots import write_plots

        for path in write_plots(results, stem):
            log(f"written {path}")
    for target in results["targets"]:
        status = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
        log(f"  [{status:>6}] {target['target']}: {target['measured']} (goal {target['goal']}; {target['where']})")
    return results


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
