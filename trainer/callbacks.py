# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Trainer callbacks of BD3-LM: the data-driven clipped noise schedule, EMA of the weights (`ema.py`, re-exported
here), and the gradient-variance diagnostic (Arriola et al., 2025, Sec. 4 "Data-driven noise schedules for
low-variance training").

All three are correct under accelerate/DDP, FSDP2 and DeepSpeed ZeRO-3 (the gradient-variance diagnostic needs
unsharded parameters): every process runs the same number of forward passes and collectives, per-block values are
gathered with `gather_for_metrics`, and the chosen interval is broadcast from the main process.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from transformers import TrainerCallback

from modeling_bd3lm.noise_schedule_bd3lm import EVAL_NOISE_INTERVAL, nelbo_valid_mask

from . import sharding
from .ema import EMA_STATE_NAME, EMACallback  # noqa: F401  (the EMA lives in ema.py; re-exported here)
from .utils import (
    diagnostic_generator,
    gather_block_values,
    noised_nelbo,
    per_block_nelbo,
    pyplot,
    save_figure,
    take_batches,
    unwrap_bd3lm,
)

logger = logging.getLogger(__name__)

# The upstream grid (`algo.clip_search_widths`, `clip_search_delta`).
DEFAULT_SEARCH_WIDTHS = (0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_SEARCH_STEP = 0.05
SCHEDULE_SEARCH_JSON = "schedule_search.json"
SCHEDULE_SEARCH_PNG = "schedule_search.png"


def noise_interval_grid(
    widths: Iterable[float] = DEFAULT_SEARCH_WIDTHS, step: float = DEFAULT_SEARCH_STEP
) -> list[tuple[float, float]]:
    """Candidate intervals [β, ω] of the clipped-schedule search, in the upstream order.

    Always the unbiased (1e-3, 1), then for every width w the offsets i = 0, step, ..., 1 - w give
    (max(i, 1e-3), i + w): with the default widths 0.5..0.9 and step 0.05 that is 11 + 9 + 7 + 5 + 3 = 35 clipped
    intervals.
    """
    if step <= 0:
        raise ValueError(f"`step` must be > 0, got {step}.")
    grid = [EVAL_NOISE_INTERVAL]
    for width in widths:
        if not 0.0 < width <= 1.0:
            raise ValueError(f"Search widths must lie in (0, 1], got {width}.")
        num_offsets = int(math.floor((1.0 - width) / step + 1e-9)) + 1
        for i in range(num_offsets):
            offset = round(i * step, 10)
            interval = (max(offset, EVAL_NOISE_INTERVAL[0]), round(offset + width, 10))
            if interval not in grid:
                grid.append(interval)
    return grid


class TrainerBoundCallback(TrainerCallback):
    """A callback that needs its trainer's accelerator, `log` and `is_world_process_zero` (a `transformers.Trainer`).

    The trainer does not exist yet when the callbacks are built (they go into `Trainer.__init__`), so it is bound
    afterwards: `BD3LMTrainer` binds every such callback it holds; with another `Trainer`, call `bind(trainer)`.
    """

    trainer: Any = None

    def bind(self, trainer: Any) -> None:
        self.trainer = trainer

    def _require_trainer(self) -> Any:
        if self.trainer is None:
            raise RuntimeError(f"{type(self).__name__} needs its trainer: use BD3LMTrainer, or call `.bind(trainer)`.")
        return self.trainer


class NoiseScheduleSearchCallback(TrainerBoundCallback):
    """The data-driven clipped schedule: after each evaluation, pick the training interval [β, ω] that minimises the
    variance of the NELBO estimator and write it into the model's `sampling_eps_min/max` buffers (so checkpoints carry
    it).

    For every candidate interval, each of the first `num_batches` evaluation batches is noised with t ∼ U[β, ω]
    (model in eval mode, EMA weights if on); its per-block NELBO values (mean of the token terms over each block) are
    gathered across processes and their variance is taken; the variances are summed over batches and the argmin wins
    (ties keep the earlier grid entry). The table is logged, and written to `schedule_search.json` (and
    `schedule_search.png` when matplotlib is installed) in `args.output_dir`.

    Args:
        widths (`Iterable[float]`, defaults to (0.5, 0.6, 0.7, 0.8, 0.9)): interval widths of the grid.
        step (`float`, defaults to 0.05): offset step of the grid.
        num_batches (`int`, defaults to 100): evaluation batches per interval (upstream: 100).
        fixed (`bool`, defaults to `False`): only measure and report; leave the buffers alone (`fix_clipping`).
        eval_dataset_name (`str`, *optional*): with a dict of eval datasets, search on this one only.
    """

    def __init__(
        self,
        widths: Iterable[float] = DEFAULT_SEARCH_WIDTHS,
        step: float = DEFAULT_SEARCH_STEP,
        num_batches: int = 100,
        fixed: bool = False,
        eval_dataset_name: str | None = None,
    ) -> None:
        if num_batches < 1:
            raise ValueError(f"`num_batches` must be >= 1, got {num_batches}.")
        self.grid = noise_interval_grid(widths, step)
        self.num_batches = num_batches
        self.fixed = fixed
        self.eval_dataset_name = eval_dataset_name
        self.last_table: list[dict[str, float]] | None = None
        self.history: list[dict[str, Any]] = []

    def candidates(self, config: Any) -> list[tuple[float, float]]:
        """The grid intervals the model's training could use: with `config.resample` only masked fractions k / L'
        exist, so an interval holding none of them can never be sampled and is dropped."""
        if not config.resample:
            return list(self.grid)
        fractions = [k / config.block_size for k in range(config.block_size + 1)]
        return [(lo, hi) for lo, hi in self.grid if any(lo <= f <= hi for f in fractions)]

    def on_evaluate(self, args, state, control, model=None, eval_dataloader=None, metrics=None, **kwargs):
        if self.eval_dataset_name is not None and metrics is not None:
            if f"eval_{self.eval_dataset_name}_loss" not in metrics:
                return
        if model is None or eval_dataloader is None:
            return
        self.search(model, eval_dataloader, args, state)

    @torch.no_grad()
    def search(self, model: torch.nn.Module, dataloader: Iterable, args: Any, state: Any) -> tuple[float, float]:
        trainer = self._require_trainer()
        accelerator = trainer.accelerator
        bd3lm = unwrap_bd3lm(model)
        config = bd3lm.config
        grid = self.candidates(config)
        device = next(bd3lm.parameters()).device
        generator = diagnostic_generator(device, args.seed, state.global_step, accelerator.process_index)
        sums = [0.0] * len(grid)
        num_batches = 0
        was_training = model.training
        model.eval()
        try:
            for batch in take_batches(dataloader, self.num_batches):
                batch = {key: value.to(device) for key, value in batch.items() if isinstance(value, torch.Tensor)}
                labels = batch.get("labels", batch["input_ids"])
                valid = nelbo_valid_mask(labels, batch.get("attention_mask"), config.ignore_bos)
                for i, interval in enumerate(grid):
                    with accelerator.autocast():
                        token_loss = noised_nelbo(model, batch, interval, generator).token_loss
                    values, blocks = per_block_nelbo(token_loss, valid, config.block_size)
                    gathered = gather_block_values(accelerator, values, blocks)
                    if gathered.numel() > 1:
                        sums[i] += float(gathered.double().var())
                num_batches += 1
        finally:
            model.train(was_training)
        if num_batches == 0:
            logger.warning("The noise-schedule search got no evaluation batches; the interval is unchanged.")
            return bd3lm.training_noise_interval()
        best = min(range(len(grid)), key=lambda i: (sums[i], i))
        chosen = list(grid[best])
        if accelerator.num_processes > 1:  # identical by construction; broadcast so that no rounding can split ranks
            from accelerate.utils import broadcast_object_list

            chosen = broadcast_object_list(chosen, from_process=0)
        if not self.fixed:
            bd3lm.set_noise_interval(float(chosen[0]), float(chosen[1]))
        table = [
            {"eps_min": lo, "eps_max": hi, "nelbo_var": s / num_batches, "nelbo_var_sum": s}
            for (lo, hi), s in zip(grid, sums)
        ]
        self.last_table = table
        interval = bd3lm.training_noise_interval()
        self.history.append({"step": state.global_step, "best": tuple(chosen), "interval": interval})
        self._report(trainer, args, state, table, tuple(chosen), num_batches)
        return interval

    def _report(self, trainer, args, state, table, chosen, num_batches) -> None:
        logs = {"schedule_search/eps_min": chosen[0], "schedule_search/eps_max": chosen[1]}
        for row in table:
            logs[f"schedule_search/var_{row['eps_min']:g}_{row['eps_max']:g}"] = row["nelbo_var"]
        trainer.log(logs)
        if not trainer.is_world_process_zero():
            return
        lines = [f"Noise-schedule search at step {state.global_step} ({num_batches} batches per interval):"]
        lines += [f"  [{r['eps_min']:.3f}, {r['eps_max']:.3f}]  var {r['nelbo_var']:.6g}" for r in table]
        lines.append(f"  -> [{chosen[0]:g}, {chosen[1]:g}]" + (" (fixed interval: not applied)" if self.fixed else ""))
        logger.info("\n".join(lines))
        os.makedirs(args.output_dir, exist_ok=True)
        record = {
            "step": state.global_step,
            "num_batches": num_batches,
            "best": list(chosen),
            "applied": not self.fixed,
            "table": table,
        }
        with open(os.path.join(args.output_dir, SCHEDULE_SEARCH_JSON), "w") as f:
            json.dump(record, f, indent=2)
        plot_schedule_search(table, chosen, os.path.join(args.output_dir, SCHEDULE_SEARCH_PNG), state.global_step)


def plot_schedule_search(
    table: list[dict[str, float]], chosen: tuple[float, float], path: str, step: int | None = None
) -> bool:
    """Bar chart of the NELBO variance per interval (the chosen one highlighted). Returns False, after one warning,
    when matplotlib is not installed."""
    plt = pyplot(
        "matplotlib is not installed, so schedule_search.png is not written (the JSON table is). "
        "Install it with `pip install matplotlib` or the `bd3lm[plot]` extra."
    )
    if plt is None:
        return False
    labels = [f"[{r['eps_min']:.2g},{r['eps_max']:.2g}]" for r in table]
    colors = ["tab:red" if (r["eps_min"], r["eps_max"]) == tuple(chosen) else "tab:blue" for r in table]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(table)), 4.0))
    ax.bar(range(len(table)), [r["nelbo_var"] for r in table], color=colors)
    ax.set_xticks(range(len(table)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("variance of per-block NELBO")
    ax.set_title("Clipped noise-schedule search" + (f" (step {step})" if step is not None else ""))
    save_figure(fig, path, dpi=100)
    return True


def estimate_gradient_variance(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    noise_interval: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    accelerator: Any = None,
) -> float:
    """The paper's gradient-variance estimator over M minibatches X^1..X^M:

        Var ≈ 1/(M - 1) Σ_m ||∇_θ l(X^m; θ) - (1/M) Σ_m' ∇_θ l(X^m'; θ)||²,

    with l the token-mean block NELBO under t ∼ U[noise_interval] (default: the model's training interval, i.e. the
    clipped schedule). Computed with Welford's update, so memory is two copies of the trainable gradients; under
    several processes each one's minibatches are merged with Chan's formula. Gradients come from `torch.autograd.grad`
    and never touch `.grad`, so training state and DDP hooks are unaffected. Dropout is off (model in eval mode) so
    that only the noise of the objective is measured.
    """
    bd3lm = unwrap_bd3lm(model)
    interval = bd3lm.training_noise_interval() if noise_interval is None else noise_interval
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters to measure the gradient variance of.")
    count, mean, m2 = 0, None, 0.0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            loss = noised_nelbo(model, batch, interval, generator).loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = torch.cat(
                [(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, params)]
            )
            count += 1
            if mean is None:
                mean = flat.clone()
                continue
            delta = flat - mean
            mean += delta / count
            m2 += float(delta.dot(flat - mean))
    finally:
        model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        local_n = torch.tensor(float(count), device=params[0].device)
        local_mean = torch.zeros(sum(p.numel() for p in params), device=params[0].device) if mean is None else mean
        total = float(accelerator.reduce(local_n.clone(), "sum"))
        global_mean = accelerator.reduce(local_mean * local_n, "sum") / max(total, 1.0)
        spread = m2 + float(local_n) * float((local_mean - global_mean).square().sum())
        m2 = float(accelerator.reduce(torch.tensor(spread, device=params[0].device, dtype=torch.float64), "sum"))
        count = int(total)
    if count < 2:
        raise ValueError(f"The gradient variance needs at least 2 minibatches, got {count}.")
    return m2 / (count - 1)


class GradientVarianceCallback(TrainerBoundCallback):
    """Logs `grad_variance` ([`estimate_gradient_variance`] over `num_minibatches` evaluation batches, noise from the
    training interval) after every evaluation, with the weights being evaluated.

    Args:
        num_minibatches (`int`, defaults to 8): M, minibatches per process (at least 2 in total).
    """

    def __init__(self, num_minibatches: int = 8) -> None:
        if num_minibatches < 1:
            raise ValueError(f"`num_minibatches` must be >= 1, got {num_minibatches}.")
        self.num_minibatches = num_minibatches
        self.last_value: float | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        sharding.reshard_fsdp2(model)
        layout = sharding.describe(model.parameters())
        if layout != sharding.LAYOUT_FULL:
            # Each rank holds a shard of every gradient, but the estimator needs whole per-minibatch gradients.
            raise ValueError(
                f"`grad_variance_minibatches` needs unsharded parameters, but this run shards them ({layout}); set it "
                "to 0, or measure the gradient variance in a DDP or single-process run."
            )

    def on_evaluate(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        if model is None or eval_dataloader is None:
            return
        trainer = self._require_trainer()
        device = next(model.parameters()).device
        generator = diagnostic_generator(device, args.seed + 1, state.global_step, trainer.accelerator.process_index)
        batches = (
            {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            for batch in take_batches(eval_dataloader, self.num_minibatches)
        )
        with trainer.accelerator.autocast():
            self.last_value = estimate_gradient_variance(model, batches, None, generator, trainer.accelerator)
        trainer.log({"grad_variance": self.last_value})


__all__ = [
    "EMACallback",
    "GradientVarianceCallback",
    "NoiseScheduleSearchCallback",
    "TrainerBoundCallback",
    "estimate_gradient_variance",
    "noise_interval_grid",
    "plot_schedule_search",
]
