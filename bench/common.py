"""Timing and reporting helpers shared by the benchmarks.

Every comparison is timed side by side: the candidates run in turn within each repeat (the starting candidate rotates),
after warm-up calls, so that a slow spell of a shared machine hits all of them alike. A ratio is the median over
repeats of the per-repeat ratio; a time is the median over repeats.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bd3lm_configuration import load_preset
from modeling_bd3lm import BD3LMConfig

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], object], device: torch.device | str | None = None, clock: Callable[[], float] = time.perf_counter
) -> tuple[float, object]:
    """(seconds, result) of one call by `clock` (wall time by default); waits for the device before and after."""
    synchronize(device)
    start = clock()
    result = fn()
    synchronize(device)
    return clock() - start, result


def median_time(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: torch.device | str | None = None
) -> float:
    """Median wall time of `fn()` in seconds after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[0] for _ in range(repeats))


def interleaved_times(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
    warmup_candidates: dict[str, Callable[[], object]] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Time every candidate once per repeat, in turn, and return `{name: [seconds per repeat]}` and the last result
    of each. `warmup_candidates` (same names) replace the candidates during warm-up, e.g. a shorter generation.
    `clock=time.process_time` counts the CPU time of this process only (on a CPU run with one thread, the work done,
    whatever else the machine runs)."""
    if repeats < 1:
        raise ValueError(f"`repeats` must be >= 1, got {repeats}.")
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            (warmup_candidates or candidates)[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, object] = {}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds, results[name] = timed(candidates[name], device, clock)
            times[name].append(seconds)
    return times, results


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over repeats of numerator[r] / denominator[r] (both measured in the same repeat)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers depend on: CPU, cores, torch threads, accelerator, library versions."""
    import transformers

    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return info


def machine_name() -> str:
    """File stem of this machine's results, e.g. `cpu-amd-epyc-2cores` or `cuda-nvidia-h200`."""
    if torch.cuda.is_available():
        label = "cuda-" + torch.cuda.get_device_name()
    else:
        label = f"cpu-{cpu_model()}-{os.cpu_count()}cores"
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-")


def write_json(path: Path, payload: dict, default: Callable[[Any], Any] = float, indent: int = 2) -> Path:
    """`payload` as JSON at `path`, written to a temporary file and renamed (an interrupted run never leaves half a
    file); `default` converts what json cannot (tensors, dataclasses, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=indent, default=default) + "\n")
    tmp.replace(path)
    return path


# The shape of tests/conftest.py's tiny configuration: the smoke test's setting.
TEST_CONFIG = dict(vocab_size=64, hidden_dim=64, cond_dim=16, n_blocks=2, n_heads=4, model_length=32, dropout=0.0)


def build_config(preset: str, length: int, block_size: int, attn: str) -> BD3LMConfig:
    """`preset` ("test", "tiny", "small", ...) at context `length`, block size `block_size`, no dropout."""
    kwargs = dict(model_length=length, block_size=block_size, dropout=0.0, attn_implementation=attn)
    if preset == "test":
        return BD3LMConfig(**{**TEST_CONFIG, **kwargs})
    return load_preset(preset, **kwargs)


__all__ = [
    "RESULTS_DIR",
    "TEST_CONFIG",
    "build_config",
    "cpu_model",
    "interleaved_times",
    "machine",
    "machine_name",
    "median_ratio",
    "median_time",
    "synchronize",
    "timed",
    "write_json",
]
