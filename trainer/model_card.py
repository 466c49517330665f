# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""The model card of a published BD3-LM (or LoRA adapter): what it says is gathered into a [`CardInfo`] (from the
model and the trainer's JSON reports, [`read_reports`]) and rendered from one template, `templates/model_card.md`
(TRL's `templates/lm_model_card.md` shape), by [`build_model_card`]. `hub.py` publishes it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .utils import read_json

TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "model_card.md"
PAPER_CITATION = """@inproceedings{arriola2025block,
  title     = {Block Diffusion: Interpolating Between Autoregressive and Diffusion Language Models},
  author    = {Marianne Arriola and Aaron Gokaslan and Justin T. Chiu and Zhihan Yang and Zhixuan Qi and
               Jiaqi Han and Subham Sekhar Sahoo and Volodymyr Kuleshov},
  booktitle = {The Thirteenth International Conference on Learning Representations},
  year      = {2025},
  url       = {https://arxiv.org/abs/2503.09573}
}"""
TAGS = ["block-diffusion", "bd3lm", "diffusion-language-model"]


@dataclass
class CardInfo:
    """Everything the model card says, gathered from the folder (see `plan_upload`) or given by hand."""

    repo_id: str
    kind: str = "model"  # "model" or "adapter"
    license: str = "unknown"
    datasets: list[str] = field(default_factory=list)
    base_model: str | None = None
    converted_from_official: bool = False
    architecture: dict[str, Any] = field(default_factory=dict)  # block_size, model_length, vocab_size, ...
    noise_interval: tuple[float, float] | None = None
    schedule_search: dict[str, Any] | None = None
    sampler: str | None = None  # the sampler `generate` runs with the stored generation config
    sampler_defaults: dict[str, Any] = field(default_factory=dict)  # stored settings that differ from the built-ins
    network_calls: dict[str, Any] | None = None  # calls, tokens, calls_per_token, method
    evaluation: dict[str, Any] | None = None  # ppl, source
    training: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)  # `training_data.json`: {"train": {...}, ...}
    adapter: dict[str, Any] | None = None  # peft_type, r, lora_alpha, target_modules, gated
    has_tokenizer: bool = False


def read_reports(info: CardInfo, dirs: list[Path]) -> None:
    """Card facts from the trainer's JSON reports: the first folder that has a file wins."""

    def report(name: str) -> dict:
        path = next((d / name for d in dirs if (d / name).exists()), None)
        return read_json(path, "The report") if path is not None else {}

    state = report("trainer_state.json")
    evaluated = [entry for entry in state.get("log_history", []) if "eval_ppl" in entry or "eval_loss" in entry]
    sources = [(name, report(name)) for name in ("eval_results.json", "all_results.json")]
    sources += [("the last evaluation in trainer_state.json", evaluated[-1])] if evaluated else []
    for name, results in sources:
        if "eval_ppl" in results:
            info.evaluation = {"ppl": float(results["eval_ppl"]), "source": f"`eval_ppl` in {name}"}
            break
        if "eval_loss" in results:
            info.evaluation = {"ppl": math.exp(float(results["eval_loss"])), "source": f"exp(`eval_loss`) in {name}"}
            break
    if info.evaluation is not None:
        info.evaluation["dataset"] = report("eval_results.json").get("eval_dataset") or (info.datasets or [None])[0]
    info.schedule_search = report("schedule_search.json") or None
    info.training_data = report("training_data.json")
    args = report("training_args.json")
    training = {
        "steps": state.get("global_step"),
        "epochs": state.get("epoch"),
        "train_batch_size": state.get("train_batch_size"),
    }
    keys = (
        "learning_rate",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "warmup_steps",
        "lr_scheduler_type",
        "weight_decay",
        "max_steps",
        "num_train_epochs",
        "seed",
        "bf16",
        "fp16",
    )
    training.update({k: args[k] for k in keys if k in args})
    info.training = {k: v for k, v in training.items() if v is not None}


def build_model_card(info: CardInfo):
    """A `huggingface_hub.ModelCard`: YAML metadata from `ModelCardData` and the body of `templates/model_card.md`, which
    says how to load and generate, what was measured and how, the training recipe, limitations and the citation."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    adapter = info.kind == "adapter"
    eval_results = None
    if info.evaluation is not None:
        dataset = info.evaluation.get("dataset") or "custom"
        eval_results = [
            EvalResult(
                task_type="text-generation",
                task_name="Language modelling",
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split="validation",
                metric_type="perplexity",
                metric_value=round(info.evaluation["ppl"], 4),
                metric_name="Perplexity upper bound (block NELBO)",
            )
        ]
    relation = {"base_model_relation": "adapter" if adapter else "finetune"} if info.base_model else {}
    data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        tags=TAGS
        + (
            ["lora", "peft"]
            if adapter and "LORA" in str(info.adapter.get("peft_type")).upper()
            else ["peft"]
            if adapter
            else []
        ),
        license=info.license,
        datasets=info.datasets or None,
        base_model=info.base_model,
        model_name=info.repo_id.split("/")[-1],
        eval_results=eval_results,
        **relation,
    )
    return ModelCard.from_template(data, template_path=str(TEMPLATE_PATH), **_card_context(info))


def _card_context(info: CardInfo) -> dict[str, Any]:
    """The values `templates/model_card.md` reads, formatted."""
    adapter, arch = info.kind == "adapter", info.architecture
    context = {
        "name": info.repo_id.split("/")[-1],
        "repo_id": info.repo_id,
        "adapter": adapter,
        "arch": arch,
        "base_model": info.base_model,
        "official": info.converted_from_official,
        "calls": info.network_calls,
        "paper": "[Block Diffusion](https://arxiv.org/abs/2503.09573) (BD3-LM, Arriola et al., ICLR 2025)",
        "pin": 'revision = "main"  # pin a commit hash of this repository: remote code runs on your machine,\n'
        "                   # so load a revision you have read, and the same one every time",
        "citation": PAPER_CITATION,
        "evaluation": info.evaluation,
    }
    if adapter:
        context["peft_type"] = info.adapter.get("peft_type") or "PEFT"
        context["adapter_rows"] = [(k, v) for k, v in info.adapter.items() if v is not None and k != "gated"]
        if info.adapter.get("gated") is not None:  # an activated LoRA acts only at noisy positions: never merge it
            context["adapter_rows"].append(
                (
                    "gated",
                    "yes: acts only at noisy positions (activated LoRA); keep it unmerged"
                    if info.adapter["gated"]
                    else "no: acts at every position",
                )
            )
    else:
        if info.has_tokenizer:
            tokenizer = "tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision)"
        elif info.converted_from_official and arch.get("vocab_size") == 50258:
            tokenizer = 'tokenizer = AutoTokenizer.from_pretrained("gpt2")  # GPT-2 ids; the mask is the extra id 50257'
        else:
            tokenizer = (
                f"tokenizer = ...  # not included: the tokenizer the model was trained with "
                f"(mask id {arch.get('mask_token_id')})"
            )
        lo, hi = info.noise_interval or (None, None)
        rows = [
            ("Block size L'", arch["block_size"]),
            ("Context window (model_length)", arch["model_length"]),
            ("Vocabulary size", arch["vocab_size"]),
            ("Mask token id", arch["mask_token_id"]),
            ("Layers / heads / hidden size", f"{arch['n_blocks']} / {arch['n_heads']} / {arch['hidden_dim']}"),
            ("Parameters", f"{arch['parameters']:,}"),
            ("Noise schedule", arch["noise_schedule"]),
        ]
        if arch.get("denoiser"):  # a converted causal LM: its class and whether the head keeps the token shift
            rows.insert(0, ("Denoiser", arch["denoiser"]))
        if arch.get("clean_attention"):  # how the clean tokens attend: the paper's block-causal, or causal
            rows.append(
                (
                    "Clean-stream attention",
                    {
                        "block_causal": "`block_causal` (the paper)",
                        "causal": "`causal` (clean tokens attend causally: the clean stream is the source causal LM)",
                    }.get(arch["clean_attention"], f"`{arch['clean_attention']}`"),
                )
            )
        if arch.get("denoiser"):  # a converted causal LM: what the exact decoding modes are exact to
            untouched = arch.get("clean_attention") == "causal"
            rows.append(
                (
                    "Exact decoding (`generation_mode` `autoregressive` / `draft_verify`)",
                    "greedy text = this model's clean stream decoding autoregressively; that is the source causal LM "
                    "while the clean stream is untouched: a fresh conversion, or a frozen base with a gated adapter"
                    + ("" if untouched else " (and, for the diffusion mode's cache too, `clean_attention='causal'`)"),
                )
            )
        if lo is not None:
            rows.append(("Training noise interval [β, ω]", f"[{lo:.4g}, {hi:.4g}]"))
        settings = dict(info.sampler_defaults)
        stored = settings.pop("sampler", None)
        sampler_rows = [(k, f"`{json.dumps(v)}`") for k, v in sorted(settings.items())]
        if info.sampler is not None:  # the one the measurement below and a plain `generate()` use
            how = (
                ""
                if stored
                else " (none stored: chosen because `confidence_threshold` is set)"
                if info.sampler == "confidence_threshold"
                else " (none stored: the built-in default)"
            )
            sampler_rows.insert(0, ("sampler", f"`{info.sampler}`{how}"))
        context.update(
            tokenizer_line=tokenizer,
            detail_rows=rows,
            noise_origin=_noise_origin(info, lo, hi),
            sampler_rows=sampler_rows,
        )
    data = [_data_line(role, entry) for role, entry in info.training_data.items() if isinstance(entry, dict)]
    if info.datasets:
        data.append("Data: " + ", ".join(f"[`{d}`](https://huggingface.co/datasets/{d})" for d in info.datasets))
    elif info.converted_from_official:
        data.append("Data and recipe: trained by the BD3-LM authors; see the paper and the original repository.")
    elif not data:
        data.append("Data: not recorded.")
    context["training_lines"] = data + [f"{k.replace('_', ' ')}: {v}" for k, v in info.training.items()]
    limitations = [
        "A research model: no instruction tuning or safety filtering; outputs can be false, biased or offensive.",
        "Perplexities are NELBO upper bounds, not exact likelihoods; compare with care.",
        "`trust_remote_code=True` runs this repository's Python code: review it and pin the revision.",
    ]
    if not adapter:
        limitations.insert(
            1,
            f"Block size {arch['block_size']} is fixed by training; the model attends to at most "
            f"{arch['model_length']} tokens (longer generations slide the window).",
        )
    if not info.has_tokenizer:
        limitations.append("No tokenizer files are published here; use the tokenizer the model was trained with.")
    context["limitations"] = limitations
    return context


def _data_line(role: str, entry: dict[str, Any]) -> str:
    """One dataset of `training_data.json` (written by `bd3lm train`): name, licence, size in tokens."""
    name = f"`{entry.get('name', 'unnamed')}`" + (f", {entry['split']} split" if entry.get("split") else "")
    about = f" ({entry['description']})" if entry.get("description") else ""
    size = (
        f"{entry['tokens']:,} tokens of this model's tokenizer"
        if isinstance(entry.get("tokens"), int)
        else "size not recorded"
    )
    label = {"train": "Training data", "evaluation": "Validation data"}.get(role, f"Data ({role})")
    return f"{label}: {name}{about}; licence: {entry.get('license') or 'not recorded'}; {size}."


def _noise_origin(info: CardInfo, lo: float | None, hi: float | None) -> str:
    """Where the training interval came from: the search report, the weights alone, or the default."""
    search = info.schedule_search
    if search:
        # The trainer's NoiseScheduleSearchCallback writes {step, num_batches, best, applied, table}.
        where = f" at step {search['step']}" if "step" in search else ""
        size = f" over {len(search['table'])} candidate intervals" if isinstance(search.get("table"), list) else ""
        batches = f", {search['num_batches']} validation batches each" if "num_batches" in search else ""
        return (
            f"The interval was chosen by the data-driven search{where}{size}{batches}: the candidate whose "
            "per-block NELBO values have the least variance (Arriola et al. 2025, Sec. 4; `schedule_search.json`)"
            + (f", best {search['best']}" if "best" in search else "")
            + "."
        )
    if lo is not None and (lo, hi) != (1e-3, 1.0) and abs(lo - 1e-3) + abs(hi - 0.999) > 1e-6:
        return "The interval is stored in the weights (`sampling_eps_min/max`); no search report came with them."
    return "The interval is the unclipped default; no schedule search was recorded."


__all__ = ["PAPER_CITATION", "TAGS", "TEMPLATE_PATH", "CardInfo", "build_model_card", "read_reports"]
