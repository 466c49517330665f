# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Tests of bd3lm_trainer.callbacks: the clipped-schedule search, EMA and the gradient-variance estimator."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from types import SimpleNamespace

import pytest
import torch

from bd3lm_configuration import BLOCK_PRESETS, SIZE_PRESETS, load_preset
from bd3lm_trainer import (
    BD3LMTrainer,
    BD3LMTrainingArguments,
    EMACallback,
    GradientVarianceCallback,
    NoiseScheduleSearchCallback,
    estimate_gradient_variance,
    noise_interval_grid,
    noised_nelbo,
    per_block_nelbo,
)
from bd3lm_trainer import utils as utils_module
from bd3lm_trainer.utils import diagnostic_generator, take_batches
from modeling_bd3lm import BD3LMForMaskedDiffusion, nelbo_valid_mask
from tests.conftest import random_token_dataset, tiny_train_model, tiny_training_args

tiny_model = tiny_train_model
random_dataset = random_token_dataset


def make_args(tmp_path, **overrides) -> BD3LMTrainingArguments:
    return tiny_training_args(tmp_path, **{"schedule_search_batches": 2, **overrides})


# ----------------------------------------------------------------------------------------------------------------------
# Grid


def test_grid_is_the_upstream_grid():
    grid = noise_interval_grid()
    assert grid[0] == (1e-3, 1.0)
    assert len(grid) == 1 + 11 + 9 + 7 + 5 + 3
    assert len(set(grid)) == len(grid)
    # the paper's optima for L' = 4 and L' = 16 are grid points
    assert (0.45, 0.95) in grid and (0.3, 0.8) in grid
    assert (1e-3, 0.5) in grid and (0.5, 1.0) in grid and (0.1, 1.0) in grid
    for lo, hi in grid[1:]:
        assert 1e-3 <= lo < hi <= 1.0
        assert round(hi - (0.0 if lo == 1e-3 else lo), 6) in (0.5, 0.6, 0.7, 0.8, 0.9)
    per_width = [
        sum(1 for lo, hi in grid[1:] if round(hi - (0.0 if lo == 1e-3 else lo), 6) == w)
        for w in (0.5, 0.6, 0.7, 0.8, 0.9)
    ]
    assert per_width == [11, 9, 7, 5, 3]


def test_grid_options_and_errors():
    assert noise_interval_grid([0.9], 0.1) == [(1e-3, 1.0), (1e-3, 0.9), (0.1, 1.0)]
    assert noise_interval_grid([], 0.05) == [(1e-3, 1.0)]
    assert noise_interval_grid([1.0]) == [(1e-3, 1.0)]  # the full interval is not repeated
    with pytest.raises(ValueError, match="step"):
        noise_interval_grid([0.5], 0.0)
    with pytest.raises(ValueError, match="widths"):
        noise_interval_grid([1.5])


# ----------------------------------------------------------------------------------------------------------------------
# Noising helper


@pytest.mark.parametrize("interval", [(0.45, 0.95), (0.3, 0.8), (0.5, 1.0), (1e-3, 0.5)])
def test_noised_nelbo_resamples_into_the_interval(interval):
    model = tiny_model(resample=True).eval()
    x_0 = torch.randint(0, 63, (8, 32), generator=torch.Generator().manual_seed(0))
    out = noised_nelbo(model, {"input_ids": x_0}, interval, torch.Generator().manual_seed(1))
    fraction = (out.noisy_input_ids == model.config.mask_token_id).float().view(8, 8, 4).mean(-1)
    lo = interval[0] if interval[0] > 1e-3 else 0.0  # a bound at the default end is not enforced (upstream)
    assert bool(((fraction >= lo) & (fraction <= interval[1])).all())
    assert bool(((out.noise_levels >= interval[0]) & (out.noise_levels <= interval[1])).all())


def test_noised_nelbo_always_mask_masks_everything():
    model = tiny_model(always_mask=True).eval()
    x_0 = torch.randint(0, 63, (2, 32))
    out = noised_nelbo(model, {"input_ids": x_0}, (0.3, 0.8))
    assert bool((out.noisy_input_ids == model.config.mask_token_id).all())


def test_per_block_nelbo_is_the_block_mean():
    token_loss = torch.arange(16, dtype=torch.float32).view(2, 8)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 4:] = False
    values, blocks = per_block_nelbo(token_loss, valid, 4)
    assert torch.equal(values, torch.tensor([[1.5, 5.5], [9.5, 13.5]]))
    assert torch.equal(blocks, torch.tensor([[True, True], [True, False]]))


# ----------------------------------------------------------------------------------------------------------------------
# The diagnostics measure the training estimator: one noise draw for all (same interval rule, same resampling)

PRESETS = [(size, block) for size in SIZE_PRESETS for block in (None, *BLOCK_PRESETS)]


def preset_model(size: str, block: str | None) -> BD3LMForMaskedDiffusion:
    """The preset's noise settings (block size, interval, resampling, t ≡ 1, schedule, antithetic draws) on a network
    small enough for a test (vocabulary 64, L = 32; the MDLM preset's one block is then 32 tokens)."""
    torch.manual_seed(0)
    config = load_preset(
        size,
        block=block,
        vocab_size=64,
        mask_token_id=63,
        hidden_dim=32,
        cond_dim=16,
        n_blocks=1,
        n_heads=2,
        model_length=32,
        dropout=0.0,
    )
    return BD3LMForMaskedDiffusion(config)


class NoiseRecorder:
    """Records `(x_t, t)` of every vectorised forward of a model (its output carries both)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.draws: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.draws.append((output.noisy_input_ids.clone(), output.noise_levels.clone()))

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        draws, self.draws = self.draws, []
        return draws


def training_draws(model, batches, generator, interval=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What the training loss draws for `batches` (training mode, `interval` written into the buffers first)."""
    if interval is not None and model.config.var_min:
        model.set_noise_interval(*interval)
    recorder = NoiseRecorder(model)
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], labels=batch["input_ids"], generator=generator)
    recorder.handle.remove()
    return recorder.take()


def assert_same_draws(got, expected) -> None:
    assert len(got) == len(expected) > 0
    for (x_got, t_got), (x_expected, t_expected) in zip(got, expected):
        assert torch.equal(x_got, x_expected)
        assert torch.equal(t_got, t_expected)


@pytest.mark.parametrize(("size", "block"), PRESETS, ids=[f"{s}-{b}" for s, b in PRESETS])
def test_gradient_variance_draws_exactly_the_training_noise(size, block):
    model = preset_model(size, block)
    batches = _batches(3)
    recorder = NoiseRecorder(model)
    estimate_gradient_variance(model, batches, generator=torch.Generator().manual_seed(7))
    measured = recorder.take()
    recorder.handle.remove()
    assert_same_draws(measured, training_draws(model, batches, torch.Generator().manual_seed(7)))


@pytest.mark.parametrize(("size", "block"), PRESETS, ids=[f"{s}-{b}" for s, b in PRESETS])
def test_schedule_search_draws_exactly_the_training_noise_of_every_candidate(size, block):
    model = preset_model(size, block)
    batches = _batches(2)
    search = NoiseScheduleSearchCallback(widths=(0.5, 0.6), step=0.1, num_batches=2, fixed=True)
    accelerator = SimpleNamespace(process_index=0, num_processes=1, autocast=contextlib.nullcontext)
    search.bind(SimpleNamespace(accelerator=accelerator, log=lambda logs: None, is_world_process_zero=lambda: False))
    args, state = SimpleNamespace(seed=3, output_dir=None), SimpleNamespace(global_step=5)
    recorder = NoiseRecorder(model)
    search.search(model, batches, args, state)
    measured = recorder.take()
    recorder.handle.remove()
    candidates = search.candidates(model.config)
    assert len(measured) == len(batches) * len(candidates)

    generator = diagnostic_generator(torch.device("cpu"), args.seed, state.global_step, 0)
    expected = [
        draw
        for batch in batches
        for interval in candidates
        for draw in training_draws(model, [batch], generator, interval)
    ]
    assert_same_draws(measured, expected)


# ----------------------------------------------------------------------------------------------------------------------
# Schedule search


def _manual_search_sums(model, trainer, grid, num_batches):
    """Recompute the per-interval sums of per-batch variances with the callback's seeding."""
    generator = diagnostic_generator(torch.device("cpu"), trainer.args.seed, trainer.state.global_step, 0)
    sums = [0.0] * len(grid)
    model.eval()
    with torch.no_grad():
        for batch in list(trainer.get_eval_dataloader())[:num_batches]:
            valid = nelbo_valid_mask(batch["labels"], batch["attention_mask"])
            for i, interval in enumerate(grid):
                token_loss = noised_nelbo(model, batch, interval, generator).token_loss
                values, blocks = per_block_nelbo(token_loss, valid, 4)
                sums[i] += float(values[blocks].double().var())
    return sums


def test_search_picks_the_argmin_of_the_recomputed_variances(tmp_path):
    model = tiny_model()
    args = make_args(tmp_path, schedule_search_widths=[0.5, 0.8], schedule_search_step=0.25, schedule_search_batches=2)
    trainer = BD3LMTrainer(model, args, eval_dataset=random_dataset(12))
    search = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NoiseScheduleSearchCallback))
    assert search.grid == [(1e-3, 1.0), (1e-3, 0.5), (0.25, 0.75), (0.5, 1.0), (1e-3, 0.8)]
    trainer.evaluate()
    sums = _manual_search_sums(model, trainer, search.grid, 2)
    table_sums = [row["nelbo_var_sum"] for row in search.last_table]
    assert table_sums == pytest.approx(sums, rel=1e-9)
    assert [row["nelbo_var"] for row in search.last_table] == pytest.approx([s / 2 for s in sums], rel=1e-9)
    best = search.grid[min(range(len(sums)), key=sums.__getitem__)]
    assert model.training_noise_interval() == pytest.approx(best, abs=1e-6)
    record = json.loads((tmp_path / "out" / "schedule_search.json").read_text())
    assert record["best"] == pytest.approx(list(best)) and record["applied"] is True
    assert len(record["table"]) == 5
    assert (tmp_path / "out" / "schedule_search.png").stat().st_size > 0
    logged = trainer.state.log_history[-1]
    assert logged["schedule_search/eps_min"] == pytest.approx(best[0])
    assert "schedule_search/var_0.25_0.75" in logged


def test_fixed_interval_is_reported_but_not_replaced(tmp_path):
    model = tiny_model()
    args = make_args(tmp_path, noise_interval=[0.3, 0.8], schedule_search_widths=[0.5], schedule_search_step=0.5)
    trainer = BD3LMTrainer(model, args, eval_dataset=random_dataset(8))
    assert model.training_noise_interval() == pytest.approx((0.3, 0.8))
    trainer.evaluate()
    assert model.training_noise_interval() == pytest.approx((0.3, 0.8))
    record = json.loads((tmp_path / "out" / "schedule_search.json").read_text())
    assert record["applied"] is False and len(record["table"]) == 3


def test_search_without_matplotlib_writes_json_and_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(utils_module, "_warned_without_matplotlib", set())
    args = make_args(tmp_path, schedule_search_widths=[0.5], schedule_search_step=0.5, schedule_search_batches=1)
    trainer = BD3LMTrainer(tiny_model(), args, eval_dataset=random_dataset(4))
    with caplog.at_level(logging.WARNING, logger="bd3lm_trainer.callbacks"):
        trainer.evaluate()
        trainer.evaluate()
    assert (tmp_path / "out" / "schedule_search.json").exists()
    assert not (tmp_path / "out" / "schedule_search.png").exists()
    assert sum("matplotlib is not installed" in r.getMessage() for r in caplog.records) == 1


def test_search_keeps_only_reachable_intervals_with_resampling(tmp_path):
    # L' = 2 reaches mask fractions 0, 1/2, 1 only; rejection resampling could never land in (0.05, 0.45) etc.
    model = tiny_model(block_size=2, resample=True)
    args = make_args(tmp_path, schedule_search_widths=[0.4], schedule_search_step=0.05, schedule_search_batches=1)
    trainer = BD3LMTrainer(model, args, eval_dataset=random_dataset(4))
    trainer.evaluate()
    search = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NoiseScheduleSearchCallback))
    searched = [(row["eps_min"], row["eps_max"]) for row in search.last_table]
    assert searched and all(any(lo <= f <= hi for f in (0.0, 0.5, 1.0)) for lo, hi in searched)
    assert (0.15, 0.55) in searched and (0.05, 0.45) not in searched


def test_search_restores_training_mode_and_requires_the_trainer():
    model = tiny_model().train()
    callback = NoiseScheduleSearchCallback(widths=[], num_batches=1)
    with pytest.raises(RuntimeError, match="BD3LMTrainer"):
        callback.search(model, [{"input_ids": torch.randint(0, 63, (2, 32))}], None, None)
    assert model.training
    with pytest.raises(ValueError, match="num_batches"):
        NoiseScheduleSearchCallback(num_batches=0)


def test_take_unregisters_an_accelerate_loader_stopped_early():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(torch.utils.data.DataLoader(list(range(10)), batch_size=2))
    assert len(list(take_batches(loader, 2))) == 2
    assert accelerator.gradient_state.active_dataloader is None


# ----------------------------------------------------------------------------------------------------------------------
# EMA


def test_ema_decay_warmup():
    ema = EMACallback(decay=0.9999)
    assert ema.current_decay() == pytest.approx(2 / 11)  # first update: n = 1
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.9999
    assert EMACallback(decay=0.5, warmup=False).current_decay() == 0.5
    with pytest.raises(ValueError, match="decay"):
        EMACallback(decay=1.0)


def test_ema_update_matches_the_recursion():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)  # frozen parameters are not averaged
    ema = EMACallback(decay=0.9)
    ema.reset(layer)
    expected = layer.weight.detach().clone()
    for n in range(1, 6):
        with torch.no_grad():
            layer.weight.add_(torch.randn_like(layer.weight))
        ema.update(layer)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * layer.weight.detach()
    assert set(ema.shadow) == {"weight"}
    torch.testing.assert_close(ema.shadow["weight"], expected, rtol=1e-6, atol=1e-7)
    assert ema.num_updates == 5


def test_ema_applied_swaps_and_restores_exactly(tmp_path):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    ema = EMACallback(decay=0.5)
    ema.reset(layer)
    online = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with torch.no_grad():
        layer.weight.mul_(3.0)
    online["weight"] = layer.weight.detach().clone()
    with ema.applied(layer):
        torch.testing.assert_close(layer.weight, ema.shadow["weight"], rtol=0, atol=0)
        with ema.applied(layer):  # re-entrant: nothing more to swap
            torch.testing.assert_close(layer.weight, ema.shadow["weight"], rtol=0, atol=0)
        torch.testing.assert_close(layer.weight, ema.shadow["weight"], rtol=0, atol=0)
    for name, param in layer.named_parameters():
        assert torch.equal(param, online[name])

    ema.update(layer)
    ema.save_state(str(tmp_path), layer)
    shadow = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        layer.weight.zero_()
    restored = EMACallback(decay=0.5)
    assert restored.load_state(str(tmp_path), layer)
    assert restored.num_updates == 1
    assert torch.equal(layer.weight, online["weight"])
    torch.testing.assert_close(restored.shadow["weight"], shadow["weight"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match"):
        restored.load_state(str(tmp_path), torch.nn.Sequential(torch.nn.Linear(3, 2)))


def test_trainer_evaluates_and_saves_the_ema_weights(tmp_path):
    from safetensors.torch import load_file

    from modeling_bd3lm.modeling_bd3lm import checkpoint_key

    model = tiny_model()
    args = make_args(tmp_path, use_ema=True, ema_decay=0.9, max_steps=3, schedule_search=False, learning_rate=1e-2)
    trainer = BD3LMTrainer(model, args, train_dataset=random_dataset(16), eval_dataset=random_dataset(8, seed=2))
    trainer.train()
    ema = trainer.ema_callback
    assert ema is not None and ema.num_updates == 3
    online = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = trainer.evaluate()
    for name, param in model.named_parameters():  # evaluation put the online weights back
        assert torch.equal(param, online[name])

    averaged = tiny_model()
    averaged.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, param in averaged.named_parameters():
            param.copy_(ema.shadow[name])
    plain = BD3LMTrainer(
        averaged, make_args(tmp_path / "plain", schedule_search=False), eval_dataset=random_dataset(8, seed=2)
    )
    assert plain.evaluate()["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)

    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    for name, shadow in ema.shadow.items():
        torch.testing.assert_close(saved[checkpoint_key(name)], shadow, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Gradient variance


def _batches(n: int, batch: int = 3):
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, 63, (batch, 32), generator=g)} for _ in range(n)]


def test_gradient_variance_matches_the_two_pass_formula():
    model = tiny_model()
    model.set_noise_interval(0.3, 0.8)
    batches = _batches(4)
    value = estimate_gradient_variance(model, batches, generator=torch.Generator().manual_seed(3))

    generator = torch.Generator().manual_seed(3)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    model.eval()
    for batch in batches:
        loss = noised_nelbo(model, batch, (0.3, 0.8), generator).loss
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double())
    stacked = torch.stack(grads)
    expected = float((stacked - stacked.mean(0)).square().sum(-1).sum() / (len(batches) - 1))
    assert value == pytest.approx(expected, rel=1e-5)
    assert all(p.grad is None for p in params)  # .grad untouched


def test_gradient_variance_is_zero_for_identical_minibatches_and_needs_two():
    model = tiny_model(always_mask=True)  # deterministic objective: identical batches, identical gradients
    batch = _batches(1)[0]
    assert estimate_gradient_variance(model, [batch, batch, batch]) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        estimate_gradient_variance(model, [batch])


def test_gradient_variance_callback_logs(tmp_path):
    args = make_args(tmp_path, grad_variance_minibatches=2, schedule_search=False)
    trainer = BD3LMTrainer(tiny_model(), args, eval_dataset=random_dataset(8))
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GradientVarianceCallback))
    trainer.evaluate()
    assert callback.last_value is not None and callback.last_value > 0
    assert trainer.state.log_history[-1]["grad_variance"] == callback.last_value
