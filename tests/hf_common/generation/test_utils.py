# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Stand-in for transformers' `tests/generation/test_utils.py`, which `test_modeling_common.py` imports but the PyPI
sdist does not ship. `ModelTesterMixin` only uses the class to check that a tester of a model that can `generate`
inherits it (`test_generation_tester_mixin_inheritance`). Its real tests drive GenerationMixin's autoregressive
decoding (greedy, beam search, assisted decoding, ...), which a block-diffusion sampler does not implement; BD3-LM's
own `generate` is tested in tests/test_generation_bd3lm.py."""


class GenerationTesterMixin:
    """Marker only: no tests."""
