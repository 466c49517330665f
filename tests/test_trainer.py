# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Tests of bd3lm_trainer.trainer: loss, gradient accumulation, evaluation metrics, checkpoints and resume, gradient
checkpointing, mixed precision, the fine-tuning loader, and a two-process (gloo) run."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from bd3lm_trainer import (
    BD3LMTrainer,
    BD3LMTrainingArguments,
    NoiseScheduleSearchCallback,
    load_for_finetuning,
)
from bd3lm_trainer.callbacks import EMA_STATE_NAME, per_block_nelbo
from modeling_bd3lm import BD3LMForMaskedDiffusion
from tests.conftest import REPO_ROOT, random_token_dataset, tiny_train_model, tiny_training_args

tiny_model = tiny_train_model
random_dataset = random_token_dataset


def make_args(tmp_path, **overrides) -> BD3LMTrainingArguments:
    return tiny_training_args(tmp_path, **{"schedule_search": False, **overrides})


# ----------------------------------------------------------------------------------------------------------------------
# Arguments


def test_arguments_defaults_and_validation(tmp_path):
    args = make_args(tmp_path)
    assert args.learning_rate == 3e-4 and args.ddp_find_unused_parameters is False
    assert str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "constant_with_warmup"
    assert args.schedule_search_widths == [0.5, 0.6, 0.7, 0.8, 0.9] and args.schedule_search_batches == 100
    bad = [
        ({"schedule_search_widths": [1.5]}, "schedule_search_widths"),
        ({"schedule_search_step": 0.0}, "schedule_search_step"),
        ({"schedule_search_batches": 0}, "schedule_search_batches"),
        ({"noise_interval": [0.8, 0.3]}, "noise_interval"),
        ({"noise_interval": [0.3]}, "noise_interval"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"grad_variance_minibatches": -1}, "grad_variance_minibatches"),
    ]
    for overrides, name in bad:
        with pytest.raises(ValueError, match=name):
            make_args(tmp_path, **overrides)


def test_plain_training_arguments_are_upgraded(tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path / "o"), learning_rate=1e-3, use_cpu=True, report_to=[])
    trainer = BD3LMTrainer(tiny_model(), plain)
    assert isinstance(trainer.args, BD3LMTrainingArguments)
    assert trainer.args.learning_rate == 1e-3 and trainer.args.output_dir == str(tmp_path / "o")


def test_model_must_be_bd3lm_and_may_be_a_path(tmp_path):
    with pytest.raises(TypeError, match="BD3LMForMaskedDiffusion"):
        BD3LMTrainer(torch.nn.Linear(2, 2), make_args(tmp_path))
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    trainer = BD3LMTrainer(str(tmp_path / "m"), make_args(tmp_path))
    assert isinstance(trainer.model, BD3LMForMaskedDiffusion)
    assert trainer.data_collator.block_size == 4 and trainer.data_collator.max_length == 32


# ----------------------------------------------------------------------------------------------------------------------
# Loss


def test_compute_loss_is_the_model_nelbo(tmp_path):
    model = tiny_model().train()
    trainer = BD3LMTrainer(model, make_args(tmp_path))
    batch = trainer.data_collator([{"input_ids": list(range(1, 30))}, {"input_ids": list(range(5, 25))}])
    torch.manual_seed(7)
    expected = model(**batch)
    torch.manual_seed(7)
    loss = trainer.compute_loss(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    torch.testing.assert_close(loss, expected.loss, rtol=0, atol=0)
    count = int(batch["attention_mask"].sum())
    torch.manual_seed(7)
    normalised = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(count))
    torch.testing.assert_close(normalised, expected.token_loss.sum() / count, rtol=1e-6, atol=0)
    torch.testing.assert_close(normalised, expected.loss, rtol=1e-6, atol=0)


def test_gradient_accumulation_with_padding_matches_one_large_batch(tmp_path):
    # always_mask makes the objective deterministic, SGD makes the update the gradient itself.
    g = torch.Generator().manual_seed(3)
    lengths = [32, 5, 17, 9, 30, 12, 3, 21]
    data = Dataset.from_dict({"input_ids": [torch.randint(0, 63, (n,), generator=g).tolist() for n in lengths]})
    common = dict(
        max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1
    )
    finals = []
    for batch_size, accumulation in ((8, 1), (4, 2), (2, 4)):
        model = tiny_model(always_mask=True)
        args = make_args(
            tmp_path / f"ga{accumulation}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            **common,
        )
        BD3LMTrainer(model, args, train_dataset=data).train()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})

    reference = tiny_model(always_mask=True)
    collator = BD3LMTrainer(reference, make_args(tmp_path / "ref")).data_collator
    collated = collator([{"input_ids": ids} for ids in data["input_ids"]])
    reference(**collated).loss.backward()
    for name, param in reference.named_parameters():
        expected = param.detach() - 0.5 * param.grad
        for final in finals:
            torch.testing.assert_close(final[name], expected, rtol=1e-5, atol=1e-6)


def test_training_logs_mask_rate_and_the_noise_interval(tmp_path):
    model = tiny_model()
    model.set_noise_interval(0.45, 0.95)
    reported = []  # what report_to integrations see: they are callbacks fed by on_log

    class Reporter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            reported.append(dict(logs))

    trainer = BD3LMTrainer(
        model,
        make_args(tmp_path, max_steps=2, logging_steps=1),
        train_dataset=random_dataset(8),
        callbacks=[Reporter()],
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry for entry in reported if "loss" in entry] == [
        {k: v for k, v in entry.items() if k != "step"} for entry in logs
    ]
    assert len(logs) == 2
    for entry in logs:
        assert 0.0 < entry["mask_rate"] < 1.0
        assert entry["sampling_eps_min"] == pytest.approx(0.45) and entry["sampling_eps_max"] == pytest.approx(0.95)
        assert math.isfinite(entry["loss"])


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation


def test_evaluation_reports_the_unbiased_nelbo_bound_and_variance(tmp_path):
    model = tiny_model()
    model.set_noise_interval(0.45, 0.95)  # evaluation must ignore the training interval
    data = random_dataset(10, seed=4)
    trainer = BD3LMTrainer(model, make_args(tmp_path), eval_dataset=data)
    torch.manual_seed(123)
    metrics = trainer.evaluate()
    torch.manual_seed(456)
    again = trainer.evaluate()
    for key in ("eval_loss", "eval_ppl", "eval_nelbo_var"):  # the global RNG plays no part
        assert again[key] == metrics[key]

    generator = torch.Generator().manual_seed(trainer.args.seed)
    model.eval()
    total, count, variances = 0.0, 0, []
    with torch.no_grad():
        for start in range(0, 10, 4):
            x = torch.tensor(data["input_ids"][start : start + 4])
            out = model(input_ids=x, labels=x, attention_mask=torch.ones_like(x), generator=generator)
            assert bool((out.noise_levels < 0.45).any())  # drawn from U[1e-3, 1], not the clipped interval
            total += float(out.token_loss.double().sum())
            count += x.numel()
            values, blocks = per_block_nelbo(out.token_loss, torch.ones_like(x, dtype=torch.bool), 4)
            variances.append(float(values[blocks].double().var()))
    assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-7)
    assert metrics["eval_ppl"] == pytest.approx(math.exp(total / count), rel=1e-7)
    assert metrics["eval_nelbo_var"] == pytest.approx(sum(variances) / len(variances), rel=1e-9)


def test_several_eval_datasets_search_once(tmp_path):
    args = make_args(
        tmp_path,
        schedule_search=True,
        schedule_search_widths=[0.5],
        schedule_search_step=0.5,
        schedule_search_batches=1,
    )
    trainer = BD3LMTrainer(tiny_model(), args, eval_dataset={"a": random_dataset(4), "b": random_dataset(4, seed=2)})
    metrics = trainer.evaluate()
    assert {"eval_a_loss", "eval_b_loss", "eval_a_ppl", "eval_b_nelbo_var"} <= set(metrics)
    search = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NoiseScheduleSearchCallback))
    assert len(search.history) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_resume_from_checkpoint_continues_exactly_with_ema(tmp_path):
    data = random_dataset(24)
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, use_ema=True, ema_decay=0.9, learning_rate=1e-2)
    full_model = tiny_model()
    full = BD3LMTrainer(full_model, make_args(tmp_path / "full", **common), train_dataset=data)
    full.train()

    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert (checkpoint / EMA_STATE_NAME).is_file()
    # the checkpoint's model file holds the EMA weights, so it loads straight into from_pretrained
    reloaded = BD3LMForMaskedDiffusion.from_pretrained(checkpoint)
    ema_file = load_file(str(checkpoint / EMA_STATE_NAME))
    for name, param in reloaded.named_parameters():
        torch.testing.assert_close(param, ema_file[f"shadow.{name}"], rtol=0, atol=0)

    resumed_model = tiny_model(seed=99)  # different init: everything must come from the checkpoint
    resumed = BD3LMTrainer(resumed_model, make_args(tmp_path / "resumed", **common), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, a), (_, b) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert resumed.ema_callback.num_updates == full.ema_callback.num_updates == 4
    for name, shadow in full.ema_callback.shadow.items():
        torch.testing.assert_close(resumed.ema_callback.shadow[name], shadow, rtol=0, atol=0)


def test_searched_interval_travels_in_checkpoints(tmp_path):
    model = tiny_model()
    args = make_args(
        tmp_path,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        schedule_search=True,
        schedule_search_widths=[0.5],
        schedule_search_step=0.25,
        schedule_search_batches=1,
    )
    BD3LMTrainer(model, args, train_dataset=random_dataset(8), eval_dataset=random_dataset(4)).train()
    reloaded = BD3LMForMaskedDiffusion.from_pretrained(tmp_path / "out" / "checkpoint-2")
    assert reloaded.training_noise_interval() == model.training_noise_interval()
    grid = [(1e-3, 1.0), (1e-3, 0.5), (0.25, 0.75), (0.5, 1.0)]
    assert any(model.training_noise_interval() == pytest.approx(interval) for interval in grid)
    assert (tmp_path / "out" / "schedule_search.json").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing and mixed precision


def _loss_and_grads(model, x_0, x_t, t):
    model.zero_grad()
    loss = model(input_ids=x_0, noisy_input_ids=x_t, noise_levels=t, labels=x_0).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(method):
    model = tiny_model().train()
    if not hasattr(model, method):
        pytest.skip(f"{method} does not exist in this transformers release")
    g = torch.Generator().manual_seed(0)
    x_0 = torch.randint(0, 63, (3, 32), generator=g)
    t = torch.rand(3, 8, generator=g)
    x_t = torch.where(torch.rand(3, 32, generator=g) < t.repeat_interleave(4, 1), 63, x_0)
    loss, grads = _loss_and_grads(model, x_0, x_t, t)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is deprecated in 5.x
        getattr(model, method)()
    assert all(block.gradient_checkpointing for block in model.backbone.blocks)
    calls = []
    inner = model.backbone.blocks[0]._gradient_checkpointing_func

    def counting(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    for block in model.backbone.blocks:
        block._gradient_checkpointing_func = counting
    loss_ckpt, grads_ckpt = _loss_and_grads(model, x_0, x_t, t)
    assert len(calls) == model.config.n_blocks  # really checkpointed, once per layer
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_trainer_with_activation_checkpointing(tmp_path):
    model = tiny_model()
    fields = TrainingArguments.__dataclass_fields__
    flag = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    trainer = BD3LMTrainer(model, make_args(tmp_path, max_steps=2, **{flag: True}), train_dataset=random_dataset(8))
    result = trainer.train()
    assert model.is_gradient_checkpointing and math.isfinite(result.training_loss)


def test_bf16_autocast_on_cpu(tmp_path):
    model = tiny_model()
    dtypes = []
    handle = model.backbone.blocks[0].attn_qkv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer = BD3LMTrainer(model, make_args(tmp_path, max_steps=2, bf16=True), train_dataset=random_dataset(8))
    result = trainer.train()
    handle.remove()
    assert torch.bfloat16 in dtypes and math.isfinite(result.training_loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning recipe


def test_load_for_finetuning_from_an_mdlm_like_checkpoint(tmp_path):
    mdlm = tiny_model(block_size=32)  # L' = L: the MDLM-style pre-training of the paper
    mdlm.set_noise_interval(0.3, 0.8)
    mdlm.save_pretrained(tmp_path / "mdlm")
    model = load_for_finetuning(tmp_path / "mdlm", block_size=4, dropout=0.1)
    assert model.config.block_size == 4 and model.config.dropout == 0.1
    assert model.training_noise_interval() == pytest.approx((1e-3, 0.999))  # the searched interval belonged to L'=32
    for (name, a), (_, b) in zip(mdlm.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    same = load_for_finetuning(tmp_path / "mdlm")
    assert same.config.block_size == 32 and same.training_noise_interval() == pytest.approx((0.3, 0.8))
    with pytest.raises(ValueError, match="multiple of `block_size`"):
        load_for_finetuning(tmp_path / "mdlm", block_size=5)
    with pytest.raises(ValueError, match="Unknown BD3LMConfig fields"):
        load_for_finetuning(tmp_path / "mdlm", block_size=4, not_a_field=1)


def test_official_checkpoint_finetunes_at_another_block_size(tmp_path, official_fixture_dir):
    folder = tmp_path / "official"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(official_fixture_dir / name, folder / name)
    model = load_for_finetuning(folder, block_size=8, attn_backend="eager")
    assert model.config.block_size == 8 and model.backbone.attn_implementation == "eager"
    assert load_for_finetuning(folder).backbone.attn_implementation == "sdpa"  # official config: attn_backend sdpa
    official = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in official.items():
        if name in state and not name.startswith("sampling_eps"):
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    trainer = BD3LMTrainer(model, make_args(tmp_path, max_steps=2), train_dataset=random_dataset(8))
    assert math.isfinite(trainer.train().training_loss)


# ----------------------------------------------------------------------------------------------------------------------
# Two processes


_WORKER = r"""
import json, os, sys
import torch
from datasets import Dataset
from modeling_bd3lm import BD3LMConfig, BD3LMForMaskedDiffusion
from bd3lm_trainer import BD3LMTrainer, BD3LMTrainingArguments, NoiseScheduleSearchCallback


class CountingTrainer(BD3LMTrainer):
    first_step = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if model.training and self.first_step is None:
            self.first_step = {"ids": inputs["input_ids"][:, :4].tolist(), "t": outputs.noise_levels.tolist()}
        return (loss, outputs) if return_outputs else loss

    def _record_eval_batch(self, token_loss, valid, block_size):
        super()._record_eval_batch(token_loss, valid, block_size)
        self.eval_tokens = self._eval_stats.num_tokens


out = sys.argv[1]
torch.manual_seed(0)
model = BD3LMForMaskedDiffusion(BD3LMConfig(vocab_size=64, hidden_dim=64, cond_dim=16, n_blocks=2, n_heads=4,
                                            model_length=32, block_size=4, dropout=0.0))
g = torch.Generator().manual_seed(1)
train = Dataset.from_dict({"input_ids": torch.randint(0, 63, (32, 32), generator=g).tolist()})
valid = Dataset.from_dict({"input_ids": torch.randint(0, 63, (10, 32), generator=g).tolist()})  # uneven: 10 = 8 + 2
args = BD3LMTrainingArguments(
    output_dir=out, max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=4,
    gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=2, logging_steps=1, save_strategy="steps",
    save_steps=4, use_cpu=True, report_to=[], dataloader_num_workers=0, disable_tqdm=True, seed=0,
    schedule_search_batches=2, schedule_search_widths=[0.5, 0.9], use_ema=True, grad_variance_minibatches=1,
)
trainer = CountingTrainer(model, args, train_dataset=train, eval_dataset=valid)
trainer.train()
search = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NoiseScheduleSearchCallback))
rank = trainer.accelerator.process_index
result = {
    "world": trainer.accelerator.num_processes,
    "interval": list(model.training_noise_interval()),
    "history": [list(h["interval"]) for h in search.history],
    "table": search.last_table,
    "eval": [{k: v for k, v in entry.items() if "runtime" not in k and "per_second" not in k}
             for entry in trainer.state.log_history if "eval_loss" in entry],
    "eval_tokens": trainer.eval_tokens,
    "first_step": trainer.first_step,
    "weights": float(sum(p.detach().double().sum() for p in model.parameters())),
}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
"""


@pytest.mark.slow
def test_two_process_training_agrees_on_the_searched_interval(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_WORKER))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert len(ranks[0]["history"]) == 2  # evaluations at steps 2 and 4
    for key in ("interval", "history", "table", "eval", "weights"):
        assert ranks[0][key] == ranks[1][key], key
    assert ranks[0]["interval"] == ranks[0]["history"][-1]
    assert ranks[0]["eval_tokens"] == ranks[1]["eval_tokens"] == 10 * 32  # padded duplicates dropped
    # each rank trains on its own data with its own noise draws
    assert ranks[0]["first_step"]["ids"] != ranks[1]["first_step"]["ids"]
    assert ranks[0]["first_step"]["t"] != ranks[1]["first_step"]["t"]
    assert (tmp_path / "out" / "checkpoint-4" / EMA_STATE_NAME).is_file()


def test_plain_trainer_does_not_pass_num_items_in_batch(tmp_path):
    # The model computes its own token-mean loss (`accepts_loss_kwargs = False`); BD3LMTrainer normalises the token
    # terms itself and so does take the count.
    from transformers import Trainer

    assert BD3LMForMaskedDiffusion.accepts_loss_kwargs is False
    seen = []

    class Recording(BD3LMForMaskedDiffusion):
        def forward(self, *args, **kwargs):
            seen.append(sorted(kwargs))
            return super().forward(*args, **kwargs)

    model = Recording(tiny_train_model().config).train()
    args = TrainingArguments(
        output_dir=str(tmp_path / "plain"),
        max_steps=1,
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    plain = Trainer(
        model=model, args=args, train_dataset=random_token_dataset(8).map(lambda r: {"labels": r["input_ids"]})
    )
    assert plain.model_accepts_loss_kwargs is False
    plain.train()
    assert seen and all("num_items_in_batch" not in keys for keys in seen)
    assert BD3LMTrainer(tiny_train_model(), make_args(tmp_path)).model_accepts_loss_kwargs is True
