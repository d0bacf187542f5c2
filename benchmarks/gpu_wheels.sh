#!/usr/bin/env bash
# Wheels for a GPU machine without network access (Python 3.12; torch and triton are already there), at the versions the test suite ran on, so that the carried packages pass the trainer's
# start-up version check and transformers matches the one our parity tests use:
#
#   bash benchmarks/gpu_wheels.sh [DEST]     # on a machine with registry access and torch importable; DEST=.whl
#
# Then carry DEST with the working tree; benchmarks/gpu_run.sh installs it into /tmp/site first on PYTHONPATH.
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# The tested versions, as pyproject.toml pins them (deepspeed: pretrain/train/versions.py TESTED_DEEPSPEED).
binary=(hydra-core "omegaconf<2.4" datasets dill multiprocess wandb gitpython gitdb smmap sentry-sdk
        pydantic pydantic-core annotated-types typing-inspection platformdirs hjson
        "transformers==5.25.*" "huggingface-hub==2.4.*" "tokenizers==0.23.*" "safetensors==0.8.*")
for p in "${binary[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d "$dest" "$p"
done
# deepspeed and antlr4 ship as source only: pure-Python wheels built here (deepspeed's build imports torch).
python3 -c "import torch" 2>/dev/null || { echo "gpu_wheels.sh: needs torch importable here" >&2; exit 1; }
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "deepspeed==0.19.8" antlr4-python3-runtime==4.9.3
ls "$dest"
