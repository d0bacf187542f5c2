"""Shared fixtures: one prepared debug corpus per session, and a helper that runs the real 2-rank trainer.

`make test` runs the suite on two pytest-xdist workers: each test file stays on one worker,
so its module fixtures are built once, and every Slurm test shares the one worker that owns the local cluster.
Part of a multi-rank test is waiting, which the other worker fills. The session fixtures (the
debug corpus and the 2-rank debug run) are built once for all workers, under a file lock.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from tests.helpers import WANDB_SECRET, run_pretrain

# The longest groups, longest first (measured with `--durations`): handed out first, so the workers finish
# together instead of one running a long file alone at the end. Every other file follows in collection order.
LONGEST_FIRST = (
    "tests/slurm",
    "tests/pretrain/checkpoint/test_moe_resume.py",
    "tests/pretrain/checkpoint/test_reshard.py",
    "tests/pretrain/train/test_training.py",
    "tests/pretrain/train/test_faults.py",
    "tests/pretrain/train/test_gradients.py",
    "tests/pretrain/train/test_sequence_parallel.py",
    "tests/benchmarks/test_gpu_throughput.py",
    "tests/pretrain/train/test_stages.py",
    "tests/pretrain/checkpoint/test_checkpoint_crash.py",
    "tests/pretrain/model/test_parity.py",
    "tests/pretrain/train/test_launchers.py",
    "tests/pretrain/checkpoint/test_checkpoint.py",
    "tests/pretrain/test_configs.py",
    "tests/pretrain/model/test_moe_parity.py",
    "tests/pretrain/planning/test_plan.py",
)


def test_group(nodeid: str) -> str:
    """The unit of work a worker takes whole: a test file, or all of tests/slurm (one local cluster)."""
    path = nodeid.split("::", 1)[0]
    return "tests/slurm" if path.startswith("tests/slurm/") else path


def pytest_collection_modifyitems(config, items) -> None:
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(test_group(item.nodeid), len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's loadscope with `test_group` as the scope, the collection order kept, and a worker given its next
    group only when its last test is running (not two tests ahead, which can leave another worker idle)."""
    from xdist.scheduler import LoadScopeScheduling

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return test_group(nodeid)

        def _reschedule(self, node) -> None:
            if not node.shutting_down and self.workqueue and self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)

    config.option.loadscopereorder = False
    return FileGroupScheduling(config, log)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(dir)` once per test session, shared by every xdist worker; the first worker builds, the others
    wait on the lock and reuse the finished directory (a `.done` marker says it is complete)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    target, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            target.mkdir(exist_ok=True)
            build(target)
            done.touch()
    return target


@pytest.fixture(scope="session")
def debug_artifacts(tmp_path_factory) -> Path:
    """Tokenizer and shards of the embedded corpus under the debug experiment, built once per session."""
    from data.prepare import ensure_data
    from pretrain.config import compose_pretrain_config

    def build(artifacts: Path) -> None:
        ensure_data(
            compose_pretrain_config(["+experiment=debug", f"paths.artifacts={artifacts}"]).data_pipeline()
        )

    return built_once(tmp_path_factory, "artifacts", build)


@pytest.fixture(scope="session")
def debug_run_output(debug_artifacts, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted `python -m pretrain +experiment=debug` (2 ranks, 40 steps) shared by the tests that
    only read it; WANDB_API_KEY is set to a sentinel that must never be written anywhere."""

    def build(runs: Path) -> None:
        result = run_pretrain(debug_artifacts, runs, env={"WANDB_API_KEY": WANDB_SECRET})
        output = {"args": result.args, "stdout": result.stdout, "stderr": result.stderr}
        (runs / "launch.json").write_text(json.dumps(output))

    runs = built_once(tmp_path_factory, "runs", build)
    output = json.loads((runs / "launch.json").read_text())
    return runs / "debug", subprocess.CompletedProcess(returncode=0, **output)


@pytest.fixture(scope="session")
def debug_run(debug_run_output) -> Path:
    return debug_run_output[0]
