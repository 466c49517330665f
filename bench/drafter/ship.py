"""`python -m bench.drafter.ship`: a measured checkpoint of this study as the package's shipped SmolLM2 drafter.

    python -m bench.drafter.ship --checkpoint runs/drafter/seed_plus_masks/checkpoint-53

writes, into `--target` (default the package's `trainer/drafters/smollm2-135m-k4/`, the folder that
`bd3lm_trainer.pretrained.load_smollm2_drafter()` reads): the float16 adapter and its training log (`export_adapter`),
`heldout.json` (the held-out sequences of `heldout.jsonl` and every block's accepted length that `--stage measure`
logged for the checkpoint) and `drafter.json` (the conversion settings of the study's configuration, the provenance
and the logged tokens per cycle; other fields of an existing `drafter.json`, e.g. the default `draft_variant`, are
kept). The folder is then checked with `read_drafter_settings`. Re-measure it with
`bd3lm_trainer.pretrained.check_drafter_acceptance` (tests/test_smollm2_drafter.py does, on the chat prompts).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bd3lm_trainer.pretrained import SMOLLM2_DRAFTER, SMOLLM2_GGUF_FILE, read_drafter_settings

from . import study


def ship(cfg: study.DrafterConfig, work_dir: Path, checkpoint: Path, target: Path = SMOLLM2_DRAFTER) -> Path:
    """Write `checkpoint` (a checkpoint folder of `work_dir/<recipe>/`, measured) as a drafter folder `target`."""
    recipe = checkpoint.parent.name
    measured_path = work_dir / "measure" / f"{recipe}--{checkpoint.name}.json"
    if not measured_path.exists():
        raise FileNotFoundError(f"{measured_path} is missing; run: python -m bench.drafter --stage measure")
    acceptance = json.loads(measured_path.read_text())["acceptance"]
    key = f"k{cfg.block_size}"
    heldout = study.read_rows(work_dir / "heldout.jsonl")
    kinds: dict[str, Any] = {}
    for kind in dict.fromkeys(d["kind"] for d in heldout):
        rows = [d for d in heldout if d["kind"] == kind]
        kinds[kind] = {
            "rows": [
                {"text": d["text"], "prompt_ids": d["prompt_ids"], "continuation": d["continuation"]} for d in rows
            ],
            "accepted_lengths": acceptance[kind][key]["accepted_lengths"],
        }
    settings = json.loads((target / "drafter.json").read_text()) if (target / "drafter.json").exists() else {}
    state = json.loads((checkpoint / "state.json").read_text()) if (checkpoint / "state.json").exists() else {}
    study.export_adapter(checkpoint, target)
    about = (
        "Held-out prompts of bench/drafter (prompts.HELDOUT; chat through SmolLM2's chat template) with SmolLM2's greedy "
        "continuations, and the per-block accepted drafts that the study logged for this adapter (estimate_acceptance "
        "at drafter.json's conversion.block_size, one pass per kind)."
    )
    (target / "heldout.json").write_text(json.dumps({"about": about, "kinds": kinds}, separators=(", ", ": ")) + "\n")
    settings.setdefault("name", target.name)
    settings["source"] = {**settings.get("source", {}), "gguf_file": SMOLLM2_GGUF_FILE}
    settings["conversion"] = {
        "block_size": cfg.block_size,
        "model_length": cfg.model_length,
        "clean_attention": "causal",
    }
    settings.setdefault("generation", {"draft_variant": "two_pass"})
    settings["adapter"] = {
        **settings.get("adapter", {}),
        "study": "bench/drafter",
        "recipe": recipe,
        "checkpoint": checkpoint.name,
        "training_cpu_s": state.get("checkpoints", {}).get(checkpoint.name, {}).get("cpu_s"),
        "dtype": "float16",
    }
    settings["acceptance"] = {
        **settings.get("acceptance", {}),
        "tokens_per_cycle": {kind: acceptance[kind][key]["tokens_per_cycle"] for kind in [*kinds, "all"]},
    }
    (target / "drafter.json").write_text(json.dumps(settings, indent=2) + "\n")
    read_drafter_settings(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drafter.ship", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--checkpoint", required=True, help="a measured checkpoint folder, e.g. .../checkpoint-53")
    parser.add_argument("--work-dir", default="runs/drafter", help="the study's work folder (heldout.jsonl, measure/)")
    parser.add_argument("--target", default=str(SMOLLM2_DRAFTER), help="the drafter folder to write")
    parser.add_argument("--tiny", action="store_true", help="the tiny study's configuration (the smoke test)")
    args = parser.parse_args(argv)
    cfg = study.TINY if args.tiny else study.DrafterConfig()
    print("shipped to", ship(cfg, Path(args.work_dir), Path(args.checkpoint), Path(args.target)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
