# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Exponential moving average of the weights (the paper trains with EMA 0.9999), one process or sharded.

Under FSDP2 and DeepSpeed ZeRO-3 each rank averages only its own shard of every parameter (`sharding.local_shard`),
so the EMA costs one fp32 copy of the rank's shard and no communication; evaluation and `save_model` swap the shards in,
and the engines gather them as they gather the weights. Checkpoints store one file per rank for sharded runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator

import torch
from transformers import TrainerCallback

from . import sharding

logger = logging.getLogger(__name__)

EMA_STATE_NAME = "ema_state.safetensors"
# One file per rank when the parameters are sharded: `ema_state-rank00001-of-00008.safetensors`.
EMA_SHARD_TEMPLATE = "ema_state-rank{rank:05d}-of-{world:05d}.safetensors"
EMA_SHARD_PATTERN = re.compile(r"ema_state-rank(\d{5})-of-(\d{5})\.safetensors")


def ema_shard_files(folder: str) -> dict[int, list[int]]:
    """The per-rank EMA files of a checkpoint folder: {process count: [ranks present]}."""
    found: dict[int, list[int]] = {}
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            match = EMA_SHARD_PATTERN.fullmatch(name)
            if match:
                found.setdefault(int(match.group(2)), []).append(int(match.group(1)))
    return {world: sorted(ranks) for world, ranks in found.items()}


class EMACallback(TrainerCallback):
    """Exponential moving average of the trainable weights: θ_ema ← d·θ_ema + (1 - d)·θ after every optimizer step,
    with the warm-up d_n = min(decay, (1 + n) / (10 + n)) of the official `models/ema.py` (n counts updates).

    `BD3LMTrainer` evaluates and saves with the EMA weights swapped in ([`EMACallback.applied`]) and stores the EMA
    state in every checkpoint, so that `resume_from_checkpoint` continues exactly:

    * unsharded (one process, DDP, ZeRO-1/2): `ema_state.safetensors` holds the average and the online weights (the
      checkpoint's `model.safetensors` holds the EMA weights, so the folder loads with `from_pretrained`);
    * sharded (FSDP2 `DTensor` parameters, ZeRO-3 partitions): each rank writes
      `ema_state-rank<r>-of-<world>.safetensors` with the average of its own shard (the engine's checkpoint holds the
      online weights), and resuming needs the same sharding and process count.

    Under ZeRO-3 the average follows the optimizer's fp32 master partition (the working copy may be bf16).

    Args:
        decay (`float`, defaults to 0.9999): the asymptotic decay.
        warmup (`bool`, defaults to `True`): use the (1 + n) / (10 + n) warm-up.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` must be in [0, 1), got {decay}.")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        # fp32, keyed by parameter name without wrapper segments, shaped like this rank's shard
        self.shadow: dict[str, torch.Tensor] | None = None
        self.resume_from: str | None = None  # a checkpoint folder, loaded when training begins (set by the trainer)
        self._depth = 0
        self._backup: dict[str, torch.Tensor] = {}

    @staticmethod
    def _tracked(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        sharding.check_supported(model)
        sharding.reshard_fsdp2(model)  # so that FSDP2 parameters are the DTensor shards, not a gathered copy
        return {
            sharding.canonical_name(name): p
            for name, p in model.named_parameters()
            if p.requires_grad and p.is_floating_point()
        }

    def current_decay(self) -> float:
        """The decay of the next update."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def reset(self, model: torch.nn.Module) -> None:
        self.shadow = {
            name: sharding.local_master(p).detach().float().clone() for name, p in self._tracked(model).items()
        }
        self.num_updates = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        if self.resume_from is not None:
            folder, self.resume_from = self.resume_from, None
            self.load_state(folder, model)
        elif self.shadow is None:
            self.reset(model)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        if self.shadow is None:
            self.reset(model)
        decay = self.current_decay()
        self.num_updates += 1
        for name, param in self._tracked(model).items():
            self.shadow[name].lerp_(sharding.local_master(param).float(), 1.0 - decay)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.update(model)

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """Swap the EMA weights in for the duration of the block (re-entrant); the online weights come back after.

        Sharded: each rank writes its shard of the average into its shard of the parameters; gathered copies are
        dropped before (stale online weights) and after (EMA weights), so every forward gathers what is current.
        """
        if self.shadow is None or self._depth > 0:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        tracked = self._tracked(model)
        sharding.release_gathered(model)
        with torch.no_grad():
            shards = {name: sharding.local_shard(p) for name, p in tracked.items()}
            self._backup = {name: shard.clone() for name, shard in shards.items()}
            for name, shard in shards.items():
                shard.copy_(self.shadow[name])
        self._depth = 1
        try:
            yield
        finally:
            self._depth = 0
            sharding.release_gathered(model)
            with torch.no_grad():
                for name, shard in shards.items():
                    shard.copy_(self._backup[name])
            self._backup = {}

    def _metadata(self, layout: str) -> dict[str, str]:
        return {
            "num_updates": str(self.num_updates),
            "decay": repr(self.decay),
            "warmup": str(self.warmup),
            "layout": layout,
        }

    def save_state(self, folder: str, model: torch.nn.Module, write_replicated: bool = True) -> None:
        """Write the EMA state into a checkpoint folder; call it on every rank. Unsharded: `ema_state.safetensors`
        (average and online weights, update count), written only where `write_replicated`. Sharded: this rank's
        `ema_state-rank<r>-of-<world>.safetensors` (its shard of the average)."""
        from safetensors.torch import save_file

        if self.shadow is None:
            return
        tracked = self._tracked(model)
        layout = sharding.describe(tracked.values())
        if layout == sharding.LAYOUT_FULL:
            if not write_replicated:
                return
            tensors = {f"shadow.{n}": t.contiguous() for n, t in self.shadow.items()}
            tensors.update({f"online.{n}": p.detach().contiguous().clone() for n, p in tracked.items()})
            save_file(tensors, os.path.join(folder, EMA_STATE_NAME), metadata=self._metadata(layout))
            return
        rank, world = sharding.rank_and_world()
        os.makedirs(folder, exist_ok=True)
        tensors = {f"shadow.{n}": t.detach().cpu().contiguous() for n, t in self.shadow.items()}
        metadata = {**self._metadata(layout), "rank": str(rank), "world_size": str(world)}
        save_file(tensors, os.path.join(folder, EMA_SHARD_TEMPLATE.format(rank=rank, world=world)), metadata=metadata)

    @torch.no_grad()
    def load_state(self, folder: str, model: torch.nn.Module) -> bool:
        """Restore the average and the update count (and, unsharded, the online weights: the checkpoint's model file
        holds the EMA weights). Returns False, after a warning, when the folder has no EMA state; raises when its
        EMA was saved under another sharding or process count."""
        tracked = self._tracked(model)
        layout = sharding.describe(tracked.values())
        saved_shards = ema_shard_files(folder)
        unsharded_path = os.path.join(folder, EMA_STATE_NAME)
        if layout == sharding.LAYOUT_FULL:
            path = unsharded_path
            if not os.path.isfile(path) and saved_shards:
                raise ValueError(
                    f"{folder} holds an EMA saved in shards by {sorted(saved_shards)} processes (FSDP2 / ZeRO-3), but "
                    "this run's parameters are not sharded; resume it with the same sharding and process count."
                )
        else:
            rank, world = sharding.rank_and_world()
            path = os.path.join(folder, EMA_SHARD_TEMPLATE.format(rank=rank, world=world))
            if not os.path.isfile(path) and (saved_shards or os.path.isfile(unsharded_path)):
                saved = f"in shards by {sorted(saved_shards)} processes" if saved_shards else "unsharded"
                raise ValueError(
                    f"{folder} holds an EMA saved {saved}; this run shards the parameters ({layout}) over {world} "
                    f"processes. The EMA is stored per shard: resume with the sharding and process count it was saved with."
                )
        if not os.path.isfile(path):
            logger.warning(
                f"{folder} has no EMA state ({os.path.basename(path)}); the EMA restarts from the loaded weights."
            )
            self.reset(model)
            return False
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            saved_layout = f.metadata().get("layout", sharding.LAYOUT_FULL)
            if saved_layout != layout:
                raise ValueError(f"{path} was saved with {saved_layout} parameters; this run has {layout} ones.")
            missing = [
                n for n in tracked if f"shadow.{n}" not in keys or (layout == "full" and f"online.{n}" not in keys)
            ]
            if missing:
                raise ValueError(
                    f"{path} does not match the model: no EMA entry for {missing[:3]}... "
                    "(was the checkpoint made with other trainable parameters?)"
                )
            shadow = {}
            for name, param in tracked.items():
                shard = sharding.local_shard(param)
                saved = f.get_tensor(f"shadow.{name}")
                if saved.shape != shard.shape:
                    raise ValueError(
                        f"{path}: the EMA of {name} has shape {tuple(saved.shape)}, this rank's shard "
                        f"{tuple(shard.shape)} (another sharding?)."
                    )
                shadow[name] = saved.to(shard.device, torch.float32)
                if layout == sharding.LAYOUT_FULL:
                    param.copy_(f.get_tensor(f"online.{name}"))
            self.shadow = shadow
            self.num_updates = int(f.metadata()["num_updates"])
        return True


__all__ = ["EMA_SHARD_TEMPLATE", "EMA_STATE_NAME", "EMACallback", "ema_shard_files"]
