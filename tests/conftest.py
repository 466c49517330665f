"""Shared fixtures: tiny configurations and the official golden fixture folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from modeling_bd3lm import BD3LMConfig, BD3LMForMaskedDiffusion

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI lays shared/ beside the clone; a developer checkout has it at ../shared too.
SHARED_DIR = Path(os.environ.get("BD3LM_SHARED_DIR", REPO_ROOT.parent / "shared"))
OFFICIAL_FIXTURE = SHARED_DIR / "fixtures" / "official-bd3lm-tiny"

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config(**overrides) -> BD3LMConfig:
    """The shape of the official fixture: 2 layers, 4 heads of 16, L=32, L'=4, vocabulary 64 (mask = 63)."""
    kwargs = dict(
        vocab_size=64, hidden_dim=64, cond_dim=16, n_blocks=2, n_heads=4, model_length=32, block_size=4, dropout=0.0
    )
    kwargs.update(overrides)
    return BD3LMConfig(**kwargs)


def random_model(seed: int = 0, **overrides) -> BD3LMForMaskedDiffusion:
    """A tiny model whose every parameter is random and non-zero (the zero inits would hide bugs)."""
    torch.manual_seed(seed)
    model = BD3LMForMaskedDiffusion(tiny_config(**overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1.0 + 0.1 * torch.randn_like(param) if "norm" in name else 0.1 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
    return model.eval()


@pytest.fixture
def official_fixture_dir() -> Path:
    if not OFFICIAL_FIXTURE.is_dir():
        pytest.fail(f"The official fixture is missing at {OFFICIAL_FIXTURE}; set BD3LM_SHARED_DIR to the shared/ folder.")
    return OFFICIAL_FIXTURE
