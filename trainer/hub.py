# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Publish a trained BD3-LM (or a LoRA adapter for one) to the Hugging Face Hub, with a model card.

The command is `bd3lm upload` (`cli/upload.py`), also run as `python hub_upload.py` (the top-level shim).

Three small steps, as TRL's `_save_checkpoint` does: (1) assemble exactly the repository to publish in a staging
folder, by re-saving the model `from_pretrained` validated (code files, `config.json` with `auto_map`,
`generation_config.json`, safetensors shards) and copying allow-listed tokenizer files; (2) write the model card from
the model and the trainer's JSON reports (`model_card.py`, one template); (3) create the repository and commit the
staging folder in one commit. Anything else in the folder (optimizer, scheduler and RNG states, `training_args.bin`,
`.env` files, unknown files) stays behind unless `--include` names it, and the plan says what was left out and why;
the trainer's JSON reports are read into the card and listed as such.

The token comes from `HF_TOKEN` or the login cache (`huggingface_hub.get_token`); it is never printed, logged or
written, and an upload is refused if a staged file contains it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeling_bd3lm.checks_bd3lm import is_int

from .model_card import CardInfo, build_model_card, read_reports
from .peft_presets import is_gated_adapter_config
from .utils import check_repo_id, read_json

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.*",
)
# JSON reports the trainer writes; read into the card, not published.
REPORT_FILES = (
    "eval_results.json",
    "all_results.json",
    "train_results.json",
    "trainer_state.json",
    "schedule_search.json",
    "training_args.json",
    "training_data.json",
)
# The reason given for a report file: the card states its content.
READ_INTO_CARD = "read into the model card"
# Files that a re-save regenerates (weights, config, code, generation config) or the card replaces.
REGENERATED = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "*_bd3lm.py",
    "__init__.py",
)
# Why well-known training leftovers stay behind; anything unmatched is "not on the allow-list".
LEFT_OUT_REASONS = (
    ("optimizer.*", "optimizer state"),
    ("scheduler.*", "learning-rate scheduler state"),
    ("rng_state*", "RNG state"),
    ("scaler.*", "mixed-precision scaler state"),
    ("training_args.bin", "training arguments (a pickle)"),
    (".env*", "environment file (may hold secrets)"),
    ("*.bin", "pickle weights are never published"),
    ("*.pt", "pickle file"),
    ("*.pth", "pickle file"),
    ("README.md", "replaced by the generated model card"),
    ("ema_state.safetensors", "EMA training state (the saved weights already are the EMA)"),
)

__all__ = [
    "LeftOut",
    "PlannedFile",
    "UploadPlan",
    "UploadResult",
    "check_shard_size",
    "plan_upload",
    "resolve_token",
    "upload",
]


# ----------------------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class PlannedFile:
    path: str  # path in the repository
    size: int  # bytes
    origin: str  # where it comes from, in words


@dataclass(frozen=True)
class LeftOut:
    path: str  # relative to the folder given, a trailing "/" for a whole folder
    reason: str  # READ_INTO_CARD for the trainer's reports


@dataclass
class UploadPlan:
    """Exactly the repository to publish: the files in `staging`, what stayed behind, and the card."""

    kind: str
    source: Path
    staging: Path
    files: list[PlannedFile]
    left_out: list[LeftOut]
    card: Any  # huggingface_hub.ModelCard
    card_info: CardInfo
    notes: list[str] = field(default_factory=list)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def describe(self, with_card: bool = True) -> str:
        lines = [f"Upload plan for {self.source} ({self.kind}): {len(self.files)} files, {_human(self.total_size)}"]
        width = max(len(f.path) for f in self.files)
        lines += [f"  {f.path:<{width}}  {_human(f.size):>10}  {f.origin}" for f in self.files]
        # The trainer's reports are not files the user might want to --include: the card already states them.
        read = [item.path for item in self.left_out if item.reason == READ_INTO_CARD]
        left = [item for item in self.left_out if item.reason != READ_INTO_CARD]
        lines.append(f"Left out ({len(left)}):" if left else "Left out: nothing")
        lines += [f"  {item.path}  ({item.reason})" for item in left]
        if read:
            lines.append(f"Read into the model card, not published ({len(read)}): {', '.join(read)}")
        lines += [f"Note: {note}" for note in self.notes]
        if with_card:
            lines += ["", "README.md (model card):", str(self.card)]
        return "\n".join(lines)

    def cleanup(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> UploadPlan:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


@dataclass(frozen=True)
class UploadResult:
    repo_id: str
    commit_url: str
    commit_oid: str
    pr_url: str | None
    revision: str


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def check_shard_size(size: str | int) -> str | int:
    """`size` as `save_pretrained`'s `max_shard_size` takes it ('5GB', '500MB', bytes), or a ValueError naming it."""
    if is_int(size) and size > 0:
        return size
    if isinstance(size, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", size, re.I):
        return size.strip()
    raise ValueError(f"max_shard_size={size!r} is not a size: use a positive number of bytes or e.g. '5GB', '500MB'.")


def resolve_token(token: str | None = None) -> str:
    """The explicit token, else `HF_TOKEN`, else the login cache; a ValueError when there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise ValueError("No Hugging Face token found: set HF_TOKEN or run `hf auth login` (or pass --dry-run).")
    return token


# ----------------------------------------------------------------------------------------------------------------------
# Step 1: assemble


def _select_model_dir(folder: Path, checkpoint: str | None) -> Path:
    """The final model at the top of a Trainer output folder, or the checkpoint asked for."""
    if not folder.is_dir():
        raise ValueError(f"folder={str(folder)!r} does not exist or is not a directory.")
    checkpoints = sorted((p for p in folder.glob("checkpoint-*") if p.is_dir()), key=_step)
    if checkpoint is not None:
        if not checkpoint or "/" in checkpoint or "\\" in checkpoint or checkpoint in (".", ".."):
            raise ValueError(f"checkpoint={checkpoint!r} must be the name of a folder directly inside {folder}.")
        model_dir = checkpoints[-1] if checkpoint == "latest" and checkpoints else folder / checkpoint
        if not model_dir.is_dir():
            names = ", ".join(p.name for p in checkpoints) or "none"
            raise ValueError(f"checkpoint={checkpoint!r} is not a folder in {folder} (checkpoints: {names}).")
    else:
        model_dir = folder
    if not (model_dir / "config.json").exists() and not (model_dir / "adapter_config.json").exists():
        if model_dir == folder and checkpoints:
            names = ", ".join(p.name for p in checkpoints)
            raise ValueError(
                f"{folder} holds no final model (no config.json) but checkpoints {names}: "
                "pass --checkpoint NAME (or 'latest') to publish one."
            )
        raise ValueError(
            f"{model_dir} holds neither config.json nor adapter_config.json: it is not a saved model "
            "(missing or half-written folder)."
        )
    return model_dir


def _step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}): half-written?") from error


def _load_model(model_dir: Path):
    """The model, loaded with the bundled code: `from_pretrained` refuses weights that do not fit the config (missing,
    unexpected or resized tensors) and unreadable safetensors, with a message that says so."""
    from transformers.utils import logging as hf_logging

    from modeling_bd3lm import BD3LMForMaskedDiffusion

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the refusal below says what is wrong; transformers' load report would repeat it
    try:
        return BD3LMForMaskedDiffusion.from_pretrained(model_dir, dtype="auto").eval()
    except OSError as error:  # no weights, a missing shard, a config.json that is not JSON
        raise ValueError(f"{model_dir} is not a complete BD3-LM save: {error}") from error
    finally:
        hf_logging.set_verbosity(verbosity)


def _assemble_model(model_dir: Path, staging: Path, max_shard_size, info: CardInfo, nfe_tokens: int) -> None:
    """Re-save the validated model into `staging` (code files, auto_map, generation config, shards); fill `info`."""
    model = _load_model(model_dir)
    model.save_pretrained(staging, max_shard_size=max_shard_size)
    raw, config = read_json(model_dir / "config.json", "The config"), model.config
    # The official release names its class `BD3LM`; this package's saves name `BD3LMForMaskedDiffusion`.
    info.converted_from_official = raw.get("architectures") == ["BD3LM"] or str(
        raw.get("auto_map", {}).get("AutoModelForMaskedLM")
    ).endswith(".BD3LM")
    info.architecture = {
        name: getattr(config, name)
        for name in (
            "block_size",
            "model_length",
            "vocab_size",
            "mask_token_id",
            "hidden_dim",
            "n_blocks",
            "n_heads",
            "noise_schedule",
            "clean_attention",
        )
    }
    info.architecture["parameters"] = sum(p.numel() for p in model.parameters())
    if model.denoiser.description is not None:  # a denoiser other than the official DiT (a converted causal LM)
        info.architecture["denoiser"] = model.denoiser.description
    info.noise_interval = model.training_noise_interval()
    generation = read_json(staging / "generation_config.json", "The generation config")
    # Only what differs from a fresh generation config: a null field is the built-in default and says nothing.
    builtin = type(model.generation_config)().to_dict()
    info.sampler_defaults = {
        k: v
        for k, v in generation.items()
        if k not in ("transformers_version", "_from_model_config") and v != builtin.get(k)
    }
    info.sampler = model.generation_config.resolved_sampler
    info.network_calls = _measure_network_calls(model, nfe_tokens) if nfe_tokens > 0 else None


def _assemble_adapter(model_dir: Path, staging: Path, base_model: str | None) -> dict:
    config = read_json(model_dir / "adapter_config.json", "The adapter config")
    weights = model_dir / "adapter_model.safetensors"
    if not weights.exists():
        bad = (
            "adapter_model.bin is a pickle, re-save with safetensors"
            if (model_dir / "adapter_model.bin").exists()
            else "the save is incomplete"
        )
        raise ValueError(f"{model_dir} has adapter_config.json but no adapter_model.safetensors: {bad}.")
    base = base_model or config.get("base_model_name_or_path")
    if not base or Path(base).exists():
        raise ValueError(
            f"The adapter's base model is {base!r}, not a Hub repository: pass --base-model "
            "namespace/name so that the card and adapter_config.json name the published base."
        )
    check_repo_id(base, name="base_model", namespace=False)
    rank = config.get("r")
    if rank is not None and not config.get("rank_pattern"):
        for key, shape in _tensor_shapes(weights).items():
            if (key.endswith("lora_A.weight") and shape[0] != rank) or (
                key.endswith("lora_B.weight") and shape[1] != rank
            ):
                raise ValueError(
                    f"The adapter weights do not match adapter_config.json: {key} has shape {shape} but "
                    f"r={rank}; check that the config belongs to these weights."
                )
    config["base_model_name_or_path"] = base
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy2(weights, staging / weights.name)
    targets = config.get("target_modules")
    return {
        "peft_type": config.get("peft_type"),
        "r": rank,
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "gated": is_gated_adapter_config(config),
        "base_model": base,
    }


def _copy_tokenizer(tokenizer_dirs: list[Path], staging: Path, vocab_size: int | None) -> list[Path]:
    """Copy the allow-listed tokenizer files of the first folder that has any."""
    for directory in tokenizer_dirs:
        found = [p for p in sorted(directory.iterdir()) if p.is_file() and _matches(p.name, TOKENIZER_FILES)]
        if not found:
            continue
        if vocab_size is not None and (directory / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            size = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
            if size > vocab_size:
                raise ValueError(
                    f"The tokenizer in {directory} has {size} ids but the model's vocab_size is "
                    f"{vocab_size}: publish the tokenizer the model was trained with (--tokenizer)."
                )
        for path in found:
            shutil.copy2(path, staging / path.name)
        return found
    return []


def _measure_network_calls(model, num_tokens: int) -> dict | None:
    """Network calls per generated token, as `generate` counts them (`nfe`, see
    `bd3lm_trainer.evaluation.network_calls_per_token`), for `num_tokens` tokens after a one-token prompt."""
    import torch

    from .evaluation.generative_perplexity import network_calls_per_token

    config = model.config
    num_tokens = min(num_tokens, config.model_length - config.block_size) // config.block_size * config.block_size
    if num_tokens <= 0:
        return None
    candidates = [
        getattr(source, name, None)
        for source in (model.generation_config, config)
        for name in ("bos_token_id", "eos_token_id")
    ]
    prompt_id = next((i for i in candidates if isinstance(i, int)), 0)
    try:
        with torch.no_grad():
            output = model.generate(
                torch.tensor([[prompt_id]]), max_new_tokens=num_tokens, seed=0, return_dict_in_generate=True
            )
    except NotImplementedError:
        return None
    except Exception as error:
        raise ValueError(
            f"generate() failed while counting network calls ({type(error).__name__}: {error}); "
            "pass --nfe-tokens 0 to skip the measurement."
        ) from error
    calls_per_token, _ = network_calls_per_token(output)
    generated = int(output.sequences.shape[-1]) - 1
    return {
        "calls": int(output.nfe.sum()),
        "tokens": generated,
        "calls_per_token": calls_per_token,
        "method": f"generate()'s count of network calls (prefill and cache commits ride inside them) while "
        f"generating {generated} tokens after a one-token prompt, batch 1, default generation config, "
        "seed 0, on CPU",
    }


def _left_out(folder: Path, model_dir: Path, used: set[Path]) -> list[LeftOut]:
    """Every file or folder under `folder` whose content is not published, with the reason."""
    items = []

    def classify(path: Path, in_model_dir: bool) -> None:
        rel = path.relative_to(folder).as_posix()
        if path in used:
            return
        if path.is_dir():
            checkpoint = _step(path) >= 0
            items.append(
                LeftOut(
                    rel + "/",
                    f"intermediate checkpoint; pass --checkpoint {path.name} to publish it"
                    if checkpoint
                    else "folder not on the allow-list",
                )
            )
        elif _matches(path.name, REGENERATED):
            if not in_model_dir:
                items.append(LeftOut(rel, f"belongs to the final model; publishing {model_dir.name} instead"))
        elif _matches(path.name, REPORT_FILES):
            items.append(LeftOut(rel, READ_INTO_CARD))
        elif _matches(path.name, TOKENIZER_FILES):
            items.append(LeftOut(rel, "tokenizer file; another folder's tokenizer is published"))
        else:
            reason = next(
                (why for pattern, why in LEFT_OUT_REASONS if fnmatch.fnmatch(path.name, pattern)),
                "not on the allow-list (pass --include to publish it)",
            )
            items.append(LeftOut(rel, reason))

    for path in sorted(folder.iterdir()):
        if path == model_dir and model_dir != folder:
            for sub in sorted(model_dir.iterdir()):
                classify(sub, in_model_dir=True)
        else:
            classify(path, in_model_dir=model_dir == folder)
    return items


def plan_upload(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    checkpoint: str | None = None,
    include: list[str] | tuple[str, ...] = (),
    tokenizer: str | os.PathLike | None = None,
    max_shard_size: str | int = "5GB",
    base_model: str | None = None,
    datasets: list[str] | tuple[str, ...] = (),
    license: str = "unknown",
    nfe_tokens: int = 64,
) -> UploadPlan:
    """Assemble the repository to publish from `folder` in a temporary staging folder, card included.

    Args:
        folder: a folder saved by `save_pretrained`, a Trainer output folder (the final model at its top, `checkpoint-*`
            below), an official checkpoint (config.json + model.safetensors) or a PEFT adapter folder.
        repo_id: the repository ('namespace/name') the card's snippets load from.
        checkpoint: publish `folder/<checkpoint>` (or `"latest"`) instead of the final model.
        include: glob patterns, relative to the model folder, of extra files to publish on purpose.
        tokenizer: take the tokenizer files from this folder instead of the model's (or the Trainer output's) own.
        max_shard_size: safetensors files above this size are sharded (`save_pretrained`'s `max_shard_size`).
        base_model: Hub id of the model this one was fine-tuned from; an adapter's base when its config names a
            local path.
        datasets: Hub ids of the training data, for the card's metadata.
        license: the licence identifier for the card ("unknown" unless told).
        nfe_tokens: tokens to generate when measuring network calls per token (0 skips the measurement).

    Returns:
        An `UploadPlan`; use it as a context manager (or call `cleanup()`) to remove the staging folder.
    """
    check_repo_id(repo_id)
    if base_model is not None:
        check_repo_id(base_model, name="base_model", namespace=False)
    for dataset in datasets:
        check_repo_id(dataset, name="dataset", namespace=False)
    if not is_int(nfe_tokens) or nfe_tokens < 0:
        raise ValueError(f"nfe_tokens={nfe_tokens!r} must be an integer >= 0 (0 skips the measurement).")
    max_shard_size = check_shard_size(max_shard_size)
    for pattern in include:
        if "custom_generate" in pattern:
            raise ValueError(
                f"--include {pattern!r}: custom_generate/ code is never published; BD3-LM's generate() is part of the "
                "model code and runs only under trust_remote_code=True."
            )
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise ValueError(f"tokenizer={str(tokenizer)!r} is not a folder.")
    folder = Path(folder).resolve()
    model_dir = _select_model_dir(folder, checkpoint)
    staging = Path(tempfile.mkdtemp(prefix="bd3lm-upload-"))
    info = CardInfo(repo_id=repo_id, license=license, datasets=list(datasets), base_model=base_model)
    notes, used, origins = [], set(), {}
    try:
        if (model_dir / "adapter_config.json").exists():
            info.kind, info.adapter = "adapter", _assemble_adapter(model_dir, staging, base_model)
            info.base_model = info.adapter.pop("base_model")
            used |= {model_dir / "adapter_config.json", model_dir / "adapter_model.safetensors"}
        else:
            _assemble_model(model_dir, staging, max_shard_size, info, nfe_tokens)
            if info.network_calls is None and nfe_tokens > 0:
                notes.append("network calls per token not measured: this build's generate() is not implemented")
        dirs = [Path(tokenizer)] if tokenizer is not None else [model_dir, folder]
        for path in _copy_tokenizer(dirs, staging, info.architecture.get("vocab_size")):
            used.add(path)
            origins[path.name] = f"copied from {path.parent.name}/"
        info.has_tokenizer = any(origins)
        if not info.has_tokenizer:
            notes.append("no tokenizer files found: the card says which tokenizer to use (--tokenizer DIR adds one)")
        for pattern in include:
            matched = [
                p
                for p in sorted(model_dir.rglob("*"))
                if p.is_file() and p not in used and fnmatch.fnmatch(p.relative_to(model_dir).as_posix(), pattern)
            ]
            if not matched:
                raise ValueError(f"--include {pattern!r} matches no file in {model_dir} that is not already published.")
            for path in matched:
                rel = path.relative_to(model_dir).as_posix()
                if (staging / rel).exists() or rel == "README.md":
                    raise ValueError(f"--include {pattern!r} would overwrite the generated {rel}; drop it.")
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, staging / rel)
                used.add(path)
                origins[rel] = "included on request (--include)"
        read_reports(info, [model_dir, folder])
        card = build_model_card(info)
        card.save(staging / "README.md")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    default = "copied (adapter)" if info.kind == "adapter" else "re-saved by save_pretrained"
    origins["README.md"] = "generated model card"
    files = [
        PlannedFile(rel, path.stat().st_size, origins.get(rel, default))
        for path in sorted(staging.rglob("*"))
        if path.is_file() and (rel := path.relative_to(staging).as_posix())
    ]
    return UploadPlan(info.kind, model_dir, staging, files, _left_out(folder, model_dir, used), card, info, notes)


# ----------------------------------------------------------------------------------------------------------------------
# Step 3: push


def _refuse_token_in_files(plan: UploadPlan, token: str) -> None:
    needle = token.encode()
    for planned in plan.files:
        with open(plan.staging / planned.path, "rb") as f:
            tail = b""
            while chunk := f.read(1 << 24):
                if needle in tail + chunk:
                    raise ValueError(
                        f"{planned.path} contains your Hugging Face token: remove it (or drop the "
                        "--include that added it). Nothing was sent."
                    )
                tail = chunk[-len(needle) :]


def upload(
    plan: UploadPlan,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> UploadResult:
    """Create `repo_id` (if needed) and commit exactly the plan's files to `revision` (a branch, created from main if
    missing), or open a pull request against it with `create_pr=True`.

    `endpoint` defaults to `HF_ENDPOINT` read now, so a Hub mirror set after `huggingface_hub` was imported still
    counts. Checks run before anything is sent: the id, the token, and that no staged file contains the token.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    check_repo_id(repo_id)
    if repo_id != plan.card_info.repo_id:
        raise ValueError(
            f"repo_id={repo_id!r} differs from the plan's ({plan.card_info.repo_id!r}), whose card loads "
            "from it: plan again for this repository."
        )
    token = resolve_token(token)
    _refuse_token_in_files(plan, token)
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    api.whoami()  # a bad token fails here, before the repository is created
    api.create_repo(repo_id, private=private, exist_ok=True)
    branch = revision or "main"
    if branch != "main":
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(plan.staging / f.path)) for f in plan.files
    ]
    left = "".join(f"\n- {item.path} ({item.reason})" for item in plan.left_out) or " nothing"
    description = (
        f"Published with hub_upload from `{plan.source.name}` ({plan.kind}): {len(plan.files)} files, "
        f"{_human(plan.total_size)}.\n\nLeft out:{left}"
    )
    info = api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or f"Upload BD3-LM {plan.kind}",
        commit_description=description,
        revision=branch,
        create_pr=create_pr,
    )
    return UploadResult(repo_id, info.commit_url, info.oid, info.pr_url, branch)
