# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Where each rank's share of a parameter lives under the sharding engines `BD3LMTrainer` runs on, so that the EMA
(`ema.py`) and `save_model` can work on shards without ever gathering a full copy per rank.

* FSDP2 (`torch.distributed.fsdp.fully_shard`, what accelerate's `fsdp_version: 2` and transformers'
  `from_pretrained(distributed_config=...)` apply): a parameter is a `DTensor`; `to_local()` is this rank's rows.
* DeepSpeed ZeRO-3: a parameter is an empty placeholder; `param.ds_tensor` is this rank's flat partition in the
  working precision, and the optimizer holds an fp32 master copy of it (`deepspeed.utils.safe_get_local_fp32_param`).
* Anything else (one process, DDP, ZeRO-1/2): every rank holds the whole parameter.

FSDP1 (`FullyShardedDataParallel`, flat parameters) is refused with a message pointing to FSDP2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

# Segments that wrappers insert into parameter names (activation checkpointing, FSDP1, torch.compile); dropped so that
# names match the unwrapped model's state dict, however the run was wrapped.
WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod")

LAYOUT_FULL = "full"
LAYOUT_FSDP2 = "fsdp2"
LAYOUT_ZERO3 = "zero3"


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 keeps it private
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def _fsdp2_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return None
    return FSDPModule


def canonical_name(name: str) -> str:
    """`name` without the segments wrappers insert (`blocks.0._checkpoint_wrapped_module.attn_qkv.weight` ->
    `blocks.0.attn_qkv.weight`)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def is_zero3_parameter(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") and getattr(param, "ds_tensor", None) is not None


def parameter_layout(param: torch.Tensor) -> str:
    """`"fsdp2"`, `"zero3"` or `"full"`: how this rank holds `param`."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(param, dtensor):
        return LAYOUT_FSDP2
    if is_zero3_parameter(param):
        return LAYOUT_ZERO3
    return LAYOUT_FULL


def check_supported(model: torch.nn.Module) -> None:
    """Raise for FSDP1, whose flat parameters give no per-parameter shard to average."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise ValueError(
            "The EMA (`use_ema=True`) works on FSDP2 or DeepSpeed ZeRO-3 shards, not on FSDP1 flat parameters; set "
            "`fsdp_version: 2` in the accelerate config (or `fsdp_config={'fsdp_version': 2}`)."
        )


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """This rank's share of `param`, as a tensor sharing its storage (writing into it writes the parameter)."""
    layout = parameter_layout(param)
    if layout == LAYOUT_FSDP2:
        with torch.no_grad():
            return param.to_local()  # a view of the local rows
    if layout == LAYOUT_ZERO3:
        return param.ds_tensor
    return param.data


def local_master(param: torch.Tensor) -> torch.Tensor:
    """This rank's share of `param` in full precision: the optimizer's fp32 master partition under ZeRO-3 (the working
    copy may be bf16), else `local_shard`."""
    if parameter_layout(param) == LAYOUT_ZERO3 and getattr(param, "_z3_optimizer", None) is not None:
        from deepspeed.utils import safe_get_local_fp32_param

        master = safe_get_local_fp32_param(param)
        if master is not None and master.numel() == param.ds_tensor.numel():
            return master.view_as(param.ds_tensor)
    return local_shard(param)


def reshard_fsdp2(model: torch.nn.Module) -> None:
    """Free FSDP2's gathered parameters: a module with `reshard_after_forward=False` (always the root) keeps them after
    a forward, and `named_parameters()` then yields those plain tensors instead of the `DTensor` shards."""
    fsdp_module = _fsdp2_module_type()
    if fsdp_module is not None:
        for module in model.modules():
            if isinstance(module, fsdp_module):
                module.reshard()


def release_gathered(model: torch.nn.Module) -> None:
    """Drop every gathered (unsharded) copy of the parameters, so that the next forward gathers from the shards.

    FSDP2 keeps the root module's parameters gathered after a forward; ZeRO-3 keeps small ("persistent") parameters,
    and recently used ones, gathered. A shard written while such a copy exists would not be seen by the next forward.
    No-op for unsharded models.
    """
    reshard_fsdp2(model)
    zero3 = [p for p in model.parameters() if is_zero3_parameter(p)]
    if zero3:
        optimizer = getattr(zero3[0], "_z3_optimizer", None)
        if optimizer is not None and hasattr(optimizer, "empty_partition_cache"):
            optimizer.empty_partition_cache()  # releases every parameter, persistent ones included
        else:  # inference-only engine: no optimizer to ask
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            available = [p for p in zero3 if p.ds_status == ZeroParamStatus.AVAILABLE]
            if available:
                available[0].partition(param_list=available)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the process count (0, 1 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP2 model, gathered on CPU on rank 0 (an empty dict on the other ranks); every rank
    must call it. Keys are those of the unwrapped model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def saved_as_original_class(model: torch.nn.Module) -> Iterator[None]:
    """`fully_shard` gives the model a generated class, `FSDP<Name>`, defined in torch's FSDP module; `save_pretrained`
    would copy torch's files as the model's code and write `_fsdp_init.FSDP<Name>` into `config.auto_map`, a folder that
    `trust_remote_code` cannot load. The model carries its own class for the duration of the block (the FSDP state
    lives on the instance, so gathering the state dict still works)."""
    fsdp_module = _fsdp2_module_type()
    generated = type(model)
    if fsdp_module is None or not isinstance(model, fsdp_module):
        yield
        return
    model.__class__ = next(base for base in generated.__mro__[1:] if not issubclass(base, fsdp_module))
    try:
        yield
    finally:
        model.__class__ = generated


def keep_present_layer_classes(model: torch.nn.Module) -> None:
    """Keep in `model._no_split_modules` only the layer classes the model contains. accelerate's FSDP auto-wrap (and
    `fsdp_transformer_layer_cls_to_wrap`'s default) takes its layer classes from there and raises for a name it cannot
    find; a BD3-LM on a causal-LM backbone lists the DiT's `BD3LMBlock` (class attribute) beside the backbone's decoder
    layer (`LlamaDecoderLayer`, ...)."""
    listed = getattr(model, "_no_split_modules", None)
    if not listed:
        return
    present = {type(module).__name__ for module in model.modules()}
    kept = [name for name in listed if name in present]
    if kept and len(kept) < len(listed):
        model._no_split_modules = set(kept) if isinstance(listed, set) else kept


def describe(params: Iterable[torch.Tensor]) -> str:
    """`"fsdp2"`, `"zero3"` or `"full"` for a set of parameters (the first sharded one decides). Call `reshard_fsdp2`
    first: gathered FSDP2 parameters look whole."""
    for param in params:
        layout = parameter_layout(param)
        if layout != LAYOUT_FULL:
            return layout
    return LAYOUT_FULL


__all__ = [
    "canonical_name",
    "check_supported",
    "describe",
    "full_state_dict",
    "keep_present_layer_classes",
    "local_master",
    "local_shard",
    "parameter_layout",
    "rank_and_world",
    "release_gathered",
    "reshard_fsdp2",
    "saved_as_original_class",
]
