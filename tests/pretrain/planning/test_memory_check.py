"""The memory check before a run starts: on CPU ranks the planner's estimate per rank times the ranks of the machine
against its available memory, on a GPU the plan against the device's and the host's memory; a run that cannot fit
stops with the numbers, what to change, and the one-line error the command prints."""

from __future__ import annotations

import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from pretrain.config import ConfigError, compose_pretrain_config
from pretrain.planning import memory_check
from pretrain.planning.hardware import resolve_precision
from pretrain.planning.memory_check import ensure_fits, memory_problem

CPU_MESSAGE = re.compile(
    r"model (?P<model>\S+) \((?P<params>[\d.]+)B parameters, (?P<precision>\w+)\) needs about (?P<per_rank>[\d.]+) GiB "
    r"per CPU rank under ZeRO-(?P<stage>\d) over (?P<world>\d+) ranks, (?P<need>[\d.]+) GiB for the (?P<local>\d+) "
    r"ranks of this machine, which has (?P<have>[\d.]+) GiB available\. "
)
GIB = 2**30


@pytest.fixture(scope="module")
def debug_cfg():
    return compose_pretrain_config(["+experiment=debug"])


@pytest.fixture(scope="module")
def big_cfg():
    return compose_pretrain_config(["+experiment=7b"])


@pytest.fixture
def cpu(monkeypatch):
    """CPU ranks (also on a GPU machine), with the host's available memory as the test sets it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    host = SimpleNamespace(gib=20.0)
    monkeypatch.setattr(memory_check, "available_memory_gib", lambda device: host.gib)
    return host


@pytest.fixture
def gpu(monkeypatch):
    """One visible CUDA device of the size the test sets, and the host's available memory."""
    machine = SimpleNamespace(name="NVIDIA H100 80GB HBM3", gib=80.0, host_gib=1000.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda index: SimpleNamespace(
            name=machine.name, total_memory=int(machine.gib * GIB), major=9, minor=0
        ),
    )
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *index: machine.name)

    def available(device: str) -> float:
        assert device == "cpu", device  # the device's capacity comes from its properties
        return machine.host_gib

    monkeypatch.setattr(memory_check, "available_memory_gib", available)
    return machine


def cpu_numbers(problem: str | None) -> dict[str, str]:
    assert problem is not None
    match = CPU_MESSAGE.match(problem)
    assert match, problem
    return match.groupdict()


def test_the_debug_run_fits_this_machine(debug_cfg):
    assert memory_problem(debug_cfg, 2, 2, "fp32") is None
    ensure_fits(debug_cfg, 2, 2)  # and the run goes on


def test_a_7b_on_two_cpu_ranks_is_refused_with_its_numbers_and_what_to_change(big_cfg, cpu):
    problem = memory_problem(big_cfg, 2, 2, "bf16")
    numbers = cpu_numbers(problem)
    assert numbers["model"] == "7b" and numbers["precision"] == "bf16" and numbers["stage"] == "3"
    assert 6.5 < float(numbers["params"]) < 7.0
    assert (numbers["world"], numbers["local"], numbers["have"]) == ("2", "2", "20.0")
    assert float(numbers["per_rank"]) > 20.0
    assert float(numbers["need"]) == pytest.approx(2 * float(numbers["per_rank"]), abs=0.1)
    for change in ("a smaller model", "more machines", "train.micro_batch_size", "train.check_memory=false"):
        assert change in problem


def test_the_cpu_check_passes_exactly_when_the_machine_has_what_the_ranks_need(big_cfg, cpu):
    cpu.gib = 0.0
    need = float(cpu_numbers(memory_problem(big_cfg, 2, 2, "bf16"))["need"])  # rounded to 0.1 GiB
    cpu.gib = need + 0.06
    assert memory_problem(big_cfg, 2, 2, "bf16") is None
    cpu.gib = need - 0.06
    assert cpu_numbers(memory_problem(big_cfg, 2, 2, "bf16"))["have"] == f"{need - 0.06:.1f}"


def test_the_cpu_need_is_per_rank_times_this_machines_ranks_and_shrinks_with_more_ranks(big_cfg, cpu):
    cpu.gib = 0.0
    two = cpu_numbers(memory_problem(big_cfg, 2, 2, "bf16"))
    four_here = cpu_numbers(memory_problem(big_cfg, 4, 4, "bf16"))
    four_over_two_machines = cpu_numbers(memory_problem(big_cfg, 4, 2, "bf16"))
    # ZeRO-3 shards the model state: four ranks need less each than two.
    assert float(four_here["per_rank"]) < float(two["per_rank"])
    assert four_over_two_machines["per_rank"] == four_here["per_rank"]
    assert float(four_here["need"]) == pytest.approx(4 * float(four_here["per_rank"]), abs=0.2)
    assert float(four_over_two_machines["need"]) == pytest.approx(2 * float(four_here["per_rank"]), abs=0.2)
    # fp32 parameters take twice the bytes of bf16 ones.
    assert float(cpu_numbers(memory_problem(big_cfg, 2, 2, "fp32"))["per_rank"]) > float(two["per_rank"])


def test_every_cpu_rank_counts_the_runtime_besides_the_model(debug_cfg, cpu):
    cpu.gib = 0.0
    numbers = cpu_numbers(memory_problem(debug_cfg, 2, 2, "fp32"))
    assert (
        float(numbers["per_rank"]) >= memory_check.CPU_RANK_BASE_GIB
    )  # a model of a few MB, and the runtime
    assert float(numbers["need"]) >= 2 * memory_check.CPU_RANK_BASE_GIB


def test_on_cpu_ranks_offloaded_state_still_counts_since_it_stays_in_the_same_memory(big_cfg, cpu):
    cpu.gib = 0.0
    offloaded = compose_pretrain_config(["+experiment=7b", "deepspeed.offload_optimizer=cpu"])
    plain = float(cpu_numbers(memory_problem(big_cfg, 2, 2, "bf16"))["per_rank"])
    assert float(cpu_numbers(memory_problem(offloaded, 2, 2, "bf16"))["per_rank"]) >= plain


def test_ensure_fits_raises_the_config_error_the_command_prints_as_one_line(big_cfg, cpu):
    with pytest.raises(ConfigError) as caught:
        ensure_fits(big_cfg, 2, 2)
    message = str(caught.value)
    assert message.startswith("train.check_memory: this run does not fit this machine: model 7b")
    assert "\n" not in message
    # The 7B's precision is "auto": the message names the precision it resolves to here, not "auto".
    assert big_cfg.deepspeed.precision == "auto"
    assert f"B parameters, {resolve_precision('auto')[0]})" in message


def test_check_memory_false_lets_a_run_that_cannot_fit_proceed(big_cfg, cpu):
    cpu.gib = 0.0
    ensure_fits(replace(big_cfg, train=replace(big_cfg.train, check_memory=False)), 2, 2)


def test_on_a_gpu_a_7b_that_cannot_fit_one_device_names_need_capacity_and_fixes(big_cfg, gpu):
    problem = memory_problem(big_cfg, 1, 1, "bf16")
    assert problem is not None
    need = re.match(r"(.+?) needs ([\d.]+) GiB per GPU \(NVIDIA H100 80GB HBM3: 80\.0 GiB\)", problem)
    assert need and float(need[2]) > 80.0, problem
    assert "GiB of host memory per node (1000 GiB available)" in problem
    assert "to make it fit: " in problem and "deepspeed.offload_optimizer=cpu" in problem
    assert problem.endswith("or set train.check_memory=false to try anyway")
    with pytest.raises(ConfigError, match="does not fit this machine"):
        ensure_fits(big_cfg, 1, 1)


def test_on_a_gpu_the_capacity_is_the_devices_own_memory(big_cfg, gpu):
    gpu.name, gpu.gib = "a card the planner's table does not know", 200.0
    assert memory_problem(big_cfg, 1, 1, "bf16") is None


def test_on_a_gpu_the_debug_run_fits_and_eight_gpus_hold_the_7b(debug_cfg, big_cfg, gpu):
    assert memory_problem(debug_cfg, 1, 1, "fp32") is None
    assert memory_problem(big_cfg, 8, 8, "bf16") is None


def test_on_a_gpu_the_host_memory_per_node_counts_the_ranks_of_this_machine(big_cfg, gpu):
    gpu.host_gib = 8.0  # less than what the ranks of one node need besides the model (4 GiB each)
    problem = memory_problem(big_cfg, 8, 8, "bf16")
    assert problem is not None
    assert re.search(r"and (\d+) GiB of host memory per node \(8 GiB available\)", problem), problem
    # The same eight GPUs one per node: a node's host holds one rank.
    assert memory_problem(big_cfg, 8, 1, "bf16") is None


def test_on_a_gpu_without_bf16_the_check_sizes_the_fp32_run_that_auto_resolves_to(big_cfg, gpu):
    """`deepspeed.precision=auto` trains in fp32 on a GPU without bf16 (a V100): the check must size fp32."""
    gpu.name, gpu.gib = "Tesla V100-SXM2-32GB", 32.0
    as_fp32 = memory_check.memory_problem(big_cfg, 4, 4, "fp32")
    assert as_fp32 != memory_check.memory_problem(big_cfg, 4, 4, "bf16")
    configured_fp32 = replace(big_cfg, deepspeed=replace(big_cfg.deepspeed, precision="fp32"))
    assert as_fp32 == memory_check.memory_problem(configured_fp32, 4, 4, "fp32")
