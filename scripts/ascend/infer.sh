#!/usr/bin/env bash
# Text-to-image on every NPU: rank r generates prompts r, r + world, ... of PROMPTS (one per line) with seed + r into
# OUT (default outputs/), bf16. MODEL: a pipeline folder (diffusers layout), or an original checkpoint with
# --text-encoder and --vae among the extra arguments, which go to tools/sample.py.
#   MODEL=models/Lumina-Next-SFT-diffusers PROMPTS=prompts.txt bash scripts/ascend/infer.sh --resolution 1024x1024
set -euo pipefail
: "${MODEL:?set MODEL to a model folder}" "${PROMPTS:?set PROMPTS to a prompts file, one prompt per line}"
exec bash "$(dirname "$0")/launch.sh" tools/sample.py --device Ascend --dtype "${DTYPE:-bf16}" --model "$MODEL" \
  --prompts-file "$PROMPTS" --out "${OUT:-outputs}" "$@"
