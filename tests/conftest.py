"""Shared fixtures: tiny configurations and the official golden fixture folder."""

from __future__ import annotations

import os
import subprocess
import sys
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
        pytest.fail(
            f"The official fixture is missing at {OFFICIAL_FIXTURE}; set BD3LM_SHARED_DIR to the shared/ folder."
        )
    return OFFICIAL_FIXTURE


# Prepended to child code by `run_python_without_project`: hide this project (cwd, PYTHONPATH, an editable install)
# and prove it is hidden, so that whatever the child loads comes from the folder or repository under test.
HIDE_PROJECT_PREAMBLE = """
import importlib.util, sys
sys.path = [p for p in sys.path if p not in ("", ".", {repo!r})]
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "") and
                 "__editable__" not in getattr(f, "__name__", "")]
for name in ("modeling_bd3lm", "hub_upload", "bd3lm_trainer"):
    assert importlib.util.find_spec(name) is None, f"the project ({{name}}) is importable in the child"
"""


def run_python_without_project(
    code: str, *, cwd: Path, python: str | Path = sys.executable, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that cannot import this project (offline unless `env` says otherwise).

    `env` entries override the inherited environment; a value of None removes the variable.
    """
    child_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    child_env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_MODULES_CACHE=str(Path(cwd) / "modules"))
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    script = HIDE_PROJECT_PREAMBLE.format(repo=str(REPO_ROOT)) + code
    return subprocess.run(
        [str(python), "-c", script],
        cwd=cwd,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def tiny_train_model(seed: int = 0, **overrides) -> BD3LMForMaskedDiffusion:
    """`random_model` in training mode, for Trainer and callback tests."""
    return random_model(seed, **overrides).train()


def random_token_dataset(n: int, length: int = 32, seed: int = 1):
    """A `datasets.Dataset` of `n` random sequences in the tiny vocabulary (mask id 63 excluded)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": torch.randint(0, 63, (n, length), generator=g).tolist()})


def tiny_training_args(tmp_path, **overrides):
    """CPU-only, silent `BD3LMTrainingArguments` for the tiny model; tests override what they exercise."""
    from bd3lm_trainer import BD3LMTrainingArguments

    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_strategy="no",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        seed=0,
    )
    kwargs.update(overrides)
    return BD3LMTrainingArguments(**kwargs)


PINNED = ("torch", "transformers", "peft", "accelerate", "datasets", "huggingface_hub", "tokenizers", "safetensors")


def pinned_versions(constraints: Path = REPO_ROOT / "tests" / "constraints.txt") -> dict[str, str]:
    """The exact versions of tests/constraints.txt, the environment the suite was last verified with."""
    import re

    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", constraints.read_text(), flags=re.M))


def versions_report() -> list[str]:
    """The versions under test, and which differ from the pinned environment (printed at the start of every run)."""
    import importlib.metadata

    import transformers

    from tests.hf_common import VENDORED_VERSION

    pins = pinned_versions()
    line = []
    for name in PINNED:
        have = importlib.metadata.version(name).split("+")[0]
        line.append(name + " " + have + ("" if pins.get(name) == have else f" (pinned {pins.get(name)})"))
    common = "match" if transformers.__version__ == VENDORED_VERSION else "DO NOT match: they will be skipped"
    return [
        "versions under test: " + ", ".join(line),
        f"vendored transformers common tests: {VENDORED_VERSION} ({common} the installed transformers)",
    ]


def pytest_sessionstart(session: pytest.Session) -> None:
    # Written through the terminal reporter rather than pytest_report_header, which `-q` hides.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for line in versions_report():
            reporter.write_line(line)
