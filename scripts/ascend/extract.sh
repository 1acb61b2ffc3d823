#!/usr/bin/env bash
# Training data first: VAE latents and Gemma caption features into a feature store, each rank a slice of the data
# (rerun the same command to resume after a kill). Arguments go to tools/extract_features.py.
#   bash scripts/ascend/extract.sh --data data/my-images --text-encoder models/gemma-2b --vae models/sdxl-vae \
#        --output stores/my-images --resolution 1024 --aspect-ratios 0.25 0.5 0.75 1.0 1.333 2.0 4.0
set -euo pipefail
exec bash "$(dirname "$0")/launch.sh" tools/extract_features.py --device Ascend "$@"
