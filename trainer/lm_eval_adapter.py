# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Deprecated alias of `bd3lm_trainer.evaluation.lm_eval_adapter`, which it re-exports (it moved when trainer/ was
split by job); goes in 0.2."""

import warnings

from .evaluation.lm_eval_adapter import *  # noqa: F401,F403
from .evaluation.lm_eval_adapter import __all__, main  # noqa: F401

warnings.warn(
    "bd3lm_trainer.lm_eval_adapter moved to bd3lm_trainer.evaluation.lm_eval_adapter; the old name goes in 0.2.",
    DeprecationWarning,
    stacklevel=2,
)

if __name__ == "__main__":  # `python -m bd3lm_trainer.lm_eval_adapter ...`, the 0.1 spelling
    main()
