# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Where a gated adapter acts: `adapter_gate(backbone, active_last)`.

STUB (decoding-modes branch): the gated adapter (PEFT activated LoRA acting only at noisy / mask-holding positions) is
built on the clean-stream branch, whose `gating_bd3lm.py` replaces this file at merge with the same signature. Until
then no layer has a gated variant, so the gate has nothing to switch and is a no-op; the decoding modes already call it
where the adapter must be off (the clean stream) or on (the draft positions).

A leaf of the package: it imports only torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def adapter_gate(backbone: torch.nn.Module, active_last: int | None) -> Iterator[None]:
    """Inside the block, every gated LoRA layer of `backbone` applies its update only on the last `active_last`
    positions of each row (0: off everywhere; None: PEFT's own behaviour). A no-op when there is no such adapter (always,
    in this stub)."""
    yield


__all__ = ["adapter_gate"]
