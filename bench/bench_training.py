"""Training-step speed: the vectorised x_t ⊕ x_0 pass against an AR pass and an MDLM pass of the same backbone, and
against the per-block loop it replaces; attention kernels; sweeps over length, block size and batch; MFU.

    python -m bench --only training [--quick]

One step = `zero_grad` + forward + backward (no optimizer). The passes, all on the same weights:

* `vectorised`: `model(x_0, labels=x_0)`, one pass over 2L tokens with the three-part mask (Sec. 3.2 of the paper).
* `ar`: next-token prediction over L tokens, the same network with block_size = 1 (causal attention).
* `mdlm`: one pass over the L noisy tokens with block_size = L (bidirectional attention), NELBO of the masked ones.
* `per_block_loop`: for each block b, a pass over [x_0 blocks < b ; x_t block b], summed (what the vectorised pass
  replaces; the official code's naive alternative).
* `compiled`: the `vectorised` step through `torch.compile(model, fullgraph=True)` (inductor; the forward, loss and
  noise draw included, one graph), against the eager `vectorised` step in the `compile` group. The warm-up calls
  compile; compilation time is not in the step time.

The vectorised pass carries 2L tokens, so about 2.0x an AR step is its floor.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.common import build_config, interleaved_times, median_ratio
from bench.flops import matmul_peak, per_block_loop_flops, step_flops
from modeling_bd3lm import BD3LMForMaskedDiffusion

PASSES = ("vectorised", "ar", "mdlm", "per_block_loop", "compiled")


# ----------------------------------------------------------------------------------------------------------------------
# One training step of each pass


def vectorised_step(model: BD3LMForMaskedDiffusion, x_0: torch.LongTensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x_0, labels=x_0, return_dict=True).loss.backward()


def ar_step(model: BD3LMForMaskedDiffusion, x: torch.LongTensor) -> None:
    """Next-token prediction over the first L of L + 1 tokens: the sampling pass with block_size = 1 is causal."""
    model.zero_grad(set_to_none=True)
    logits = model(x[:, :-1], return_dict=True).logits
    F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten()).backward()


def mdlm_step(model: BD3LMForMaskedDiffusion, x_0: torch.LongTensor) -> None:
    """MDLM: one block spanning the sequence, so the sampling pass over x_t is bidirectional; NELBO as in Eq. (8)."""
    model.zero_grad(set_to_none=True)
    x_t, t = model.draw_noise(x_0)
    logits = model(x_t, return_dict=True).logits
    model.block_nelbo(logits, x_0, x_t, t)[0].backward()


def per_block_step(model: BD3LMForMaskedDiffusion, x_0: torch.LongTensor) -> None:
    """One network call per block b on [x_0 blocks < b ; x_t block b]; the block NELBO terms are summed."""
    model.zero_grad(set_to_none=True)
    bs = model.config.block_size
    x_t, t = model.draw_noise(x_0)
    total = 0.0
    for b in range(x_0.shape[1] // bs):
        window = torch.cat((x_0[:, : b * bs], x_t[:, b * bs : (b + 1) * bs]), dim=1)
        logits = model(window, return_dict=True).logits[:, -bs:]
        block = slice(b * bs, (b + 1) * bs)
        total = total + model.block_nelbo(logits, x_0[:, block], x_t[:, block], t[:, b : b + 1])[0]
    total.backward()


def make_step(
    kind: str,
    preset: str,
    length: int,
    block_size: int,
    batch: int,
    attn: str,
    *,
    state: dict,
    device: torch.device,
    compile_backend: str = "inductor",
) -> tuple[Callable[[], None], int]:
    """The step closure of one pass (its model loaded with the shared `state` weights) and its counted FLOPs."""
    pass_block = {"ar": 1, "mdlm": length}.get(kind, block_size)
    config = build_config(preset, length, pass_block, attn)
    model = BD3LMForMaskedDiffusion(config)
    model.load_state_dict(state)
    model.to(device).train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size - 1, (batch, length + 1), generator=g).to(device)
    x_0 = tokens[:, :length]
    if kind == "vectorised":
        return (lambda: vectorised_step(model, x_0)), step_flops(config, "vectorised", batch, length)
    if kind == "compiled":
        compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
        return (lambda: vectorised_step(compiled, x_0)), step_flops(config, "vectorised", batch, length)
    if kind == "ar":
        return (lambda: ar_step(model, tokens)), step_flops(config, "ar", batch, length)
    if kind == "mdlm":
        return (lambda: mdlm_step(model, x_0)), step_flops(config, "mdlm", batch, length)
    if kind == "per_block_loop":
        return (lambda: per_block_step(model, x_0)), per_block_loop_flops(config, batch, length)
    raise ValueError(f"Unknown pass {kind!r}; choose one of {PASSES}.")


# ----------------------------------------------------------------------------------------------------------------------
# The plan: groups of candidates timed side by side


def training_plan(mode: str, device: torch.device) -> list[dict]:
    """Groups to measure. Each group is one setting (preset, L, L', batch) whose passes × kernels run interleaved.

    `full` (default): the kernel comparison at tiny L=256, L'=4, batch 2; one-at-a-time sweeps of L (128 to 1024),
    L' (4, 8, 16) and batch (1 to 8) around it; the small preset at L=256 (batch 1: a step takes seconds on a CPU);
    the per-block loop at L=128. `quick`: the kernel comparison at tiny L=128 and a short loop. `smoke`: the test
    configuration.
    """
    kernels = ["sdpa", "eager"] + (["flex_attention"] if device.type == "cuda" else [])
    if mode == "smoke":  # the compile group with the aot_eager backend: the code path without inductor's build time
        return [
            dict(
                name="kernels",
                preset="test",
                length=32,
                block_size=4,
                batch=2,
                passes=["vectorised", "ar", "mdlm"],
                attn=kernels,
                repeats=1,
                warmup=0,
            ),
            dict(
                name="per-block loop",
                preset="test",
                length=32,
                block_size=4,
                batch=2,
                passes=["per_block_loop", "vectorised"],
                attn=["sdpa"],
                repeats=1,
                warmup=0,
            ),
            dict(
                name="compile",
                preset="test",
                length=32,
                block_size=4,
                batch=2,
                passes=["compiled", "vectorised"],
                attn=["sdpa"],
                repeats=1,
                warmup=1,
                compile_backend="aot_eager",
            ),
        ]
    if mode == "quick":
        return [
            dict(
                name="kernels",
                preset="tiny",
                length=128,
                block_size=4,
                batch=2,
                passes=["vectorised", "ar", "mdlm"],
                attn=kernels,
                repeats=3,
                warmup=1,
            ),
            dict(
                name="per-block loop",
                preset="tiny",
                length=64,
                block_size=4,
                batch=2,
                passes=["per_block_loop", "vectorised"],
                attn=["sdpa"],
                repeats=3,
                warmup=1,
            ),
            dict(
                name="compile",
                preset="tiny",
                length=128,
                block_size=4,
                batch=2,
                passes=["compiled", "vectorised"],
                attn=["sdpa"],
                repeats=3,
                warmup=2,
            ),
        ]
    base = dict(preset="tiny", length=256, block_size=4, batch=2, attn=["sdpa"], repeats=5, warmup=1)
    plan = [dict(base, name="kernels", passes=["vectorised", "ar", "mdlm"], attn=kernels, repeats=7)]
    for length in (128, 512, 1024):
        plan.append(
            dict(
                base,
                name="length",
                length=length,
                passes=["vectorised", "ar", "mdlm"],
                repeats=3 if length == 1024 else 5,
            )
        )
    for block_size in (8, 16):
        plan.append(dict(base, name="block size", block_size=block_size, passes=["vectorised", "ar"]))
    for batch in (1, 4, 8):
        plan.append(dict(base, name="batch", batch=batch, passes=["vectorised", "ar"]))
    plan.append(dict(base, name="small preset", preset="small", batch=1, passes=["vectorised", "ar"], repeats=3))
    plan.append(dict(base, name="per-block loop", length=128, passes=["per_block_loop", "vectorised"], repeats=3))
    # warm-up 2: the first call compiles the forward, the first backward the backward graph
    plan.append(dict(base, name="compile", passes=["compiled", "vectorised"], warmup=2))
    return plan


def run_group(group: dict, device: torch.device, states: dict) -> list[dict]:
    """Time one group side by side; one row per (pass, kernel) with its median time, ratios and counted FLOPs."""
    preset = group["preset"]
    if preset not in states:  # one set of weights per preset, shared by every pass (they do not depend on L or L')
        torch.manual_seed(0)
        states[preset] = copy.deepcopy(BD3LMForMaskedDiffusion(build_config(preset, 32, 4, "sdpa")).state_dict())
    steps, flops = {}, {}
    for attn in group["attn"]:
        for kind in group["passes"]:
            key = f"{kind}/{attn}"
            steps[key], flops[key] = make_step(
                kind,
                preset,
                group["length"],
                group["block_size"],
                group["batch"],
                attn,
                state=states[preset],
                device=device,
                compile_backend=group.get("compile_backend", "inductor"),
            )
    times, _ = interleaved_times(steps, group["repeats"], group["warmup"], device)
    rows = []
    for key, seconds in times.items():
        kind, attn = key.split("/")
        row = {
            "group": group["name"],
            "device": device.type,
            "preset": preset,
            "L": group["length"],
            "block_size": group["block_size"],
            "batch": group["batch"],
            "pass": kind,
            "attn": attn,
            "seconds": statistics.median(seconds),
            "times": seconds,
            "flops": flops[key],
        }
        for reference in ("ar", "vectorised", "sdpa"):
            ref_key = f"{kind}/sdpa" if reference == "sdpa" else f"{reference}/{attn}"
            if ref_key in times and ref_key != key:
                row[f"over_{reference}"] = median_ratio(seconds, times[ref_key])
        rows.append(row)
    return rows


def run_training(mode: str, device: torch.device, log: Callable[[str], None] = print) -> dict:
    """Run the plan on `device`; MFU uses the larger of two matmul-peak measurements taken before and after."""
    peak_repeats = 1 if mode == "smoke" else 5
    peak_size = 256 if mode == "smoke" else None
    peaks = [matmul_peak(device, peak_size, peak_repeats)]
    log(f"matmul peak ({device.type}, fp32 {peaks[0]['size']}^2): {peaks[0]['flops_per_s'] / 1e9:.1f} GFLOP/s")
    rows: list[dict] = []
    states: dict = {}
    for group in training_plan(mode, device):
        rows += run_group(group, device, states)
        for row in rows[-len(group["passes"]) * len(group["attn"]) :]:
            log(
                f"  {row['group']:>14} {row['preset']} L={row['L']} L'={row['block_size']} B={row['batch']} "
                f"{row['pass']}/{row['attn']}: {row['seconds'] * 1e3:.1f} ms"
                + (f", {row['over_ar']:.2f}x AR" if "over_ar" in row else "")
            )
    peaks.append(matmul_peak(device, peak_size, peak_repeats))
    peak = max(p["flops_per_s"] for p in peaks)
    for row in rows:
        row["flops_per_s"] = row["flops"] / row["seconds"]
        row["mfu"] = row["flops_per_s"] / peak
    return {
        "device": device.type,
        "torch_threads": torch.get_num_threads(),
        "matmul_peak": peaks,
        "peak_flops_per_s": peak,
        "rows": rows,
    }


__all__ = [
    "PASSES",
    "ar_step",
    "make_step",
    "mdlm_step",
    "per_block_step",
    "run_group",
    "run_training",
    "training_plan",
    "vectorised_step",
]
