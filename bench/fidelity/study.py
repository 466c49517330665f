"""The fidelity study: train every row with the same architecture, data order, token budget and seed, then measure.

Rows (`ROWS`): a causal-attention AR baseline, BD3-LM with L' = 1 (t ≡ 1, and the linear schedule), 4, 8 and 16,
L'=4 with the linear schedule, and MDLM (L' = L). BD3 rows with `search=True` start on the unbiased U[1e-3, 1] and let
`NoiseScheduleSearchCallback` pick the clipped interval at every evaluation (the paper's var_min recipe); the other
diffusion rows train on U[1e-3, 1] and get one reporting-only search at the end, so that every L' has a searched
interval to measure the variance under.

Each row's model is saved under the work folder, so an interrupted study resumes where it stopped; the results JSON is
rewritten after every row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, set_seed

from bd3lm_configuration import load_preset
from bd3lm_trainer import BD3LMDataCollator, BD3LMTrainer, BD3LMTrainingArguments, NoiseScheduleSearchCallback
from bd3lm_trainer.callbacks import DEFAULT_SEARCH_STEP, DEFAULT_SEARCH_WIDTHS
from bd3lm_trainer.corpus import load_corpus, load_tokenizer
from bd3lm_trainer.data import build_lm_dataset
from bench.stats import summarise
from modeling_bd3lm import BD3LMForMaskedDiffusion

from . import measures
from .measures import GenSetting

LINEAR = (1e-3, 1.0)


@dataclass
class StudyConfig:
    """Budget and protocol of one study. Every row uses the same values."""

    size: str = "tiny"
    size_overrides: dict[str, Any] = field(default_factory=dict)
    model_length: int = 128
    steps: int = 1200
    batch_size: int = 16
    learning_rate: float = 1e-3  # the tiny preset's CLI default; constant after warm-up (the paper's schedule)
    warmup_steps: int = 100
    seed: int = 0
    max_train_documents: int | None = None
    # in-training evaluation and clipped-interval search
    evals: int = 4  # the first search after a quarter of the steps (upstream: after 10k of 150k fine-tuning steps)
    eval_chunks: int = 128
    search_batches: int = 4
    search_widths: tuple[float, ...] = DEFAULT_SEARCH_WIDTHS
    search_step: float = DEFAULT_SEARCH_STEP
    # final measurements
    max_val_chunks: int | None = None
    nelbo_draws: int = 4
    eval_batch_size: int = 32
    var_sequences: int = 64
    var_draws: int = 16
    l1_check_sequences: int = 8
    gen_samples: int = 32
    gen_length: int = 128
    gen_batch_size: int = 32
    # The paper samples with nucleus p = 0.9; its sort over 8192 ids at every position of every call makes MDLM's
    # 128-token block cost seconds per call on a CPU, so the study samples from the full distribution (None).
    nucleus_p: float | None = None
    thresholds: tuple[float, ...] = (0.9, 0.7, 0.5)
    # A second, independent judge of the samples (re-tokenised): "smollm2" (SmolLM2-135M, bd3lm_trainer.pretrained)
    # or None. The study's own AR judge was trained on the same corpus; a real pretrained LM was not.
    second_judge: str | None = "smollm2"

    def training_key(self) -> str:
        """Hash of everything that changes a trained model (resuming reuses a model only when it matches)."""
        keys = (
            "size",
            "size_overrides",
            "model_length",
            "steps",
            "batch_size",
            "learning_rate",
            "warmup_steps",
            "seed",
            "max_train_documents",
            "evals",
            "eval_chunks",
            "search_batches",
            "search_widths",
            "search_step",
        )
        payload = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


#: A reduced study for the smoke test and `--quick`: the same code paths, seconds of compute.
QUICK = StudyConfig(
    size_overrides={"hidden_dim": 32, "cond_dim": 16, "n_blocks": 1, "n_heads": 2},
    model_length=32,
    steps=3,
    batch_size=4,
    warmup_steps=1,
    max_train_documents=2,
    evals=1,
    eval_chunks=8,
    search_batches=1,
    search_widths=(0.5,),
    search_step=0.25,
    max_val_chunks=16,
    nelbo_draws=2,
    eval_batch_size=8,
    var_sequences=4,
    var_draws=3,
    l1_check_sequences=2,
    gen_samples=2,
    gen_length=16,
    gen_batch_size=2,
    thresholds=(0.5,),
    second_judge=None,
)


@dataclass(frozen=True)
class Row:
    """One trained model of the study. `block_size=None` means L' = L (MDLM)."""

    name: str
    label: str
    kind: str  # "causal" (next-token cross entropy) or "bd3" (block NELBO)
    block_size: int | None
    always_mask: bool = False
    search: bool = False
    paper_interval: tuple[float, float] | None = None  # Table 8's optimum, measured beside the searched one


# In order of importance, so that a study cut short still has the core comparison.
ROWS: tuple[Row, ...] = (
    Row("ar", "AR (causal attention)", "causal", 1),
    Row("bd3_l4", "BD3-LM L'=4", "bd3", 4, search=True, paper_interval=(0.45, 0.95)),
    Row("bd3_l16", "BD3-LM L'=16", "bd3", 16, search=True, paper_interval=(0.3, 0.8)),
    Row("mdlm", "MDLM (L'=L)", "bd3", None),
    Row("bd3_l1", "BD3-LM L'=1, t≡1", "bd3", 1, always_mask=True),
    Row("bd3_l8", "BD3-LM L'=8", "bd3", 8, search=True),
    Row("bd3_l4_linear", "BD3-LM L'=4, linear U[0,1]", "bd3", 4),
    Row("bd3_l1_linear", "BD3-LM L'=1, linear U[0,1]", "bd3", 1),
)
ROW_BY_NAME = {row.name: row for row in ROWS}
ROW_ORDER = [row.name for row in ROWS]  # results list the rows in this order, however they were run


class CausalARTrainer(Trainer):
    """`Trainer` whose loss is next-token cross entropy through the L'=1 sampling pass (the causal AR baseline)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # a plain mean loss: let the Trainer handle accumulation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = measures.causal_lm_loss(model, inputs["input_ids"], inputs.get("labels"), inputs.get("attention_mask"))
        return (loss, {"loss": loss}) if return_outputs else loss


# ----------------------------------------------------------------------------------------------------------------------
# Building and training


def row_config(row: Row, cfg: StudyConfig, tokenizer: Any):
    """The row's `BD3LMConfig`: the size preset, the row's L', always t ∼ U[1e-3, 1] to start with."""
    block_size = cfg.model_length if row.block_size is None else row.block_size
    return load_preset(
        cfg.size,
        vocab_size=len(tokenizer),
        mask_token_id=tokenizer.mask_token_id,
        model_length=cfg.model_length,
        block_size=block_size,
        always_mask=row.always_mask,
        sampling_eps_min=LINEAR[0],
        sampling_eps_max=LINEAR[1],
        resample=block_size > 1,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,  # fixed-length samples, as the paper's Table 7
        **cfg.size_overrides,
    )


def training_arguments(cfg: StudyConfig, row: Row, output_dir: Path) -> BD3LMTrainingArguments:
    eval_steps = max(1, cfg.steps // cfg.evals)
    return BD3LMTrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="no",
        logging_steps=max(1, min(50, eval_steps)),
        prediction_loss_only=True,
        schedule_search=row.search,
        schedule_search_batches=cfg.search_batches,
        schedule_search_widths=list(cfg.search_widths),
        schedule_search_step=cfg.search_step,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def _search_callback(trainer: Trainer) -> NoiseScheduleSearchCallback | None:
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NoiseScheduleSearchCallback)), None)


def train_row(row: Row, cfg: StudyConfig, data: dict[str, Any], folder: Path) -> tuple[BD3LMForMaskedDiffusion, dict]:
    """Train one row from the shared seed and save it; returns the model and the training record."""
    tokenizer = data["tokenizer"]
    set_seed(cfg.seed)  # identical initial weights for every row (L' does not change the parameters)
    model = BD3LMForMaskedDiffusion(row_config(row, cfg, tokenizer))
    args = training_arguments(cfg, row, folder)
    collator = BD3LMDataCollator(
        pad_token_id=tokenizer.pad_token_id, block_size=model.config.block_size, max_length=cfg.model_length
    )
    trainer_cls = CausalARTrainer if row.kind == "causal" else BD3LMTrainer
    # No `processing_class`: the Trainer would copy the tokenizer's EOS into the config, and the samples of Table 7
    # are fixed-length (no stop at EOS).
    trainer = trainer_cls(
        model=model, args=args, data_collator=collator, train_dataset=data["train"], eval_dataset=data["eval"]
    )
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    record = {
        "train_seconds": time.perf_counter() - wall,
        "train_cpu_seconds": time.process_time() - cpu,
        "steps": trainer.state.global_step,
        "tokens": trainer.state.global_step * cfg.batch_size * cfg.model_length,
    }
    record["seconds_per_step"] = record["train_seconds"] / max(1, record["steps"])
    search = _search_callback(trainer)
    if row.kind == "bd3" and model.config.block_size > 1 and search is None:
        # Trained on U[1e-3, 1]: one reporting-only search on the final weights, so every L' has a searched interval.
        search = NoiseScheduleSearchCallback(cfg.search_widths, cfg.search_step, cfg.search_batches, fixed=True)
        trainer.add_callback(search)
        trainer.evaluate()
    history = trainer.state.log_history
    record["train_loss"] = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
    record["eval"] = [
        {k: h[k] for k in ("step", "eval_loss", "eval_ppl", "eval_nelbo_var") if k in h}
        for h in history
        if "eval_loss" in h
    ]
    if search is not None and search.history:
        record["search"] = {
            "applied_in_training": row.search,
            "history": [{"step": h["step"], "best": list(h["best"])} for h in search.history],
            "chosen": list(search.history[-1]["best"]),
            "table": search.last_table,
        }
    model.eval()
    trainer.save_model(str(folder))
    return model, record


def load_or_train(row: Row, cfg: StudyConfig, data: dict[str, Any], work_dir: Path, resume: bool):
    folder = work_dir / row.name
    record_path = folder / "train_record.json"
    if resume and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("training_key") == cfg.training_key():
            print(f"[fidelity] {row.name}: reusing the trained model in {folder}", flush=True)
            return BD3LMForMaskedDiffusion.from_pretrained(str(folder)).eval(), record
    print(f"[fidelity] {row.name}: training {cfg.steps} steps", flush=True)
    model, record = train_row(row, cfg, data, folder)
    record["training_key"] = cfg.training_key()
    record_path.write_text(json.dumps(record, indent=1))
    print(
        f"[fidelity] {row.name}: trained in {record['train_seconds']:.0f} s ({record['seconds_per_step']:.3f} s/step)",
        flush=True,
    )
    return model, record


# ----------------------------------------------------------------------------------------------------------------------
# Measurements of one row


def measure_row(row: Row, model, record: dict, cfg: StudyConfig, data: dict[str, Any], judge) -> dict[str, Any]:
    out: dict[str, Any] = {"label": row.label, "kind": row.kind, "block_size": model.config.block_size, "train": record}
    chunks, tokenizer = data["val_chunks"], data["tokenizer"]
    wall, cpu = time.perf_counter(), time.process_time()
    # 1. the perplexity bound on the validation split
    if row.kind == "causal":
        sums, counts = measures.causal_nll_per_chunk(model, chunks, cfg.eval_batch_size)
        draws = 1
    else:
        sums, counts = measures.nelbo_per_chunk(model, chunks, cfg.nelbo_draws, cfg.seed, cfg.eval_batch_size)
        # At L'=1 the t-integral is analytic (t ≡ 1 gives the expectation exactly), so `nelbo` makes one pass.
        draws = 1 if model.config.always_mask or model.config.block_size == 1 else cfg.nelbo_draws
    out["nelbo"] = {**summarise(sums, counts), "draws": draws, "per_chunk": sums.tolist()}
    data.setdefault("val_counts", counts.tolist())
    # 2. the variance of the NELBO estimator under the linear and the searched intervals
    if row.kind == "bd3":
        x = data["var_x"]
        intervals: dict[str, tuple[float, float] | None] = {"linear": LINEAR}
        if model.config.block_size == 1:
            intervals["t≡1"] = None
        else:
            if "search" in record:
                intervals["searched"] = tuple(record["search"]["chosen"])
            if row.paper_interval is not None:
                intervals["paper"] = row.paper_interval
        out["variance"] = {
            name: {
                "interval": None if iv is None else list(iv),
                **measures.estimator_variance(model, x, iv, cfg.var_draws, cfg.seed + 1, cfg.eval_batch_size),
            }
            for name, iv in intervals.items()
        }
    # 3. L'=1: the vectorised t ≡ 1 NELBO against the token-by-token sampling pass
    if row.kind == "bd3" and model.config.block_size == 1:
        x = data["var_x"][: cfg.l1_check_sequences]
        with measures.config_overrides(model.config, always_mask=True):
            vectorised = measures.vectorised_token_nll(model, x)
        sampled = measures.l1_sampling_path_nll(model, x)
        out["l1_equivalence"] = {
            "sequences": x.shape[0],
            "tokens": int(sampled.numel()),
            "vectorised_nll": float(vectorised.mean()),
            "sampling_path_nll": float(sampled.mean()),
            "max_abs_token_diff": float((vectorised - sampled).abs().max()),
        }
    # 4. generation quality against network calls per token
    if judge is not None:
        out["generation"] = generation_sweep(row, model, cfg, tokenizer, judge, data.get("second_judge"))
    out["measure_seconds"] = time.perf_counter() - wall
    out["measure_cpu_seconds"] = time.process_time() - cpu
    return out


def generation_sweep(
    row: Row, model, cfg: StudyConfig, tokenizer, judge, second_judge: tuple[Any, Any] | None = None
) -> list[dict[str, Any]]:
    """Samples of every setting judged by the study's AR model and, when given, by `second_judge` (`(model,
    tokenizer)`, re-tokenised); the decoded samples are kept under `"texts"` (so they can be judged again)."""
    bos = tokenizer.bos_token_id
    if row.kind == "causal":
        runs = [
            (
                "ancestral",
                measures.sample_causal(
                    model,
                    cfg.gen_samples,
                    cfg.gen_length,
                    bos,
                    cfg.nucleus_p,
                    torch.Generator().manual_seed(cfg.seed + 7),
                ),
            )
        ]
    else:
        settings = [GenSetting("first_hitting")]
        if model.config.block_size > 1:
            settings += [GenSetting("confidence_threshold", th) for th in cfg.thresholds]
        runs = [
            (
                s.name,
                measures.generate_samples(
                    model,
                    cfg.gen_samples,
                    cfg.gen_length,
                    bos,
                    s,
                    nucleus_p=cfg.nucleus_p,
                    seed=cfg.seed + 7,
                    batch_size=cfg.gen_batch_size,
                ),
            )
            for s in settings
        ]
    results = []
    for name, run in runs:
        judged = measures.judge_samples(run["sequences"], judge, tokenizer, cfg.gen_batch_size)
        results.append(
            {
                "setting": name,
                "nfe_per_token": run["nfe"] / run["new_tokens"],
                "seconds_per_token": run["seconds"] / run["new_tokens"],
                **judged,
                "example": tokenizer.decode(run["sequences"][0][:48]),
                "texts": [tokenizer.decode(seq) for seq in run["sequences"]],
            }
        )
        if second_judge is not None:
            results[-1][cfg.second_judge] = measures.judge_samples(
                run["sequences"], second_judge[0], tokenizer, cfg.gen_batch_size, judge_tokenizer=second_judge[1]
            )
        print(
            f"[fidelity]   {row.name} {name}: gen-PPL {judged['gen_ppl']:.1f}, "
            f"NFE/token {results[-1]['nfe_per_token']:.3f}",
            flush=True,
        )
    return results


# ----------------------------------------------------------------------------------------------------------------------
# The study


def prepare_data(cfg: StudyConfig) -> dict[str, Any]:
    tokenizer = load_tokenizer()
    train_docs = load_corpus("train")
    if cfg.max_train_documents is not None:
        train_docs = train_docs.select(range(min(cfg.max_train_documents, len(train_docs))))
    validation = load_corpus("validation")
    train = build_lm_dataset(train_docs, tokenizer, cfg.model_length)
    eval_set = build_lm_dataset(validation, tokenizer, cfg.model_length)
    eval_set = eval_set.select(range(min(cfg.eval_chunks, len(eval_set))))
    chunks = measures.validation_chunks(validation["text"], tokenizer, cfg.model_length, cfg.max_val_chunks)
    full = [c for c in chunks if len(c) == cfg.model_length]
    picks = torch.linspace(0, len(full) - 1, min(cfg.var_sequences, len(full))).round().long().unique().tolist()
    var_x = torch.tensor([full[i] for i in picks], dtype=torch.long)
    judge_ref = [[tokenizer.bos_token_id, *c[: cfg.gen_length]] for c in full[: cfg.gen_samples]]
    return {
        "tokenizer": tokenizer,
        "train": train,
        "eval": eval_set,
        "val_chunks": chunks,
        "var_x": var_x,
        "judge_reference": judge_ref,
        "train_chunks": len(train),
    }


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_study(
    cfg: StudyConfig,
    output_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    rows: tuple[str, ...] | None = None,
    resume: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train and measure every row, writing `fidelity.json` (and the tables and plots) into `output_dir` after each."""
    from . import report

    output_dir, work_dir = Path(output_dir), Path(work_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    selected = [ROW_BY_NAME[name] for name in (rows or [r.name for r in ROWS])]
    selected.sort(key=lambda r: r.name != "ar")  # the AR model first: it judges the samples of the others
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    results: dict[str, Any] = {
        "meta": {
            "command": command or " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "git_commit": _git_commit(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_start": os.getloadavg(),
        },
        "config": dataclasses.asdict(cfg),
        "rows": {},
    }
    previous = _previous_rows(output_dir, cfg) if resume and rows else {}
    if previous:
        # `--rows` adds to a finished study: rows measured earlier under the same training key stay in the results.
        chosen = {r.name for r in selected}
        results["rows"].update({name: row for name, row in previous.items() if name not in chosen})
        if not (work_dir / "ar" / "train_record.json").is_file() and all(r.name != "ar" for r in selected):
            # The AR model judges generated samples; without it on disk it is trained again (deterministically, so
            # its re-measured row is a check that the rows kept from before were judged by the same model).
            selected.insert(0, ROW_BY_NAME["ar"])
            if "ar" in previous:
                results["meta"]["ar_nelbo_before_retraining"] = previous["ar"]["nelbo"]["nelbo"]
    data = prepare_data(cfg)
    results["meta"].update(
        train_chunks=data["train_chunks"], val_chunks=len(data["val_chunks"]), var_sequences=int(data["var_x"].shape[0])
    )
    judge = None
    if cfg.second_judge == "smollm2":
        data["second_judge"] = measures.smollm2_judge()
    elif cfg.second_judge is not None:
        raise ValueError(f"`second_judge` must be 'smollm2' or None, got {cfg.second_judge!r}")
    for row in selected:
        model, record = load_or_train(row, cfg, data, work_dir, resume)
        if row.name == "ar":
            judge = measures.CausalJudge(model)
            reference = measures.judge_samples(data["judge_reference"], judge, data["tokenizer"], cfg.gen_batch_size)
            if "second_judge" in data:
                reference[cfg.second_judge] = measures.judge_samples(
                    data["judge_reference"],
                    data["second_judge"][0],
                    data["tokenizer"],
                    cfg.gen_batch_size,
                    judge_tokenizer=data["second_judge"][1],
                )
            results["reference_text"] = reference
        elif judge is None and (work_dir / "ar" / "train_record.json").is_file():
            judge = measures.CausalJudge(BD3LMForMaskedDiffusion.from_pretrained(str(work_dir / "ar")).eval())
        print(f"[fidelity] {row.name}: measuring", flush=True)
        results["rows"][row.name] = measure_row(row, model, record, cfg, data, judge)
        results["rows"] = dict(sorted(results["rows"].items(), key=lambda item: ROW_ORDER.index(item[0])))
        results["val_token_counts"] = data["val_counts"]
        results["meta"].update(
            wall_seconds=time.perf_counter() - start_wall,
            cpu_seconds=time.process_time() - start_cpu,
            load_average_end=os.getloadavg(),
            finished_rows=list(results["rows"]),
        )
        results["comparisons"] = report.comparisons(results)
        (output_dir / "fidelity.json").write_text(json.dumps(results, indent=1, default=_json_default))
        report.write_report(results, output_dir, with_plots=False)  # the plots once at the end (--report-only)
        nelbo = results["rows"][row.name]["nelbo"]
        print(
            f"[fidelity] {row.name}: PPL bound {nelbo['ppl']:.2f} (NELBO {nelbo['nelbo']:.4f} ± "
            f"{nelbo['nelbo_se']:.4f}); elapsed {results['meta']['wall_seconds'] / 60:.1f} min",
            flush=True,
        )
    results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (output_dir / "fidelity.json").write_text(json.dumps(results, indent=1, default=_json_default))
    report.write_report(results, output_dir)
    return results


def _previous_rows(output_dir: Path, cfg: StudyConfig) -> dict[str, Any]:
    """Rows of an earlier `fidelity.json` in `output_dir` whose models were trained with this `cfg`'s training key."""
    path = output_dir / "fidelity.json"
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    key = cfg.training_key()
    rows = earlier.get("rows", {})
    return {name: row for name, row in rows.items() if row.get("train", {}).get("training_key") == key}


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
