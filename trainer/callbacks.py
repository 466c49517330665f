# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Trainer callbacks of BD3-LM: the data-driven clipped noise schedule, EMA of the weights (`ema.py`, re-exported
here), and the gradient-variance diagnostic (Arriola et al., 2025, Sec. 4 "Data-driven noise schedules for
low-variance training").

All three are correct under accelerate/DDP, FSDP2 and DeepSpeed ZeRO-3 (the gradient-variance diagnostic needs
unsharded parameters): every process runs the same number of forward passes and collectives, per-block values are
gathered with `gather_for_metrics`, and the chosen interval is broadcast from the main process.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from modeling_bd3lm import add_noise, sample_noise_levels
from modeling_bd3lm.noise_schedule_bd3lm import EVAL_NOISE_INTERVAL

from . import sharding
from .ema import EMA_STATE_NAME, EMACallback  # noqa: F401  (the EMA lives in ema.py; re-exported here)

if TYPE_CHECKING:
    from .trainer import BD3LMTrainer

logger = logging.getLogger(__name__)

# The upstream grid (`algo.clip_search_widths`, `clip_search_delta`).
DEFAULT_SEARCH_WIDTHS = (0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_SEARCH_STEP = 0.05
SCHEDULE_SEARCH_JSON = "schedule_search.json"
SCHEDULE_SEARCH_PNG = "schedule_search.png"
_warned_no_matplotlib = False


def unwrap_bd3lm(model: torch.nn.Module) -> torch.nn.Module:
    """The `BD3LMForMaskedDiffusion` inside a DDP / compiled / PEFT wrapper (checked by `model_type`, so that a copy
    loaded with `trust_remote_code` also qualifies)."""
    current = model
    for _ in range(8):
        if hasattr(current, "get_base_model"):  # PEFT (which would also forward the attributes checked below)
            current = current.get_base_model()
            continue
        config = getattr(current, "config", None)
        if getattr(config, "model_type", None) == "bd3lm" and hasattr(current, "set_noise_interval"):
            return current
        if isinstance(getattr(current, "module", None), torch.nn.Module):  # DDP, DataParallel
            current = current.module
        elif isinstance(getattr(current, "_orig_mod", None), torch.nn.Module):  # torch.compile
            current = current._orig_mod
        else:
            break
    raise TypeError(
        f"Expected a BD3LMForMaskedDiffusion (possibly wrapped by PEFT or DDP), got {type(model).__name__}."
    )


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


def nelbo_valid_mask(
    labels: torch.Tensor, attention_mask: torch.Tensor | None = None, ignore_bos: bool = False
) -> torch.BoolTensor:
    """Positions that count in the NELBO average: labelled, not padding, and not position 0 with `ignore_bos`."""
    valid = labels != -100
    if attention_mask is not None:
        valid = valid & attention_mask.bool()
    if ignore_bos:
        valid = valid.clone()
        valid[:, 0] = False
    return valid


def noised_nelbo(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    interval: tuple[float, float],
    generator: torch.Generator | None = None,
):
    """The block NELBO of `batch` with t ∼ U[β, ω] per (sequence, block), whatever mode the model is in.

    x_t ∼ q(x_t | x_0) at those levels, with rejection resampling into [β, ω] when `config.resample` (a bound at the
    default end of the range is not enforced, as upstream). Returns the model output (`loss`, `token_loss`).
    """
    bd3lm = unwrap_bd3lm(model)
    config = bd3lm.config
    x_0 = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    labels = batch.get("labels", x_0)
    lo, hi = interval
    num_blocks = x_0.shape[1] // config.block_size
    resample_interval = None
    if config.always_mask:  # the "t ≡ 1" objective: every token masked, whatever the interval
        noise_levels = torch.ones(x_0.shape[0], num_blocks, device=x_0.device)
        mask_probability = noise_levels
    else:
        noise_levels = sample_noise_levels(
            x_0.shape[0], num_blocks, lo, hi, config.antithetic_sampling, generator, x_0.device
        )
        mask_probability = bd3lm.noise_schedule.mask_probability(noise_levels)
        if config.resample and (lo, hi) != EVAL_NOISE_INTERVAL:
            resample_interval = (lo if lo > EVAL_NOISE_INTERVAL[0] else 0.0, hi)
    maskable = torch.ones_like(x_0, dtype=torch.bool) if attention_mask is None else attention_mask.bool().clone()
    if config.ignore_bos:
        maskable[:, 0] = False
    x_t = add_noise(
        x_0, mask_probability, config.mask_token_id, config.block_size, resample_interval, maskable, generator
    )
    return model(
        input_ids=x_0, noisy_input_ids=x_t, noise_levels=noise_levels, labels=labels, attention_mask=attention_mask,
        return_dict=True,
    )


def per_block_nelbo(token_loss: torch.Tensor, valid: torch.BoolTensor, block_size: int):
    """Per-block NELBO values, the mean of `token_loss` over the L' positions of each block (upstream's statistic),
    and a mask of the blocks holding at least one counted token. Shapes `(batch, num_blocks)`."""
    batch, seq_len = token_loss.shape
    values = token_loss.float().view(batch, seq_len // block_size, block_size).mean(-1)
    return values, valid.view(batch, seq_len // block_size, block_size).any(-1)


def gather_block_values(accelerator: Any, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """All processes' per-block values of one batch (duplicates of an uneven last batch dropped), flattened."""
    if accelerator is not None and accelerator.num_processes > 1:
        # Dynamic padding can give processes different block counts; pad so that the gather lines up.
        values = accelerator.pad_across_processes(values.contiguous(), dim=1, pad_index=0)
        valid = accelerator.pad_across_processes(valid.float().contiguous(), dim=1, pad_index=0)
        values, valid = accelerator.gather_for_metrics((values, valid))
    return values[valid.bool()]


def _take(dataloader: Iterable, num_batches: int) -> Iterator:
    """The first `num_batches` batches; an accelerate loader stopped early is unregistered from its GradientState
    (it only does that itself at its end), so that the training loader stays the active one."""
    iterator = iter(dataloader)
    try:
        yield from itertools.islice(iterator, num_batches)
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
        end = getattr(dataloader, "end", None)
        if callable(end):
            end()


def _search_generator(device: torch.device, seed: int, step: int, process_index: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step * 9_973 + process_index) % (2**63))
    return generator


class _TrainerBoundCallback(TrainerCallback):
    """A callback that needs the trainer (accelerator, `log`, output folder); `BD3LMTrainer` binds it."""

    trainer: BD3LMTrainer | None = None

    def bind(self, trainer: BD3LMTrainer) -> None:
        self.trainer = trainer

    def _require_trainer(self) -> BD3LMTrainer:
        if self.trainer is None:
            raise RuntimeError(f"{type(self).__name__} must be used with BD3LMTrainer (it binds the callback).")
        return self.trainer


class NoiseScheduleSearchCallback(_TrainerBoundCallback):
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
        grid = self.grid
        if config.resample:  # only fractions k / L' exist; an interval holding none of them can never be sampled
            fractions = [k / config.block_size for k in range(config.block_size + 1)]
            grid = [(lo, hi) for lo, hi in grid if any(lo <= f <= hi for f in fractions)]
        device = next(bd3lm.parameters()).device
        generator = _search_generator(device, args.seed, state.global_step, accelerator.process_index)
        sums = [0.0] * len(grid)
        num_batches = 0
        was_training = model.training
        model.eval()
        try:
            for batch in _take(dataloader, self.num_batches):
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
        record = {"step": state.global_step, "num_batches": num_batches, "best": list(chosen),
                  "applied": not self.fixed, "table": table}
        with open(os.path.join(args.output_dir, SCHEDULE_SEARCH_JSON), "w") as f:
            json.dump(record, f, indent=2)
        plot_schedule_search(table, chosen, os.path.join(args.output_dir, SCHEDULE_SEARCH_PNG), state.global_step)


def plot_schedule_search(
    table: list[dict[str, float]], chosen: tuple[float, float], path: str, step: int | None = None
) -> bool:
    """Bar chart of the NELBO variance per interval (the chosen one highlighted). Returns False, after one warning,
    when matplotlib is not installed."""
    global _warned_no_matplotlib
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned_no_matplotlib:
            logger.warning(
                "matplotlib is not installed, so schedule_search.png is not written (the JSON table is). "
                "Install it with `pip install matplotlib` or the `bd3lm[plot]` extra."
            )
            _warned_no_matplotlib = True
        return False
    labels = [f"[{r['eps_min']:.2g},{r['eps_max']:.2g}]" for r in table]
    colors = ["tab:red" if (r["eps_min"], r["eps_max"]) == tuple(chosen) else "tab:blue" for r in table]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(table)), 4.0))
    ax.bar(range(len(table)), [r["nelbo_var"] for r in table], color=colors)
    ax.set_xticks(range(len(table)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("variance of per-block NELBO")
    ax.set_title("Clipped noise-schedule search" + (f" (step {step})" if step is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
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


class GradientVarianceCallback(_TrainerBoundCallback):
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
        generator = _search_generator(device, args.seed + 1, state.global_step, trainer.accelerator.process_index)
        batches = (
            {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            for batch in _take(eval_dataloader, self.num_minibatches)
        )
        with trainer.accelerator.autocast():
            self.last_value = estimate_gradient_variance(model, batches, None, generator, trainer.accelerator)
        trainer.log({"grad_variance": self.last_value})


__all__ = [
    "EMACallback",
    "GradientVarianceCallback",
    "NoiseScheduleSearchCallback",
    "estimate_gradient_variance",
    "noise_interval_grid",
    "noised_nelbo",
    "per_block_nelbo",
    "plot_schedule_search",
    "unwrap_bd3lm",
]
