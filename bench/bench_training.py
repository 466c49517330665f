"""Training-step speed of the vectorised x_t ⊕ x_0 pass against an AR pass of the same backbone and the per-block loop.

    python -m bench.bench_training [--presets tiny small] [--length 256] [--block-size 4] [--batch 2]

One step = forward + backward. The vectorised pass carries 2L tokens, so ~2.0× an AR step over L tokens is the floor.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bd3lm_configuration import load_preset
from bench.common import median_time, write_results
from modeling_bd3lm import BD3LMForMaskedDiffusion


def vectorised_step(model, x_0):
    model(x_0, labels=x_0, return_dict=True).loss.backward()


def ar_step(model, x_0):
    """Next-token prediction with causal attention over L tokens: the same network with block_size = 1."""
    logits = model(x_0[:, :-1], return_dict=True).logits
    F.cross_entropy(logits.flatten(0, 1).float(), x_0[:, 1:].flatten()).backward()


def per_block_step(model, x_0):
    """One network call per block on [x_0 blocks < b ; x_t block b] (what the vectorised pass replaces)."""
    bs = model.config.block_size
    out = model(x_0, labels=x_0, return_dict=True)  # reuse its noise draw for x_t
    x_t, t = out.noisy_input_ids, out.noise_levels
    total = 0.0
    for b in range(x_0.shape[1] // bs):
        window = torch.cat((x_0[:, : b * bs], x_t[:, b * bs : (b + 1) * bs]), dim=1)
        logits = model(window, return_dict=True).logits[:, -bs:]
        loss, _ = model.block_nelbo(logits, x_0[:, b * bs : (b + 1) * bs], x_t[:, b * bs : (b + 1) * bs], t[:, b : b + 1])
        total = total + loss
    total.backward()


def run(preset: str, length: int, block_size: int, batch: int, repeats: int, loop: bool) -> dict:
    torch.manual_seed(0)
    config = load_preset(preset, model_length=length, block_size=block_size, dropout=0.0)
    model = BD3LMForMaskedDiffusion(config).train()
    ar_model = BD3LMForMaskedDiffusion(load_preset(preset, model_length=length, block_size=1, dropout=0.0)).train()
    ar_model.load_state_dict(model.state_dict())
    x_0 = torch.randint(0, config.vocab_size - 1, (batch, length))
    row = {"preset": preset, "L": length, "block_size": block_size, "batch": batch}
    row["vectorised_s"] = median_time(lambda: vectorised_step(model, x_0), repeats)
    row["ar_s"] = median_time(lambda: ar_step(ar_model, x_0), repeats)
    row["vectorised_over_ar"] = row["vectorised_s"] / row["ar_s"]
    if loop:
        row["per_block_s"] = median_time(lambda: per_block_step(model, x_0), max(1, repeats // 2))
        row["per_block_over_vectorised"] = row["per_block_s"] / row["vectorised_s"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-loop", action="store_true", help="skip the (slow) per-block loop")
    args = parser.parse_args(argv)
    rows = [run(p, args.length, args.block_size, args.batch, args.repeats, not args.no_loop) for p in args.presets]
    lines = [
        "| preset | L | L' | batch | vectorised step (s) | AR step (s) | vectorised / AR | per-block loop (s) | loop / vectorised |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['L']} | {r['block_size']} | {r['batch']} | {r['vectorised_s']:.4f} | {r['ar_s']:.4f} | "
            f"{r['vectorised_over_ar']:.2f} | {r.get('per_block_s', float('nan')):.4f} | "
            f"{r.get('per_block_over_vectorised', float('nan')):.1f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    print("written to", write_results("training_step", {"rows": rows}, table))


if __name__ == "__main__":
    main()
