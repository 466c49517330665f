"""Publish a trained BD3-LM (or a LoRA adapter for one) to the Hugging Face Hub, with a model card.

    python hub_upload.py OUTPUT_DIR namespace/name --dry-run          # print the plan and the card, send nothing
    python hub_upload.py OUTPUT_DIR namespace/name --private           # create the repository and upload
    bd3lm upload ...                                                   # the same command, through the CLI

This file is the entry point only: the work lives in `bd3lm_trainer.hub` (the plan, the staging folder, the push) and
the command line in `bd3lm_trainer.cli.upload`. Nothing in the package imports this module.
"""

from __future__ import annotations

import sys

from bd3lm_trainer.cli.upload import add_upload_arguments as add_arguments
from bd3lm_trainer.cli.upload import run_upload as run
from bd3lm_trainer.cli.upload import upload_main
from bd3lm_trainer.hub import LeftOut, PlannedFile, UploadPlan, UploadResult, plan_upload, resolve_token, upload
from bd3lm_trainer.model_card import CardInfo, build_model_card
from bd3lm_trainer.utils import check_repo_id

__all__ = [
    "CardInfo",
    "LeftOut",
    "PlannedFile",
    "UploadPlan",
    "UploadResult",
    "add_arguments",
    "build_model_card",
    "check_repo_id",
    "main",
    "plan_upload",
    "resolve_token",
    "run",
    "upload",
]


def main(argv: list[str] | None = None) -> int:
    """`python hub_upload.py ...`: the `bd3lm upload` command."""
    return upload_main(argv, prog="hub_upload")


if __name__ == "__main__":
    sys.exit(main())
