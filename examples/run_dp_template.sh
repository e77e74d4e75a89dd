#!/usr/bin/env bash
# External load balancing ("distributed DP server"): one `epplat serve` per local DP rank,
# each with its own HTTP port, all joining one expert-parallel group. Run it on every node;
# put your own load balancer (or the clients) in front of the per-rank ports.
#
#   examples/run_dp_template.sh MODEL DP_SIZE DP_SIZE_LOCAL DP_START_RANK DP_MASTER_IP DP_RPC_PORT HTTP_BASE_PORT [flags...]
#
# e.g. two nodes, four ranks each (node 0 is 10.0.0.1):
#   node 0: examples/run_dp_template.sh /models/Qwen3-30B-A3B 8 4 0 10.0.0.1 29550 8000 --enable-expert-parallel
#   node 1: examples/run_dp_template.sh /models/Qwen3-30B-A3B 8 4 4 10.0.0.1 29550 8000 --enable-expert-parallel
# DP rank R serves on port HTTP_BASE_PORT + R. The same settings can come from the environment:
# EPPLAT_DP_RANK, EPPLAT_DP_SIZE, EPPLAT_DP_MASTER_IP, EPPLAT_DP_MASTER_PORT (or vLLM's VLLM_DP_*).
set -euo pipefail
if [ $# -lt 7 ]; then
    sed -n 2,14p "$0" >&2
    exit 2
fi
model=$1 dp_size=$2 dp_local=$3 dp_start=$4 master_ip=$5 rpc_port=$6 http_base=$7
shift 7
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' INT TERM EXIT
for ((rank = dp_start; rank < dp_start + dp_local; rank++)); do
    EPPLAT_DP_RANK=$rank epplat serve "$model" \
        --port $((http_base + rank)) \
        --data-parallel-size "$dp_size" \
        --data-parallel-address "$master_ip" \
        --data-parallel-rpc-port "$rpc_port" \
        "$@" &
    pids+=($!)
done
wait -n "${pids[@]}"   # when one rank stops, stop them all
