"""Generation speed, network calls per token and memory: uncached vs cached block sampling, parallel decoding, and an
autoregressive decode of the same backbone.

    python -m bench --only generation [--model runs/bench-tiny] [--quick]

Four measurements:

* `cache`: the tiny preset with random weights and a long window (L = 1024), 1024 new tokens from BOS, batch 1:
  `use_cache=False` (the whole window at every call) against the KV cache (default), both first-hitting (one token per
  call), and the AR decode.
* `samplers`: `--model` (a trained checkpoint; else the tiny preset with random weights, L = 128), for L' = 4, 8, 16 and
  batch 1 and 8: uncached, cached, `confidence_threshold` 0.9 / 0.7 / 0.5, `topk_confidence` with 2 tokens per call,
  and the AR decode, side by side. A trained checkpoint is run at other block sizes by changing L' only.
* `rng`: the cost of per-row random streams (`seed=[0, ..., 7]`, batch-invariant) against one stream shared by the
  batch (`generator=`), at batch 8, L = 128, L' = 4, for `first_hitting` and `ddpm` sampling and greedy `first_hitting`
  (`--model` or the tiny preset). `python -c "from bench.bench_generation import run_rng; run_rng('full', 'cpu')"`
  runs it alone.
* `memory`: in a fresh process per run, the peak memory of one cached generation of 1x, 4x and 10x `model_length`
  tokens, and the KV cache's bytes per cached token.

Every run samples (`do_sample=True`, generate's defaults otherwise, row r seeded with r), so repeats make the same
tokens. EOS is
disabled (set to the mask id, which is never sampled) so that every row makes exactly the requested tokens. The AR
decode uses the same weights with block_size = 1 and a KV cache: one call per token holding [previous token, mask],
committing the former (the mask's keys are dropped); top-k 50 sampling like generate's default.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache

from bench.common import build_config, interleaved_times, median_ratio
from modeling_bd3lm import CACHE_FIELD, BD3LMConfig, BD3LMForMaskedDiffusion, trim_cache_left
from modeling_bd3lm.cache_bd3lm import trim_cache_right
from modeling_bd3lm.sampling_bd3lm import RowGenerators, suppress_mask_logit, uniform

MODES: dict[str, dict] = {
    "uncached": dict(use_cache=False, sampler="first_hitting"),
    "cached": dict(sampler="first_hitting"),
    "threshold 0.9": dict(confidence_threshold=0.9),
    "threshold 0.7": dict(confidence_threshold=0.7),
    "threshold 0.5": dict(confidence_threshold=0.5),
    "topk_confidence k=2": dict(sampler="topk_confidence", tokens_per_step=2),
}
AR_MODE = "AR (KV cache)"
# The cost of per-row random streams (`seed=` a list: one CPU generator per row, batch-invariant samples) against one
# stream shared by the batch (`generator=`, the only seeded path before), for the samplers that draw the most: both
# draw one uniform per position per step for the tokens, and another per position for the positions revealed.
RNG_MODES: dict[str, dict] = {
    "first_hitting, shared stream": dict(sampler="first_hitting", rng="shared"),
    "first_hitting, per-row streams": dict(sampler="first_hitting"),
    "ddpm, shared stream": dict(sampler="ddpm", rng="shared"),
    "ddpm, per-row streams": dict(sampler="ddpm"),
    "greedy first_hitting, shared stream": dict(sampler="first_hitting", do_sample=False, rng="shared"),
    "greedy first_hitting, per-row streams": dict(sampler="first_hitting", do_sample=False),
}


def load_model(
    path: str | None, block_size: int, model_length: int, preset: str = "tiny", device: torch.device | str = "cpu"
) -> BD3LMForMaskedDiffusion:
    """A checkpoint with its L' replaced, or `preset` with random non-zero weights (seed 0, the same for every L')."""
    if path is not None:
        model = BD3LMForMaskedDiffusion.from_pretrained(path, block_size=block_size)
    else:
        torch.manual_seed(0)
        model = BD3LMForMaskedDiffusion(build_config(preset, model_length, block_size, "sdpa"))
        with torch.no_grad():  # the zero-initialised head and adaLN would make every prediction uniform
            for name, param in model.named_parameters():
                if param.dim() > 1:
                    param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
                else:
                    param.copy_(0.1 * torch.randn_like(param) + (1.0 if "norm" in name else 0.0))
    return model.to(device).eval()


def bos_prompt(model: BD3LMForMaskedDiffusion, batch: int) -> torch.LongTensor:
    bos = getattr(model.config, "bos_token_id", None)
    bos = 0 if bos is None else bos
    return torch.full((batch, 1), bos, dtype=torch.long, device=model.device)


def generate_run(
    model: BD3LMForMaskedDiffusion, batch: int, new_tokens: int, rng: str = "per-row", do_sample: bool = True, **kwargs
) -> Callable[[], dict]:
    """A closure that runs one generation and returns its call counts. `rng="per-row"` seeds row r with r (the rows
    differ, and each equals its prompt generated alone); `"shared"` draws from one generator seeded with 0."""
    prompt = bos_prompt(model, batch)

    def run() -> dict:
        source = {"seed": list(range(batch))} if rng == "per-row" else {"generator": torch.Generator().manual_seed(0)}
        out = model.generate(
            prompt,
            max_new_tokens=new_tokens,
            do_sample=do_sample,
            eos_token_id=model.config.mask_token_id,
            return_dict_in_generate=True,
            **source,
            **kwargs,
        )
        if out.sequences.shape != (batch, 1 + new_tokens):
            raise RuntimeError(f"expected {new_tokens} new tokens per row, got shape {tuple(out.sequences.shape)}")
        nfe = out.nfe.double().mean().item()
        return {"nfe_per_row": nfe, "forwards": out.num_forwards}

    return run


@torch.no_grad()
def ar_run(model: BD3LMForMaskedDiffusion, batch: int, new_tokens: int) -> Callable[[], dict]:
    """A closure that decodes `new_tokens` per row autoregressively with a KV cache (module docstring)."""
    if model.config.block_size != 1:
        raise ValueError(f"The AR decode needs a block_size=1 model, got block_size={model.config.block_size}.")
    mask_id, length = model.config.mask_token_id, model.config.model_length

    @torch.no_grad()
    def run() -> dict:
        g = torch.Generator().manual_seed(0)
        cache, token = DynamicCache(), bos_prompt(model, batch)
        masks = torch.full_like(token, mask_id)
        for _ in range(new_tokens):
            if cache.get_seq_length() + 2 > length:
                trim_cache_left(cache, cache.get_seq_length() + 2 - length)
            logits = model(torch.cat((token, masks), 1), cache=cache, use_cache=True, return_dict=True)
            trim_cache_right(cache, 1)  # drop the mask's keys and values: only the real token stays committed
            scores = suppress_mask_logit(logits.logits[:, -1].double(), mask_id)
            top = scores.topk(min(50, scores.shape[-1]), dim=-1)
            pick = torch.multinomial(top.values.softmax(-1).cpu(), 1, generator=g).to(scores.device)
            token = top.indices.gather(-1, pick)
        return {"nfe_per_row": float(new_tokens), "forwards": new_tokens}

    return run


def time_modes(
    models: dict[str, BD3LMForMaskedDiffusion],
    modes: list[str],
    batch: int,
    new_tokens: int,
    repeats: int,
    device: torch.device,
    warmup_tokens: int = 32,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict]:
    """Time `modes` side by side (AR on `models['ar']`, the rest on `models['bd3lm']`); one row per mode."""

    def candidate(mode: str, tokens: int) -> Callable[[], dict]:
        if mode == AR_MODE:
            return ar_run(models["ar"], batch, tokens)
        return generate_run(models["bd3lm"], batch, tokens, **{**MODES, **RNG_MODES}[mode])

    candidates = {mode: candidate(mode, new_tokens) for mode in modes}
    warmups = {mode: candidate(mode, min(warmup_tokens, new_tokens)) for mode in modes}
    times, results = interleaved_times(
        candidates, repeats, warmup=1, device=device, warmup_candidates=warmups, clock=clock
    )
    config = models["bd3lm"].config
    rows = []
    for mode in modes:
        seconds = statistics.median(times[mode])
        row = {
            "mode": mode,
            "device": device.type,
            "block_size": 1 if mode == AR_MODE else config.block_size,
            "model_length": config.model_length,
            "batch": batch,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "seconds": seconds,
            "times": times[mode],
            "tokens_per_s": batch * new_tokens / seconds,
            # denoising calls a row needed per token (the paper's NFE), and every batched call per token position
            # (the cached path writes committed tokens inside denoising calls, so it has no other calls)
            "calls_per_token": results[mode]["nfe_per_row"] / new_tokens,
            "forwards_per_token": results[mode]["forwards"] / new_tokens,
            "tokens_per_call": new_tokens / results[mode]["nfe_per_row"],
        }
        for reference, key in (
            ("uncached", "speedup_vs_uncached"),
            ("cached", "speedup_vs_cached"),
            (AR_MODE, "speedup_vs_ar"),
        ):
            if reference in times and reference != mode:
                row[key] = median_ratio(times[reference], times[mode])  # time ratio = tokens/s ratio
        rows.append(row)
    return rows


def time_rng(
    model: BD3LMForMaskedDiffusion, batch: int, new_tokens: int, repeats: int, device: torch.device
) -> list[dict]:
    """`RNG_MODES` side by side; each per-row row gets `per_row_over_shared`, the median per-repeat time ratio to
    its shared-stream twin (> 1: per-row streams are slower). On the CPU the times are the process's CPU time: the
    difference is a few percent at most, below the wall-clock noise of a shared machine."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    rows = time_modes({"bd3lm": model}, list(RNG_MODES), batch, new_tokens, repeats, device, clock=clock)
    by_mode = {row["mode"]: row for row in rows}
    for row in rows:
        if row["mode"].endswith("per-row streams"):
            shared = by_mode[row["mode"].replace("per-row streams", "shared stream")]
            row["per_row_over_shared"] = median_ratio(row["times"], shared["times"])
        row["clock"] = clock.__name__
    return rows


def rng_draw_cost(batch: int, block_size: int, repeats: int = 5, steps: int = 2000) -> dict:
    """CPU microseconds per denoising step spent drawing random numbers, with per-row streams and with one shared
    stream, side by side (process time, `repeats` medians of `steps` steps): the two (batch, block_size) draws of a
    sampling step (`first_hitting` and `ddpm` draw one uniform per position for the tokens, one for the positions)."""
    active = torch.ones(batch, dtype=torch.bool)

    def shared() -> None:
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            uniform((batch * block_size, 1), generator, torch.device("cpu"))
            uniform((batch, block_size), generator, torch.device("cpu"))

    def per_row() -> None:
        generators = RowGenerators.from_seeds(range(batch))
        for _ in range(steps):
            uniform((batch, block_size), generators, torch.device("cpu"), active)
            uniform((batch, block_size), generators, torch.device("cpu"), active)

    times, _ = interleaved_times({"shared": shared, "per_row": per_row}, repeats, clock=time.process_time)
    return {
        "batch": batch,
        "block_size": block_size,
        "shared_us_per_step": statistics.median(times["shared"]) / steps * 1e6,
        "per_row_us_per_step": statistics.median(times["per_row"]) / steps * 1e6,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Memory, in a fresh process per measurement


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * __import__("resource").getpagesize() / 2**20


def peak_rss_mib() -> float | None:
    """VmHWM (the process's peak resident memory since the last reset), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes, cached tokens per row) of a DynamicCache, summed over layers, keys and values."""
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total, cache.layers[0].keys.shape[-2]


def measure_memory(
    path: str | None, preset: str, block_size: int, model_length: int, new_tokens: int, device: str = "cpu"
) -> dict:
    """Peak memory of one cached generation after a short warm-up one (so lazily allocated buffers are in the
    baseline): process peak RSS (CPU) or the allocator's peak (CUDA), and the final KV cache's bytes per token."""
    torch.set_num_threads(1)
    model = load_model(path, block_size, model_length, preset, device)
    prompt = bos_prompt(model, 1)
    kwargs = dict(do_sample=True, seed=0, eos_token_id=model.config.mask_token_id, return_dict_in_generate=True)
    model.generate(prompt, max_new_tokens=4 * block_size, **kwargs)
    result: dict = {"new_tokens": new_tokens, "model_length": model.config.model_length, "block_size": block_size}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss_mib()
        sampled = [before]
        exact = reset_peak_rss()
        hook = model.register_forward_pre_hook(lambda module, args: sampled.append(current_rss_mib()))
    out = model.generate(prompt, max_new_tokens=new_tokens, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["baseline_mib"] = before / 2**20
        result["measure"] = "torch.cuda.max_memory_allocated"
    else:
        hook.remove()
        hwm = peak_rss_mib() if exact else None
        result["peak_mib"] = max(hwm, max(sampled)) if hwm is not None else max(sampled)
        result["baseline_mib"] = before
        result["measure"] = "peak RSS (VmHWM)" if hwm is not None else "RSS sampled at every network call"
    result["growth_mib"] = result["peak_mib"] - result["baseline_mib"]
    kv, cached = cache_bytes(getattr(out, CACHE_FIELD))
    config = model.config
    element = next(model.parameters()).element_size()
    result.update(
        kv_bytes=kv,
        cached_tokens=cached,
        kv_bytes_per_token=kv / cached,
        formula_bytes_per_token=2 * config.n_blocks * config.hidden_dim * element,
    )
    return result


def memory_in_child(
    path: str | None, preset: str, block_size: int, model_length: int, new_tokens: int, device: str
) -> dict:
    code = (
        "import json, sys; from bench.bench_generation import measure_memory; "
        "print(json.dumps(measure_memory(*json.loads(sys.argv[1]))))"
    )
    args = json.dumps([path, preset, block_size, model_length, new_tokens, device])
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    command = [sys.executable, "-c", code, args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the memory measurement failed in its child process:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------------
# The plan


def generation_plan(mode: str, model_path: str | None) -> dict:
    """Settings of the three measurements for `full`, `quick` and `smoke` runs (module docstring)."""
    every = [*MODES, AR_MODE]
    if mode == "smoke":
        return dict(
            preset="test",
            cache=dict(model_length=32, new_tokens=16, block_sizes=[4], repeats=1),
            samplers=dict(model_length=32, new_tokens=8, block_sizes=[4], batches=[2], modes=every, repeats=1),
            rng=dict(model_length=32, block_size=4, batch=2, new_tokens=8, repeats=1),
            memory=dict(model_length=16, block_size=4, multiples=[1, 4, 10], subprocess=False),
        )
    if mode == "quick":
        return dict(
            preset="tiny",
            cache=dict(model_length=256, new_tokens=256, block_sizes=[4], repeats=2),
            samplers=dict(model_length=128, new_tokens=128, block_sizes=[4], batches=[1, 8], modes=every, repeats=2),
            rng=dict(model_length=128, block_size=4, batch=8, new_tokens=64, repeats=2),
            memory=dict(model_length=128, block_size=4, multiples=[1, 4, 10], subprocess=True),
        )
    return dict(
        preset="tiny",
        cache=dict(model_length=1024, new_tokens=1024, block_sizes=[4], repeats=3),
        samplers=dict(model_length=128, new_tokens=256, block_sizes=[4, 8, 16], batches=[1, 8], modes=every, repeats=3),
        rng=dict(model_length=128, block_size=4, batch=8, new_tokens=256, repeats=5),
        memory=dict(model_length=1024, block_size=4, multiples=[1, 4, 10], subprocess=True),
    )


def run_generation(
    mode: str, device: torch.device, model_path: str | None = None, log: Callable[[str], None] = print
) -> dict:
    """The three measurements on `device` with one torch thread (small decode calls only slow down with more)."""
    plan = generation_plan(mode, model_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        preset, rows = plan["preset"], []
        cache = plan["cache"]
        for bs in cache["block_sizes"]:
            models = {
                "bd3lm": load_model(None, bs, cache["model_length"], preset, device),
                "ar": load_model(None, 1, cache["model_length"], preset, device),
            }
            for row in time_modes(
                models, ["uncached", "cached", AR_MODE], 1, cache["new_tokens"], cache["repeats"], device
            ):
                rows.append({"group": "cache", "model": f"{preset} (random weights)", **row})
                log_row(log, rows[-1])
        grid = plan["samplers"]
        model_name = model_path or f"{preset} (random weights)"
        for bs in grid["block_sizes"]:
            models = {
                "bd3lm": load_model(model_path, bs, grid["model_length"], preset, device),
                "ar": load_model(model_path, 1, grid["model_length"], preset, device),
            }
            for batch in grid["batches"]:
                for row in time_modes(models, grid["modes"], batch, grid["new_tokens"], grid["repeats"], device):
                    rows.append({"group": "samplers", "model": model_name, "trained": model_path is not None, **row})
                    log_row(log, rows[-1])
        rows += run_rng(plan, device, model_path, log)
        memory = []
        spec = plan["memory"]
        for multiple in spec["multiples"]:
            args = (
                None,
                preset,
                spec["block_size"],
                spec["model_length"],
                multiple * spec["model_length"],
                device.type,
            )
            result = memory_in_child(*args) if spec["subprocess"] else measure_memory(*args)
            memory.append({"multiple": multiple, "fresh_process": spec["subprocess"], "device": device.type, **result})
            log(
                f"  memory {multiple:>2}x L: peak {result['peak_mib']:.1f} MiB (growth {result['growth_mib']:.1f}), "
                f"KV {result['kv_bytes_per_token']:.0f} B/token (formula {result['formula_bytes_per_token']})"
            )
    finally:
        torch.set_num_threads(threads)
    native = BD3LMConfig.from_pretrained(model_path).block_size if model_path else None
    return {
        "device": device.type,
        "torch_threads": 1,
        "model": model_name,
        "native_block_size": native,
        "rows": rows,
        "memory": memory,
    }


def run_rng(
    plan: dict | str, device: torch.device | str, model_path: str | None = None, log: Callable[[str], None] = print
) -> list[dict]:
    """The `rng` rows of `plan` (or of the plan named `full`, `quick`, `smoke`), one torch thread."""
    plan = generation_plan(plan, model_path) if isinstance(plan, str) else plan
    device = torch.device(device)
    spec, threads = plan["rng"], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_model(model_path, spec["block_size"], spec["model_length"], plan["preset"], device)
        name = model_path or f"{plan['preset']} (random weights)"
        rows = []
        draws = rng_draw_cost(spec["batch"], spec["block_size"], repeats=spec["repeats"])
        log(
            f"  random draws per step at batch {spec['batch']}: {draws['per_row_us_per_step']:.1f} us with per-row "
            f"streams, {draws['shared_us_per_step']:.1f} us with one shared stream (CPU time)"
        )
        for row in time_rng(model, spec["batch"], spec["new_tokens"], spec["repeats"], device):
            if "per_row_over_shared" in row:
                row["draw_cost"] = draws
            rows.append({"group": "rng", "model": name, **row})
            log_row(log, rows[-1])
    finally:
        torch.set_num_threads(threads)
    return rows


def log_row(log: Callable[[str], None], row: dict) -> None:
    log(
        f"  {row['group']:>8} L'={row['block_size']:<2} B={row['batch']} {row['mode']:<20} "
        f"{row['tokens_per_s']:8.1f} tok/s  {row['tokens_per_call']:.2f} tok/call"
        + (f"  {row['speedup_vs_ar']:.2f}x AR" if "speedup_vs_ar" in row else "")
        + (f"  {row['per_row_over_shared']:.3f}x the shared stream's time" if "per_row_over_shared" in row else "")
    )


__all__ = [
    "AR_MODE",
    "MODES",
    "RNG_MODES",
    "ar_run",
    "cache_bytes",
    "generate_run",
    "generation_plan",
    "load_model",
    "measure_memory",
    "run_generation",
    "rng_draw_cost",
    "run_rng",
    "time_modes",
    "time_rng",
]
