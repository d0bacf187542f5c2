"""Run tracking: one wandb run id per run directory, the metrics log and its resume contract (no duplicated step
after a restart), and the real wandb library in offline mode: every logged step, the scrubbed config, no secret."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pretrain.train.tracking import RunTracker, scrub, wandb_run_id
from tests.helpers import WANDB_SECRET

# The .wandb file: a 7-byte W&B header, then LevelDB's log format (32 KiB blocks of records, each with a 7-byte
# header: CRC, length, type), each record one wandb `Record` protobuf.
WANDB_HEADER, BLOCK, RECORD_HEADER = 7, 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data.startswith(b":W&B"), data[:16]
    records, pending, pos = [], b"", WANDB_HEADER
    while pos + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER:  # the block's tail is padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        payload = data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        if kind == FULL:
            records.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            records.append(pending + payload)
    parsed = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def wandb_history(path: Path) -> dict[int, dict[str, float]]:
    """Step -> the metrics wandb recorded for it (its own `_`-keys left out)."""
    out = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            out[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return out


def wandb_config(path: Path) -> dict:
    (run,) = [r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run"]
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in run.config.update}


def offline_runs(run_dir: Path) -> list[Path]:
    """Each incarnation's offline run file, oldest first."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


def logged_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


@dataclass
class TinyConfig:
    """A config whose credentials scrub must drop: one under a key of its own, others nested deeper."""

    lr: float = 3e-4
    run_name: str = "tracking-test"
    logging: dict = field(
        default_factory=lambda: {"wandb_api_key": WANDB_SECRET, "project": "p", "sinks": [{"Password": "x"}]}
    )


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """The real wandb, offline, with the API key set as a user's shell would and every wandb folder in tmp_path;
    torn down afterwards, which also waits until wandb's writer has flushed the run file."""
    import wandb

    home = tmp_path / "wandb-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    yield home
    wandb.teardown()


def offline_tracker(run_dir: Path) -> RunTracker:
    return RunTracker(
        TinyConfig(), run_dir, wandb_run_id(run_dir), mode="offline", project="tests", entity=None
    )


def test_the_run_id_is_created_once_and_read_back_for_the_same_run_dir(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    run_id = wandb_run_id(first)
    assert re.fullmatch(r"[0-9a-f]{8}", run_id)
    assert (first / "wandb_run_id").read_text() == run_id
    assert wandb_run_id(first) == wandb_run_id(first) == run_id
    assert wandb_run_id(second) != run_id  # another run directory is another wandb run
    assert sorted(p.name for p in first.iterdir()) == ["wandb_run_id"]  # no temporary file left behind


def test_a_stored_run_id_is_used_as_written_without_its_newline(tmp_path):
    (tmp_path / "wandb_run_id").write_text("feedc0de\n")
    assert wandb_run_id(tmp_path) == "feedc0de"


def test_scrub_drops_credential_keys_at_any_depth_and_keeps_everything_else():
    config = {
        "lr": 0.1,
        "WANDB_API_KEY": "k1",
        "tokenizer": {"dir": "t", "vocab_size": 512},  # "token" alone is no credential
        "sinks": [{"apikey": "k2", "url": "u"}, {"db": {"Password": "k3", "user": "me"}}, 7],
        "client_secret": "k4",
        "token_secret": "k5",
    }
    assert scrub(config) == {
        "lr": 0.1,
        "tokenizer": {"dir": "t", "vocab_size": 512},
        "sinks": [{"url": "u"}, {"db": {"user": "me"}}, 7],
    }
    assert scrub([1, "api_key"]) == [1, "api_key"]  # values are data, only keys are judged


def test_with_wandb_disabled_only_the_metrics_log_is_written(tmp_path):
    tracker = RunTracker(TinyConfig(), tmp_path, "unused", mode="disabled", project="tests", entity=None)
    tracker.log({"train/loss": 2.5, "train/lr": 1e-3}, step=1)
    tracker.log({"val/loss": 2.75}, step=1)
    tracker.log({"train/loss": 2.25}, step=2)
    tracker.finish()
    tracker.finish()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "train/loss": 2.5, "train/lr": 1e-3},
        {"step": 1, "val/loss": 2.75},
        {"step": 2, "train/loss": 2.25},
    ]
    assert not (tmp_path / "wandb").exists()


def write_log(run_dir: Path, steps: list[int]) -> RunTracker:
    tracker = RunTracker(TinyConfig(), run_dir, "unused", mode="disabled", project="tests", entity=None)
    for step in steps:
        tracker.log({"train/loss": 10.0 - step}, step=step)
    return tracker


def test_truncate_after_keeps_every_entry_up_to_and_including_the_resume_step(tmp_path):
    tracker = write_log(tmp_path, [1, 2, 3, 3, 4, 5])  # step 3 twice: its training and its validation line
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write("\n")
    tracker.truncate_after(3)
    assert logged_steps(tmp_path) == [1, 2, 3, 3]
    assert "\n\n" not in (tmp_path / "metrics.jsonl").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left behind


def test_truncate_after_at_or_beyond_the_last_step_changes_nothing(tmp_path):
    tracker = write_log(tmp_path, [1, 2, 3])
    before = (tmp_path / "metrics.jsonl").read_text()
    tracker.truncate_after(3)
    tracker.truncate_after(100)
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_truncate_after_with_no_log_yet_creates_none(tmp_path):
    write_log(tmp_path, []).truncate_after(5)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_restart_from_an_earlier_checkpoint_leaves_no_duplicated_step(tmp_path):
    """The first process logged steps 1-5 but its last checkpoint is step 3; the restart resumes at 3 and logs
    4-6 again: the log holds each step once, with the restart's values."""
    write_log(tmp_path, [1, 2, 3, 4, 5]).finish()
    restarted = RunTracker(TinyConfig(), tmp_path, "unused", mode="disabled", project="tests", entity=None)
    restarted.truncate_after(3)
    for step in (4, 5, 6):
        restarted.log({"train/loss": 100.0 + step}, step=step)
    entries = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert [e["train/loss"] for e in entries[3:]] == [104.0, 105.0, 106.0]


def test_offline_wandb_holds_every_logged_step_the_scrubbed_config_and_no_secret(tmp_path, wandb_env, capfd):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = offline_tracker(run_dir)
    for step in (1, 2, 3):
        tracker.log({"train/loss": 4.0 / step, "train/lr": 1e-3 * step}, step=step)
    tracker.finish()
    tracker.finish()  # a second finish (a `close()` after an error path) is harmless
    import wandb

    wandb.teardown()  # wandb's writer flushes the run file on teardown, as at the trainer's exit
    (run_file,) = offline_runs(run_dir)
    assert run_file.name == f"run-{wandb_run_id(run_dir)}.wandb"
    assert wandb_history(run_file) == {
        1: {"train/loss": 4.0, "train/lr": 1e-3},
        2: {"train/loss": 2.0, "train/lr": 2e-3},
        3: {"train/loss": 4.0 / 3, "train/lr": 3e-3},
    }
    config = wandb_config(run_file)
    assert config["lr"] == 3e-4 and config["run_name"] == "tracking-test"
    assert config["logging"] == {"project": "p", "sinks": [{}]}
    assert logged_steps(run_dir) == [1, 2, 3]
    for path in [*run_dir.rglob("*"), *wandb_env.rglob("*")]:
        if path.is_file():
            assert WANDB_SECRET.encode() not in path.read_bytes(), path
    out, err = capfd.readouterr()
    assert WANDB_SECRET not in out + err


def test_a_restarted_run_logs_to_the_same_wandb_run_from_the_resume_step(tmp_path, wandb_env):
    """Two incarnations (a requeue after a checkpoint at step 2): one wandb run id, the second incarnation's
    history starting after the resume step, and the local log without a duplicated step."""
    import wandb

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = offline_tracker(run_dir)
    for step in (1, 2, 3):
        first.log({"train/loss": float(step)}, step=step)
    first.finish()
    wandb.teardown()

    second = offline_tracker(run_dir)
    second.truncate_after(2)
    for step in (3, 4):
        second.log({"train/loss": 10.0 * step}, step=step)
    second.finish()
    wandb.teardown()

    run_id = wandb_run_id(run_dir)
    incarnations = offline_runs(run_dir)
    assert [p.name for p in incarnations] == [f"run-{run_id}.wandb"] * 2
    assert wandb_history(incarnations[0]) == {s: {"train/loss": float(s)} for s in (1, 2, 3)}
    assert wandb_history(incarnations[1]) == {3: {"train/loss": 30.0}, 4: {"train/loss": 40.0}}
    assert logged_steps(run_dir) == [1, 2, 3, 4]


def test_a_line_torn_by_a_crash_mid_write_is_dropped_on_resume_not_fatal(tmp_path):
    tracker = write_log(tmp_path, [1, 2])
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "train/lo')  # the process died while writing step 3
    tracker.truncate_after(2)
    assert logged_steps(tmp_path) == [1, 2]
