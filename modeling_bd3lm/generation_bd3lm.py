# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Block-by-block generation for BD3-LM (work in progress: see the generate issue)."""

from __future__ import annotations


class BD3LMGenerationMixin:
    """Placeholder until the sampler lands; `generate` raises."""

    def generate(self, *args, **kwargs):
        raise NotImplementedError("BD3LMGenerationMixin.generate is not implemented yet.")


__all__ = ["BD3LMGenerationMixin"]
