#!/usr/bin/env bash
# A second, minimal environment with the last transformers 4.x release: the remote-code test loads our checkpoints
# there too (many users still pin 4.57). Only torch, transformers and safetensors: never this project.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-457/bin/python ] || ! .venv-457/bin/python -c "import transformers, torch" 2>/dev/null; then
  python3 -m venv .venv-457
  .venv-457/bin/pip install -q "torch==2.13.0" "transformers==4.57.6" safetensors
fi
.venv-457/bin/python -c "import transformers; print('transformers', transformers.__version__, 'in .venv-457')"
