#!/usr/bin/env bash
# A second, minimal environment with the last transformers 4.x release: the remote-code test loads our checkpoints
# there too (many users still pin 4.57). Only torch, transformers and safetensors: never this project. Exact versions
# from tests/constraints-tf457.txt; an existing .venv-457 with other versions is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(sed -n 's/^transformers==//p' tests/constraints-tf457.txt)
if [ ! -x .venv-457/bin/python ] || ! .venv-457/bin/python -c "import torch, transformers, sys; sys.exit(transformers.__version__ != '$want')" 2>/dev/null; then
  rm -rf .venv-457
  python3 -m venv .venv-457
  .venv-457/bin/pip install -q -c tests/constraints-tf457.txt "torch==2.13.0" "transformers==$want" safetensors
fi
.venv-457/bin/python -c "import transformers; print('transformers', transformers.__version__, 'in .venv-457')"
