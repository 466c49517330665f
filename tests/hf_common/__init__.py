"""transformers' common model and config tests, vendored from one release (see README.md and VENDORED.json).

They import private helpers of `transformers.testing_utils` that change from release to release, so they only run
against the transformers release they were copied from; with any other installed release they are skipped with the
command that re-vendors them, never imported (an import error would stop the whole suite at collection).
"""

from __future__ import annotations

import json
from pathlib import Path

VENDORED = json.loads((Path(__file__).resolve().parent / "VENDORED.json").read_text())
VENDORED_VERSION: str = VENDORED["transformers"]


def mismatch_reason(installed: str) -> str | None:
    """Why the vendored common tests cannot run against transformers `installed`, or None when they can."""
    if installed == VENDORED_VERSION:
        return None
    return (
        f"transformers {installed} is installed but tests/hf_common/ holds the common tests of transformers "
        f"{VENDORED_VERSION}; run `python tests/hf_common/revendor.py {installed}` to vendor this release's, or "
        f"install the pinned test environment (`pip install -c tests/constraints.txt ...`, see docs/testing.md)"
    )
