"""Publish a trained BD3-LM (or a LoRA adapter for one) to the Hugging Face Hub, with a model card.

    python -m hub_upload OUTPUT_DIR namespace/name --dry-run          # print the plan and the card, send nothing
    python -m hub_upload OUTPUT_DIR namespace/name --private           # create the repository and upload
    bd3lm upload ...                                                   # the same command, through the CLI

Three small steps, as TRL's `_save_checkpoint` does: (1) assemble exactly the repository to publish in a staging
folder, by re-saving the validated model (code files, `config.json` with `auto_map`, `generation_config.json`,
safetensors shards) and copying allow-listed tokenizer files; (2) write the model card from the model and the
trainer's JSON reports; (3) create the repository and commit the staging folder in one commit. Anything else in the
folder (optimizer, scheduler and RNG states, `training_args.bin`, `.env` files, unknown files) stays behind unless
`--include` names it, and the plan says what was left out and why.

The token comes from `HF_TOKEN` or the login cache (`huggingface_hub.get_token`); it is never printed, logged or
written, and an upload is refused if a staged file contains it.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.*")
# JSON reports the trainer writes; read into the card, not published.
REPORT_FILES = ("eval_results.json", "all_results.json", "train_results.json", "trainer_state.json",
                "schedule_search.json", "training_args.json", "training_data.json")
# Files that a re-save regenerates (weights, config, code, generation config) or the card replaces.
REGENERATED = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
               "model.safetensors.index.json", "*_bd3lm.py", "__init__.py")
# Why well-known training leftovers stay behind; anything unmatched is "not on the allow-list".
LEFT_OUT_REASONS = (
    ("optimizer.*", "optimizer state"), ("scheduler.*", "learning-rate scheduler state"),
    ("rng_state*", "RNG state"), ("scaler.*", "mixed-precision scaler state"),
    ("training_args.bin", "training arguments (a pickle)"), (".env*", "environment file (may hold secrets)"),
    ("*.bin", "pickle weights are never published"), ("*.pt", "pickle file"), ("*.pth", "pickle file"),
    ("README.md", "replaced by the generated model card"),
    ("ema_state.safetensors", "EMA training state (the saved weights already are the EMA)"),
)
PAPER_CITATION = """@inproceedings{arriola2025block,
  title     = {Block Diffusion: Interpolating Between Autoregressive and Diffusion Language Models},
  author    = {Marianne Arriola and Aaron Gokaslan and Justin T. Chiu and Zhihan Yang and Zhixuan Qi and
               Jiaqi Han and Subham Sekhar Sahoo and Volodymyr Kuleshov},
  booktitle = {The Thirteenth International Conference on Learning Representations},
  year      = {2025},
  url       = {https://arxiv.org/abs/2503.09573}
}"""
TAGS = ["block-diffusion", "bd3lm", "diffusion-language-model"]

__all__ = ["CardInfo", "LeftOut", "PlannedFile", "UploadPlan", "UploadResult", "build_model_card", "check_repo_id",
           "main", "plan_upload", "resolve_token", "upload"]


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
    reason: str


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
    adapter: dict[str, Any] | None = None  # peft_type, r, lora_alpha, target_modules
    has_tokenizer: bool = False


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
        lines.append(f"Left out ({len(self.left_out)}):" if self.left_out else "Left out: nothing")
        lines += [f"  {item.path}  ({item.reason})" for item in self.left_out]
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


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{what} {path} is not readable JSON ({error}); was the save interrupted?") from error


def check_repo_id(repo_id: str, *, name: str = "repo_id", namespace: bool = True) -> str:
    """Raise a ValueError naming the fix unless `repo_id` is a valid Hub id ('namespace/name')."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if not repo_id or (namespace and "/" not in repo_id):
            raise HFValidationError("it needs a namespace.")
    except HFValidationError as error:
        raise ValueError(f"{name}={repo_id!r} is not a valid Hub repository id: {error} Use 'namespace/name' "
                         "(letters, digits, '-', '_', '.').") from None
    return repo_id


def check_shard_size(size: str | int) -> str | int:
    """`size` as `save_pretrained`'s `max_shard_size` takes it ('5GB', '500MB', bytes), or a ValueError naming it."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
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
            raise ValueError(f"{folder} holds no final model (no config.json) but checkpoints {names}: "
                             "pass --checkpoint NAME (or 'latest') to publish one.")
        raise ValueError(f"{model_dir} holds neither config.json nor adapter_config.json: it is not a saved model "
                         "(missing or half-written folder).")
    return model_dir


def _step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(_read_json(index, "The shard index").get("weight_map", {}).values()))
        missing = [name for name in shards if not (model_dir / name).exists()]
        if not shards or missing:
            raise ValueError(f"{index} lists shards that are missing ({', '.join(missing) or 'none listed'}): "
                             "the save is incomplete.")
        return [model_dir / name for name in shards]
    if (model_dir / "model.safetensors").exists():
        return [model_dir / "model.safetensors"]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise ValueError(f"{model_dir} holds only pickle weights (.bin/.pt), which this tool refuses to load or "
                         "publish: re-save the model with safetensors (`save_pretrained` does by default).")
    raise ValueError(f"{model_dir} has a config.json but no model.safetensors: the save is incomplete.")


def _checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} is not a readable safetensors file ({error}): half-written?") from error
    return shapes


def _load_model(model_dir: Path):
    """Load with the bundled code after checking, key by key, that the weights fit the config."""
    import torch

    from modeling_bd3lm import BD3LMConfig, BD3LMForMaskedDiffusion
    from modeling_bd3lm.modeling_bd3lm import parameter_name

    try:
        config = BD3LMConfig.from_pretrained(model_dir)
    except (ValueError, TypeError, OSError) as error:
        raise ValueError(f"{model_dir}/config.json is not a valid BD3-LM config: {error}") from error
    with torch.device("meta"):
        skeleton = BD3LMForMaskedDiffusion(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    # Tied copies (a causal-LM backbone's head tied to its embedding) are not written by save_pretrained.
    tied = set(getattr(skeleton, "all_tied_weights_keys", None) or ())
    # checkpoints store the token table under the official key; compare under the in-memory names
    found = {parameter_name(key): shape for key, shape in _checkpoint_shapes(_weight_files(model_dir)).items()}
    ignorable = BD3LMForMaskedDiffusion._keys_to_ignore_on_load_unexpected or []
    missing = sorted(set(expected) - set(found) - tied)
    unexpected = sorted(k for k in set(found) - set(expected) if not any(re.search(p, k) for p in ignorable))
    wrong = sorted(f"{k} {found[k]} vs {expected[k]}" for k in set(found) & set(expected) if found[k] != expected[k])
    if missing or unexpected or wrong:
        problems = [f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                    if keys]
        raise ValueError(f"The weights in {model_dir} do not match its config.json ({'; '.join(problems)}): check "
                         "that config.json belongs to these weights.")
    model = BD3LMForMaskedDiffusion.from_pretrained(model_dir, dtype="auto")
    return model.eval()


def _assemble_model(model_dir: Path, staging: Path, max_shard_size, info: CardInfo, nfe_tokens: int) -> None:
    """Re-save the validated model into `staging` (code files, auto_map, generation config, shards); fill `info`."""
    model = _load_model(model_dir)
    model.save_pretrained(staging, max_shard_size=max_shard_size)
    raw, config = _read_json(model_dir / "config.json", "The config"), model.config
    # The official release names its class `BD3LM`; this package's saves name `BD3LMForMaskedDiffusion`.
    info.converted_from_official = raw.get("architectures") == ["BD3LM"] or str(
        raw.get("auto_map", {}).get("AutoModelForMaskedLM")).endswith(".BD3LM")
    info.architecture = {name: getattr(config, name) for name in (
        "block_size", "model_length", "vocab_size", "mask_token_id", "hidden_dim", "n_blocks", "n_heads",
        "noise_schedule")}
    info.architecture["parameters"] = sum(p.numel() for p in model.parameters())
    if getattr(config, "backbone_config", None) is not None:  # a converted causal LM (from_causal_lm)
        shift = "token shift: position i-1 predicts token i" if config.token_shift else "no token shift"
        info.architecture["denoiser"] = f"{type(model.backbone).__name__} ({shift})"
    info.noise_interval = model.training_noise_interval()
    generation = _read_json(staging / "generation_config.json", "The generation config")
    # Only what differs from a fresh generation config: a null field is the built-in default and says nothing.
    builtin = type(model.generation_config)().to_dict()
    info.sampler_defaults = {k: v for k, v in generation.items()
                             if k not in ("transformers_version", "_from_model_config") and v != builtin.get(k)}
    info.sampler = model.generation_config.resolved_sampler
    info.network_calls = _measure_network_calls(model, nfe_tokens) if nfe_tokens > 0 else None


def _assemble_adapter(model_dir: Path, staging: Path, base_model: str | None) -> dict:
    config = _read_json(model_dir / "adapter_config.json", "The adapter config")
    weights = model_dir / "adapter_model.safetensors"
    if not weights.exists():
        bad = "adapter_model.bin is a pickle, re-save with safetensors" if (model_dir / "adapter_model.bin").exists() \
            else "the save is incomplete"
        raise ValueError(f"{model_dir} has adapter_config.json but no adapter_model.safetensors: {bad}.")
    base = base_model or config.get("base_model_name_or_path")
    if not base or Path(base).exists():
        raise ValueError(f"The adapter's base model is {base!r}, not a Hub repository: pass --base-model "
                         "namespace/name so that the card and adapter_config.json name the published base.")
    check_repo_id(base, name="base_model", namespace=False)
    rank = config.get("r")
    if rank is not None and not config.get("rank_pattern"):
        for key, shape in _checkpoint_shapes([weights]).items():
            if (key.endswith("lora_A.weight") and shape[0] != rank) or (key.endswith("lora_B.weight") and shape[1] != rank):
                raise ValueError(f"The adapter weights do not match adapter_config.json: {key} has shape {shape} but "
                                 f"r={rank}; check that the config belongs to these weights.")
    config["base_model_name_or_path"] = base
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy2(weights, staging / weights.name)
    targets = config.get("target_modules")
    return {"peft_type": config.get("peft_type"), "r": rank, "lora_alpha": config.get("lora_alpha"),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets, "base_model": base}


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
                raise ValueError(f"The tokenizer in {directory} has {size} ids but the model's vocab_size is "
                                 f"{vocab_size}: publish the tokenizer the model was trained with (--tokenizer).")
        for path in found:
            shutil.copy2(path, staging / path.name)
        return found
    return []


def _measure_network_calls(model, num_tokens: int) -> dict | None:
    """Network calls per generated token: every backbone forward over the tokens generated (the prompt and the
    committed blocks are written to the cache inside these calls)."""
    import torch

    config = model.config
    num_tokens = min(num_tokens, config.model_length - config.block_size) // config.block_size * config.block_size
    if num_tokens <= 0:
        return None
    calls = 0

    def count(*_):
        nonlocal calls
        calls += 1

    candidates = [getattr(source, name, None) for source in (model.generation_config, config)
                  for name in ("bos_token_id", "eos_token_id")]
    prompt_id = next((i for i in candidates if isinstance(i, int)), 0)
    handle = model.backbone.register_forward_pre_hook(count)
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            output = model.generate(torch.tensor([[prompt_id]]), max_new_tokens=num_tokens)
    except NotImplementedError:
        return None
    except Exception as error:
        raise ValueError(f"generate() failed while counting network calls ({type(error).__name__}: {error}); "
                         "pass --nfe-tokens 0 to skip the measurement.") from error
    finally:
        handle.remove()
    sequences = getattr(output, "sequences", output)
    generated = int(sequences.shape[-1]) - 1
    return {"calls": calls, "tokens": generated, "calls_per_token": calls / max(generated, 1),
            "method": f"counted every backbone forward pass (prefill and cache commits ride inside them) while "
                      f"generating {generated} tokens after a one-token prompt, batch 1, default generation config, "
                      "torch.manual_seed(0), on CPU"}


def _left_out(folder: Path, model_dir: Path, used: set[Path]) -> list[LeftOut]:
    """Every file or folder under `folder` whose content is not published, with the reason."""
    items = []

    def classify(path: Path, in_model_dir: bool) -> None:
        rel = path.relative_to(folder).as_posix()
        if path in used:
            return
        if path.is_dir():
            checkpoint = _step(path) >= 0
            items.append(LeftOut(rel + "/", f"intermediate checkpoint; pass --checkpoint {path.name} to publish it"
                                 if checkpoint else "folder not on the allow-list"))
        elif _matches(path.name, REGENERATED):
            if not in_model_dir:
                items.append(LeftOut(rel, f"belongs to the final model; publishing {model_dir.name} instead"))
        elif _matches(path.name, REPORT_FILES):
            items.append(LeftOut(rel, "read into the model card"))
        elif _matches(path.name, TOKENIZER_FILES):
            items.append(LeftOut(rel, "tokenizer file; another folder's tokenizer is published"))
        else:
            reason = next((why for pattern, why in LEFT_OUT_REASONS if fnmatch.fnmatch(path.name, pattern)),
                          "not on the allow-list (pass --include to publish it)")
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
    if isinstance(nfe_tokens, bool) or not isinstance(nfe_tokens, int) or nfe_tokens < 0:
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
            matched = [p for p in sorted(model_dir.rglob("*")) if p.is_file() and p not in used
                       and fnmatch.fnmatch(p.relative_to(model_dir).as_posix(), pattern)]
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
        _read_reports(info, [model_dir, folder])
        card = build_model_card(info)
        card.save(staging / "README.md")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    default = "copied (adapter)" if info.kind == "adapter" else "re-saved by save_pretrained"
    origins["README.md"] = "generated model card"
    files = [PlannedFile(rel, path.stat().st_size, origins.get(rel, default))
             for path in sorted(staging.rglob("*")) if path.is_file() and (rel := path.relative_to(staging).as_posix())]
    return UploadPlan(info.kind, model_dir, staging, files, _left_out(folder, model_dir, used), card, info, notes)


def _read_reports(info: CardInfo, dirs: list[Path]) -> None:
    """Card facts from the trainer's JSON reports: the first folder that has a file wins."""

    def report(name: str) -> dict:
        path = next((d / name for d in dirs if (d / name).exists()), None)
        return _read_json(path, "The report") if path is not None else {}

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
    training = {"steps": state.get("global_step"), "epochs": state.get("epoch"),
                "train_batch_size": state.get("train_batch_size")}
    keys = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "warmup_steps",
            "lr_scheduler_type", "weight_decay", "max_steps", "num_train_epochs", "seed", "bf16", "fp16")
    training.update({k: args[k] for k in keys if k in args})
    info.training = {k: v for k, v in training.items() if v is not None}


# ----------------------------------------------------------------------------------------------------------------------
# Step 2: the model card


def build_model_card(info: CardInfo):
    """A `huggingface_hub.ModelCard`: YAML metadata from `ModelCardData` and a body that says how to load, generate,
    what was measured and how, the training recipe, limitations and the paper's citation."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    adapter = info.kind == "adapter"
    eval_results = None
    if info.evaluation is not None:
        dataset = info.evaluation.get("dataset") or "custom"
        eval_results = [EvalResult(
            task_type="text-generation", task_name="Language modelling", dataset_type=dataset, dataset_name=dataset,
            dataset_split="validation", metric_type="perplexity", metric_value=round(info.evaluation["ppl"], 4),
            metric_name="Perplexity upper bound (block NELBO)",
        )]
    relation = {"base_model_relation": "adapter" if adapter else "finetune"} if info.base_model else {}
    data = ModelCardData(
        library_name="peft" if adapter else "transformers", pipeline_tag="text-generation",
        tags=TAGS + (["lora", "peft"] if adapter and "LORA" in str(info.adapter.get("peft_type")).upper() else
                     ["peft"] if adapter else []),
        license=info.license, datasets=info.datasets or None, base_model=info.base_model,
        model_name=info.repo_id.split("/")[-1], eval_results=eval_results, **relation,
    )
    sections = [_card_intro(info), _card_load(info)]
    sections += [_card_adapter(info)] if adapter else [_card_details(info), _card_sampler(info)]
    sections += [_card_training(info), _card_limitations(info), f"## Citation\n\n```bibtex\n{PAPER_CITATION}\n```\n"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections))


def _card_intro(info: CardInfo) -> str:
    name = info.repo_id.split("/")[-1]
    paper = "[Block Diffusion](https://arxiv.org/abs/2503.09573) (BD3-LM, Arriola et al., ICLR 2025)"
    if info.kind == "adapter":
        text = f"A {info.adapter.get('peft_type') or 'PEFT'} adapter for the {paper} model `{info.base_model}`."
    else:
        arch = info.architecture
        text = (f"A {paper} language model with {arch['parameters']:,} parameters and block size "
                f"L' = {arch['block_size']}: it writes text block by block, left to right, and fills each block of "
                f"{arch['block_size']} tokens by iterative unmasking (discrete diffusion) conditioned on the blocks "
                "before it, with a KV cache over committed blocks.")
        if info.converted_from_official:
            text += (" The weights are an official BD3-LM release, unchanged; the code is this package's "
                     "re-implementation, whose logits match the official code's.")
        if info.base_model:
            text += f" Fine-tuned from [`{info.base_model}`](https://huggingface.co/{info.base_model})."
    return f"# {name}\n\n{text}\n"


def _card_load(info: CardInfo) -> str:
    pin = ('revision = "main"  # pin a commit hash of this repository: remote code runs on your machine,\n'
           "                   # so load a revision you have read, and the same one every time\n")
    if info.kind == "adapter":
        base_pin = 'base_revision = "main"  # pin this one too\n'
        return ("## How to load\n\nThe base model ships its own modelling code, so it loads with "
                "`trust_remote_code=True`; the adapter then loads with PEFT.\n\n```python\n"
                "from peft import PeftModel\nfrom transformers import AutoModelForMaskedLM\n\n" + pin + base_pin +
                f'base = AutoModelForMaskedLM.from_pretrained("{info.base_model}", trust_remote_code=True, '
                "revision=base_revision)\n"
                f'model = PeftModel.from_pretrained(base, "{info.repo_id}", revision=revision)\n'
                "model = model.merge_and_unload()  # optional: plain BD3-LM weights, same generate()\n```\n")
    arch = info.architecture
    if info.has_tokenizer:
        tok = 'tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision)\n'
    elif info.converted_from_official and arch.get("vocab_size") == 50258:
        tok = 'tokenizer = AutoTokenizer.from_pretrained("gpt2")  # GPT-2 ids; the mask is the extra id 50257\n'
    else:
        tok = (f"tokenizer = ...  # not included: the tokenizer the model was trained with "
               f"(mask id {arch.get('mask_token_id')})\n")
    return (
        "## How to load\n\nThe modelling code ships in this repository (`*_bd3lm.py`, `auto_map` in config.json), so "
        "no package is needed beyond `transformers` and `torch`; `trust_remote_code=True` lets it run. Pin a "
        "revision.\n\n```python\nfrom transformers import AutoModelForMaskedLM, AutoTokenizer\n\n"
        f'repo = "{info.repo_id}"\n' + pin + tok +
        "model = AutoModelForMaskedLM.from_pretrained(repo, trust_remote_code=True, revision=revision).eval()\n```\n\n"
        "## Generate\n\n```python\nimport torch\n\n"
        'inputs = tokenizer("The block diffusion model", return_tensors="pt")\n'
        "with torch.no_grad():\n    output = model.generate(**inputs, max_new_tokens=64)\n"
        "print(tokenizer.decode(output[0], skip_special_tokens=True))\n```\n\n"
        f"Tokens are drawn in whole blocks of {arch['block_size']}; the output stops at `max_new_tokens` (or EOS). "
        "Sampler settings are the defaults below unless passed to `generate`.\n\n"
        "The `text-generation` pipeline works too (greedy output and seeded samples do not depend on the batch):\n\n"
        "```python\nfrom transformers import pipeline\n\n"
        'pipe = pipeline("text-generation", model=repo, tokenizer=tokenizer, trust_remote_code=True, '
        "revision=revision)\n"
        'print(pipe("The block diffusion model", max_new_tokens=64, do_sample=False)[0]["generated_text"])\n```\n'
    )


def _card_details(info: CardInfo) -> str:
    arch, (lo, hi) = info.architecture, info.noise_interval or (None, None)
    rows = [("Block size L'", arch["block_size"]), ("Context window (model_length)", arch["model_length"]),
            ("Vocabulary size", arch["vocab_size"]), ("Mask token id", arch["mask_token_id"]),
            ("Layers / heads / hidden size", f"{arch['n_blocks']} / {arch['n_heads']} / {arch['hidden_dim']}"),
            ("Parameters", f"{arch['parameters']:,}"), ("Noise schedule", arch["noise_schedule"])]
    if arch.get("denoiser"):
        rows.insert(0, ("Denoiser", arch["denoiser"]))
    if lo is not None:
        rows.append(("Training noise interval [β, ω]", f"[{lo:.4g}, {hi:.4g}]"))
    table = "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    search = info.schedule_search
    if search:
        # The trainer's NoiseScheduleSearchCallback writes {step, num_batches, best, applied, table}.
        where = f" at step {search['step']}" if "step" in search else ""
        size = f" over {len(search['table'])} candidate intervals" if isinstance(search.get("table"), list) else ""
        batches = f", {search['num_batches']} validation batches each" if "num_batches" in search else ""
        noise = (f"The interval was chosen by the data-driven search{where}{size}{batches}: the candidate whose "
                 "per-block NELBO values have the least variance (Arriola et al. 2025, Sec. 4; `schedule_search.json`)"
                 + (f", best {search['best']}" if "best" in search else "") + ".")
    elif lo is not None and (lo, hi) != (1e-3, 1.0) and abs(lo - 1e-3) + abs(hi - 0.999) > 1e-6:
        noise = "The interval is stored in the weights (`sampling_eps_min/max`); no search report came with them."
    else:
        noise = "The interval is the unclipped default; no schedule search was recorded."
    return (f"## Model details\n\n{table}\nTraining draws one noise level per block, t ~ U[β, ω]; evaluation uses "
            f"t ~ U[1e-3, 1]. {noise}\n")


def _card_sampler(info: CardInfo) -> str:
    settings = dict(info.sampler_defaults)
    stored = settings.pop("sampler", None)
    rows = [(k, f"`{json.dumps(v)}`") for k, v in sorted(settings.items())]
    if info.sampler is not None:  # the one the measurement below and a plain `generate()` use
        how = "" if stored else " (none stored: chosen because `confidence_threshold` is set)" \
            if info.sampler == "confidence_threshold" else " (none stored: the built-in default)"
        rows.insert(0, ("sampler", f"`{info.sampler}`{how}"))
    table = "".join(f"| `{k}` | {v} |\n" for k, v in rows)
    table = (f"| setting | value |\n|---|---|\n{table}\nEvery other setting is the built-in default of "
             "`BD3LMGenerationConfig`.\n" if rows else "No sampler settings are stored.\n")
    calls = info.network_calls
    if calls is not None:
        nfe = (f"**{calls['calls_per_token']:.3f} network calls per generated token** ({calls['calls']} forward "
               f"passes for {calls['tokens']} tokens). How: {calls['method']}.")
    else:
        nfe = ("Not measured for this upload (the `generate` of the code that wrote this card was not available). "
               "With one token unmasked per call plus one cache-commit pass per block, expect about "
               f"1 + 1/{info.architecture['block_size']} calls per token; parallel unmasking rules need fewer.")
    return f"## Sampler defaults (`generation_config.json`)\n\n{table}\n### Network calls per token\n\n{nfe}\n"


def _card_adapter(info: CardInfo) -> str:
    rows = "".join(f"| {k} | `{v}` |\n" for k, v in info.adapter.items() if v is not None)
    return f"## Adapter\n\n| | |\n|---|---|\n| base model | `{info.base_model}` |\n{rows}"


def _card_training(info: CardInfo) -> str:
    lines = [_card_data_line(role, entry) for role, entry in info.training_data.items() if isinstance(entry, dict)]
    if info.datasets:
        lines.append("- Data: " + ", ".join(f"[`{d}`](https://huggingface.co/datasets/{d})" for d in info.datasets))
    elif info.converted_from_official:
        lines.append("- Data and recipe: trained by the BD3-LM authors; see the paper and the original repository.")
    elif not lines:
        lines.append("- Data: not recorded.")
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in info.training.items()]
    text = "## Training\n\n" + "\n".join(lines) + "\n"
    if info.evaluation is not None:
        ev = info.evaluation
        text += (f"\n## Evaluation\n\nValidation perplexity ≤ **{ev['ppl']:.4g}** on "
                 f"{ev.get('dataset') or 'the held-out split'} ({ev['source']}): exp of the block NELBO per token with "
                 "t ~ U[1e-3, 1], an upper bound on the model's perplexity.\n")
    return text


def _card_data_line(role: str, entry: dict[str, Any]) -> str:
    """One dataset of `training_data.json` (written by `bd3lm train`) as a card line: name, licence, size in tokens."""
    name = f"`{entry.get('name', 'unnamed')}`" + (f", {entry['split']} split" if entry.get("split") else "")
    about = f" ({entry['description']})" if entry.get("description") else ""
    size = f"{entry['tokens']:,} tokens of this model's tokenizer" if isinstance(entry.get("tokens"), int) else \
        "size not recorded"
    label = {"train": "Training data", "evaluation": "Validation data"}.get(role, f"Data ({role})")
    return f"- {label}: {name}{about}; licence: {entry.get('license') or 'not recorded'}; {size}."


def _card_limitations(info: CardInfo) -> str:
    items = ["A research model: no instruction tuning or safety filtering; outputs can be false, biased or offensive.",
             "Perplexities are NELBO upper bounds, not exact likelihoods; compare with care.",
             "`trust_remote_code=True` runs this repository's Python code: review it and pin the revision."]
    if info.kind != "adapter":
        arch = info.architecture
        items.insert(1, f"Block size {arch['block_size']} is fixed by training; the model attends to at most "
                        f"{arch['model_length']} tokens (longer generations slide the window).")
    if not info.has_tokenizer:
        items.append("No tokenizer files are published here; use the tokenizer the model was trained with.")
    return "## Limitations\n\n" + "".join(f"- {item}\n" for item in items)


# ----------------------------------------------------------------------------------------------------------------------
# Step 3: push


def _refuse_token_in_files(plan: UploadPlan, token: str) -> None:
    needle = token.encode()
    for planned in plan.files:
        with open(plan.staging / planned.path, "rb") as f:
            tail = b""
            while chunk := f.read(1 << 24):
                if needle in tail + chunk:
                    raise ValueError(f"{planned.path} contains your Hugging Face token: remove it (or drop the "
                                     "--include that added it). Nothing was sent.")
                tail = chunk[-len(needle):]


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
        raise ValueError(f"repo_id={repo_id!r} differs from the plan's ({plan.card_info.repo_id!r}), whose card loads "
                         "from it: plan again for this repository.")
    token = resolve_token(token)
    _refuse_token_in_files(plan, token)
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    api.whoami()  # a bad token fails here, before the repository is created
    api.create_repo(repo_id, private=private, exist_ok=True)
    branch = revision or "main"
    if branch != "main":
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(plan.staging / f.path)) for f in plan.files]
    left = "".join(f"\n- {item.path} ({item.reason})" for item in plan.left_out) or " nothing"
    description = (f"Published with hub_upload from `{plan.source.name}` ({plan.kind}): {len(plan.files)} files, "
                   f"{_human(plan.total_size)}.\n\nLeft out:{left}")
    info = api.create_commit(repo_id, operations, commit_message=commit_message or f"Upload BD3-LM {plan.kind}",
                             commit_description=description, revision=branch, create_pr=create_pr)
    return UploadResult(repo_id, info.commit_url, info.oid, info.pr_url, branch)


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the upload options on `parser` (also used by `bd3lm upload`)."""
    parser.add_argument("folder", help="saved model, Trainer output folder, official checkpoint or LoRA adapter")
    parser.add_argument("repo_id", help="the Hub repository, as namespace/name")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (files, sizes, card) and send nothing")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to commit to (created from main if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", help="summary line of the commit")
    parser.add_argument("--checkpoint", help="publish this checkpoint-* folder (or 'latest') instead of the final model")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB",
                        help="also publish files matching GLOB (relative to the model folder); repeatable")
    parser.add_argument("--tokenizer", help="take tokenizer files from this folder")
    parser.add_argument("--max-shard-size", default="5GB", help="shard safetensors above this size (default 5GB)")
    parser.add_argument("--base-model", help="Hub id of the model this one was fine-tuned from (adapters: the base)")
    parser.add_argument("--dataset", action="append", default=[], help="Hub id of a training dataset; repeatable")
    parser.add_argument("--license", default="unknown", help="licence identifier for the card (default: unknown)")
    parser.add_argument("--nfe-tokens", type=int, default=64,
                        help="tokens to generate when measuring network calls per token (0 skips)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Plan, then print (dry run) or upload. Returns 0 on success, 2 on bad input, 1 when the Hub refuses."""
    token = None
    try:
        check_repo_id(args.repo_id)
        if not args.dry_run:
            token = resolve_token()
        with plan_upload(args.folder, args.repo_id, checkpoint=args.checkpoint, include=args.include,
                         tokenizer=args.tokenizer, max_shard_size=args.max_shard_size, base_model=args.base_model,
                         datasets=args.dataset, license=args.license, nfe_tokens=args.nfe_tokens) as plan:
            if args.dry_run:
                print(plan.describe())
                print("\nDry run: nothing was sent.")
                return 0
            print(plan.describe(with_card=False))
            result = upload(plan, args.repo_id, token=token, private=args.private, revision=args.revision,
                            create_pr=args.create_pr, commit_message=args.commit_message)
    except ValueError as error:
        print(f"error: {_redact(str(error), token)}", file=sys.stderr)
        return 2
    except Exception as error:  # the Hub's answer, already worded by huggingface_hub
        print(f"error: upload failed ({type(error).__name__}): {_redact(str(error), token)}", file=sys.stderr)
        return 1
    print(f"Uploaded {len(plan.files)} files to {result.repo_id}@{result.revision}: {result.commit_url}")
    if result.pr_url:
        print(f"Pull request: {result.pr_url}")
    return 0


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hub_upload", description=__doc__.splitlines()[0])
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
