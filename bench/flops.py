"""Matmul FLOPs of one training step, counted analytically, and the matmul peak of the machine.

Model FLOPs utilisation (MFU) = counted FLOPs of a step / measured step time / measured matmul peak. The count covers
every matrix product the step executes (2·m·n·k each), forward and backward, with the attention scores computed
densely over the whole boolean mask (what `sdpa` and `eager` do with a dense mask; masked-out entries are computed
too). `tests/test_bench_smoke.py` checks the formula against `torch.utils.flop_counter.FlopCounterMode` on eager
attention, where every product is a visible `mm`/`addmm`/`bmm`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from modeling_bd3lm import BD3LMConfig
from modeling_bd3lm.layers_bd3lm import TIMESTEP_FREQUENCY_DIM

# The passes a training step may run (bench_training.py): trunk tokens per sequence and output-head tokens.
PASS_KINDS = ("vectorised", "ar", "mdlm")


def forward_flops(config: BD3LMConfig, batch: int, trunk_tokens: int, head_tokens: int) -> tuple[int, int]:
    """(forward FLOPs, FLOPs of products whose input needs no gradient) of one network call.

    Per layer: adaLN 2·B·C·6D, qkv 2·B·n·D·3D, output projection 2·B·n·D², MLP 2·2·B·n·D·rD, attention scores and
    weighted values 2·(2·B·n²·D). Then the final adaLN 2·B·C·2D and head 2·B·o·D·V, and the noise embedder
    2·B·(F·C + C²), whose first product reads fixed sinusoidal features (no input gradient).
    """
    d, c, v, r = config.hidden_dim, config.cond_dim, config.vocab_size, config.mlp_ratio
    b, n = batch, trunk_tokens
    per_layer = 2 * b * n * d * (3 * d + d + 2 * r * d) + 4 * b * n * n * d
    total = config.n_blocks * per_layer + 2 * b * head_tokens * d * v
    no_input_grad = 0
    if config.adaln:
        total += config.n_blocks * 2 * b * c * 6 * d + 2 * b * c * 2 * d
        sigma_first = 2 * b * TIMESTEP_FREQUENCY_DIM * c
        total += sigma_first + 2 * b * c * c
        no_input_grad = sigma_first
    return total, no_input_grad


def step_flops(config: BD3LMConfig, kind: str, batch: int, length: int) -> int:
    """Matmul FLOPs of one forward + backward step of `kind` over `length` tokens per sequence.

    `vectorised`: one pass over x_t ⊕ x_0 (2L trunk tokens, head on the L noisy ones); `ar` and `mdlm`: one pass over
    L tokens. Backward = two products per forward product (input and weight gradients), except that a product whose
    input needs no gradient only computes the weight gradient.
    """
    if kind not in PASS_KINDS:
        raise ValueError(f"`kind` must be one of {PASS_KINDS}, got {kind!r}.")
    trunk = 2 * length if kind == "vectorised" else length
    forward, no_input_grad = forward_flops(config, batch, trunk, length)
    return 3 * forward - no_input_grad


def per_block_loop_flops(config: BD3LMConfig, batch: int, length: int) -> int:
    """Matmul FLOPs of the per-block loop: for each block b, one pass over the window [x_0 blocks < b ; x_t block b]
    (the head runs on the whole window, as in `bench_training.per_block_step`)."""
    bs = config.block_size
    total = 0
    for block in range(length // bs):
        window = (block + 1) * bs
        forward, no_input_grad = forward_flops(config, batch, window, window)
        total += 3 * forward - no_input_grad
    return total


def matmul_peak(
    device: torch.device | str = "cpu",
    size: int | None = None,
    repeats: int = 5,
    timer: Callable | None = None,
) -> dict:
    """FLOP/s of a large float32 square matmul on `device` (median of `repeats` after one warm-up)."""
    from bench.common import median_time

    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    seconds = median_time(lambda: torch.mm(a, b), repeats=repeats, warmup=1, device=device)
    return {"size": size, "dtype": "float32", "seconds": seconds, "flops_per_s": 2 * size**3 / seconds}


__all__ = ["PASS_KINDS", "forward_flops", "matmul_peak", "per_block_loop_flops", "step_flops"]
