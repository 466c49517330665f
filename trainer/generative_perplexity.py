# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Deprecated alias of `bd3lm_trainer.evaluation.generative_perplexity`, which it re-exports (it moved when trainer/ was
split by job); goes in 0.2."""

import warnings

from .evaluation.generative_perplexity import *  # noqa: F401,F403
from .evaluation.generative_perplexity import __all__  # noqa: F401

warnings.warn(
    "bd3lm_trainer.generative_perplexity moved to bd3lm_trainer.evaluation.generative_perplexity; the old name goes in 0.2.",
    DeprecationWarning,
    stacklevel=2,
)
