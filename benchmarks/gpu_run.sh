#!/usr/bin/env bash
# Throughput and MFU on one H100 or H200, one stage per call so that each stays under 10 minutes:
#
#   bash benchmarks/gpu_run.sh STAGE        # in the project root of the GPU machine
#
# Needs .whl/ (deepspeed, hydra-core, omegaconf, ... for Python 3.12), made on a networked machine by
# `bash benchmarks/gpu_wheels.sh` and carried with the working tree (it is git-ignored). Writes, under $OUT
# (default benchmarks/results/gpu): STAGE.json (rewritten after every case), STAGE.txt (progress and table),
# logs/STAGE/ (every rank's log) and env.txt (GPU, driver, versions, commit).
#
# Stages, most important first (minutes on a fresh machine, roughly):
#   first10          run this first on a freshly lent GPU: the import check (versions), 20 steps of the debug
#                    model on 1 GPU in bf16, the GPU tests (loss parity with transformers on CUDA, compiled
#                    FlexAttention), then the 1B throughput case with its baseline; every part writes its
#                    result under $OUT as soon as it finishes, so a time-out keeps what was measured     ~7
#   1b               1B, seq 4096, micro-batch 2, 8 micro-batches per step; activation checkpointing off and
#                    on; each against the Hugging Face baseline (the headline: >=50% MFU, >=1.3x)        ~8
#   7b-h200          7B, seq 4096, micro-batch 1, ZeRO-3 + activation checkpointing, no offload, with the
#                    baseline; needs the H200's memory (>=40% MFU target)                                ~6
#   1b-offload       1B with the optimizer state offloaded to the CPU (the offload path on one GPU; the 7B
#                    needs ~138 GiB of host memory for it, more than the lent machine's 128 GiB)          ~5
#   1b-micro         1B micro-batch 1 and 4 (checkpointing off), each with its baseline                  ~8
#   1b-levers        1B levers, ours only: flash SDPA (no document ids), torch.compile, 4 documents per
#                    row, one micro-batch per step                                                       ~6
#   1b-zero          1B ZeRO-3 knobs and the loss chunk, ours only: prefetch bucket, persistence
#                    threshold, overlap_comm, loss_chunk_size                                            ~9
#   smoke            the debug model and the GPU-marked tests (checks the set-up; ~2)
# Every case asks the trainer's memory check first; one that cannot fit the machine (the 7B without offload on
# an H100, say) is recorded as a `refused` row with the planner's numbers, not started.
set -uo pipefail

stage=${1:-}
case "$stage" in
  first10 | smoke | 1b | 1b-micro | 1b-levers | 1b-zero | 7b-h200 | 1b-offload) ;;
  *)
    sed -n '2,29p' "$0"
    exit 2
    ;;
esac
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out/logs"

if [ ! -d /tmp/site/deepspeed ]; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_run.sh: no .whl/*.whl here: run 'bash benchmarks/gpu_wheels.sh' on a machine with registry" \
      "access and carry .whl/ with the working tree" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl ||
    exit 3
fi
export PYTHONPATH=/tmp/site:$PWD
# The carried DeepSpeed and transformers must be the tested ones: the trainer would refuse another DeepSpeed at
# every start, and the parity tests compare with transformers' own models.
python3 - <<'PY' || exit 3
import deepspeed, transformers
from packaging.version import Version
from pretrain.train.versions import check_deepspeed_version
check_deepspeed_version(deepspeed.__version__, allow_untested=False)
if not Version("5.25") <= Version(transformers.__version__) < Version("6"):
    raise SystemExit(f"transformers {transformers.__version__} is not the tested >=5.25,<6: carry its wheel"
                     " (bash benchmarks/gpu_wheels.sh)")
PY
# DeepSpeed builds FusedAdam / CPUAdam with nvcc on first use: only for Hopper, to keep that short.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import sys, torch, deepspeed, transformers; print('python', sys.version.split()[0], '| torch', \
torch.__version__, 'cuda', torch.version.cuda, '| deepspeed', deepspeed.__version__, '| transformers', \
transformers.__version__)"
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (tree copied without .git)"
  nproc; free -g | head -2
} >"$out/env.txt" 2>&1

bench() { # bench NAME [benchmark args...]: one call of the benchmark; JSON, table and rank logs land in $out
  local name=$1
  shift
  echo "== $name: python3 benchmarks/gpu_throughput.py $*" | tee "$out/$name.txt"
  python3 benchmarks/gpu_throughput.py --out "$out/$name.json" --logs "$out/logs/$name" "$@" 2>&1 |
    tee -a "$out/$name.txt"
}

B1=(--experiment 1b --seq-len 4096 --grad-accum 8 --steps 8 --warmup 3 --timeout 300)
B1_FAST=("${B1[@]}" --micro-batch 2 --override deepspeed.activation_checkpointing=false --no-baseline)
B7=(--experiment 7b --seq-len 4096 --micro-batch 1 --timeout 420)

case "$stage" in
  first10)
    # 1. the import check: every version the figures depend on, and that the GPU is the one we think.
    python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__); \
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**30, 'GiB')" \
      2>&1 | tee "$out/first10-versions.txt"
    # 2. 20 optimizer steps of the debug model on one GPU in bf16, through the trainer's engine.
    bench first10-debug --experiment debug --ranks 1 --steps 20 --warmup 0 --no-baseline \
      --override deepspeed.precision=bf16
    # 3. loss parity with transformers on CUDA, and compiled FlexAttention's shape bound (GPU-marked tests).
    python3 -m pytest -q -m gpu tests/pretrain/model/test_model.py tests/pretrain/model/test_attention_paths.py 2>&1 |
      tee "$out/first10-gpu-tests.txt"
    # 4. the headline: the 1B throughput case (checkpointing off) and its Hugging Face baseline.
    bench first10-1b "${B1[@]}" --micro-batch 2 --override deepspeed.activation_checkpointing=false
    ;;
  smoke)
    python3 -m pytest -q -m gpu tests/benchmarks tests/pretrain/model/test_model.py tests/pretrain/model/test_attention_paths.py \
      2>&1 | tee "$out/smoke-pytest.txt"
    bench smoke --experiment debug --steps 5 --warmup 3
    ;;
  1b)
    bench 1b "${B1[@]}" --micro-batch 2 --sweep deepspeed.activation_checkpointing=false,true
    ;;
  1b-micro)
    bench 1b-micro "${B1[@]}" --override deepspeed.activation_checkpointing=false --sweep train.micro_batch_size=1,4
    ;;
  1b-levers)
    bench 1b-flash "${B1_FAST[@]}" --documents 0
    bench 1b-compile "${B1_FAST[@]}" --compile
    bench 1b-docs4 "${B1_FAST[@]}" --documents 4
    bench 1b-gas1 "${B1_FAST[@]}" --grad-accum 1 --steps 20 --warmup 5
    ;;
  1b-zero)
    bench 1b-prefetch "${B1_FAST[@]}" --sweep deepspeed.stage3_prefetch_bucket_size=2e7,2e8
    bench 1b-persistence "${B1_FAST[@]}" --sweep deepspeed.stage3_param_persistence_threshold=1e4,1e6
    bench 1b-overlap "${B1_FAST[@]}" --override deepspeed.overlap_comm=false
    bench 1b-loss-chunk "${B1_FAST[@]}" --sweep model.loss_chunk_size=0,8192
    ;;
  7b-h200)
    bench 7b-h200 "${B7[@]}" --grad-accum 4 --steps 4 --warmup 2
    ;;
  1b-offload)
    bench 1b-offload "${B1[@]}" --micro-batch 2 --override deepspeed.offload_optimizer=cpu --steps 4 \
      --warmup 1 --no-baseline
    ;;
esac
