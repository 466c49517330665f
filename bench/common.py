"""Timing helpers shared by the benchmark scripts: warm-up, median of repeats, machine description."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def machine_name() -> str:
    return "cuda" if torch.cuda.is_available() else f"cpu-{torch.get_num_threads()}threads"


def write_results(name: str, payload: dict, markdown: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"{name}-{machine_name()}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    stem.with_suffix(".md").write_text(markdown)
    return stem.with_suffix(".md")
