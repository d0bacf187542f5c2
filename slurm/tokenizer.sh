#!/usr/bin/env bash
# Train a tokenizer on one CPU node: the same `python -m data.tokenizer [overrides]` as on a workstation.
#
#   sbatch slurm/tokenizer.sh tokenizer=bpe data=embedded
#   sbatch --cpus-per-task=64 --mem=200G slurm/tokenizer.sh tokenizer=unigram data=web tokenizer.vocab_size=64000
#
# Submit from the repository root; sbatch flags override the defaults below, everything after the script
# name is a Hydra override. HF tokenizers trains with one thread per allocated CPU (RAYON_NUM_THREADS).
# The log goes to logs/<job name>-<job id>.out; logs/ must exist.
#
#SBATCH --job-name=tokenizer
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --output=logs/%x-%j.out

set -uo pipefail

cd "${SLURM_SUBMIT_DIR:-.}" || exit 1
# shellcheck source=slurm/common.sh
source slurm/common.sh 2>/dev/null || {
    echo "tokenizer.sh: slurm/common.sh not found in $PWD; submit from the repository root" >&2
    exit 1
}
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job; run: sbatch slurm/tokenizer.sh $*"
require_project

# Without this the Rust trainer starts one thread per core of the node, not of the allocation.
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$(cpus_per_task)}
print_header "tokenizer"
echo "== overrides: $*"
exec srun --ntasks=1 --cpus-per-task="$(cpus_per_task)" "$PYTHON" -m data.tokenizer "$@"
