#!/bin/bash
{{sbatch_directives}}
#
# Written by `memplan job`; submit it with:  sbatch {{script}}
#
# One SLURM task per node runs torchrun, which starts that node's {{gpus_per_node}} worker(s); the
# agents of all {{num_nodes}} node(s) meet at a c10d rendezvous on the first node of the allocation.
# Workers read resolved.yaml and plan.json from RUN_DIR (written beside this script), so the
# job runs exactly what was planned; logs, checkpoints and the wandb run go to RUN_DIR too.
set -euo pipefail

RUN_DIR={{run_dir}}
# {{num_nodes}} node(s) x {{gpus_per_node}} worker(s) = {{world_size}} ranks, the plan's world size
NNODES={{num_nodes}}
NPROC_PER_NODE={{gpus_per_node}}
RDZV_PORT={{port}}
# After a failure torchrun restarts all workers up to MAX_RESTARTS times; a requeued job starts
# again. Either way the workers resume from CHECKPOINT_DIR (checkpoint.resume={{resume}}).
MAX_RESTARTS={{max_restarts}}
CHECKPOINT_DIR={{checkpoint_dir}}
# torchrun of the Python environment that wrote this job (memplan and torch are installed there)
TORCHRUN=({{torchrun}})
# A worker stopped by SIGUSR1 (#SBATCH --signal) requeues this job when 1 (job.requeue)
export MEMPLAN_REQUEUE_ON_SIGNAL={{requeue_on_signal}}
# OpenMP threads per worker: the task's CPUs shared by the node's workers, unless already set
# (unset, torchrun sets 1 and prints a banner about it)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( {{cpus_per_task}} / NPROC_PER_NODE > 0 ? {{cpus_per_task}} / NPROC_PER_NODE : 1 ))}
# Local rank 0 prints to this output unprefixed (metrics lines start with `step N | loss`);
# the raw streams of the other local ranks go to files under RUN_DIR/logs.
REDIRECTS=({{redirects}})

# job.setup: run before srun (its environment reaches every task)
{{setup}}

: "${SLURM_JOB_ID:?not inside a SLURM job: submit this script with sbatch}"
: "${SLURM_JOB_NODELIST:?not inside a SLURM job: submit this script with sbatch}"
if [ "${SLURM_NNODES:-$NNODES}" != "$NNODES" ]; then
    echo "memplan job: the plan needs $NNODES node(s) but SLURM gave $SLURM_NNODES" >&2
    exit 2
fi

# The first node of the allocation hosts the rendezvous. (sed, not head: it reads every line,
# so a long node list cannot end scontrol with SIGPIPE, which pipefail would make fatal.)
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
: "${HEAD_NODE:?scontrol show hostnames gave no node for $SLURM_JOB_NODELIST}"
echo "memplan job $SLURM_JOB_ID: $NNODES node(s) x $NPROC_PER_NODE worker(s), rendezvous $HEAD_NODE:$RDZV_PORT"
echo "memplan job $SLURM_JOB_ID: run directory $RUN_DIR, checkpoints in $CHECKPOINT_DIR"

# The rendezvous id is the job id, which a requeued job keeps.
# Every rank's lines: RUN_DIR/logs/rank<global rank>.log; raw streams of local ranks 1..:
# RUN_DIR/logs/<job id>_<suffix>/attempt_<n>/<local rank>/{stdout,stderr}.log
# (one <job id>_<suffix> directory per node); this job's output shows each node's local rank 0.
# SIGUSR1 (--signal, before the time limit) reaches every process of the step: torchrun and
# everything else started here ignore it (an ignored signal stays ignored across exec), the
# workers catch it, save a checkpoint after the same step, stop and requeue this job.
srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task={{cpus_per_task}} --kill-on-bad-exit=1 \
    bash -c 'trap "" USR1; exec "$@"' memplan-node \
    "${TORCHRUN[@]}" \
    --nnodes="$NNODES" \
    --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" \
    --rdzv-id="$SLURM_JOB_ID" \
    --max-restarts="$MAX_RESTARTS" \
    --log-dir="$RUN_DIR/logs" \
    "${REDIRECTS[@]}" \
    -m launch.worker "$RUN_DIR"
