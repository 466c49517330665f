"""Short check of a sharded BD3LMTrainer run on GPUs (or any accelerate launch): a few steps, then asserts.

    accelerate launch --config_file examples/accelerate/fsdp2.yaml --mixed_precision no examples/gpu_check.py --out DIR
    accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml --mixed_precision no examples/gpu_check.py --out DIR

(`examples/gpu_check.sh` runs both.) It trains a small BD3-LM for 8 steps (AdamW, clipping, gradient accumulation, EMA,
an evaluation with the noise-schedule search and a checkpoint every 4 steps) on sequences of uneven lengths, and asserts:

1. the parameters are sharded: FSDP2 `DTensor`s holding 1/world of the rows (activation checkpointing wrapped in), or
   ZeRO-3 partitions of 1/world of the elements;
2. losses and final weights equal a plain single-process loop on the union of all ranks' data (its own AdamW,
   clipping, token normalisation and EMA, on rank 0; fp32 with TF32 off);
3. every rank ends with the same searched noise interval;
4. `save_model` wrote a normal folder that `AutoModelForMaskedLM.from_pretrained(..., trust_remote_code=True)` loads,
   holding the gathered EMA weights;
5. resuming from the step-4 checkpoint ends with the same weights and EMA.

Prints `GPU CHECK PASSED` and writes `DIR/gpu_check.json` (figures, peak memory per rank); raises otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForMaskedLM, TrainerCallback  # noqa: E402

from bd3lm_trainer import BD3LMTrainer, BD3LMTrainingArguments, sharding  # noqa: E402
from bd3lm_trainer.callbacks import NoiseScheduleSearchCallback, unwrap_bd3lm  # noqa: E402
from bd3lm_trainer.ema import EMACallback  # noqa: E402
from modeling_bd3lm import BD3LMConfig, BD3LMForMaskedDiffusion  # noqa: E402

STEPS, SAVE_AT, PER_DEVICE, ACCUMULATION, LR, DECAY = 8, 4, 2, 2, 1e-3, 0.9


def make_model(seed: int, **overrides) -> BD3LMForMaskedDiffusion:
    """~13M parameters; odd vocabulary and conditioning sizes so that shards split unevenly."""
    torch.manual_seed(seed)
    config = BD3LMConfig(
        vocab_size=4097,
        hidden_dim=256,
        cond_dim=127,
        n_blocks=4,
        n_heads=4,
        model_length=128,
        block_size=4,
        dropout=0.0,
        **overrides,
    )
    model = BD3LMForMaskedDiffusion(config)
    with torch.no_grad():  # the zero inits (adaLN, output layer) would hide a wrong shard
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model.train()


def make_data(num: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 129, (num,), generator=g).tolist()
    return Dataset.from_dict({"input_ids": [torch.randint(0, 4096, (n,), generator=g).tolist() for n in lengths]})


def arguments(output_dir: str, bf16: bool, **overrides) -> BD3LMTrainingArguments:
    kwargs = dict(
        output_dir=output_dir,
        max_steps=STEPS,
        per_device_train_batch_size=PER_DEVICE,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=ACCUMULATION,
        learning_rate=LR,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        use_ema=True,
        ema_decay=DECAY,
        eval_strategy="steps",
        eval_steps=SAVE_AT,
        save_strategy="steps",
        save_steps=SAVE_AT,
        logging_steps=1,
        schedule_search_widths=[0.5, 0.9],
        schedule_search_step=0.25,
        schedule_search_batches=2,
        train_sampling_strategy="sequential",
        seed=0,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
    )
    return BD3LMTrainingArguments(**{**kwargs, **overrides})


class LayoutProbe(TrainerCallback):
    """How the engine holds the parameters once training begins."""

    found: dict | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        sharding.reshard_fsdp2(model)
        params = dict(model.named_parameters())
        embedding = model.get_input_embeddings().weight
        self.found = {
            "layout": sharding.describe(params.values()),
            "embedding_local_numel": sharding.local_shard(embedding).numel(),
            "activation_checkpointing": any("_checkpoint_wrapped_module" in n for n in params),
        }


def gathered(trainer: BD3LMTrainer) -> dict[str, torch.Tensor]:
    """The whole weights on rank 0 (every rank must call it)."""
    target = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    state = trainer.accelerator.get_state_dict(target) or {}
    return {sharding.canonical_name(k): v.detach().float().cpu().clone() for k, v in state.items()}


def single_process_reference(
    train: Dataset, world: int, device: torch.device, collator
) -> tuple[list[float], dict, dict]:
    """A plain loop over the union of all ranks' batches (the sequential sampler gives step k the examples
    k·B·A·W ... (k+1)·B·A·W - 1): the model's token-mean NELBO over all of them, clipping, AdamW, EMA."""
    model = make_model(0, always_mask=True).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    ema = EMACallback(decay=DECAY)
    ema.reset(model)
    losses = []
    per_step = PER_DEVICE * ACCUMULATION * world
    for step in range(STEPS):
        rows = train[step * per_step : (step + 1) * per_step]["input_ids"]
        batch = {k: v.to(device) for k, v in collator([{"input_ids": r} for r in rows]).items()}
        loss = model(**batch).loss  # the token mean over every rank's tokens of the step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        losses.append(float(loss.detach()))
    online = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    return losses, online, {n: t.cpu() for n, t in ema.shadow.items()}


def close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    return bool(torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu-check", help="output folder (default: runs/gpu-check)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (skips the fp32 equality checks)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    train, valid = make_data(STEPS * PER_DEVICE * ACCUMULATION * 64, seed=1), make_data(12, seed=2)

    probe = LayoutProbe()
    trainer = BD3LMTrainer(
        make_model(0, always_mask=True),
        arguments(str(out / "run"), args.bf16),
        train_dataset=train,
        eval_dataset=valid,
        callbacks=[probe],
    )
    world, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    online = gathered(trainer)
    with trainer.ema_weights():
        ema_weights = gathered(trainer)
    trainer.save_model(str(out / "saved"))

    resumed = BD3LMTrainer(
        make_model(1, always_mask=True),
        arguments(str(out / "resumed"), args.bf16),
        train_dataset=train,
        eval_dataset=valid,
    )
    resumed.train(resume_from_checkpoint=str(out / "run" / f"checkpoint-{SAVE_AT}"))
    resumed_online = gathered(resumed)

    searched = BD3LMTrainer(
        make_model(0),
        arguments(str(out / "search"), args.bf16, max_steps=SAVE_AT, save_strategy="no"),
        train_dataset=train,
        eval_dataset=valid,
    )
    searched.train()
    interval = torch.tensor(unwrap_bd3lm(searched.model).training_noise_interval(), device=searched.args.device)
    intervals = searched.accelerator.gather(interval[None]).view(-1, 2).tolist()
    search = next(cb for cb in searched.callback_handler.callbacks if isinstance(cb, NoiseScheduleSearchCallback))

    problems = []
    found = probe.found
    numel = 4097 * 256
    if world > 1:
        expected_layout = "zero3" if trainer.is_deepspeed_enabled else "fsdp2"
        if found["layout"] != expected_layout:
            problems.append(
                f"parameters are {found['layout']!r}, expected {expected_layout!r} shards "
                f"(distributed type {trainer.accelerator.distributed_type})"
            )
        if not found["embedding_local_numel"] <= math.ceil(numel / world) + 256:
            problems.append(f"rank {rank} holds {found['embedding_local_numel']} of {numel} embedding elements")
    if trainer.is_fsdp_enabled and not found["activation_checkpointing"]:
        problems.append("FSDP2 without activation checkpointing wrappers (fsdp_activation_checkpointing: true?)")
    if len({tuple(i) for i in intervals}) != 1 or search.history == []:
        problems.append(f"searched intervals differ across ranks: {intervals}")

    figures = {
        "world": world,
        "layout": found,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "losses": losses,
        "intervals": intervals,
    }
    if torch.cuda.is_available():
        figures["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if rank == 0:
        if trainer.is_deepspeed_enabled:  # what follows runs on rank 0 alone: no ZeRO-3 partitioning at load time
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        tol = dict(rtol=2e-2, atol=2e-3) if args.bf16 else dict(rtol=1e-4, atol=2e-5)
        for name, value in online.items():
            if name in resumed_online and not close(resumed_online[name], value, **tol):
                problems.append(f"resumed weights differ at {name}")
        reloaded = AutoModelForMaskedLM.from_pretrained(out / "saved", trust_remote_code=True)
        for name, param in reloaded.named_parameters():
            if not close(param.detach(), ema_weights[name], **tol):
                problems.append(f"the saved folder does not hold the gathered EMA weights ({name})")
                break
        if not args.bf16:
            ref_losses, ref_online, ref_ema = single_process_reference(
                train, world, trainer.args.device, trainer.data_collator
            )
            figures["reference_losses"] = ref_losses
            if not all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(losses, ref_losses)):
                problems.append(f"losses {losses} differ from one process on the union {ref_losses}")
            bad = [n for n, v in ref_online.items() if not close(online[n], v, rtol=1e-3, atol=1e-4)]
            bad += [f"EMA {n}" for n, v in ref_ema.items() if not close(ema_weights[n], v, rtol=1e-3, atol=1e-4)]
            if bad:
                problems.append(f"weights differ from one process on the union: {bad[:4]}")
    figures["problems"] = problems
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"gpu_check.rank{rank}.json", "w") as f:
        json.dump(figures, f, indent=1)
    if problems:
        raise SystemExit(f"GPU CHECK FAILED on rank {rank}: " + "; ".join(problems))
    print(f"GPU CHECK PASSED on rank {rank} ({world} processes, {found['layout']})", flush=True)


if __name__ == "__main__":
    main()
