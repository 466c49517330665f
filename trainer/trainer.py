# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""`BD3LMTrainer`: training, fine-tuning and evaluation of BD3-LM with the block NELBO (Arriola et al., ICLR 2025).

The model computes the loss itself (`model(input_ids=x_0, labels=x_0)` draws t per block and returns the token-mean
block NELBO); the trainer normalises it over gradient-accumulation and processes, records metrics, reports the
evaluation NELBO / perplexity bound / NELBO variance, and wires in the callbacks of `callbacks.py` (clipped-schedule
search, EMA, gradient variance).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from modeling_bd3lm import BD3LMConfig, BD3LMForMaskedDiffusion
from modeling_bd3lm.checks_bd3lm import check_tokenizer_fits
from modeling_bd3lm.noise_schedule_bd3lm import nelbo_valid_mask
from modeling_bd3lm.tokenization_bd3lm import special_token_ids

from . import sharding
from .callbacks import (
    EMACallback,
    GradientVarianceCallback,
    NoiseScheduleSearchCallback,
    TrainerBoundCallback,
)
from .data import BD3LMDataCollator
from .faults import (
    NonFiniteLossError,
    NonFiniteSteps,
    _NonFiniteGuard,
    checkpoint_problem,
    last_complete_checkpoint,
)
from .training_args import BD3LMTrainingArguments
from .utils import check_model_reference, gather_block_values, per_block_nelbo, unwrap_bd3lm

logger = logging.getLogger(__name__)


class _PerProcessNoiseCallback(TrainerCallback):
    """`Trainer` seeds every process alike, so every rank would draw the same noise levels, masks and dropout for its
    own data, correlating the global batch. Offset the torch RNG of ranks > 0 when training starts (rank 0, and so a
    single-process run, is untouched); on resume the Trainer then restores each rank's checkpointed RNG state."""

    def __init__(self, process_index: int) -> None:
        self.process_index = process_index

    def on_train_begin(self, args, state, control, **kwargs):
        if self.process_index > 0:
            torch.manual_seed(args.seed + 1_000_003 * self.process_index)


class _EvalStats:
    """Running sums of one evaluation: NELBO token sum and count, and the per-batch variances of per-block NELBO."""

    def __init__(self) -> None:
        self.token_sum = 0.0
        self.num_tokens = 0
        self.batch_variances: list[float] = []


class BD3LMTrainer(Trainer):
    """[`Trainer`] for BD3-LM: the loss is the block NELBO computed by the model.

    * Training: `compute_loss` calls the model with `labels = input_ids` (t from the clipped interval in the model's
      buffers) and normalises the summed token terms by the token count of the whole accumulated batch across
      processes, so gradient accumulation and DDP match one large batch. `mask_rate` is logged with the loss.
    * Evaluation (`model.eval()`, t ∼ U[1e-3, 1], a fixed per-evaluation seed): `eval_loss` is the NELBO per token over
      the whole evaluation set, `eval_ppl = exp(eval_loss)` the perplexity bound, `eval_nelbo_var` the variance of
      per-block NELBO values (the paper's "Var. NELBO": taken over all processes' blocks of a batch, averaged over
      batches).
    * Callbacks from the arguments: [`NoiseScheduleSearchCallback`] (`schedule_search`), [`EMACallback`] (`use_ema`;
      evaluation, `save_model` and checkpoints then use the EMA weights, and the EMA state is checkpointed),
      [`GradientVarianceCallback`] (`grad_variance_minibatches`).

    Args:
        model: a `BD3LMForMaskedDiffusion` (or a PEFT model around one), or a path / Hub id to load it from.
        args ([`BD3LMTrainingArguments`], *optional*): plain `TrainingArguments` are upgraded.
        data_collator (*optional*): defaults to [`BD3LMDataCollator`] for the model's block size.
        peft_config (`peft.PeftConfig`, *optional*): wrap the model with `peft.get_peft_model` first (see
            `bd3lm_trainer.LORA_TARGET_MODULES`).
        Other arguments are those of [`Trainer`].

    Example:

    ```python
    >>> from bd3lm_trainer import BD3LMTrainer, BD3LMTrainingArguments, build_lm_dataset
    >>> args = BD3LMTrainingArguments(output_dir="out", max_steps=1000, eval_strategy="steps", eval_steps=500)
    >>> trainer = BD3LMTrainer(model, args, train_dataset=train, eval_dataset=valid)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    _tag_names = ["bd3lm", "block-diffusion"]

    def __init__(
        self,
        model: torch.nn.Module | str,
        args: TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        callbacks: list | None = None,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = BD3LMTrainingArguments(output_dir="bd3lm-trainer")
        elif not isinstance(args, TrainingArguments):
            raise TypeError(f"`args` must be BD3LMTrainingArguments (or TrainingArguments), got {type(args).__name__}.")
        elif not isinstance(args, BD3LMTrainingArguments):
            values = args.to_dict()
            values["hub_token"] = args.hub_token  # to_dict masks tokens
            args = BD3LMTrainingArguments(**values)
        if isinstance(model, (str, os.PathLike)):
            model = BD3LMForMaskedDiffusion.from_pretrained(check_model_reference(model, "`model`"))
        if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
            raise ValueError("`train_dataset` is empty; pass at least one example.")
        if peft_config is not None:
            from peft import PeftConfig, get_peft_model

            if not isinstance(peft_config, PeftConfig):
                raise TypeError(
                    f"`peft_config` must be a peft.PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}."
                )

            model = get_peft_model(model, peft_config)
        bd3lm = unwrap_bd3lm(model)
        sharding.keep_present_layer_classes(bd3lm)
        config = bd3lm.config
        check_tokenizer_fits(processing_class, config.vocab_size, "`processing_class` (tokenizer)")
        if data_collator is None:
            data_collator = BD3LMDataCollator(
                pad_token_id=_pad_token_id(processing_class, config),
                block_size=config.block_size,
                max_length=config.model_length,
            )
        if args.noise_interval is not None:
            bd3lm.set_noise_interval(*args.noise_interval)
        callbacks = list(callbacks or []) + self._callbacks_from_args(args, config, callbacks or [], eval_dataset)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            **kwargs,
        )
        # The model says it does not accept `num_items_in_batch` (`accepts_loss_kwargs = False`), but `compute_loss`
        # below does, and for that the Trainer must gather the token count.
        self.model_accepts_loss_kwargs = True
        self._non_finite = NonFiniteSteps()  # flags of the current step and the skipped steps, for `_NonFiniteGuard`
        self._train_metrics: defaultdict[str, list[float]] = defaultdict(list)  # averaged into each training log
        self._eval_stats: _EvalStats | None = None
        self._eval_generator: torch.Generator | None = None
        self._saving_checkpoint = False  # `save_model` called by `_save_checkpoint` (sharded runs then save shards)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TrainerBoundCallback):
                callback.bind(self)
        self.add_callback(_PerProcessNoiseCallback(self.accelerator.process_index))
        self.add_callback(_NonFiniteGuard(self._non_finite, self))

    @staticmethod
    def _callbacks_from_args(args: BD3LMTrainingArguments, config: BD3LMConfig, given: list, eval_dataset: Any) -> list:
        def present(cls: type) -> bool:
            return any(isinstance(cb, cls) or cb is cls for cb in given)

        extra = []
        if args.use_ema and not present(EMACallback):
            extra.append(EMACallback(decay=args.ema_decay))
        if args.schedule_search and not present(NoiseScheduleSearchCallback):
            if not config.var_min:
                logger.warning("`schedule_search` is on but the model has no noise-interval buffers (`var_min=False`).")
            elif config.always_mask:
                logger.warning("`schedule_search` is skipped: `always_mask=True` trains at t = 1 only.")
            else:
                name = next(iter(eval_dataset)) if isinstance(eval_dataset, dict) and eval_dataset else None
                extra.append(
                    NoiseScheduleSearchCallback(
                        widths=args.schedule_search_widths,
                        step=args.schedule_search_step,
                        num_batches=args.schedule_search_batches,
                        fixed=args.noise_interval is not None,
                        eval_dataset_name=name,
                    )
                )
        if args.grad_variance_minibatches > 0 and not present(GradientVarianceCallback):
            extra.append(GradientVarianceCallback(args.grad_variance_minibatches))
        return extra

    def add_callback(self, callback: Any) -> None:
        super().add_callback(callback)
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, TrainerBoundCallback) and cb.trainer is None:
                cb.bind(self)

    # ------------------------------------------------------------------------------------------------------------------
    # Loss and metrics

    @property
    def skipped_steps(self) -> list[int]:
        """Global steps whose update `nan_loss_policy="skip"` dropped (a non-finite loss or gradient norm)."""
        return self._non_finite.skipped

    _skipped_steps = skipped_steps  # the name of the 0.1 README; kept for one release

    @property
    def bd3lm_config(self) -> BD3LMConfig:
        return unwrap_bd3lm(self.model).config

    def _nelbo_labels(self, batch: dict[str, Any]) -> torch.Tensor:
        """`labels` with -100 wherever the NELBO does not count a token (padding, a kept BOS)."""
        labels = batch.get("labels", batch["input_ids"])
        valid = nelbo_valid_mask(labels, batch.get("attention_mask"), self.bd3lm_config.ignore_bos)
        return labels.masked_fill(~valid, -100)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | int | None:
        # Count exactly the positions the model averages over; the parent then sums over processes.
        if not batch_samples or not isinstance(batch_samples[0], dict) or "input_ids" not in batch_samples[0]:
            return super()._get_num_items_in_batch(batch_samples, device)
        return super()._get_num_items_in_batch([{"labels": self._nelbo_labels(b)} for b in batch_samples], device)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Block NELBO (Eq. (8) of the paper), L = Σ_b E_t E_q[(1/t)·(-log p_θ(x^b | x_t^b, x^{<b}))], per token.

        In training, `Σ token terms / num_items_in_batch` (the count over the accumulated batch and all processes,
        rescaled by the process count because DDP averages gradients); otherwise the model's per-batch token mean.
        """
        inputs = dict(inputs)
        inputs.setdefault("labels", inputs["input_ids"])  # the denoising target is x_0 itself
        inputs["return_dict"] = True  # official configs say return_dict=False
        training = model.training
        extra = {"generator": self._eval_generator} if not training and self._eval_generator is not None else {}
        outputs = model(**inputs, **extra)
        if training and num_items_in_batch is not None:
            # clamp: a batch whose every label is ignored contributes 0, not 0 / 0
            loss = outputs.token_loss.sum() / (
                num_items_in_batch.clamp_min(1) if torch.is_tensor(num_items_in_batch) else max(num_items_in_batch, 1)
            )
            if self.args.average_tokens_across_devices:
                loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        else:
            loss = outputs.loss

        config = self.bd3lm_config
        valid = nelbo_valid_mask(inputs["labels"], inputs.get("attention_mask"), config.ignore_bos)
        if training:
            masked = ((outputs.noisy_input_ids == config.mask_token_id) & valid).sum()
            non_finite = (~torch.isfinite(loss.detach())).sum()
            # One gather for the metrics and the finiteness check, so that every process takes the same decision.
            counts = self.accelerator.gather(torch.stack([masked, valid.sum(), non_finite]).float()[None]).sum(0)
            self._train_metrics["mask_rate"].append(float(counts[0] / counts[1].clamp_min(1)))
            if counts[2] > 0:
                self._on_non_finite_loss(float(loss.detach()))
        elif self._eval_stats is not None:
            self._record_eval_batch(outputs.token_loss.detach(), valid, config.block_size)
        return (loss, outputs) if return_outputs else loss

    def _on_non_finite_loss(self, value: float) -> None:
        step = self.state.global_step + 1
        if self.args.nan_loss_policy == "stop":  # before backward: nothing reaches the weights
            raise NonFiniteLossError(
                f"The training loss is {value} at global step {step} (a NaN or infinite loss on at least one "
                "process); training stopped before the optimizer step, so the weights keep their last finite update. "
                "Lower the learning rate, check the data, or set nan_loss_policy='skip' to drop such steps."
            )
        self._non_finite.flag(f"training loss ({value})")

    def _clip_grad_norm(self, model: torch.nn.Module):
        # Called by the transformers 5 training loop when max_grad_norm > 0, right before the optimizer step. With a
        # GradScaler (fp16) infinite gradients are routine and the scaler skips those steps itself.
        grad_norm = super()._clip_grad_norm(model)
        if grad_norm is not None and self.accelerator.scaler is None and not math.isfinite(float(grad_norm)):
            self._non_finite.flag(f"gradient norm ({float(grad_norm)})")
        return grad_norm

    def _record_eval_batch(self, token_loss: torch.Tensor, valid: torch.Tensor, block_size: int) -> None:
        stats = self._eval_stats
        sums = torch.stack([token_loss.float().sum(-1), valid.sum(-1).float()], dim=-1)  # (batch, 2) per sequence
        sums = self.accelerator.gather_for_metrics(sums)
        stats.token_sum += float(sums[:, 0].double().sum())
        stats.num_tokens += int(sums[:, 1].sum())
        values, blocks = per_block_nelbo(token_loss, valid, block_size)
        gathered = gather_block_values(self.accelerator, values, blocks)
        if gathered.numel() > 1:
            stats.batch_variances.append(float(gathered.double().var()))

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ):
        """The parent loop, plus `{prefix}_loss` (NELBO per token), `{prefix}_ppl` and `{prefix}_nelbo_var`."""
        self._eval_stats = _EvalStats()
        # One seed per evaluation: eval_loss is then a deterministic function of the weights (common random numbers
        # across checkpoints), whatever the global RNG state.
        self._eval_generator = torch.Generator(device=self.args.device)
        self._eval_generator.manual_seed(self.args.seed + 104_729 * self.accelerator.process_index)
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        finally:
            stats, self._eval_stats, self._eval_generator = self._eval_stats, None, None
        if stats.num_tokens > 0:
            nelbo = stats.token_sum / stats.num_tokens
            output.metrics[f"{metric_key_prefix}_loss"] = nelbo
            output.metrics[f"{metric_key_prefix}_ppl"] = math.exp(nelbo) if nelbo < 700 else float("inf")
        if stats.batch_variances:
            output.metrics[f"{metric_key_prefix}_nelbo_var"] = sum(stats.batch_variances) / len(stats.batch_variances)
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged recorded metrics to the periodic training log (and the noise interval in use)."""
        if "loss" in logs:
            logs = dict(logs)
            for key, values in self._train_metrics.items():
                if values:
                    logs[key] = sum(values) / len(values)
            self._train_metrics.clear()
            config = self.bd3lm_config
            if config.var_min:
                logs["sampling_eps_min"], logs["sampling_eps_max"] = unwrap_bd3lm(self.model).training_noise_interval()
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------------------------
    # EMA: evaluate and save with the averaged weights, checkpoint its state

    @property
    def ema_callback(self) -> EMACallback | None:
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, EMACallback)), None)

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """Context manager with the EMA weights swapped into `self.model` (a no-op without EMA)."""
        ema = self.ema_callback
        return ema.applied(self.model) if ema is not None else contextlib.nullcontext()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        with self.ema_weights():
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """[`Trainer.save_model`] with the EMA weights (when on). Under FSDP2 with sharded state dicts the parent writes
        no weights at all; a folder that `from_pretrained` loads is what a user saving a model expects, so the full
        state dict is gathered (on CPU, on rank 0) and saved as safetensors. Checkpoints stay sharded."""
        with self.ema_weights():
            if self._gathers_full_state_dict():
                state_dict = sharding.full_state_dict(self.model)  # a collective: every rank takes part
                self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)
                if self.args.push_to_hub and not _internal_call:
                    self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
            else:
                super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        with sharding.saved_as_original_class(self.model):  # FSDP2's generated class would break the saved code
            super()._save(output_dir, state_dict)

    def _gathers_full_state_dict(self) -> bool:
        if self._saving_checkpoint or not self.is_fsdp_enabled:
            return False
        plugin = self.accelerator.state.fsdp_plugin
        return getattr(plugin, "fsdp_version", 1) == 2 and "FULL_STATE_DICT" not in str(plugin.state_dict_type)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        # The EMA state goes in first: the parent writes trainer_state.json last, so a folder that has it is complete
        # (`last_complete_checkpoint` relies on that when a run was killed while saving). Sharded EMAs are written by
        # every rank, before the collectives of the parent's save, so every shard is on disk before trainer_state.json.
        ema = self.ema_callback
        if ema is not None:
            checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), checkpoint)
            if self.args.should_save:
                os.makedirs(folder, exist_ok=True)
            ema.save_state(folder, self.model, write_replicated=self.args.should_save)
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any):
        """[`Trainer.train`], resuming only from a complete checkpoint: `resume_from_checkpoint=True` takes the newest
        complete `checkpoint-*` folder (skipping one half-written by a killed run, which transformers would pick), and
        an explicit folder is checked first."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no complete checkpoint-* folder."
                )
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)) and os.path.isdir(resume_from_checkpoint):
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                latest = last_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)))
                raise ValueError(
                    f"resume_from_checkpoint={str(resume_from_checkpoint)!r} is not a complete checkpoint ({problem}); "
                    + (f"the newest complete one is {latest}." if latest else "no complete checkpoint is beside it.")
                )
        ema = self.ema_callback
        if ema is not None:
            # Loaded when training begins, after the engine restored the model (DeepSpeed never calls
            # `_load_from_checkpoint`); unsharded, that also puts the online weights back over the EMA ones that the
            # checkpoint's model file holds.
            ema.resume_from = os.fspath(resume_from_checkpoint) if resume_from_checkpoint else None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        ema = self.ema_callback
        if ema is not None and self.state.best_model_checkpoint is not None:
            ema.load_state(self.state.best_model_checkpoint, self.model)


def _pad_token_id(processing_class: Any, config: BD3LMConfig) -> int:
    """The collator's pad id: `special_token_ids`' pad rule (the tokenizer's PAD, else the config's, else EOS); 0 when
    that gives no id inside the vocabulary (padding is never attended or scored, so any in-vocabulary id works)."""
    token_id = special_token_ids(processing_class, config)["pad_token_id"]
    return token_id if isinstance(token_id, int) and 0 <= token_id < config.vocab_size else 0


def load_for_finetuning(
    path_or_repo: str | os.PathLike,
    block_size: int | None = None,
    from_pretrained_kwargs: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> BD3LMForMaskedDiffusion:
    """Load a checkpoint to fine-tune at another block size: the paper's recipe (pre-train with L' = L, i.e. MDLM, then
    fine-tune at L' ∈ {4, 8, 16}), or an official BD3-LM checkpoint moved to another L'.

    Works with our checkpoints and the official Hub format (`kuleshov-group/bd3lm-owt-block_size*`, including the
    `...-block_size1024-pretrain` MDLM-style one): the weights do not depend on L', only the attention mask does.
    When the block size changes, the noise-interval buffers are reset to the config's initial interval, because a
    searched interval belongs to the old L'.

    Args:
        path_or_repo: a local folder or Hub id.
        block_size (`int`, *optional*): the new L'; must divide `model_length`.
        from_pretrained_kwargs (`dict`, *optional*): passed to `from_pretrained` (`dtype`, `revision`, ...).
        **config_overrides: config fields to change (e.g. `dropout=0.1`, `resample=True`, `attn_backend="sdpa"`).
    """
    config = BD3LMConfig.from_pretrained(path_or_repo)
    old_block_size = config.block_size
    unknown = [key for key in config_overrides if not hasattr(config, key)]
    if unknown:
        raise ValueError(f"Unknown BD3LMConfig fields in the overrides: {unknown}.")
    for key, value in config_overrides.items():
        setattr(config, key, value)
    if "attn_backend" in config_overrides:  # the official backend name also selects our attention kernel
        config._attn_implementation = BD3LMConfig(attn_backend=config.attn_backend)._attn_implementation
    if block_size is not None:
        config.block_size = block_size
    config.validate_bd3lm()
    model = BD3LMForMaskedDiffusion.from_pretrained(path_or_repo, config=config, **(from_pretrained_kwargs or {}))
    interval_overridden = bool({"sampling_eps_min", "sampling_eps_max"} & set(config_overrides))
    if config.var_min and (config.block_size != old_block_size or interval_overridden):
        model.set_noise_interval(config.sampling_eps_min, config.sampling_eps_max)
    return model


__all__ = ["BD3LMTrainer", "load_for_finetuning"]
