# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Keep freed tensor memory in the process on glibc, for the `bd3lm` command line.

glibc serves every allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh `mmap` and
returns it to the kernel on `free`. A CPU training step allocates and frees tensors of tens of MiB (the tiny preset's
logits alone are batch x L x 8192 floats), so every step faults all of those pages in again: measured on the tiny
preset (batch 16, L=128, 1 thread) ~94k minor page faults and 0.19 s of kernel time per step, about 20% of the step's
CPU time. Raising the mmap and trim thresholds lets the heap reuse the memory instead (~1k faults, 0.002 s).

This is a process-wide setting, so only the command line applies it (a library must not); Python users can call
`reuse_freed_memory()` themselves or run with `MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_` set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30  # 1 GiB: above any single tensor of the presets the CLI trains on CPU
OPT_OUT = "BD3LM_GLIBC_DEFAULTS"


def reuse_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds to `threshold` bytes; returns whether the setting was applied.

    Nothing is changed (and False returned) off glibc, when `BD3LM_GLIBC_DEFAULTS=1`, or when the user already tunes
    malloc through `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if os.environ.get(OPT_OUT, "0") not in ("", "0") or any(
        name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    ):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))


__all__ = ["OPT_OUT", "THRESHOLD", "reuse_freed_memory"]
