#!/usr/bin/env bash
# The self-check on every NPU: each rank runs tools/selfcheck.py on its own device (components against the shipped
# golden bundle in fp32, fp16 and bf16, the kernel contracts with the real kernels, the 2B speed) and writes
# REPORT.rank<N> (default selfcheck-report.md.rank<N>); any failing rank fails msrun. Extra arguments go to the tool.
#   bash scripts/ascend/selfcheck.sh                       # 1 node x 8 NPUs
#   NPROC_PER_NODE=1 bash scripts/ascend/selfcheck.sh      # one NPU
set -euo pipefail
exec bash "$(dirname "$0")/launch.sh" tools/selfcheck.py --device Ascend --out "${REPORT:-selfcheck-report.md}" "$@"
