"""The README's promises that a test can hold: the two commands at its top (the second is exactly what CI runs), and
every Python snippet is valid Python that imports only names that exist."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


def test_the_first_two_blocks_are_the_main_job_and_the_tests() -> None:
    (lang1, main_job), (lang2, tests) = BLOCKS[:2]
    assert lang1 == lang2 == "bash"
    assert main_job.strip().startswith("python3 -m venv .venv && . .venv/bin/activate && pip install")
    assert '"torch==2.13.0"' in main_job and ".[plot]" in main_job and main_job.strip().endswith("bd3lm demo")
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert ci == [tests.strip()]


@pytest.mark.parametrize("code", PYTHON, ids=[f"block{i}" for i in range(len(PYTHON))])
def test_python_snippets_parse_and_import_real_names(code: str) -> None:
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
            "modeling_bd3lm", "bd3lm_trainer", "bd3lm_configuration", "hub_upload"
        ):  # fmt: skip
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"README imports {alias.name} from {node.module}, which lacks it"


def test_there_are_snippets_to_check() -> None:
    assert len(PYTHON) >= 10
