"""Leave the vendored common-test modules out of collection when the installed transformers is another release."""

from __future__ import annotations

import transformers

from tests.hf_common import mismatch_reason

collect_ignore_glob = ["test_*.py"] if mismatch_reason(transformers.__version__) else []
