"""`python -m bench.fidelity`: run the fidelity study (README.md in this folder describes it and its results).

python -m bench.fidelity                         # the full study into bench/fidelity/results
python -m bench.fidelity --quick --output-dir /tmp/fid   # the reduced study of the smoke test
python -m bench.fidelity --report-only           # rewrite tables.md and the plots from fidelity.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    from .study import QUICK, ROWS, StudyConfig

    parser = argparse.ArgumentParser(
        prog="python -m bench.fidelity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the reduced study (seconds; the smoke test's)")
    parser.add_argument("--output-dir", default=str(HERE / "results"), help="results JSON, tables and plots")
    parser.add_argument("--work-dir", default="runs/fidelity", help="trained models (reused on a rerun)")
    parser.add_argument("--rows", nargs="+", choices=[r.name for r in ROWS], help="train and measure only these rows")
    parser.add_argument("--steps", type=int, help="optimizer steps per row (default 1200; --quick: 3)")
    parser.add_argument("--seed", type=int, help="the seed of every row (default 0)")
    parser.add_argument("--no-resume", action="store_true", help="retrain rows whose trained model already exists")
    parser.add_argument("--report-only", action="store_true", help="only rewrite tables.md and the plots")
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir)
    if args.report_only:
        from .report import comparisons, write_report

        results = json.loads((output_dir / "fidelity.json").read_text())
        results["comparisons"] = comparisons(results)
        write_report(results, output_dir)
        print("rewrote", output_dir / "tables.md")
        return 0
    for name in ("steps",):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive, got {value}")
    cfg = QUICK if args.quick else StudyConfig()
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    from .study import run_study

    command = "python -m bench.fidelity " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    run_study(cfg, output_dir, args.work_dir, tuple(args.rows) if args.rows else None, not args.no_resume, command)
    print("results in", output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
