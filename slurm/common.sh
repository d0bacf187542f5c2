# shellcheck shell=bash
# Shared by slurm/*.sh; sourced, never run. Jobs run from the directory sbatch was called in, which must be
# the repository root (that is where `python -m pretrain` and `python -m data.*` import from).

PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 # log lines reach the job's output file as they happen

# die MESSAGE: print to stderr and stop the job with a non-zero status.
die() {
    echo "$(basename "${SLURM_JOB_NAME:-$0}"): error: $*" >&2
    exit 1
}

# require_project: the project must be importable with $PYTHON from here, or nothing below can work.
require_project() {
    "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("pretrain") is None)' 2>/dev/null ||
        die "cannot import the project with PYTHON=$PYTHON from $PWD; submit from the repository root" \
            "(or install it with pip install -e .) and set PYTHON to the interpreter that has torch"
}

# cpus_per_task: what Slurm gave each task (1 when the job did not ask).
cpus_per_task() {
    echo "${SLURM_CPUS_PER_TASK:-1}"
}

# allocated_tasks: the tasks of the allocation this job has now, from SLURM_TASKS_PER_NODE ("2(x3),1" = 7).
# A requeued job keeps the SLURM_NTASKS of its first allocation even when it comes back on fewer or more
# nodes, so that variable cannot be trusted after a requeue.
allocated_tasks() {
    local total=0 part count times
    local IFS=,
    for part in ${SLURM_TASKS_PER_NODE:-${SLURM_NTASKS:-1}}; do
        count=${part%%(*}
        times=1
        if [[ $part == *"(x"* ]]; then
            times=${part##*(x}
            times=${times%)}
        fi
        total=$((total + count * times))
    done
    echo "$total"
}

# print_header TITLE: one short block at the top of every job log (and again after each requeue).
print_header() {
    echo "== $1: job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})}" \
        "on ${SLURM_JOB_NUM_NODES:-1} node(s) ${SLURM_JOB_NODELIST:-}, ${SLURM_NTASKS:-1} task(s)," \
        "$(cpus_per_task) cpu(s)/task, restart ${SLURM_RESTART_COUNT:-0}, $(date '+%F %T')"
    echo "== python: $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])' 2>&1)), dir: $PWD"
}
