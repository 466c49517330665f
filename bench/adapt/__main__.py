"""`python -m bench.adapt`: the SmolLM2-135M → BD3-LM adaptation study (README.md in this folder: results, commands).

python -m bench.adapt                                  # every stage: source, train (LoRA, full), eval, report
python -m bench.adapt --stage train --methods lora     # one stage of one method (two trainings can run at once)
python -m bench.adapt --quick --work-dir /tmp/a --output-dir /tmp/a/results   # the smoke test's reduced study
python -m bench.adapt --stage profile                  # loss by position in the block, cost of a call (vs AR)
python -m bench.adapt --stage report                   # rewrite results/ from the work folder's JSON files
python -m bench.adapt --methods lora --stage ship      # (train LoRA and) export its adapter to results/adapter

Every stage resumes: finished stages are skipped, training restarts from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("source", "train", "eval", "profile", "report", "ship")


def main(argv: list[str] | None = None) -> int:
    from .study import QUICK, AdaptConfig

    parser = argparse.ArgumentParser(
        prog="python -m bench.adapt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=STAGES + ("all",), default="all", help="which stage to run (default all)")
    parser.add_argument("--methods", nargs="+", choices=("lora", "full"), help="fine-tuning methods (default both)")
    parser.add_argument("--quick", action="store_true", help="the reduced study on a tiny random Llama (seconds)")
    parser.add_argument("--work-dir", default="runs/adapt", help="checkpoints and per-stage JSON (resumed)")
    parser.add_argument("--output-dir", default=str(HERE / "results"), help="adapt.json, tables.md and plots")
    parser.add_argument("--cpu-budget", type=float, help="process CPU seconds of training of each chosen method")
    parser.add_argument("--threads", type=int, help="torch threads per process (default 1)")
    parser.add_argument("--follow", action="store_true", help="eval: wait for new checkpoints until training ends")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else AdaptConfig()
    for name in ("cpu_budget", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    budget = None if args.cpu_budget is None else {m: args.cpu_budget for m in ("lora", "full")}
    overrides = {
        "methods": tuple(args.methods) if args.methods else None,
        "cpu_budget_s": budget,
        "threads": args.threads,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    from . import study

    work_dir = Path(args.work_dir)
    stages = STAGES[:-1] if args.stage == "all" else (args.stage,)
    if args.stage == "ship":  # train LoRA first when it has not been (resumes an unfinished run)
        stages = ("train",)
        cfg = dataclasses.replace(cfg, methods=("lora",))
    if "source" in stages:
        study.run_source(cfg, work_dir)
    for method in cfg.methods if "train" in stages else ():
        study.run_training(cfg, method, work_dir)
    for method in cfg.methods if "eval" in stages else ():
        study.run_eval(cfg, method, work_dir, follow=args.follow)
    if "profile" in stages:
        from .profiles import run_call_cost, run_profile

        run_profile(cfg, work_dir)
        run_call_cost(cfg, work_dir)
    if "report" in stages:
        from .report import write_report

        write_report(cfg, work_dir, Path(args.output_dir))
        print("results in", args.output_dir)
    if args.stage == "ship":
        study.run_ship(cfg, work_dir, Path(args.output_dir) / "adapter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
