"""Worker of tests/test_distributed.py, started in 2 processes (gloo, CPU) by torchrun or `accelerate launch`.

    python tests/distributed_worker.py MODE OUT

MODE:
* `ddp`: one plain-SGD step of BD3LMTrainer, no clipping, uneven sequence lengths.
* `fsdp2` (under `accelerate launch --config_file examples/accelerate/fsdp2.yaml`) and `zero3` (under
  `.../deepspeed_zero3.yaml`): a short deterministic BD3LMTrainer run with AdamW, clipping, gradient accumulation, EMA,
  evaluation and a checkpoint; a resume from that checkpoint; `save_model`; then a short run with the noise-schedule
  search.
* `fully_shard`: the model under `torch.distributed.fsdp.fully_shard` in a plain loop, with and without EMA, against an
  unsharded copy trained on the union of both ranks' data.

Rank 0 writes what the test compares (safetensors and JSON) into OUT.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import Dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from bd3lm_trainer import (  # noqa: E402
    BD3LMTrainer,
    BD3LMTrainingArguments,
    sharding,  # noqa: E402
)
from bd3lm_trainer.callbacks import NoiseScheduleSearchCallback, unwrap_bd3lm  # noqa: E402
from bd3lm_trainer.ema import EMACallback  # noqa: E402
from tests.conftest import random_model  # noqa: E402

# Odd sizes (vocabulary 61, cond_dim 15) so that FSDP2 rows and ZeRO-3 partitions split unevenly over 2 ranks.
MODEL = dict(vocab_size=61, cond_dim=15)


def uneven_dataset(n: int, seed: int) -> Dataset:
    """`n` sequences of lengths 1..32 (padding in every batch), tokens below the mask id 60."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 33, (n,), generator=g).tolist()
    return Dataset.from_dict({"input_ids": [torch.randint(0, 60, (k,), generator=g).tolist() for k in lengths]})


def run_arguments(output_dir: str, **overrides) -> BD3LMTrainingArguments:
    """The deterministic run the tests replay in one process (per-device batch doubled)."""
    kwargs = dict(
        output_dir=output_dir,
        use_cpu=True,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        train_sampling_strategy="sequential",
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        max_grad_norm=1.0,
        use_ema=True,
        ema_decay=0.9,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        schedule_search=False,
    )
    kwargs.update(overrides)
    return BD3LMTrainingArguments(**kwargs)


class _ForceAccelerateFSDP:
    """accelerate (1.15, `state.py`) turns `ACCELERATE_USE_FSDP` into `DistributedType.FSDP` only for accelerator
    devices (MULTI_GPU, MULTI_XPU, ...), so on CPU the YAML's FSDP2 settings are dropped without a word and the run is
    plain DDP. Put them back (the plugin reads the same `FSDP_*` variables `accelerate launch` set from the YAML), so
    that accelerate's own FSDP2 code (fully_shard per layer, activation checkpointing, sharded checkpoints) runs here."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.is_fsdp_enabled:
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            state.fsdp_plugin = FullyShardedDataParallelPlugin()
            state.distributed_type = DistributedType.FSDP
            # as accelerate does on a GPU, so that later `AcceleratorState()` calls keep FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True


class WorkerTrainer(_ForceAccelerateFSDP, BD3LMTrainer):
    pass


class LayoutProbe(TrainerCallback):
    """Records how the parameters are held when training begins (after the engine wrapped the model)."""

    layout: dict | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        sharding.reshard_fsdp2(model)
        params = dict(model.named_parameters())
        embedding = model.get_input_embeddings().weight
        self.layout = {
            "layout": sharding.describe(params.values()),
            "embedding_local_numel": sharding.local_shard(embedding).numel(),
            "embedding_numel": 61 * 64,
            "checkpoint_wrapped": any("_checkpoint_wrapped_module" in n for n in params),
        }


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def full_weights(trainer: BD3LMTrainer) -> dict[str, torch.Tensor]:
    """The gathered online weights (rank 0), keys of the unwrapped model."""
    target = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    state = trainer.accelerator.get_state_dict(target) or {}  # DeepSpeed: None on ranks > 0
    return {sharding.canonical_name(k): v.detach().float().cpu().clone() for k, v in state.items()}


def sharded_trainer_run(out: Path) -> None:
    train, valid = uneven_dataset(32, seed=1), uneven_dataset(6, seed=2)
    model = random_model(0, always_mask=True, **MODEL).train()
    probe = LayoutProbe()
    trainer = WorkerTrainer(
        model, run_arguments(str(out / "run")), train_dataset=train, eval_dataset=valid, callbacks=[probe]
    )
    trainer.train()
    online = full_weights(trainer)
    trainer.save_model(str(out / "saved"))  # EMA weights, gathered
    record = {
        "world": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "layout": probe.layout,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "eval": [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e],
        "ema_updates": trainer.ema_callback.num_updates,
    }

    resumed_model = random_model(99, always_mask=True, **MODEL).train()  # everything must come from the checkpoint
    resumed = WorkerTrainer(resumed_model, run_arguments(str(out / "resumed")), train_dataset=train, eval_dataset=valid)
    resumed.train(resume_from_checkpoint=str(out / "run" / "checkpoint-2"))
    resumed_online = full_weights(resumed)
    resumed.save_model(str(out / "resumed_saved"))
    record["resumed_losses"] = [e["loss"] for e in resumed.state.log_history if "loss" in e and e["step"] > 2]

    # The noise-schedule search: noisy training, one evaluation; every rank must end with the same buffers.
    searched = random_model(0, **MODEL).train()
    args = run_arguments(
        str(out / "search"),
        max_steps=1,
        eval_steps=1,
        save_strategy="no",
        use_ema=False,
        schedule_search=True,
        schedule_search_widths=[0.5, 0.9],
        schedule_search_step=0.25,
        schedule_search_batches=2,
    )
    search_trainer = WorkerTrainer(searched, args, train_dataset=train, eval_dataset=valid)
    search_trainer.train()
    callback = next(
        cb for cb in search_trainer.callback_handler.callbacks if isinstance(cb, NoiseScheduleSearchCallback)
    )
    record["search"] = {
        "interval": list(unwrap_bd3lm(search_trainer.model).training_noise_interval()),
        "table": callback.last_table,
    }
    with open(out / f"rank{rank()}.json", "w") as f:
        json.dump(record, f)
    if rank() == 0:
        save_file(online, str(out / "online.safetensors"))
        save_file(resumed_online, str(out / "resumed_online.safetensors"))


def ddp_sgd_step(out: Path) -> None:
    model = random_model(0, always_mask=True, **MODEL).train()
    args = run_arguments(
        str(out / "run"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        use_ema=False,
        eval_strategy="no",
        save_strategy="no",
    )
    trainer = BD3LMTrainer(model, args, train_dataset=uneven_dataset(8, seed=3))
    trainer.train()
    record = {
        "world": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    }
    with open(out / f"rank{rank()}.json", "w") as f:
        json.dump(record, f)
    if rank() == 0:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(out / "online.safetensors"))


def fully_shard_loop(out: Path) -> None:
    """FSDP2 applied by hand (each BD3LMBlock, then the root), against an unsharded copy on the union of the data."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.distributed.init_process_group("gloo")
    r, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    g = torch.Generator().manual_seed(5)
    steps, per_rank = 3, 3
    x_0 = torch.randint(0, 60, (steps, world * per_rank, 32), generator=g)
    lengths = torch.randint(4, 33, (steps, world * per_rank), generator=g)
    mask = (torch.arange(32) < lengths[..., None]).long()  # padding at the end of every sequence
    t = torch.rand(steps, world * per_rank, 8, generator=g)
    x_t = torch.where((torch.rand(x_0.shape, generator=g) < t.repeat_interleave(4, -1)) & mask.bool(), 60, x_0)
    results: dict = {}
    for use_ema in (False, True):
        sharded, reference = random_model(0, **MODEL).train(), random_model(0, **MODEL).train()
        for block in sharded.backbone.blocks:
            fully_shard(block)
        fully_shard(sharded)
        embedding = sharded.get_input_embeddings().weight
        assert isinstance(embedding, DTensor) and embedding.to_local().shape[0] == (31 if r == 0 else 30)
        # plain SGD: the update is the gradient itself, so a gradient off by the process count cannot hide
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.02) for m in (sharded, reference)]
        emas = [EMACallback(decay=0.8) for _ in range(2)] if use_ema else []
        losses = []
        for step in range(steps):
            mine = slice(r * per_rank, (r + 1) * per_rank)
            total = mask[step].sum()
            # FSDP2 averages gradients over ranks: the rank's token sum / the global count, times the world size
            out_s = sharded(
                input_ids=x_0[step, mine],
                noisy_input_ids=x_t[step, mine],
                noise_levels=t[step, mine],
                labels=x_0[step, mine],
                attention_mask=mask[step, mine],
            )
            (out_s.token_loss.sum() / total * world).backward()
            out_r = reference(
                input_ids=x_0[step],
                noisy_input_ids=x_t[step],
                noise_levels=t[step],
                labels=x_0[step],
                attention_mask=mask[step],
            )
            (out_r.token_loss.sum() / total).backward()
            loss_s = out_s.token_loss.detach().sum()
            torch.distributed.all_reduce(loss_s)
            losses.append([float(loss_s / total), float(out_r.token_loss.detach().sum() / total)])
            for opt in optimizers:
                opt.step()
                opt.zero_grad()
            for ema, model in zip(emas, (sharded, reference)):
                ema.update(model)
        record = {"losses": losses}
        if use_ema:
            ema_s, ema_r = emas
            # Sharded EMA state round trip, one file per rank.
            ema_s.save_state(str(out / "ema_ckpt"), sharded)
            restored = EMACallback(decay=0.8)
            restored.load_state(str(out / "ema_ckpt"), sharded)
            record["restored_equal"] = all(torch.equal(restored.shadow[n], v) for n, v in ema_s.shadow.items())

            def evaluate() -> list[float]:  # one no-grad forward, both models: FSDP2 keeps the root gathered after it
                with torch.no_grad():
                    loss_s = sharded(
                        input_ids=x_0[0, mine],
                        noisy_input_ids=x_t[0, mine],
                        noise_levels=t[0, mine],
                        labels=x_0[0, mine],
                        attention_mask=mask[0, mine],
                    ).token_loss.sum()
                    torch.distributed.all_reduce(loss_s)
                    loss_r = reference(
                        input_ids=x_0[0],
                        noisy_input_ids=x_t[0],
                        noise_levels=t[0],
                        labels=x_0[0],
                        attention_mask=mask[0],
                    ).token_loss.sum()
                return [float(loss_s), float(loss_r)]

            sharded.eval()
            reference.eval()
            record["online_eval_before"] = evaluate()  # leaves gathered online weights behind
            with ema_s.applied(sharded), ema_r.applied(reference):
                record["ema_eval"] = evaluate()
            # a forward after the swap must see the online weights again, not a gathered copy of the EMA
            record["online_eval_after"] = evaluate()
            with ema_s.applied(sharded), ema_r.applied(reference):
                full = sharding.full_state_dict(sharded)  # save_model's gather, EMA weights in
                if r == 0:
                    sharded.save_pretrained(out / "saved", state_dict=full)
                    save_file(
                        {n: p.detach().clone().contiguous() for n, p in reference.named_parameters()},
                        str(out / "reference_ema_weights.safetensors"),
                    )
        online = sharding.full_state_dict(sharded)  # after the swap: the online weights again
        if r == 0:
            tag = "ema" if use_ema else "plain"
            save_file(
                {k: v.contiguous() for k, v in online.items() if k in dict(reference.named_parameters())},
                str(out / f"sharded_{tag}.safetensors"),
            )
            save_file(
                {n: p.detach().contiguous() for n, p in reference.named_parameters()},
                str(out / f"reference_{tag}.safetensors"),
            )
        results["ema" if use_ema else "plain"] = record
    with open(out / f"rank{r}.json", "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    {"ddp": ddp_sgd_step, "fsdp2": sharded_trainer_run, "zero3": sharded_trainer_run, "fully_shard": fully_shard_loop}[
        mode
    ](out)
