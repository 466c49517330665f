"""Per-rank memory of a sharded (FSDP2) vs an unsharded (DDP) training step at the same per-rank batch.

    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/sharded_memory.py --mode fsdp2
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/sharded_memory.py --mode ddp

Runs on CPU (gloo) or GPUs (nccl). Each rank reports the bytes it holds for parameters, gradients and AdamW state after
three steps, its peak memory (peak RSS on CPU, `max_memory_allocated` on a GPU) and what it holds after the steps
(VmRSS / `memory_allocated`); rank 0 prints one JSON line and appends it to `--out` when given. Every rank builds the
whole model before sharding it, so the CPU peak includes one unsharded copy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_bd3lm import BD3LMConfig, BD3LMForMaskedDiffusion  # noqa: E402


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def resident_bytes() -> int:
    """The process's resident set now (VmRSS; large tensors are mmap-backed, so freed ones leave it)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["fsdp2", "ddp"], required=True)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--out", help="append the JSON line to this file")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    config = BD3LMConfig(
        vocab_size=args.vocab,
        hidden_dim=args.hidden,
        cond_dim=128,
        n_blocks=args.blocks,
        n_heads=8,
        model_length=args.length,
        block_size=4,
        dropout=0.0,
    )
    model = BD3LMForMaskedDiffusion(config).to(device).train()
    num_params = sum(p.numel() for p in model.parameters())
    if args.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.backbone.blocks:
            fully_shard(block)
        fully_shard(model)
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x = torch.randint(0, args.vocab - 1, (args.batch, args.length), generator=g).to(device)
        wrapped(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        if _ < 2:
            optimizer.zero_grad()  # the last step keeps its gradients, to count them
    params = local_bytes(model.parameters())
    grads = local_bytes(p.grad for p in model.parameters())
    states = local_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    peak = (
        torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    now = torch.cuda.memory_allocated(device) if cuda else resident_bytes()
    row = torch.tensor([params, grads, states, peak, now], dtype=torch.float64, device=device)
    rows = [torch.zeros_like(row) for _ in range(world)]
    torch.distributed.all_gather(rows, row)
    if rank == 0:
        mib = 2**20
        record = {
            "mode": args.mode,
            "world": world,
            "device": "cuda" if cuda else "cpu",
            "parameters": num_params,
            "batch_per_rank": args.batch,
            "length": args.length,
            "per_rank_mib": [
                {
                    "params": r[0].item() / mib,
                    "grads": r[1].item() / mib,
                    "adamw": r[2].item() / mib,
                    "state_total": (r[0] + r[1] + r[2]).item() / mib,
                    "peak_rss" if not cuda else "peak_allocated": r[3].item() / mib,
                    "rss_after" if not cuda else "allocated_after": r[4].item() / mib,
                }
                for r in rows
            ],
        }
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
