#!/usr/bin/env bash
# The GPU check of the sharded training paths: examples/gpu_check.py under FSDP2 and under DeepSpeed ZeRO-3 (when
# installed), with the shipped accelerate configs, on every GPU of this machine (NUM_PROCESSES to change). A few
# minutes on 2+ GPUs. Prints "GPU CHECK PASSED" per rank and engine; exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
nproc="${NUM_PROCESSES:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
out="${OUT:-runs/gpu-check}"
run() {  # engine config
    echo "== $1 on $nproc processes =="
    accelerate launch --config_file "examples/accelerate/$2" --num_processes "$nproc" --mixed_precision no \
        --main_process_port 0 examples/gpu_check.py --out "$out/$1"
}
run fsdp2 fsdp2.yaml
if python -c 'import deepspeed' 2>/dev/null; then
    run zero3 deepspeed_zero3.yaml
else
    echo "== zero3 skipped: deepspeed is not installed (pip install \"bd3lm[deepspeed]\") =="
fi
