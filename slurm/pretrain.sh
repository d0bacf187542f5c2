#!/usr/bin/env bash
# Train on a Slurm cluster: the same `python -m pretrain [overrides]` as on a workstation, one rank per GPU.
#
#   sbatch slurm/pretrain.sh +experiment=7b                          # 1 node x 8 GPUs (the defaults below)
#   sbatch --nodes=4 slurm/pretrain.sh +experiment=7b                 # 4 nodes x 8 GPUs = 32 ranks
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=4 slurm/pretrain.sh +experiment=debug  # CPU
#
# Submit from the repository root; sbatch flags override the #SBATCH defaults, everything after the script
# name is a Hydra override. The log goes to logs/<job name>-<job id>.out (Slurm does not create logs/: a
# missing directory makes the job fail before it starts, with no log at all).
# CPU-only nodes: `--gpus-per-node=0` is accepted by Slurm 22.05 even where no GPUs are configured, and
# removes the GPU request of the header.
#
# Preemption and time limits: Slurm sends USR1 to this shell (`--signal=B:USR1@120`, i.e. 120 s before the
# time limit; or by hand: `scancel --signal=USR1 --batch <job>`). The shell forwards it to the srun step
# (srun passes it on to every task), waits for the ranks to checkpoint and exit, and requeues the job
# under the same id, so it resumes from runs/<name>/ with `--open-mode=append` adding to the same log.
# After MAX_RESTARTS requeues (default 5) it stops instead and exits non-zero.
# Signals without "B:" go to the steps and never reach this shell, so they do not requeue.
#
# Environment: PYTHON (default python3), MAX_RESTARTS (default 5), MASTER_PORT (default: from the job id).
#
#SBATCH --job-name=pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -uo pipefail # not -e: `wait` returns non-zero by design when a signal interrupts it

cd "${SLURM_SUBMIT_DIR:-.}" || exit 1
# shellcheck source=slurm/common.sh
source slurm/common.sh 2>/dev/null || {
    echo "pretrain.sh: slurm/common.sh not found in $PWD; submit from the repository root" >&2
    exit 1
}
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job; run: sbatch slurm/pretrain.sh $*"
require_project

MAX_RESTARTS=${MAX_RESTARTS:-5}
restarts=${SLURM_RESTART_COUNT:-0}

# The first node hosts rank 0's rendezvous; every node resolves the names `scontrol` prints.
nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || die "cannot expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
export MASTER_ADDR=${nodes%%$'\n'*}
# The same port for the same job id (also after a requeue), spread over 15000-24999: below the Linux
# ephemeral range (32768+) and away from Slurm's own 6817/6818.
export MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 10000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(cpus_per_task)}
# One rank per task of the allocation the job has now: a requeued job may come back on another number of
# nodes, and the run then resumes at that world size (its checkpoint is converted; nothing to do by hand).
SLURM_NTASKS=$(allocated_tasks)
export SLURM_NTASKS SLURM_NPROCS=$SLURM_NTASKS

print_header "pretrain"
echo "== master: $MASTER_ADDR:$MASTER_PORT, restarts so far: $restarts (at most $MAX_RESTARTS), overrides: $*"

if [ "$restarts" -gt "$MAX_RESTARTS" ]; then
    die "requeued $restarts times, more than MAX_RESTARTS=$MAX_RESTARTS; not starting again." \
        "Resubmit (sbatch slurm/pretrain.sh $*) to continue from the last checkpoint."
fi

preempted=0
srun_pid=
# shellcheck disable=SC2329 # called by the trap below
forward_usr1() {
    [ "$preempted" = 1 ] && return # forward once; the ranks are already stopping
    preempted=1
    echo "== $(date '+%F %T') USR1: asking the ranks to checkpoint and stop"
    [ -n "$srun_pid" ] && kill -USR1 "$srun_pid" 2>/dev/null # srun forwards it to every task
}
trap forward_usr1 USR1

# In the background: bash runs a trap only between commands, and `wait` is the one that returns early.
# srun 22.05 does not inherit --cpus-per-task from the allocation, so it is passed on explicitly.
srun --kill-on-bad-exit=1 --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks="$SLURM_NTASKS" \
    --cpus-per-task="$(cpus_per_task)" "$PYTHON" -m pretrain "$@" &
srun_pid=$!
[ "$preempted" = 1 ] && kill -USR1 "$srun_pid" 2>/dev/null # USR1 came before srun started
while :; do
    wait "$srun_pid"
    status=$?
    # > 128 and srun still alive: a trapped signal interrupted `wait`, not srun's exit.
    if [ "$status" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
    break
done
echo "== $(date '+%F %T') srun exited with status $status"

if [ "$preempted" = 0 ]; then
    exit "$status"
fi
if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
    die "preempted, and already requeued $restarts times (MAX_RESTARTS=$MAX_RESTARTS); not requeueing." \
        "Resubmit (sbatch slurm/pretrain.sh $*) to continue from the last checkpoint."
fi
echo "== requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $MAX_RESTARTS)"
# Slurm stops this shell as part of the requeue; the job comes back PENDING with the same id.
scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed; resubmit by hand"
exit 0
