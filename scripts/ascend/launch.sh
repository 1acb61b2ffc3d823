#!/usr/bin/env bash
# The msrun launcher every script here goes through: one process per NPU, NNODES nodes x NPROC_PER_NODE devices,
# HCCL between them. Usage: bash scripts/ascend/launch.sh TOOL [ARGS...]   (TOOL relative to the repository root)
#
#   1 node x 8 NPUs:   bash scripts/ascend/selfcheck.sh
#   2 nodes x 8 NPUs:  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash scripts/ascend/train.sh     # on node 0
#                      NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash scripts/ascend/train.sh     # on node 1
#
# Environment (default):
#   NNODES (1), NPROC_PER_NODE (8), NODE_RANK (0): topology; the world is NNODES x NPROC_PER_NODE ranks.
#   MASTER_ADDR (127.0.0.1; required when NNODES > 1: node 0's address, reachable from every node), MASTER_PORT (8118).
#   LOG_DIR (logs/<tool>): msrun writes scheduler.log and worker_<rank>.log there.
#   CLUSTER_TIMEOUT (600 s): how long msrun waits for every node to join.
#   CANN_ENV (/usr/local/Ascend/ascend-toolkit/set_env.sh): sourced when present (CANN's PATH, LD_LIBRARY_PATH, ...).
#   HCCL_CONNECT_TIMEOUT (1200 s), HCCL_EXEC_TIMEOUT (1800 s): HCCL link set-up and collective time limits.
#   HCCL_SOCKET_IFNAME / HCCL_IF_IP: the network interface HCCL's host sockets use (set them on multi-homed nodes).
#   ASCEND_RT_VISIBLE_DEVICES: which NPUs of a node the ranks take (default: all, rank i on device i).
#   MINDONE_LUMINA_PORTABLE=1: run the portable ops instead of the fused kernels (to bisect a numeric difference).
#   DRY_RUN=1: print the msrun command instead of running it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[ $# -ge 1 ] || { echo "usage: $0 TOOL [ARGS...]" >&2; exit 2; }
TOOL=$1
shift
[ -f "$ROOT/$TOOL" ] || { echo "launch.sh: no tool $ROOT/$TOOL" >&2; exit 2; }
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-8118}
LOG_DIR=${LOG_DIR:-logs/$(basename "$TOOL" .py)}
if [ "$NNODES" -gt 1 ] && [ "$MASTER_ADDR" = 127.0.0.1 ]; then
  echo "launch.sh: NNODES=$NNODES needs MASTER_ADDR set to node 0's address (not 127.0.0.1)" >&2
  exit 2
fi
if [ "$NODE_RANK" -ge "$NNODES" ]; then
  echo "launch.sh: NODE_RANK=$NODE_RANK must be below NNODES=$NNODES" >&2
  exit 2
fi
CANN_ENV=${CANN_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}
# shellcheck disable=SC1090
if [ -f "$CANN_ENV" ] && [ -z "${DRY_RUN:-}" ]; then source "$CANN_ENV"; fi
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1800}
cmd=(msrun --worker_num=$((NNODES * NPROC_PER_NODE)) --local_worker_num="$NPROC_PER_NODE"
     --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --node_rank="$NODE_RANK" --log_dir="$LOG_DIR"
     --cluster_time_out="${CLUSTER_TIMEOUT:-600}" --join=True python "$ROOT/$TOOL" "$@")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
