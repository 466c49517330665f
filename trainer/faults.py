# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Fault handling of `BD3LMTrainer`: non-finite losses and gradients (`nan_loss_policy`), and checkpoints half-written
by a run that was killed while saving (`last_complete_checkpoint`)."""

from __future__ import annotations

import json
import logging
import os
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

# Files a complete checkpoint holds when they exist at all; HF's Trainer writes `trainer_state.json` last.
TRAINER_STATE_NAME = "trainer_state.json"
_TORCH_ZIP_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin")


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient norm was NaN or infinite (`nan_loss_policy="stop"`); the weights were not
    updated with it."""


@dataclass
class NonFiniteSteps:
    """What was not finite in the current training step (flagged by the trainer's `compute_loss` and
    `_clip_grad_norm`), and the global steps that `nan_loss_policy="skip"` dropped."""

    pending: str | None = None
    skipped: list[int] = field(default_factory=list)

    def flag(self, reason: str) -> None:
        """Record `reason` for the current step (the first one flagged is reported)."""
        self.pending = self.pending or reason


class _NonFiniteGuard(TrainerCallback):
    """Applies `nan_loss_policy` just before the optimizer step: with "skip", a step whose loss or gradient norm was
    flagged in `steps` loses its gradients, so that the optimizer leaves the weights and its state as they were; with
    "stop", a non-finite gradient norm raises.

    Args:
        steps ([`NonFiniteSteps`]): the flags the trainer writes.
        trainer (`transformers.Trainer`): read for its current `model` and `accelerator` (weakly held: a finished
            trainer, and its data, is freed at once).
    """

    def __init__(self, steps: NonFiniteSteps, trainer: Any) -> None:
        self.steps = steps
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None and args.nan_loss_policy == "skip" and trainer.is_deepspeed_enabled:
            # DeepSpeed reduces gradients into its own buffers, so clearing `param.grad` would not drop the update.
            raise ValueError(
                "nan_loss_policy='skip' cannot drop an update under DeepSpeed (its gradients live in its own buffers); "
                "use nan_loss_policy='stop', or FSDP2 / DDP."
            )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self._trainer()
        reason, self.steps.pending = self.steps.pending, None
        if trainer is None or reason is None:
            return
        step = state.global_step + 1
        if args.nan_loss_policy == "stop":
            raise NonFiniteLossError(
                f"Non-finite {reason} at global step {step}; training stopped before the optimizer step, so the weights "
                "keep their last finite update. Lower the learning rate, check the data, or set "
                "nan_loss_policy='skip' to drop such steps."
            )
        logger.warning(f"Non-finite {reason} at global step {step}: skipping this update (nan_loss_policy='skip').")
        self.steps.skipped.append(step)
        if trainer.accelerator.scaler is None:  # a GradScaler already skips steps with non-finite gradients itself
            for param in trainer.model.parameters():
                param.grad = None  # torch optimizers leave a parameter without gradient (and its state) untouched


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from, or None when it is complete.

    Complete means: `trainer_state.json` (which the Trainer writes last) parses and names this step, the weights
    (`model.safetensors`, its shards, or a PEFT `adapter_model.safetensors`; or, for FSDP and DeepSpeed, the engine's
    own model state) and EMA files are whole, and every torch-serialised state file present (optimizer, scheduler,
    ...) is a whole zip archive. A run killed while saving leaves a folder that fails one of these.
    """
    import zipfile

    from safetensors import SafetensorError, safe_open

    folder = os.fspath(folder)
    state_path = os.path.join(folder, TRAINER_STATE_NAME)
    if not os.path.isfile(state_path):
        return f"no {TRAINER_STATE_NAME} (the save was interrupted)"
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as error:
        return f"{TRAINER_STATE_NAME} is unreadable ({error})"
    match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", os.path.basename(os.path.normpath(folder)))
    if not isinstance(state, dict) or (match and state.get("global_step") != int(match.group(1))):
        return f"{TRAINER_STATE_NAME} does not describe step {match.group(1) if match else '?'}"
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weights = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as error:
            return f"model.safetensors.index.json is unreadable ({error})"
    else:
        weights = [
            n for n in ("model.safetensors", "adapter_model.safetensors") if os.path.isfile(os.path.join(folder, n))
        ]
    engine_state, engine_problem = _engine_checkpoint(folder)
    if engine_problem is not None:
        return engine_problem
    if not weights and not engine_state:
        return "no model.safetensors"
    from .ema import EMA_SHARD_TEMPLATE, ema_shard_files

    shards = ema_shard_files(folder)
    if len(shards) > 1:
        return f"EMA shards of several process counts ({sorted(shards)})"
    for world, ranks in shards.items():
        if ranks != list(range(world)):
            return f"EMA shard files are missing (ranks {sorted(set(range(world)) - set(ranks))} of {world})"
        weights += [EMA_SHARD_TEMPLATE.format(rank=rank, world=world) for rank in ranks]
    for name in weights:
        try:
            with safe_open(os.path.join(folder, name), framework="pt"):
                pass  # opening checks that the header is whole and covers the file
        except (SafetensorError, OSError) as error:  # OSError: a shard is missing
            return f"{name} is not a whole safetensors file ({error})"
    for name in sorted(os.listdir(folder)):
        if (name in _TORCH_ZIP_FILES or name.startswith("rng_state")) and not zipfile.is_zipfile(
            os.path.join(folder, name)
        ):
            return f"{name} is truncated"
    return None


def _engine_checkpoint(folder: str) -> tuple[bool, str | None]:
    """Whether the folder holds the model state a sharding engine writes instead of (or beside) `model.safetensors`,
    and what is wrong with it (None when it is whole).

    FSDP with sharded state dicts: `pytorch_model_fsdp_0/` and `optimizer_0/` (torch.distributed.checkpoint writes
    their `.metadata` last),
    or `pytorch_model_fsdp.bin` with full state dicts. DeepSpeed: `latest` names the `global_step*` folder of
    per-rank `*.pt` files.
    """
    import zipfile

    found = False
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if re.fullmatch(r"(pytorch_model_fsdp|optimizer)_\d+", name) and os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, ".metadata")):
                return True, f"{name}/ has no .metadata (the sharded save was interrupted)"
            found = found or name.startswith("pytorch_model_fsdp")
        elif re.fullmatch(r"pytorch_model_fsdp(_\d+)?\.bin", name):
            if not zipfile.is_zipfile(path):
                return True, f"{name} is truncated"
            found = True
    latest = os.path.join(folder, "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        tag_folder = os.path.join(folder, tag)
        if not tag or not os.path.isdir(tag_folder):
            return True, f"`latest` names {tag!r}, which is not a folder of the checkpoint"
        states = [n for n in sorted(os.listdir(tag_folder)) if n.endswith(".pt")]
        if not states:
            return True, f"{tag}/ holds no DeepSpeed state files"
        for name in states:
            if not zipfile.is_zipfile(os.path.join(tag_folder, name)):
                return True, f"{tag}/{name} is truncated"
        found = True
    return found, None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder of `output_dir` that is complete ([`checkpoint_problem`]), or None.

    `transformers.trainer_utils.get_last_checkpoint` returns the newest folder even when a run was killed while
    writing it; resuming from such a folder restarts at step 0 or fails. This skips it (with a warning).
    """
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps.append((int(match.group(1)), name))
    for _, name in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, name)
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning(f"Skipping {folder}: {problem}.")
    return None


__all__ = ["NonFiniteLossError", "NonFiniteSteps", "checkpoint_problem", "last_complete_checkpoint"]
