"""Two-process (gloo, CPU) runs against one process on the union of both ranks' data: DDP, FSDP2 (through accelerate and
the shipped `examples/accelerate/fsdp2.yaml`, and by hand with `fully_shard`), DeepSpeed ZeRO-3 (through the shipped
`deepspeed_zero3.yaml`, when deepspeed is installed). The workers are in `tests/distributed_worker.py`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bd3lm_trainer import BD3LMTrainer
from bd3lm_trainer.faults import checkpoint_problem
from modeling_bd3lm import BD3LMForMaskedDiffusion
from tests.conftest import REPO_ROOT, random_model
from tests.distributed_worker import MODEL, run_arguments, uneven_dataset

WORKER = REPO_ROOT / "tests" / "distributed_worker.py"
CONFIGS = REPO_ROOT / "examples" / "accelerate"

pytestmark = pytest.mark.slow


def launch(mode: str, out: Path, config: str | None = None, timeout: float = 420) -> list[dict]:
    """Run the worker in 2 processes (torchrun, or `accelerate launch` with a shipped config); each rank's JSON."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        DS_ACCELERATOR="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    if config is None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:  # the YAML as shipped, but 2 CPU processes in fp32
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / config),
            "--num_processes",
            "2",
            "--mixed_precision",
            "no",
            "--main_process_port",
            "0",
        ]
    proc = subprocess.run(
        command + [str(WORKER), mode, str(out)], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def assert_weights_close(actual: dict, expected: dict, **tolerance) -> None:
    assert set(expected) <= set(actual), sorted(set(expected) - set(actual))
    for name, value in expected.items():
        torch.testing.assert_close(
            actual[name].float(), value.float(), msg=lambda m, name=name: f"{name}: {m}", **tolerance
        )


def assert_updates_close(actual: dict, expected: dict, start: dict, rel: float = 1e-3) -> None:
    """Each tensor's training update (final - start) agrees with the reference's to `rel` in Frobenius norm.

    Element-wise tolerances do not fit AdamW runs compared across process layouts: where an element's gradient is ~0,
    Adam divides by ~sqrt(v) and turns a last-bit difference of the reduction order into a visible one (seen: 1 of
    4096 elements off by 8e-5 after 4 steps at lr 1e-2 with accelerate 1.16). A real fault (a rank's gradients lost, a
    loss normalised per rank) moves whole updates, i.e. a relative error of order 1.
    """
    assert set(expected) <= set(actual), sorted(set(expected) - set(actual))
    for name, value in expected.items():
        reference = value.float() - start[name].float()
        error = (actual[name].float() - value.float()).norm() / reference.norm().clamp_min(1e-12)
        assert error <= rel, f"{name}: update differs by {error:.2e} (relative, Frobenius) > {rel}"


# ----------------------------------------------------------------------------------------------------------------------
# DDP


def test_ddp_sgd_step_equals_one_process_on_the_union(tmp_path):
    # One plain-SGD step without clipping, so the update is the gradient itself: a loss not rescaled by the process
    # count (DDP averages gradients), or normalised per rank instead of by the global token count, fails here.
    ranks = launch("ddp", tmp_path / "ddp")
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["distributed_type"] == "DistributedType.MULTI_CPU"

    model = random_model(0, always_mask=True, **MODEL).train()
    args = run_arguments(
        str(tmp_path / "ref"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        use_ema=False,
        eval_strategy="no",
        save_strategy="no",
    )
    reference = BD3LMTrainer(model, args, train_dataset=uneven_dataset(8, seed=3))
    reference.train()
    expected_loss = [e["loss"] for e in reference.state.log_history if "loss" in e]
    assert ranks[0]["losses"] == ranks[1]["losses"] == pytest.approx(expected_loss, rel=1e-6)
    start = random_model(0, always_mask=True, **MODEL).state_dict()
    weights = load_file(str(tmp_path / "ddp" / "online.safetensors"))
    assert sum(not torch.equal(weights[n], start[n]) for n in weights) > 20  # the step changed the weights
    assert_weights_close(weights, dict(model.named_parameters()), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Sharded BD3LMTrainer runs (FSDP2 through accelerate, DeepSpeed ZeRO-3)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """The run the workers make, in one process with the per-device batch doubled: the same examples per step."""
    out = tmp_path_factory.mktemp("single")
    model = random_model(0, always_mask=True, **MODEL).train()
    args = run_arguments(str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4, save_strategy="no")
    trainer = BD3LMTrainer(
        model, args, train_dataset=uneven_dataset(32, seed=1), eval_dataset=uneven_dataset(6, seed=2)
    )
    trainer.train()
    return {
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "eval": [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e],
        "online": {n: p.detach().clone() for n, p in model.named_parameters()},
        "ema": {n: t.clone() for n, t in trainer.ema_callback.shadow.items()},
    }


def check_sharded_run(out: Path, ranks: list[dict], reference: dict, layout: str, local_numels: list[int]) -> None:
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["layout"]["layout"] for r in ranks] == [layout, layout]  # the parameters really were sharded
    assert [r["layout"]["embedding_local_numel"] for r in ranks] == local_numels
    for r in ranks:
        assert r["losses"] == pytest.approx(reference["losses"], rel=2e-5)
        assert r["eval"] == pytest.approx(reference["eval"], rel=2e-5)  # evaluated with the EMA weights swapped in
        assert r["ema_updates"] == 4
        assert r["resumed_losses"] == pytest.approx(r["losses"][2:], rel=1e-6)
    start = random_model(0, always_mask=True, **MODEL).state_dict()
    online = load_file(str(out / "online.safetensors"))
    assert sum(not torch.equal(online[n], start[n]) for n in reference["online"]) > 20  # training changed the weights
    assert_updates_close(online, reference["online"], start)
    # save_model: a normal from_pretrained folder (safetensors, our code, our auto_map), gathered, with the EMA weights
    saved = out / "saved"
    assert (saved / "model.safetensors").is_file() and (saved / "modeling_bd3lm.py").is_file()
    assert not list(saved.glob("_fsdp*")) and not list(saved.glob("pytorch_model*"))  # no torch files as "code"
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_bd3lm.BD3LMForMaskedDiffusion"
    ema_model = BD3LMForMaskedDiffusion.from_pretrained(saved)
    assert_updates_close(dict(ema_model.named_parameters()), reference["ema"], start)
    # resuming from the step-2 checkpoint (engine state + one EMA file per rank) ends where the full run ended
    checkpoint = out / "run" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("ema_state*")) == [
        "ema_state-rank00000-of-00002.safetensors",
        "ema_state-rank00001-of-00002.safetensors",
    ]
    assert checkpoint_problem(checkpoint) is None
    assert_weights_close(load_file(str(out / "resumed_online.safetensors")), online, rtol=1e-6, atol=1e-7)
    resumed_ema = BD3LMForMaskedDiffusion.from_pretrained(out / "resumed_saved")
    assert_weights_close(dict(resumed_ema.named_parameters()), dict(ema_model.named_parameters()), rtol=1e-6, atol=1e-7)
    # the noise-schedule search leaves the same interval in every rank's buffers
    searches = [r["search"] for r in ranks]
    assert searches[0] == searches[1]
    assert tuple(searches[0]["interval"]) in {(row["eps_min"], row["eps_max"]) for row in searches[0]["table"]}


def test_fsdp2_through_accelerate_equals_one_process(tmp_path, single_process_run):
    out = tmp_path / "fsdp2"
    ranks = launch("fsdp2", out, config="fsdp2.yaml")
    assert ranks[0]["distributed_type"] == "DistributedType.FSDP"
    assert all(r["layout"]["checkpoint_wrapped"] for r in ranks)  # the YAML's activation checkpointing is on
    # the 61-row embedding: 31 rows on rank 0, 30 on rank 1
    check_sharded_run(out, ranks, single_process_run, "fsdp2", [31 * 64, 30 * 64])
    assert (out / "run" / "checkpoint-2" / "pytorch_model_fsdp_0" / ".metadata").is_file()  # sharded checkpoints


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (bd3lm[deepspeed])"
)
def test_deepspeed_zero3_through_accelerate_equals_one_process(tmp_path, single_process_run):
    out = tmp_path / "zero3"
    ranks = launch("zero3", out, config="deepspeed_zero3.yaml")
    assert ranks[0]["distributed_type"] == "DistributedType.DEEPSPEED"
    # ZeRO-3 partitions the flattened parameter: 3904 elements, 1952 per rank
    check_sharded_run(out, ranks, single_process_run, "zero3", [1952, 1952])


# ----------------------------------------------------------------------------------------------------------------------
# FSDP2 by hand


def test_fully_shard_with_and_without_ema_equals_unsharded(tmp_path):
    out = tmp_path / "fully_shard"
    ranks = launch("fully_shard", out)
    assert ranks[0] == ranks[1]  # all-reduced figures
    for tag in ("plain", "ema"):
        record = ranks[0][tag]
        for sharded, unsharded in record["losses"]:
            assert sharded == pytest.approx(unsharded, rel=1e-5)
        assert_weights_close(
            load_file(str(out / f"sharded_{tag}.safetensors")),
            load_file(str(out / f"reference_{tag}.safetensors")),
            rtol=1e-5,
            atol=1e-6,
        )
    start = random_model(0, **MODEL).state_dict()
    reference = load_file(str(out / "reference_plain.safetensors"))
    assert max(float((reference[n] - start[n]).abs().max()) for n in reference) > 1e-3  # the steps moved the weights
    record = ranks[0]["ema"]
    assert record["restored_equal"] is True  # the per-rank EMA files load back bit for bit
    assert record["ema_eval"][0] == pytest.approx(record["ema_eval"][1], rel=1e-5)
    # gathered copies of the online weights before the swap, and of the EMA weights after it, must not be used
    for key in ("online_eval_before", "online_eval_after"):
        assert record[key][0] == pytest.approx(record[key][1], rel=1e-5)
    assert record["online_eval_after"][0] == pytest.approx(record["online_eval_before"][0], rel=1e-6)
    assert abs(record["online_eval_after"][0] - record["ema_eval"][0]) > 1e-3  # EMA and online weights differ
    saved = BD3LMForMaskedDiffusion.from_pretrained(out / "saved")  # gathered with the EMA weights swapped in
    reference_ema = load_file(str(out / "reference_ema_weights.safetensors"))
    assert_weights_close(dict(saved.named_parameters()), reference_ema, rtol=1e-5, atol=1e-6)
    online = load_file(str(out / "sharded_ema.safetensors"))
    assert any(not torch.allclose(online[n], reference_ema[n]) for n in online)  # the swap was undone
