"""Generation speed, network calls per token and memory: uncached vs cached block sampling, parallel decoding, and an
autoregressive decode of the same backbone.

    PYTHONPATH=. python -m bench.bench_generation [--model runs/tiny] [--new-tokens 1024] [--block-sizes 4 8 16]

Per block size L', one run each of `generate()` from BOS with: `use_cache=False` (the whole window every call), the KV
cache (default), and `confidence_threshold` 0.9 / 0.7 (cached); all first-hitting except the threshold runs. The AR row
decodes the same weights with `block_size=1` and the KV cache, one token per network call (the new token and the next
mask go in one call; the mask's keys are dropped afterwards). Memory: in a fresh process, the largest resident memory
at any network call and the KV cache's bytes per cached token, after 1x and 4x `model_length` new tokens.

Without `--model` the tiny preset is randomly initialised: fine for speed and memory, but its flat predictions keep
the confidence samplers at about one token per call (the paper's speed-ups need a trained model).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from transformers import DynamicCache

from bd3lm_configuration import load_preset
from bench.common import machine, write_results
from modeling_bd3lm import BD3LMForMaskedDiffusion, trim_cache_left


def load_model(path: str | None, block_size: int, model_length: int) -> BD3LMForMaskedDiffusion:
    """A trained checkpoint with its L' replaced, or the tiny preset with random non-zero weights (seed 0)."""
    if path is not None:
        return BD3LMForMaskedDiffusion.from_pretrained(path, block_size=block_size).eval()
    torch.manual_seed(0)
    model = BD3LMForMaskedDiffusion(load_preset("tiny", block_size=block_size, model_length=model_length, dropout=0.0))
    with torch.no_grad():  # the zero-initialised head and adaLN would make every prediction uniform
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
            else:
                param.copy_(0.1 * torch.randn_like(param) + (1.0 if "norm" in name else 0.0))
    return model.eval()


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes, cached tokens) of a DynamicCache, summed over layers, keys and values."""
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total, cache.layers[0].keys.shape[-2]


def run_generate(model, new_tokens: int, **kwargs) -> dict:
    bos = torch.zeros((1, 1), dtype=torch.long)
    start = time.perf_counter()
    out = model.generate(bos, max_new_tokens=new_tokens, do_sample=True, seed=0, return_dict_in_generate=True, **kwargs)
    seconds = time.perf_counter() - start
    return {
        "tokens_per_s": new_tokens / seconds,
        "nfe_per_token": int(out.nfe[0]) / new_tokens,
        "forwards_per_token": out.num_forwards / new_tokens,
        "tokens_per_nfe": float(out.tokens_per_forward[0]),
        "seconds": seconds,
    }


@torch.no_grad()
def run_ar(model, new_tokens: int) -> dict:
    """Autoregressive decode with a KV cache: each call holds [previous token, mask] and commits only the former."""
    mask, length = model.config.mask_token_id, model.config.model_length
    g = torch.Generator().manual_seed(0)
    cache, token, calls = DynamicCache(), torch.zeros((1, 1), dtype=torch.long), 0
    start = time.perf_counter()
    for _ in range(new_tokens):
        if cache.get_seq_length() + 2 > length:
            trim_cache_left(cache, cache.get_seq_length() + 2 - length)
        logits = (
            model(
                torch.cat((token, torch.full_like(token, mask)), 1),
                past_key_values=cache,
                use_cache=True,
                return_dict=True,
            )
            .logits[:, -1]
            .double()
        )
        calls += 1
        trim_cache_left_last(cache)
        logits[:, mask] = float("-inf")
        token = torch.multinomial(logits.softmax(-1), 1, generator=g)
    seconds = time.perf_counter() - start
    return {
        "tokens_per_s": new_tokens / seconds,
        "nfe_per_token": calls / new_tokens,
        "forwards_per_token": calls / new_tokens,
        "tokens_per_nfe": new_tokens / calls,
        "seconds": seconds,
    }


def trim_cache_left_last(cache) -> None:
    """Drop the most recent cached token (the mask of the fused AR call)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :-1], layer.values[:, :, :-1]


def current_rss_mib() -> float:
    """Resident memory now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_child(path: str | None, block_size: int, model_length: int, new_tokens: int) -> dict:
    """Run in a fresh process: the largest resident memory seen at any network call of one cached generation (minus
    the memory before it), and the bytes of the final KV cache."""
    model = load_model(path, block_size, model_length)
    before = current_rss_mib()
    peak = [before]
    hook = model.register_forward_pre_hook(lambda module, args: peak.append(current_rss_mib()))
    out = model.generate(
        torch.zeros((1, 1), dtype=torch.long),
        max_new_tokens=new_tokens,
        do_sample=True,
        seed=0,
        return_dict_in_generate=True,
    )
    hook.remove()
    kv, cached = cache_bytes(out.cache if hasattr(out, "cache") else out.past_key_values)
    config = model.config
    element = next(model.parameters()).element_size()
    return {
        "new_tokens": new_tokens,
        "peak_rss_growth_mib": max(peak) - before,
        "peak_rss_mib": max(peak),
        "kv_bytes": kv,
        "cached_tokens": cached,
        "kv_bytes_per_token": kv / cached,
        "formula_bytes_per_token": 2 * config.n_blocks * config.hidden_dim * element,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained model folder (default: the tiny preset, randomly initialised)")
    parser.add_argument("--model-length", type=int, default=1024, help="L of the random model (default: 1024)")
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1; small decode calls slow down with more threads on a busy machine)",
    )
    parser.add_argument(
        "--memory-child", nargs=2, type=int, metavar=("BLOCK_SIZE", "NEW_TOKENS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        bs, new_tokens = args.memory_child
        print(json.dumps(memory_child(args.model, bs, args.model_length, new_tokens)))
        return

    rows = []
    for bs in args.block_sizes:
        model = load_model(args.model, bs, args.model_length)
        runs = {
            "uncached": dict(use_cache=False, sampler="first_hitting"),
            "cached": dict(sampler="first_hitting"),
            "threshold 0.9": dict(confidence_threshold=0.9),
            "threshold 0.7": dict(confidence_threshold=0.7),
        }
        for name, kwargs in runs.items():
            rows.append({"block_size": bs, "mode": name, **run_generate(model, args.new_tokens, **kwargs)})
            print(rows[-1], flush=True)
    ar_model = load_model(args.model, 1, args.model_length)
    rows.append({"block_size": 1, "mode": "AR (KV cache)", **run_ar(ar_model, args.new_tokens)})
    print(rows[-1], flush=True)

    length = load_model(args.model, 4, args.model_length).config.model_length
    memory = []
    for bs in args.block_sizes:
        for multiple in (1, 4):
            command = [
                sys.executable,
                "-m",
                "bench.bench_generation",
                "--model-length",
                str(args.model_length),
                "--threads",
                str(args.threads),
                "--memory-child",
                str(bs),
                str(multiple * length),
            ] + (["--model", args.model] if args.model else [])
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            memory.append({"block_size": bs, "multiple": multiple, **result})
            print(memory[-1], flush=True)

    uncached = {r["block_size"]: r["tokens_per_s"] for r in rows if r["mode"] == "uncached"}
    lines = [
        f"Model: {args.model or 'tiny preset, random init'}; L = {length}; {args.new_tokens} new tokens from BOS; "
        f"batch 1; {machine()['device']}, {torch.get_num_threads()} threads.",
        "",
        "| L' | mode | tokens/s | speed-up vs uncached | network calls/token (NFE) | all forwards/token | "
        "tokens/call |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = uncached.get(r["block_size"])
        speedup = f"{r['tokens_per_s'] / base:.1f}x" if base else "-"
        lines.append(
            f"| {r['block_size']} | {r['mode']} | {r['tokens_per_s']:.1f} | {speedup} | {r['nfe_per_token']:.3f} | "
            f"{r['forwards_per_token']:.3f} | {r['tokens_per_nfe']:.2f} |"
        )
    lines += [
        "",
        "| L' | new tokens | peak RSS during generate (MiB) | growth (MiB) | cached tokens | KV bytes/token | "
        "2·layers·hidden·bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in memory:
        lines.append(
            f"| {m['block_size']} | {m['new_tokens']} ({m['multiple']}x L) | {m['peak_rss_mib']:.0f} | "
            f"{m['peak_rss_growth_mib']:.1f} | "
            f"{m['cached_tokens']} | {m['kv_bytes_per_token']:.0f} | {m['formula_bytes_per_token']} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    name = "generation" + ("-trained" if args.model else "")
    print("written to", write_results(name, {"args": vars(args), "rows": rows, "memory": memory}, table))


if __name__ == "__main__":
    main()
