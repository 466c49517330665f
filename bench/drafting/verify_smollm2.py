"""Greedy draft-and-verify on SmolLM2-135M-Instruct against the source model's own `generate()` (issue 25).

Converts a fresh SmolLM2 (`from_causal_lm(source, block_size=4)`, an untrained drafter: expect ~1 token per verify
call) and, for each chat prompt, compares the source's `generate(do_sample=False)` with `generation_mode=
"autoregressive"` and `"draft_verify"` (both variants): token equality, network calls (`nfe`), `tokens_per_forward`,
acceptance lengths and wall time (fp32, CPU, one warm-up run, the same thread count for all).

    python -m bench.drafting.verify_smollm2 [--max-new-tokens 64] [--threads 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
]
MODES = [
    ("autoregressive", {}),
    ("draft_verify/two_pass", {"generation_mode": "draft_verify", "draft_variant": "two_pass"}),
    ("draft_verify/one_forward", {"generation_mode": "draft_verify", "draft_variant": "one_forward"}),
]


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bd3lm_trainer.pretrained import load_smollm2
    from modeling_bd3lm import BD3LMForMaskedDiffusion

    reference, tokenizer = load_smollm2()
    source, _ = load_smollm2()
    model = BD3LMForMaskedDiffusion.from_causal_lm(source, block_size=4).eval()
    rows = []
    for text in PROMPTS:
        chat = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
        common = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
        reference.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        expected, source_s = _timed(lambda: reference.generate(ids, attention_mask=torch.ones_like(ids), **common))
        row = {
            "prompt": text,
            "prompt_tokens": ids.shape[1],
            "new_tokens": expected.shape[1] - ids.shape[1],
            "source_s": source_s,
            "text": tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True),
        }
        for name, kwargs in MODES:
            kwargs = {"generation_mode": name, **kwargs}
            model.generate(ids, max_new_tokens=4, do_sample=False, **kwargs)  # warm-up
            out, seconds = _timed(lambda: model.generate(ids, return_dict_in_generate=True, **common, **kwargs))
            acceptance = None if out.acceptance_lengths is None else out.acceptance_lengths[0].tolist()
            row[name] = {
                "equal_to_source": bool(torch.equal(out.sequences, expected)),
                "nfe": int(out.nfe[0]),
                "tokens_per_forward": float(out.tokens_per_forward[0]),
                "mean_acceptance": None if not acceptance else sum(acceptance) / len(acceptance),
                "acceptance_lengths": acceptance,
                "seconds": seconds,
                "vs_source": seconds / source_s,
            }
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "max_new_tokens": args.max_new_tokens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
