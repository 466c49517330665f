#!/usr/bin/env bash
# Train BD3-LM on several GPUs / nodes with FSDP2 or DeepSpeed ZeRO-3 through accelerate; every other argument goes to
# `bd3lm train` (see `bd3lm train --help`).
#
#   examples/launch.sh fsdp2 --preset small --ema --batch-size 16 --output-dir runs/small-fsdp2
#   examples/launch.sh zero3 --init-from runs/qwen3-bd3lm --block-size 4 --ema --output-dir runs/qwen3-zero3
#
# Environment: NUM_PROCESSES (all GPUs of all nodes; default: this machine's GPUs), NUM_MACHINES (default 1),
# MACHINE_RANK (this node, default 0), MAIN_PROCESS_IP and MAIN_PROCESS_PORT (node 0's address, for several nodes),
# BF16=0 to train in fp32. Run it on every node with the same NUM_PROCESSES / NUM_MACHINES and its own MACHINE_RANK.
set -euo pipefail
cd "$(dirname "$0")/.."
engine="${1:-}"
case "$engine" in
    fsdp2) config=examples/accelerate/fsdp2.yaml ;;
    zero3) config=examples/accelerate/deepspeed_zero3.yaml ;;
    *) echo "examples/launch.sh: error: the first argument must be fsdp2 or zero3, got '${engine}'" >&2; exit 2 ;;
esac
shift
nproc="${NUM_PROCESSES:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
precision=bf16; extra=(--bf16)
if [ "${BF16:-1}" = "0" ]; then precision=no; extra=(); fi
exec accelerate launch --config_file "$config" --num_processes "$nproc" --num_machines "${NUM_MACHINES:-1}" \
    --machine_rank "${MACHINE_RANK:-0}" ${MAIN_PROCESS_IP:+--main_process_ip "$MAIN_PROCESS_IP"} \
    --main_process_port "${MAIN_PROCESS_PORT:-29500}" --mixed_precision "$precision" \
    -m bd3lm_trainer.cli train "${extra[@]}" "$@"
