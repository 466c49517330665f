# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""The `bd3lm` command line (`main.py`: the parser and dispatch), one module per command: `demo.py`, `train.py`,
`generate.py`, `eval.py`, `convert.py`, `upload.py` (its work is `bd3lm_trainer.hub`). `common.py` holds what they share, `malloc_tuning.py`
the process-wide allocator setting only the command line applies."""

from .common import EXIT_USAGE, SAMPLER_NAMES, CLIError
from .main import build_parser, main
from .train import add_train_arguments, train_from_args

__all__ = ["EXIT_USAGE", "SAMPLER_NAMES", "CLIError", "add_train_arguments", "build_parser", "main", "train_from_args"]
