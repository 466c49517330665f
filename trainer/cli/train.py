# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""`bd3lm train`: train (or fine-tune) a BD3-LM with `BD3LMTrainer` on the embedded corpus or any text dataset."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..utils import check_model_reference
from .common import CLIError, check_positive

#: Written by `bd3lm train` next to the model: what it was trained and evaluated on; `bd3lm upload` puts it in the card.
TRAINING_DATA_FILE = "training_data.json"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from bd3lm_configuration import BLOCK_PRESETS, SIZE_PRESETS

    model = parser.add_argument_group("model")
    model.add_argument("--preset", default="tiny", choices=SIZE_PRESETS, help="model size preset (default: tiny)")
    model.add_argument(
        "--block", choices=sorted(BLOCK_PRESETS), help="block-size preset with the paper's noise interval (e.g. bs4)"
    )
    model.add_argument("--block-size", type=int, help="L', tokens per block (overrides --block's block size)")
    model.add_argument("--model-length", type=int, help="L, the training context (default: the preset's)")
    model.add_argument(
        "--init-from",
        help="fine-tune from this checkpoint (local folder or Hub id; our format or the official BD3-LM/MDLM one, or "
        "a causal LM such as Llama/Qwen/GPT-2, converted on the fly with its own tokenizer) instead of a fresh model; "
        "--block-size then sets the new L' (default 4 for a causal LM)",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        help="training data: a local .txt/.json/.jsonl/.parquet file or folder, or a Hub dataset name "
        "(default: the embedded public-domain corpus)",
    )
    data.add_argument("--eval-dataset", help="validation data (default: the corpus' validation split, or --dataset's)")
    data.add_argument("--text-column", default="text", help="column holding the documents (default: text)")
    data.add_argument(
        "--tokenizer",
        help="tokenizer folder or Hub id (default: the shipped 8192-token BPE); one without a mask token gets "
        "<|mask|> appended (gpt2 -> id 50257, as the official checkpoints)",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default="runs/bd3lm", help="where checkpoints and the final model go")
    run.add_argument(
        "--max-steps",
        type=int,
        default=600,
        help="optimizer steps (default: 600, about 5 minutes for tiny on 2 CPU cores)",
    )
    run.add_argument("--batch-size", type=int, default=16, help="sequences per step and device (default: 16)")
    run.add_argument(
        "--gradient-accumulation-steps", type=int, default=1, help="batches accumulated per optimizer step (default: 1)"
    )
    run.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    run.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps (default: 100)")
    run.add_argument("--eval-steps", type=int, default=300, help="evaluate (and search the schedule) every N steps")
    run.add_argument("--eval-batches", type=int, default=4, help="validation batches per evaluation (default: 4)")
    run.add_argument("--save-steps", type=int, default=300, help="write a checkpoint every N steps")
    run.add_argument(
        "--search-batches", type=int, default=2, help="validation batches per interval of the schedule search"
    )
    run.add_argument("--no-schedule-search", action="store_true", help="do not search the clipped noise interval")
    run.add_argument(
        "--noise-interval", nargs=2, type=float, metavar=("BETA", "OMEGA"), help="fixed training noise interval"
    )
    run.add_argument("--ema", action="store_true", help="evaluate and save an EMA of the weights (see --ema-decay)")
    run.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay (default: 0.9999, the paper's)")
    run.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs with bf16, or CPU autocast)")
    run.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    run.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    run.add_argument("--report-to", default="none", help="experiment trackers for the Trainer (default: none)")


def _data_record(source: str | None, split: str | None, dataset: Any, model_length: int) -> dict[str, Any]:
    """One entry of `training_data.json`: name, description, licence, split and size in tokens of a built dataset.

    `source` is `--dataset`/`--eval-dataset`, `None` for the embedded corpus. Every chunk holds exactly `model_length`
    tokens (the CLI wraps documents), so the size is chunks x `model_length`, counted with the training tokenizer.
    """
    from ..corpus import CORPUS_DESCRIPTION, CORPUS_LICENSE, CORPUS_NAME

    if source is None:
        record = {"name": CORPUS_NAME, "description": CORPUS_DESCRIPTION, "license": CORPUS_LICENSE, "split": split}
    else:
        info = getattr(dataset, "info", None)
        record = {"license": getattr(info, "license", None) or None}  # a Hub dataset's card may state it
        if os.path.exists(source):
            # The file or folder name only: a published card must not reveal the user's directories.
            record.update(name=os.path.basename(os.path.normpath(source)), description="a local file")
        else:
            record.update(name=source, description="a Hugging Face Hub dataset", split=split)
    return {**record, "chunks": len(dataset), "tokens": len(dataset) * model_length}


def train_from_args(args: argparse.Namespace) -> tuple[Any, Any, dict[str, float]]:
    """Train (or fine-tune) as `bd3lm train` does and save the final model and tokenizer in `args.output_dir`.

    Returns:
        `(trainer, tokenizer, metrics)`: the finished `BD3LMTrainer`, the tokenizer, and the last evaluation's
        `eval_*` metrics (an evaluation of the final weights is run when the last periodic one is older).
    """
    for name in (
        "max_steps",
        "batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "eval_steps",
        "eval_batches",
        "save_steps",
    ):
        check_positive(name.replace("_", "-"), getattr(args, name))
    check_positive("block-size", args.block_size)
    check_positive("model-length", args.model_length)
    if args.init_from:
        check_model_reference(args.init_from, "--init-from")
    if args.tokenizer is not None:
        check_model_reference(args.tokenizer, "--tokenizer", namespace=False)

    import torch
    from transformers import set_seed

    from bd3lm_configuration import load_preset
    from modeling_bd3lm import BD3LMForMaskedDiffusion
    from modeling_bd3lm.tokenization_bd3lm import SPECIAL_TOKEN_NAMES, set_special_token_ids, special_token_ids

    from ..corpus import load_corpus, resolve_tokenizer
    from ..data import build_lm_dataset
    from ..trainer import BD3LMTrainer, load_for_finetuning
    from ..training_args import BD3LMTrainingArguments

    set_seed(args.seed)
    from .convert import init_from_causal_lm

    converted = init_from_causal_lm(args) if args.init_from else None  # a causal LM brings its own tokenizer
    # Otherwise one without a mask token gets <|mask|> appended (GPT-2 -> id 50257, as the official checkpoints).
    tokenizer = converted[1] if converted else resolve_tokenizer(args.tokenizer, add_mask=True)
    if converted:
        model = converted[0]
    elif args.init_from:
        model = load_for_finetuning(args.init_from, block_size=args.block_size)
    else:
        overrides: dict[str, Any] = {"vocab_size": len(tokenizer), "mask_token_id": tokenizer.mask_token_id}
        if args.model_length:
            overrides["model_length"] = args.model_length
        if args.block_size:
            overrides["block_size"] = args.block_size
        try:
            config = load_preset(args.preset, block=args.block, **overrides)
        except ValueError as err:
            raise CLIError(str(err)) from err
        model = BD3LMForMaskedDiffusion(config)
    config = model.config
    token_ids = {k: v for k, v in special_token_ids(tokenizer, config).items() if k in SPECIAL_TOKEN_NAMES}
    set_special_token_ids(config, token_ids, model.generation_config)

    if args.dataset is None:
        train_source, eval_source = load_corpus("train"), load_corpus("validation")
    else:
        if os.path.sep in args.dataset and not os.path.exists(args.dataset):
            raise CLIError(f"--dataset {args.dataset!r} does not exist")
        train_source, eval_source = args.dataset, args.eval_dataset or args.dataset
    if args.eval_dataset is not None:
        eval_source = args.eval_dataset
    eval_split = "validation" if args.dataset is not None and args.eval_dataset is None else "train"
    train_dataset = build_lm_dataset(train_source, tokenizer, config.model_length, text_column=args.text_column)
    eval_dataset = build_lm_dataset(
        eval_source, tokenizer, config.model_length, split=eval_split, text_column=args.text_column
    )
    eval_size = min(len(eval_dataset), args.eval_batches * args.batch_size)
    eval_dataset = eval_dataset.select(range(eval_size))
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"bd3lm train: {n_params / 1e6:.2f}M parameters, L={config.model_length}, L'={config.block_size}, "
        f"{len(train_dataset)} training chunks, {len(eval_dataset)} validation chunks -> {args.output_dir}",
        flush=True,
    )
    training_args = BD3LMTrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        bf16=args.bf16,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=max(1, min(50, args.eval_steps // 4)),
        schedule_search=not args.no_schedule_search,
        schedule_search_batches=args.search_batches,
        noise_interval=args.noise_interval,
        use_ema=args.ema,
        ema_decay=args.ema_decay,
        seed=args.seed,
        report_to=[] if args.report_to == "none" else [args.report_to],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = BD3LMTrainer(
        model,
        training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    resume = None
    if args.resume:
        from ..faults import last_complete_checkpoint

        # Not transformers' get_last_checkpoint: that returns a checkpoint torn by a kill during its save.
        resume = last_complete_checkpoint(args.output_dir)
        if resume is None:
            raise CLIError(f"--resume: no complete checkpoint-* folder in {args.output_dir}")
    trainer.train(resume_from_checkpoint=resume)
    evaluations = [log for log in trainer.state.log_history if "eval_loss" in log]
    if not evaluations or evaluations[-1].get("step") != trainer.state.global_step:
        trainer.evaluate()
        evaluations = [log for log in trainer.state.log_history if "eval_loss" in log]
    metrics = {k: v for k, v in evaluations[-1].items() if k.startswith("eval_")}
    trainer.save_model(args.output_dir)  # every process: a sharded run gathers the weights
    if trainer.args.should_save:
        tokenizer.save_pretrained(args.output_dir)
    trainer.save_metrics("eval", metrics)
    if trainer.args.should_save:
        eval_name = args.eval_dataset if args.eval_dataset is not None else args.dataset
        record = {
            "train": _data_record(args.dataset, "train", train_dataset, config.model_length),
            "evaluation": _data_record(
                eval_name, "validation" if eval_name is None else eval_split, eval_dataset, config.model_length
            ),
        }
        with open(os.path.join(args.output_dir, TRAINING_DATA_FILE), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    return trainer, tokenizer, metrics


def run_train(args: argparse.Namespace) -> int:
    trainer, _, metrics = train_from_args(args)
    lo, hi = trainer.model.training_noise_interval() if hasattr(trainer.model, "training_noise_interval") else (0, 0)
    print(
        f"bd3lm train: done. eval NELBO {metrics['eval_loss']:.3f} nats/token, perplexity bound "
        f"{metrics.get('eval_ppl', float('nan')):.1f}, training noise interval [{lo:.2f}, {hi:.2f}]. "
        f"Model in {args.output_dir}",
        flush=True,
    )
    return 0


__all__ = ["TRAINING_DATA_FILE", "add_train_arguments", "run_train", "train_from_args"]
