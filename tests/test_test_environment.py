"""The test environment holds on a fresh machine: exact pins, vendored common tests that match them, and a clear skip
(never a collection error) when the installed transformers is another release."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import transformers

from tests.conftest import REPO_ROOT, pinned_versions
from tests.hf_common import VENDORED_VERSION, mismatch_reason

HF_COMMON = REPO_ROOT / "tests" / "hf_common"


def test_the_vendored_common_tests_are_the_recorded_release_files_unmodified() -> None:
    record = json.loads((HF_COMMON / "VENDORED.json").read_text())
    assert record["transformers"] == VENDORED_VERSION
    for name, entry in record["files"].items():
        assert hashlib.sha256((HF_COMMON / name).read_bytes()).hexdigest() == entry["sha256"], name
        assert entry["from"] == f"transformers-{VENDORED_VERSION}/tests/{name}"


def test_the_pinned_transformers_is_the_release_the_common_tests_come_from() -> None:
    assert pinned_versions()["transformers"] == VENDORED_VERSION


def test_the_test_command_installs_the_pins() -> None:
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -c tests/constraints.txt "torch==2.13.0" -e ".[test,eval,gguf]"' in ci
    assert "bash tests/newest_releases.sh" in ci
    tf4 = pinned_versions(REPO_ROOT / "tests" / "constraints-tf457.txt")
    assert (
        tf4["transformers"].startswith("4.57.")
        and "constraints-tf457.txt" in (REPO_ROOT / "tests" / "make_tf4_env.sh").read_text()
    )


def test_the_mismatch_reason_names_the_revendor_command() -> None:
    assert mismatch_reason(VENDORED_VERSION) is None
    reason = mismatch_reason("5.99.0")
    assert reason is not None and "python tests/hf_common/revendor.py 5.99.0" in reason and VENDORED_VERSION in reason


@pytest.mark.slow
def test_another_installed_transformers_skips_the_common_tests_instead_of_failing_collection() -> None:
    """In a child whose transformers claims another release, the common tests are skipped with the reason.

    The version is set after the project is imported: importing transformers submodules restores `__version__`.
    """
    code = (
        "import sys, pytest, modeling_bd3lm, tests.conftest, transformers; transformers.__version__ = '5.99.0'; "
        "sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', 'tests/test_hf_common_bd3lm.py', "
        "'tests/hf_common']))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode in (0, 5), out  # 5: pytest's "no tests ran" when everything was skipped or left out
    assert "error" not in out.lower().replace("0 errors", ""), out
    assert "python tests/hf_common/revendor.py 5.99.0" in out and "skipped" in out, out


def test_the_installed_transformers_runs_the_common_tests() -> None:
    """The pinned environment must really run them (a silent skip would hide the whole common suite)."""
    if pinned_versions()["transformers"] != transformers.__version__:
        pytest.skip(f"transformers {transformers.__version__} is not the pinned one (the newest-release watch)")
    assert mismatch_reason(transformers.__version__) is None
