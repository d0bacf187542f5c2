#!/usr/bin/env bash
# Tokenize and pack into shards on Slurm: a job array where each task writes a disjoint slice of the shards,
# then one dependent job that checks every slice and writes the manifests. One command submits both:
#
#   bash slurm/prepare.sh data=web tokenizer=bpe                       # 8 slice tasks, then the merge
#   PREPARE_TASKS=32 bash slurm/prepare.sh --partition=cpu --time=4:00:00 -- data=web tokenizer=bpe
#
# Arguments before a literal `--` are sbatch options for both jobs; the rest are Hydra overrides. Run it from
# the repository root, after the tokenizer exists (slurm/tokenizer.sh; chain with --dependency=afterok:<id>).
# `sbatch slurm/prepare.sh <overrides>` (no array) prepares everything in one job instead.
# Logs: logs/prepare-<array id>_<task>.out and logs/prepare-<merge id>-merge.out (PREPARE_LOG_DIR=logs).
#
# Contract with data.prepare (the prepare.* keys: PrepareConfig in data/config.py, data/prepare_tasks.py):
#   slice task i of n:  python -m data.prepare <overrides> ++prepare.task_index=i ++prepare.num_tasks=n
#                       reads every source in full but builds only the shards k with k % n == i, then commits
#                       a task record (.prepare-task-i-of-n.json); task 0 also writes rejects.jsonl. Never the
#                       manifest. Tasks run side by side; re-running one redoes only what is missing.
#   merge:              python -m data.prepare <overrides> ++prepare.merge=true ++prepare.num_tasks=n
#                       tokenizes nothing: checks every task's record and every shard (names the missing or
#                       bad ones and the task to re-run), then writes the manifests, the same bytes as a
#                       single-process prepare, and cleans up. Safe to re-run.
#
#SBATCH --job-name=prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --output=logs/%x-%j.out

set -uo pipefail

cd "${SLURM_SUBMIT_DIR:-.}" || exit 1
# shellcheck source=slurm/common.sh
source slurm/common.sh 2>/dev/null || {
    echo "prepare.sh: slurm/common.sh not found in $PWD; run it from the repository root" >&2
    exit 1
}

# ---- driver: outside a job, submit the array and the merge that waits for it -------------------------------
if [ -z "${SLURM_JOB_ID:-}" ]; then
    sbatch_args=()
    if [[ " $* " == *" -- "* ]]; then
        while [ "$1" != "--" ]; do
            sbatch_args+=("$1")
            shift
        done
        shift
    fi
    tasks=${PREPARE_TASKS:-8}
    [[ "$tasks" =~ ^[1-9][0-9]*$ ]] || die "PREPARE_TASKS must be a positive integer, got '$tasks'"
    logs=${PREPARE_LOG_DIR:-logs}
    require_project
    mkdir -p "$logs" || die "cannot create the log directory $logs"
    array_id=$(sbatch --parsable "${sbatch_args[@]}" --array="0-$((tasks - 1))" \
        --output="$logs/%x-%A_%a.out" --export=ALL,PREPARE_STAGE=slice "$0" "$@") ||
        die "submitting the slice array failed"
    array_id=${array_id%%;*}
    merge_id=$(sbatch --parsable "${sbatch_args[@]}" --dependency="afterok:$array_id" \
        --kill-on-invalid-dep=yes --output="$logs/%x-%j-merge.out" \
        --export="ALL,PREPARE_STAGE=merge,PREPARE_TASKS=$tasks" "$0" "$@") ||
        die "submitting the merge job failed (the array $array_id is queued; scancel it or merge by hand)"
    merge_id=${merge_id%%;*}
    echo "prepare: slices in job array $array_id ($tasks tasks), merge in job $merge_id after they all succeed"
    echo "prepare: follow with: squeue -j $array_id,$merge_id; logs in $logs/prepare-${array_id}_*.out"
    exit 0
fi

# ---- inside a job -------------------------------------------------------------------------------------------
require_project
print_header "prepare"
stage_args=()
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    # Task index from 0 whatever range the array was given; a step or gaps would leave slices unwritten.
    first=${SLURM_ARRAY_TASK_MIN:-0}
    count=${SLURM_ARRAY_TASK_COUNT:-1}
    if [ "$((SLURM_ARRAY_TASK_MAX - first + 1))" != "$count" ]; then
        die "the array must be a contiguous range like --array=0-$((count - 1)), got" \
            "min $first, max $SLURM_ARRAY_TASK_MAX, count $count"
    fi
    stage_args=("++prepare.task_index=$((SLURM_ARRAY_TASK_ID - first))" "++prepare.num_tasks=$count")
elif [ "${PREPARE_STAGE:-}" = merge ]; then
    stage_args=("++prepare.merge=true" "++prepare.num_tasks=${PREPARE_TASKS:?set by the driver}")
fi
# Worker processes for the allocated CPUs, not for every core of the node, unless the user chose.
if [[ " $* " != *"data.num_workers="* ]]; then
    stage_args+=("data.num_workers=$(cpus_per_task)")
fi
echo "== overrides: $* ${stage_args[*]}"
exec srun --ntasks=1 --cpus-per-task="$(cpus_per_task)" "$PYTHON" -m data.prepare "$@" "${stage_args[@]}"
