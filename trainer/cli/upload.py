# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""`bd3lm upload`: publish a trained BD3-LM (or a LoRA adapter for one) to the Hugging Face Hub, with a model card.

    bd3lm upload OUTPUT_DIR namespace/name --dry-run          # print the plan and the card, send nothing
    bd3lm upload OUTPUT_DIR namespace/name --private           # create the repository and upload
    python hub_upload.py OUTPUT_DIR namespace/name ...         # the same command

The work is `bd3lm_trainer.hub` (`plan_upload`, then `upload`); this module is its command line. Exit status: 0 on
success, 2 on bad input, 1 when the Hub refuses.
"""

from __future__ import annotations

import argparse
import sys

from ..hub import plan_upload, resolve_token, upload
from ..utils import check_repo_id


def add_upload_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the upload options on `parser` (`bd3lm upload` and `python hub_upload.py`)."""
    parser.add_argument("folder", help="saved model, Trainer output folder, official checkpoint or LoRA adapter")
    parser.add_argument("repo_id", help="the Hub repository, as namespace/name")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (files, sizes, card) and send nothing")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to commit to (created from main if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", help="summary line of the commit")
    parser.add_argument(
        "--checkpoint", help="publish this checkpoint-* folder (or 'latest') instead of the final model"
    )
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="also publish files matching GLOB (relative to the model folder); repeatable",
    )
    parser.add_argument("--tokenizer", help="take tokenizer files from this folder")
    parser.add_argument("--max-shard-size", default="5GB", help="shard safetensors above this size (default 5GB)")
    parser.add_argument("--base-model", help="Hub id of the model this one was fine-tuned from (adapters: the base)")
    parser.add_argument("--dataset", action="append", default=[], help="Hub id of a training dataset; repeatable")
    parser.add_argument("--license", default="unknown", help="licence identifier for the card (default: unknown)")
    parser.add_argument(
        "--nfe-tokens", type=int, default=64, help="tokens to generate when measuring network calls per token (0 skips)"
    )
    return parser


def run_upload(args: argparse.Namespace) -> int:
    """Plan, then print (dry run) or upload. Returns 0 on success, 2 on bad input, 1 when the Hub refuses. Errors are
    printed here (one line, the token redacted), not raised: the token must never reach a traceback."""
    token = None
    try:
        check_repo_id(args.repo_id)
        if not args.dry_run:
            token = resolve_token()
        with plan_upload(
            args.folder,
            args.repo_id,
            checkpoint=args.checkpoint,
            include=args.include,
            tokenizer=args.tokenizer,
            max_shard_size=args.max_shard_size,
            base_model=args.base_model,
            datasets=args.dataset,
            license=args.license,
            nfe_tokens=args.nfe_tokens,
        ) as plan:
            if args.dry_run:
                print(plan.describe())
                print("\nDry run: nothing was sent.")
                return 0
            print(plan.describe(with_card=False))
            result = upload(
                plan,
                args.repo_id,
                token=token,
                private=args.private,
                revision=args.revision,
                create_pr=args.create_pr,
                commit_message=args.commit_message,
            )
    except ValueError as error:
        print(f"error: {_redact(str(error), token)}", file=sys.stderr)
        return 2
    except Exception as error:  # the Hub's answer, already worded by huggingface_hub
        print(f"error: upload failed ({type(error).__name__}): {_redact(str(error), token)}", file=sys.stderr)
        return 1
    print(f"Uploaded {len(plan.files)} files to {result.repo_id}@{result.revision}: {result.commit_url}")
    if result.pr_url:
        print(f"Pull request: {result.pr_url}")
    return 0


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text


def upload_main(argv: list[str] | None = None, prog: str = "hub_upload") -> int:
    """The upload command on its own (`python hub_upload.py ...`): parse `argv`, then `run_upload`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    return run_upload(add_upload_arguments(parser).parse_args(argv))


__all__ = ["add_upload_arguments", "run_upload", "upload_main"]
