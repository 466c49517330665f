# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Deprecated alias of `bd3lm_trainer.evaluation.likelihood`, which it re-exports (it moved when trainer/ was
split by job); goes in 0.2."""

import warnings

from .evaluation.likelihood import *  # noqa: F401,F403
from .evaluation.likelihood import __all__  # noqa: F401

warnings.warn(
    "bd3lm_trainer.likelihood moved to bd3lm_trainer.evaluation.likelihood; the old name goes in 0.2.",
    DeprecationWarning,
    stacklevel=2,
)
