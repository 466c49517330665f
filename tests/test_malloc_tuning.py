"""`reuse_freed_memory` (the CLI's glibc setting): applied on glibc unless opted out, and it removes the page faults of
re-allocating large tensors. Run in child processes, since the setting is process-wide."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting exists on glibc only"
)

CHILD = """
import resource, sys
from bd3lm_trainer.cli.malloc_tuning import reuse_freed_memory
applied = reuse_freed_memory()
import torch
for _ in range(2):
    torch.ones(64 * 2**20 // 4)  # 64 MiB: above the largest mmap threshold glibc adapts to (32 MiB)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(64 * 2**20 // 4)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(env: dict[str, str]) -> tuple[bool, int]:
    import os

    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "BD3LM_GLIBC"))}
    child_env.update(env)
    out = subprocess.run([sys.executable, "-c", CHILD], env=child_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_large_allocations_are_reused_instead_of_faulted_in_again() -> None:
    applied, faults = _run({})
    default_applied, default_faults = _run({"BD3LM_GLIBC_DEFAULTS": "1"})
    assert applied and not default_applied
    # 10 fresh 64 MiB tensors fault in 10 * 16384 pages with glibc's defaults; reused heap memory is not faulted in again.
    assert default_faults > 10 * 16384 // 2
    assert faults <= default_faults / 5  # at most one tensor's pages (heap growth), not one per allocation


def test_user_malloc_settings_are_left_alone() -> None:
    applied, _ = _run({"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert not applied
