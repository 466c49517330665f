"""Single-process checks around sharded training: FSDP and DeepSpeed checkpoint folders and per-rank EMA files are
recognised as complete or torn, an EMA saved in shards is refused, with a clear message, by a run that does not shard
the same way, and accelerate's FSDP auto-wrap finds the layers of a BD3-LM on a causal-LM backbone. (The sharded runs
themselves are in test_distributed.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bd3lm_trainer import BD3LMTrainer
from bd3lm_trainer.ema import EMA_SHARD_TEMPLATE, EMA_STATE_NAME, EMACallback, ema_shard_files
from bd3lm_trainer.faults import checkpoint_problem, last_complete_checkpoint
from bd3lm_trainer.sharding import canonical_name, describe
from tests.conftest import random_token_dataset, tiny_train_model, tiny_training_args
from tests.test_causal_backbone import _convert


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A complete step-1 checkpoint of an unsharded run."""
    tmp = tmp_path_factory.mktemp("run")
    args = tiny_training_args(tmp, max_steps=1, save_strategy="steps", save_steps=1, schedule_search=False)
    BD3LMTrainer(tiny_train_model(), args, train_dataset=random_token_dataset(8)).train()
    return tmp / "out" / "checkpoint-1"


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "out" / "checkpoint-1"
    shutil.copytree(checkpoint, folder)
    return folder


def _as_fsdp_sharded(folder: Path) -> None:
    """What accelerate's FSDP2 with SHARDED_STATE_DICT leaves instead of model.safetensors."""
    (folder / "model.safetensors").unlink()
    for name in ("pytorch_model_fsdp_0", "optimizer_0"):
        (folder / name).mkdir()
        (folder / name / "__0_0.distcp").write_bytes(b"shard")
        (folder / name / ".metadata").write_bytes(b"written last")


def _as_deepspeed(folder: Path) -> None:
    """What DeepSpeed ZeRO-3 leaves: `latest` naming a folder of per-rank torch files."""
    (folder / "model.safetensors").unlink()
    (folder / "global_step1").mkdir()
    for rank in range(2):
        torch.save({"rank": rank}, folder / "global_step1" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    (folder / "latest").write_text("global_step1")


def _with_ema_shards(folder: Path, world: int = 2) -> None:
    for rank in range(world):
        save_file(
            {"shadow.w": torch.zeros(3)},
            str(folder / EMA_SHARD_TEMPLATE.format(rank=rank, world=world)),
            metadata={"layout": "fsdp2", "num_updates": "1"},
        )


ENGINE_DAMAGE = {
    "fsdp model without .metadata": (
        _as_fsdp_sharded,
        lambda d: (d / "pytorch_model_fsdp_0" / ".metadata").unlink(),
        "pytorch_model_fsdp_0/ has no",
    ),
    "fsdp optimizer without .metadata": (
        _as_fsdp_sharded,
        lambda d: (d / "optimizer_0" / ".metadata").unlink(),
        "optimizer_0/ has no .metadata",
    ),
    "deepspeed truncated state": (
        _as_deepspeed,
        lambda d: (d / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"PK\x03"),
        "is truncated",
    ),
    "deepspeed latest names nothing": (
        _as_deepspeed,
        lambda d: (d / "latest").write_text("global_step9"),
        "`latest` names 'global_step9'",
    ),
    "an EMA shard missing": (
        _with_ema_shards,
        lambda d: (d / EMA_SHARD_TEMPLATE.format(rank=1, world=2)).unlink(),
        "ranks [1] of 2",
    ),
    "an EMA shard truncated": (
        _with_ema_shards,
        lambda d: (d / EMA_SHARD_TEMPLATE.format(rank=0, world=2)).write_bytes(b"\x10\x00"),
        "is not a whole safetensors file",
    ),
    "EMA shards of two process counts": (
        _with_ema_shards,
        lambda d: _with_ema_shards(d, world=3),
        "several process counts",
    ),
}


@pytest.mark.parametrize("case", sorted(ENGINE_DAMAGE))
def test_engine_checkpoints_are_complete_until_damaged(case, checkpoint, tmp_path):
    make, damage, message = ENGINE_DAMAGE[case]
    folder = _copy(checkpoint, tmp_path)
    make(folder)
    assert checkpoint_problem(folder) is None  # FSDP / DeepSpeed state instead of model.safetensors is complete
    damage(folder)
    assert message in checkpoint_problem(folder)
    assert last_complete_checkpoint(folder.parent) is None


def test_a_sharded_ema_is_refused_by_an_unsharded_run(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    _with_ema_shards(folder)
    assert ema_shard_files(str(folder)) == {2: [0, 1]}
    assert not (folder / EMA_STATE_NAME).exists()
    model = tiny_train_model()
    with pytest.raises(ValueError, match=r"saved in shards by \[2\] processes .* same sharding and process count"):
        EMACallback().load_state(str(folder), model)


def test_parameter_names_drop_wrapper_segments_and_plain_parameters_are_whole():
    assert (
        canonical_name("backbone.blocks.0._checkpoint_wrapped_module.attn_qkv.weight")
        == "backbone.blocks.0.attn_qkv.weight"
    )
    assert canonical_name("_orig_mod.backbone._fsdp_wrapped_module.vocab_embed.embedding") == (
        "backbone.vocab_embed.embedding"
    )
    assert describe(tiny_train_model().parameters()) == "full"


@pytest.mark.parametrize("family", ["dit", "llama"])
def test_fsdp_auto_wrap_finds_the_layers(family, tmp_path):
    from types import SimpleNamespace

    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    model = tiny_train_model() if family == "dit" else _convert("llama", 4)[1]
    layer = "BD3LMBlock" if family == "dit" else "LlamaDecoderLayer"
    # what accelerate reads from `fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP` without a layer class
    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=None)
    if family == "llama":  # the class attribute names the DiT block, which this model does not have
        assert "BD3LMBlock" in model._no_split_modules
    trainer = BD3LMTrainer(model, tiny_training_args(tmp_path))
    # Every listed class must exist in the model: accelerate before 1.16 raised "Could not find the transformer layer
    # class" for an absent one (1.16 filters them itself), and FSDP1's `fsdp_transformer_layer_cls_to_wrap` default
    # still reads the list as it is.
    present = {type(m).__name__ for m in trainer.model.modules()}
    assert set(trainer.model._no_split_modules) <= present
    policy = fsdp2_prepare_auto_wrap_policy(plugin, trainer.model)
    wrapped = [type(m).__name__ for m in trainer.model.modules() if policy(m)]
    assert wrapped == [layer] * 2
