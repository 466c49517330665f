"""`python -m bench.drafter`: gated-adapter drafters for SmolLM2-135M (README.md in this folder: results, commands).

python -m bench.drafter --stage data                 # SmolLM2's greedy continuations: training + held-out prompts
python -m bench.drafter --stage train                # the gated LoRA drafter (recipe seed_plus_masks), CPU budget
python -m bench.drafter --stage measure              # acceptance per prompt kind and k, every checkpoint
python -m bench.drafter --stage speed                # draft_verify vs the source's generate(), a few prompts/kind
python -m bench.drafter --stage report               # results/drafter.json, results/tables.md
python -m bench.drafter --tiny --work-dir /tmp/d --output-dir /tmp/d/out   # the smoke test (tiny random Llama)

Every stage resumes: data line by line, training from its last checkpoint (CPU seconds continue), measurements
that exist are not repeated.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("data", "train", "measure", "speed", "report")
EXTRA_STAGES = ("speed-batch",)  # not part of "all"


def main(argv: list[str] | None = None) -> int:
    from . import measure, study

    parser = argparse.ArgumentParser(
        prog="python -m bench.drafter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--stage", choices=STAGES + EXTRA_STAGES + ("all",), default="all", help="which stage (default all)"
    )
    parser.add_argument("--recipe", choices=study.RECIPES, help="training recipe (default seed_plus_masks)")
    parser.add_argument("--data", choices=study.DATA, help="training sequences (default greedy)")
    parser.add_argument("--block-size", type=int, help="the drafter's block size k (default 4)")
    parser.add_argument("--lora-preset", choices=("attention", "attention_mlp"), help="adapted modules (attention_mlp)")
    parser.add_argument("--tiny", action="store_true", help="the reduced study on a tiny random Llama (seconds)")
    parser.add_argument("--work-dir", default="runs/drafter", help="data, checkpoints, per-stage JSON (resumed)")
    parser.add_argument("--output-dir", default=str(HERE / "results"), help="drafter.json and tables.md")
    parser.add_argument("--cpu-budget", type=float, help="process CPU seconds of training")
    parser.add_argument("--threads", type=int, help="torch threads (default 1)")
    parser.add_argument("--drafters", nargs="+", help="speed: drafters to time (<run>/checkpoint-N; default the best)")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    for name in ("cpu_budget", "threads", "block_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    cfg = study.TINY if args.tiny else study.DrafterConfig()
    overrides = {
        "recipe": args.recipe,
        "data": args.data,
        "block_size": args.block_size,
        "lora_preset": args.lora_preset,
        "cpu_budget_s": args.cpu_budget,
        "threads": args.threads,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    work_dir = Path(args.work_dir)
    stages = STAGES if args.stage == "all" else (args.stage,)
    if "data" in stages:
        study.run_data(cfg, work_dir)
    if "train" in stages:
        study.run_train(cfg, work_dir)
    if "measure" in stages:
        measure.run_measure(cfg, work_dir)
    if "speed" in stages:
        measure.run_speed(cfg, work_dir, args.drafters, tuple(args.dtypes))
    if "speed-batch" in stages:
        measure.run_speed_batch(cfg, work_dir, args.drafters, tuple(args.dtypes))
    if "report" in stages:
        from .report import write_report

        write_report(cfg, work_dir, Path(args.output_dir))
        print("results in", args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
