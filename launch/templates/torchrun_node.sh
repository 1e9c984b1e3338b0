#!/bin/bash
# One node of a {{num_nodes}}-node run without SLURM; written by `memplan job job.scheduler=torchrun`.
#
# Start it on every node at about the same time, with HEAD_ADDR an address of node 0 that all
# nodes can reach (RUN_DIR must be at the same path on every node, e.g. a shared file system):
{{node_commands}}
#
# torchrun starts this node's {{gpus_per_node}} worker(s); the agents of all {{num_nodes}} node(s) meet at a c10d
# rendezvous whose store node 0 hosts. Workers read resolved.yaml and plan.json from RUN_DIR
# (written beside this script), so every node runs exactly what was planned.
set -euo pipefail

RUN_DIR={{run_dir}}
# {{num_nodes}} node(s) x {{gpus_per_node}} worker(s) = {{world_size}} ranks, the plan's world size
NNODES={{num_nodes}}
NPROC_PER_NODE={{gpus_per_node}}
RDZV_PORT={{port}}
RDZV_ID={{rdzv_id}}
# After a failure torchrun restarts all workers up to MAX_RESTARTS times; they resume from
# CHECKPOINT_DIR (checkpoint.resume={{resume}}).
MAX_RESTARTS={{max_restarts}}
CHECKPOINT_DIR={{checkpoint_dir}}
HEAD_ADDR=${HEAD_ADDR:-{{head_addr}}}
# torchrun of the Python environment that wrote this job (memplan and torch are installed there)
TORCHRUN=({{torchrun}})
# OpenMP threads per worker: this node's cores shared by its workers, unless already set
# (unset, torchrun sets 1 and prints a banner about it)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}
# Local rank 0 prints to this output unprefixed (metrics lines start with `step N | loss`);
# the raw streams of the other local ranks go to files under RUN_DIR/logs.
REDIRECTS=({{redirects}})

# job.setup: run before torchrun
{{setup}}

: "${HEAD_ADDR:?set HEAD_ADDR to an address of node 0 that every node can reach}"
: "${NODE_RANK:?set NODE_RANK to the index of this node, 0 to $((NNODES - 1))}"
if ! [ "$NODE_RANK" -ge 0 ] 2>/dev/null || ! [ "$NODE_RANK" -lt "$NNODES" ]; then
    echo "memplan job: NODE_RANK=$NODE_RANK is not in 0..$((NNODES - 1))" >&2
    exit 2
fi
# Node 0 hosts the rendezvous store, the others connect to it. Ranks are assigned as agents
# join (torchrun ignores --node-rank with the c10d rendezvous).
if [ "$NODE_RANK" -eq 0 ]; then IS_HOST=true; else IS_HOST=false; fi
echo "memplan node $NODE_RANK of $NNODES: $NPROC_PER_NODE worker(s), rendezvous $HEAD_ADDR:$RDZV_PORT"
echo "memplan node $NODE_RANK of $NNODES: run directory $RUN_DIR, checkpoints in $CHECKPOINT_DIR"

# Every rank's lines: RUN_DIR/logs/rank<global rank>.log; raw streams of local ranks 1..:
# RUN_DIR/logs/node<NODE_RANK>/<rdzv id>_<suffix>/attempt_<n>/<local rank>/{stdout,stderr}.log.
# The console shows this node's local rank 0.
exec "${TORCHRUN[@]}" \
    --nnodes="$NNODES" \
    --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$HEAD_ADDR:$RDZV_PORT" \
    --rdzv-id="$RDZV_ID" \
    --rdzv-conf="is_host=$IS_HOST" \
    --max-restarts="$MAX_RESTARTS" \
    --log-dir="$RUN_DIR/logs/node$NODE_RANK" \
    "${REDIRECTS[@]}" \
    -m launch.worker "$RUN_DIR"
