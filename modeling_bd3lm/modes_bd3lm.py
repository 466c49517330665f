# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""The registry of decoding modes: `BD3LMGenerationConfig.generation_mode` names one of `DECODING_MODES`, and
`generate()` runs it. A new mode is one file with a [`DecodingMode`] subclass plus one entry here.

* `"diffusion"` (the default): block diffusion, the paper's sampler (`generation_bd3lm.py`).
* `"autoregressive"`: one token per call through the clean stream (`autoregressive_bd3lm.py`).
* `"draft_verify"`: the diffusion view drafts a block, the clean stream verifies it (`draft_verify_bd3lm.py`); the output
  is exactly the clean stream's autoregressive decoding.
"""

from __future__ import annotations

from .autoregressive_bd3lm import AutoregressiveMode
from .decoding_bd3lm import DecodingMode, DiffusionMode
from .draft_verify_bd3lm import DRAFT_VARIANTS, DraftVerifyMode

DECODING_MODES: dict[str, type[DecodingMode]] = {
    mode.name: mode for mode in (DiffusionMode, AutoregressiveMode, DraftVerifyMode)
}

__all__ = ["DECODING_MODES", "DRAFT_VARIANTS"]
