"""Faults: a run killed while writing a checkpoint, NaN/inf losses and gradients, damaged or mismatched checkpoints and
tokenizers, and generate() interrupted half-way. Each test simulates the fault and checks that nothing is lost or
silently corrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from bd3lm_trainer import BD3LMTrainer
from bd3lm_trainer.faults import (
    NonFiniteLossError,
    checkpoint_problem,
    last_complete_checkpoint,
)
from modeling_bd3lm import BD3LMForMaskedDiffusion
from tests.conftest import (
    REPO_ROOT,
    random_model,
    random_token_dataset,
    tiny_train_model,
    tiny_training_args,
)

# ----------------------------------------------------------------------------------------------------------------------
# A run killed (SIGKILL) while it writes a checkpoint resumes from the last complete one, losing nothing


MAX_STEPS, KILL_AT = 5, 4

# The child trains the tiny model, saving every step. While it writes checkpoint-KILL_AT it stops half-way through
# model.safetensors (half the bytes on disk, as a kill mid-write leaves them), tells the parent, and waits for SIGKILL.
CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import transformers.modeling_utils as modeling_utils
    from tests.conftest import tiny_train_model, random_token_dataset, tiny_training_args
    from bd3lm_trainer import BD3LMTrainer

    tmp, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    trainer = None
    save_file = modeling_utils.safe_save_file

    def torn_save_file(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        if trainer.state.global_step == kill_at:
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            (tmp / "killing").write_text(filename)
            time.sleep(600)

    modeling_utils.safe_save_file = torn_save_file
    args = tiny_training_args(tmp, **{ARGS})
    trainer = BD3LMTrainer(tiny_train_model(), args, train_dataset=random_token_dataset(64))
    trainer.train()
    """
)
RUN_ARGS = dict(
    max_steps=MAX_STEPS,
    save_strategy="steps",
    save_steps=1,
    schedule_search=False,
    use_ema=True,
    ema_decay=0.9,
    learning_rate=1e-2,
)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.slow
def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path):
    path = os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH"))))  # this checkout first
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.replace("{ARGS}", repr(RUN_ARGS)), str(tmp_path), str(KILL_AT)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not (tmp_path / "killing").exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the child never reached checkpoint-{KILL_AT}: {child.stderr.read().decode()[-3000:]}")
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    child.stderr.close()

    out = tmp_path / "out"
    torn = out / f"checkpoint-{KILL_AT}"
    assert (torn / "model.safetensors").exists() and not (torn / "trainer_state.json").exists()
    assert get_last_checkpoint(str(out)) == str(torn)  # what transformers would resume from
    assert "trainer_state.json" in checkpoint_problem(torn)
    assert last_complete_checkpoint(out) == str(out / f"checkpoint-{KILL_AT - 1}")

    # Resume in this process; the reference is the same run never interrupted.
    resumed = BD3LMTrainer(
        tiny_train_model(), tiny_training_args(tmp_path, **RUN_ARGS), train_dataset=random_token_dataset(64)
    )
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == MAX_STEPS
    reference = BD3LMTrainer(
        tiny_train_model(), tiny_training_args(tmp_path / "ref", **RUN_ARGS), train_dataset=random_token_dataset(64)
    )
    reference.train()
    expected, got = _weights(reference.model), _weights(resumed.model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    ema_ref, ema_got = reference.ema_callback, resumed.ema_callback
    assert ema_got.num_updates == ema_ref.num_updates == MAX_STEPS
    for name in ema_ref.shadow:
        torch.testing.assert_close(ema_got.shadow[name], ema_ref.shadow[name], rtol=0, atol=1e-6, msg=name)
    # The torn folder was written again, completely, by the resumed run.
    assert checkpoint_problem(torn) is None


# ----------------------------------------------------------------------------------------------------------------------
# Each kind of damage a killed save leaves is detected


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory) -> Path:
    """Two complete checkpoints (steps 1 and 2) with EMA state, optimizer, scheduler and RNG state."""
    tmp = tmp_path_factory.mktemp("run")
    args = tiny_training_args(
        tmp, max_steps=2, save_strategy="steps", save_steps=1, schedule_search=False, use_ema=True
    )
    BD3LMTrainer(tiny_train_model(), args, train_dataset=random_token_dataset(16)).train()
    return tmp / "out"


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "no trainer_state.json": (lambda d: (d / "trainer_state.json").unlink(), "no trainer_state.json"),
    "truncated trainer_state.json": (lambda d: _truncate(d / "trainer_state.json"), "unreadable"),
    "trainer_state of another step": (
        lambda d: (d / "trainer_state.json").write_text(json.dumps({"global_step": 7})),
        "does not describe step",
    ),
    "truncated model.safetensors": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors"),
    "no model.safetensors": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "truncated optimizer.pt": (lambda d: _truncate(d / "optimizer.pt"), "optimizer.pt is truncated"),
    "truncated rng_state.pth": (lambda d: _truncate(d / "rng_state.pth", 0.9), "rng_state.pth is truncated"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_every_kind_of_half_written_checkpoint_is_skipped_and_refused(damage, complete_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(complete_run, out)
    assert checkpoint_problem(out / "checkpoint-2") is None
    damage_fn, message = DAMAGE[damage]
    damage_fn(out / "checkpoint-2")
    assert message in checkpoint_problem(out / "checkpoint-2")
    assert last_complete_checkpoint(out) == str(out / "checkpoint-1")
    trainer = BD3LMTrainer(tiny_train_model(), tiny_training_args(tmp_path, max_steps=3, schedule_search=False))
    with pytest.raises(ValueError, match="not a complete checkpoint.*newest complete one is .*checkpoint-1"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))


def test_resume_true_without_any_complete_checkpoint_fails_clearly(tmp_path, complete_run):
    out = tmp_path / "out"
    shutil.copytree(complete_run, out)
    for folder in out.glob("checkpoint-*"):
        (folder / "trainer_state.json").unlink()
    assert last_complete_checkpoint(out) is None and last_complete_checkpoint(tmp_path / "missing") is None
    trainer = BD3LMTrainer(tiny_train_model(), tiny_training_args(tmp_path, max_steps=3, schedule_search=False))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


# ----------------------------------------------------------------------------------------------------------------------
# A NaN or inf loss (or gradient) stops training naming the step, or skips the update; the weights never see it


BAD_STEP = 3


class _Snapshots(TrainerCallback):
    """The weights at the start and at the end of every optimizer step."""

    def __init__(self) -> None:
        self.begin: dict[int, dict] = {}
        self.end: dict[int, dict] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.begin[state.global_step + 1] = _weights(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.end[state.global_step] = _weights(model)


def _poisoned_trainer(tmp_path, policy: str, fault: str):
    """A trainer whose step BAD_STEP has a NaN/inf loss (the logits are poisoned) or only a NaN gradient."""
    model = tiny_train_model()
    args = tiny_training_args(tmp_path, max_steps=4, nan_loss_policy=policy, schedule_search=False, learning_rate=1e-2)
    trainer = BD3LMTrainer(model, args, train_dataset=random_token_dataset(32))
    poison = float("inf") if fault == "inf loss" else float("nan")

    def bad_step() -> bool:
        return model.training and trainer.state.global_step == BAD_STEP - 1

    if fault == "nan gradient":
        model.backbone.blocks[0].attn_qkv.weight.register_hook(lambda grad: grad * poison if bad_step() else None)
    else:
        model.backbone.output_layer.register_forward_hook(lambda m, i, out: out * poison if bad_step() else None)
    snapshots = _Snapshots()
    trainer.add_callback(snapshots)
    return trainer, snapshots


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "fault, reason", [("nan loss", "loss is nan"), ("inf loss", "loss is"), ("nan gradient", "gradient norm")]
)
def test_stop_policy_raises_naming_the_step_before_the_weights_change(fault, reason, tmp_path):
    trainer, snapshots = _poisoned_trainer(tmp_path, "stop", fault)
    with pytest.raises(NonFiniteLossError, match=f"{reason}.*global step {BAD_STEP}|global step {BAD_STEP}"):
        trainer.train()
    assert trainer.state.global_step == BAD_STEP - 1
    assert _same(snapshots.end[BAD_STEP - 1], _weights(trainer.model))  # untouched by the bad step
    assert all(bool(torch.isfinite(w).all()) for w in _weights(trainer.model).values())


@pytest.mark.parametrize("fault", ["nan loss", "inf loss", "nan gradient"])
def test_skip_policy_drops_only_the_bad_update_and_warns(fault, tmp_path, caplog):
    trainer, snapshots = _poisoned_trainer(tmp_path, "skip", fault)
    with caplog.at_level("WARNING", logger="bd3lm_trainer.faults"):
        trainer.train()
    assert trainer.state.global_step == 4 and trainer.skipped_steps == [BAD_STEP]
    assert f"global step {BAD_STEP}: skipping" in caplog.text
    assert _same(snapshots.begin[BAD_STEP], snapshots.end[BAD_STEP])  # the bad step left the weights alone
    for step in (1, 2, 4):  # the good ones did update
        assert not _same(snapshots.begin[step], snapshots.end[step])
    assert all(bool(torch.isfinite(w).all()) for w in _weights(trainer.model).values())


# ----------------------------------------------------------------------------------------------------------------------
# Damaged or mismatched checkpoints and tokenizers fail at load time


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "model"
    random_model().save_pretrained(folder)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


LOAD_FAULTS = {
    "truncated weights": (lambda d: _truncate(d / "model.safetensors"), "not a readable safetensors file.*truncated"),
    "cut-off header": (lambda d: _truncate(d / "model.safetensors", 0.0001), "not a readable safetensors file"),
    "empty weights file": (lambda d: (d / "model.safetensors").write_bytes(b""), "not a readable safetensors file"),
    "wider config": (lambda d: _edit_config(d, hidden_dim=128), "do not match its config.*wrong shape"),
    "other cond_dim": (lambda d: _edit_config(d, cond_dim=32), "do not match its config.*wrong shape"),
    "bigger vocabulary": (lambda d: _edit_config(d, vocab_size=80), "do not match its config.*wrong shape"),
    "more layers": (lambda d: _edit_config(d, n_blocks=3), "do not match its config.*missing: backbone.blocks.2"),
    "fewer layers": (lambda d: _edit_config(d, n_blocks=1), "do not match its config.*unexpected: backbone.blocks.1"),
    "pickle weights only": (
        lambda d: (
            torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin"),
            (d / "model.safetensors").unlink(),
        ),
        "pickle weights.*safetensors only",
    ),
}


@pytest.mark.parametrize("fault", sorted(LOAD_FAULTS))
def test_damaged_or_mismatched_checkpoint_fails_at_load_time(fault, saved_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    damage, message = LOAD_FAULTS[fault]
    damage(folder)
    with pytest.raises(ValueError, match=message):
        BD3LMForMaskedDiffusion.from_pretrained(folder)


def test_loading_stays_exact_and_pickles_are_refused_on_request(saved_model):
    model, info = BD3LMForMaskedDiffusion.from_pretrained(saved_model, output_loading_info=True)
    assert not any(info.values())
    x = torch.randint(0, 63, (1, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(x, return_dict=True).logits, random_model()(x, return_dict=True).logits)
    with pytest.raises(ValueError, match="safetensors only"):
        BD3LMForMaskedDiffusion.from_pretrained(saved_model, use_safetensors=False)


class _Tokenizer:
    """The part of a tokenizer the size check uses (a real one is in the catalogue)."""

    def __init__(self, size: int) -> None:
        self.size, self.pad_token_id, self.eos_token_id = size, 0, None

    def __len__(self) -> int:
        return self.size

    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_where_it_meets_the_model(tmp_path):
    from transformers import TextStreamer

    model = random_model()
    with pytest.raises(ValueError, match="has 65 tokens but the model's `vocab_size` is 64"):
        BD3LMTrainer(model, tiny_training_args(tmp_path), processing_class=_Tokenizer(65))
    with pytest.raises(ValueError, match="`tokenizer`.*65 tokens"):
        model.generate(max_new_tokens=4, bos_token_id=1, tokenizer=_Tokenizer(65))
    with pytest.raises(ValueError, match="streamer's tokenizer.*65 tokens"):
        model.generate(max_new_tokens=4, bos_token_id=1, streamer=TextStreamer(_Tokenizer(65)))
    # Smaller is fine: the mask token may sit past the tokenizer's end (GPT-2 + mask).
    BD3LMTrainer(model, tiny_training_args(tmp_path), processing_class=_Tokenizer(63))


# ----------------------------------------------------------------------------------------------------------------------
# generate() interrupted half-way leaves the model ready for the next call


class _FailingStreamer:
    def __init__(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at

    def put(self, value):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("streamer broke")

    def end(self):
        pass


def _raise_in_criterion(input_ids, scores):
    if input_ids.shape[1] > 10:
        raise KeyboardInterrupt  # the user pressing Ctrl-C between blocks
    return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _interrupt(kind: str, model, kwargs):
    if kind == "streamer exception":
        with pytest.raises(RuntimeError, match="streamer broke"):
            model.generate(**kwargs, streamer=_FailingStreamer(fail_at=3))
    elif kind == "KeyboardInterrupt in a stopping criterion":
        with pytest.raises(KeyboardInterrupt):
            model.generate(**kwargs, stopping_criteria=[_raise_in_criterion])
    elif kind == "stopping criterion":
        out = model.generate(**kwargs, stopping_criteria=[lambda ids, s: torch.full((ids.shape[0],), ids.shape[1] > 9)])
        assert out.shape[1] < kwargs["input_ids"].shape[1] + kwargs["max_new_tokens"]
    else:  # max_time reached after the first block
        model.generate(**kwargs, max_time=1e-9)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize(
    "kind", ["streamer exception", "KeyboardInterrupt in a stopping criterion", "stopping criterion", "max_time"]
)
def test_generate_interrupted_leaves_the_model_usable(kind, use_cache):
    model = random_model(bos_token_id=1, pad_token_id=0)
    prompt = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    kwargs = dict(input_ids=prompt, max_new_tokens=16, do_sample=True, use_cache=use_cache)
    expected = model.generate(**kwargs, seed=0)
    grad_mode, training = torch.is_grad_enabled(), model.training
    _interrupt(kind, model, {**kwargs, "seed": 1})
    assert torch.is_grad_enabled() == grad_mode and model.training == training
    assert torch.equal(model.generate(**kwargs, seed=0), expected)


# ----------------------------------------------------------------------------------------------------------------------
# The command line resumes past a torn checkpoint too


@pytest.mark.slow
def test_cli_resume_skips_a_torn_checkpoint(tmp_path, capsys):
    from bd3lm_trainer.cli import main

    data = tmp_path / "data.txt"
    data.write_text("In the beginning God created the heaven and the earth.\n" * 40)
    out = tmp_path / "run"
    fast = [
        "train",
        "--dataset",
        str(data),
        "--output-dir",
        str(out),
        "--model-length",
        "32",
        "--batch-size",
        "2",
        "--warmup-steps",
        "1",
        "--eval-steps",
        "100",
        "--save-steps",
        "1",
        "--eval-batches",
        "1",
        "--search-batches",
        "1",
        "--no-schedule-search",
    ]
    assert main([*fast, "--max-steps", "2"]) == 0
    (out / "checkpoint-2" / "trainer_state.json").unlink()  # as a kill during the save of step 2 leaves it
    assert main([*fast, "--max-steps", "3", "--resume"]) == 0, capsys.readouterr().err[-2000:]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
