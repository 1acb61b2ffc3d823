#!/usr/bin/env bash
# LoRA fine-tuning of nextdit-2b-gqa (rank 32 on attention and feed-forward, frozen bf16 base): CONFIG (default
# configs/nextdit-2b-lora-ascend.yaml). Arguments go to tools/train.py; --export DIR writes the peft adapter.
#   bash scripts/ascend/train_lora.sh --init models/Lumina-Next-SFT --export runs/my-lora/adapter
set -euo pipefail
CONFIG=${CONFIG:-$(dirname "$0")/../../configs/nextdit-2b-lora-ascend.yaml}
exec bash "$(dirname "$0")/launch.sh" tools/train.py --config "$CONFIG" --device Ascend "$@"
