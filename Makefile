# One command each for set-up, the demo, the tests and lint. CPU set-up pins the CPU wheel of torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0

.PHONY: setup demo test test-fast lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e ".[dev]"

setup: $(PY)

# The embedded default end to end: tokenizer, shards, then the tiny model on 2 local ZeRO-3 ranks.
demo: setup
	$(PY) -m pretrain

# Two workers, one per core: each test file stays on one worker, the longest first (tests/conftest.py).
test: setup
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf artifacts runs outputs wandb .pytest_cache .ruff_cache
