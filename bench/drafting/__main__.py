"""`python -m bench.drafting`: the cost curve and drafter acceptance behind lossless block drafting (README.md here).

python -m bench.drafting                          # every stage: cost, acceptance, report (one SmolLM2 load)
python -m bench.drafting --stage cost --quick     # a few n, 3 repeats: a look on a busy machine
python -m bench.drafting --stage acceptance       # the shipped LoRA as a drafter on SmolLM2's greedy chat answers
python -m bench.drafting --stage report           # results/drafting.json, results/tables.md, results/cost_curve.png
python -m bench.drafting --tiny --work-dir /tmp/d --output-dir /tmp/d/out   # the smoke test (tiny random Llama)

Every stage resumes: the cost curve repeat by repeat, a finished stage is skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("cost", "acceptance", "report")


def main(argv: list[str] | None = None) -> int:
    from .measures import QUICK, TINY, DraftingConfig, with_overrides

    parser = argparse.ArgumentParser(
        prog="python -m bench.drafting", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=STAGES + ("all",), default="all", help="which stage to run (default all)")
    parser.add_argument("--quick", action="store_true", help="cost curve at a few n with 3 repeats (SmolLM2)")
    parser.add_argument("--tiny", action="store_true", help="everything on a tiny random Llama (the smoke test)")
    parser.add_argument("--work-dir", default="runs/drafting", help="per-stage JSON (resumed)")
    parser.add_argument("--output-dir", default=str(HERE / "results"), help="drafting.json, tables.md, cost_curve.png")
    parser.add_argument("--repeats", type=int, help="repeats of the cost curve")
    parser.add_argument("--threads", type=int, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    if args.quick and args.tiny:
        parser.error("--quick and --tiny are exclusive")
    for name in ("repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    cfg = TINY if args.tiny else QUICK if args.quick else DraftingConfig()
    cfg = with_overrides(cfg, repeats=args.repeats, threads=args.threads)
    from . import measures

    work_dir = Path(args.work_dir)
    stages = STAGES if args.stage == "all" else (args.stage,)
    source = tokenizer = None
    needs_model = ("cost" in stages and not _finished(work_dir / "cost.json", cfg.repeats)) or (
        "acceptance" in stages and not (work_dir / "acceptance.json").exists()
    )
    if needs_model:  # one load for both stages (SmolLM2 takes 20-50 s to dequantise)
        source, tokenizer = measures.load_source(cfg)
    if "acceptance" in stages:  # first: minutes, where the cost curve takes tens of minutes at full size
        measures.run_acceptance(cfg, work_dir, source, tokenizer)
    if "cost" in stages:
        measures.run_cost(cfg, work_dir, source, tokenizer)
    if "report" in stages:
        from .report import write_report

        write_report(work_dir, Path(args.output_dir))
        print("results in", args.output_dir)
    return 0


def _finished(path: Path, repeats: int) -> bool:
    import json

    if not path.exists():
        return False
    seconds = json.loads(path.read_text())["seconds"]
    return len(next(iter(seconds.values()))) >= repeats


if __name__ == "__main__":
    sys.exit(main())
