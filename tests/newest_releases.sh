#!/usr/bin/env bash
# The newest-release watch: what a user who runs `pip install bd3lm` today gets. A separate virtual environment takes
# the newest transformers, peft, accelerate and datasets that pyproject.toml's open ranges allow (torch stays at the
# CPU build the machine provides), then runs the core subset: model, generate, Trainer, PEFT, conversion of causal
# LMs, pipeline() and remote-code loading. It FAILS CI when that subset fails (see docs/testing.md for why), with a
# banner naming the versions, so a release that breaks users is known the day it ships.
set -uo pipefail
cd "$(dirname "$0")/.."
WATCHED="transformers peft accelerate datasets"
CORE="tests/test_modeling_bd3lm.py tests/test_generation_bd3lm.py tests/test_trainer.py tests/test_peft.py
      tests/test_causal_backbone.py tests/test_pipeline.py tests/test_remote_code.py tests/test_hf_common_bd3lm.py"
banner() { printf '\n%s\n%s\n%s\n' "==================== NEWEST-RELEASE WATCH: $1 ====================" "$2" \
  "======================================================================================"; }
{ [ -x .venv-newest/bin/python ] || python3 -m venv .venv-newest; } &&
  .venv-newest/bin/pip install -q "torch==2.13.0" -e ".[test]" &&
  .venv-newest/bin/pip install -q --upgrade $WATCHED
if [ $? -ne 0 ]; then banner "INSTALL FAILED" "pip could not install the newest releases allowed by pyproject.toml"; exit 1; fi
versions=$(.venv-newest/bin/python - <<'PY'
import importlib.metadata as md, re
pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", open("tests/constraints.txt").read(), re.M))
for name in ("transformers", "peft", "accelerate", "datasets", "huggingface_hub", "tokenizers", "safetensors"):
    have = md.version(name)
    print(f"{name} {have}" + ("" if pins.get(name) == have else f" (pinned: {pins.get(name)})"))
PY
)
echo "newest releases under test:"; echo "$versions" | sed 's/^/  /'
OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv-newest/bin/python -m pytest -q -p no:cacheprovider $CORE
status=$?
if [ $status -ne 0 ]; then
  banner "FAILED" "The core subset fails on the newest releases a fresh 'pip install' takes today:
$versions
Users installing today hit this. Fix the code, or cap the range in pyproject.toml with a reason."
  exit 1
fi
banner "passed" "$versions"
