#!/usr/bin/env bash
# Full fine-tuning of nextdit-2b-gqa, data parallel with ZeRO stage 1, bf16 compute over fp32 weights: CONFIG
# (default configs/nextdit-2b-ft-ascend.yaml, which explains its memory budget). Arguments go to tools/train.py.
#   bash scripts/ascend/train.sh --init models/Lumina-Next-SFT/consolidated.00-of-01.safetensors      # 1 x 8
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0> bash scripts/ascend/train.sh --init ...            # 2 x 8
set -euo pipefail
CONFIG=${CONFIG:-$(dirname "$0")/../../configs/nextdit-2b-ft-ascend.yaml}
exec bash "$(dirname "$0")/launch.sh" tools/train.py --config "$CONFIG" --device Ascend "$@"
