# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""`python -m bd3lm_trainer.cli ...` = `bd3lm ...`."""

import sys

from .main import main

sys.exit(main())
