"""What this machine is, for the choices that depend on it: bf16 or fp32, threads per CPU rank, free memory.

Whatever started the ranks, a rank uses its share of the cores (`cpu_threads_per_rank`), on CPU and GPU
nodes alike: torch's default of one thread per core in every rank oversubscribes the machine as soon as two
ranks share it, and gloo's collectives then wait on descheduled threads (the deepspeed launcher sets no thread
count; torchrun sets 1 unless told otherwise).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def native_bf16() -> tuple[bool, str]:
    """Whether this machine multiplies bf16 matrices at full speed, and why: CUDA with bf16 support, or a CPU
    with AVX512-BF16, AMX or (Arm) the bf16 extension. On an AVX2-only CPU a bf16 matmul is emulated and
    runs tens of times slower than fp32."""
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {torch.cuda.get_device_name()} {'supports' if ok else 'lacks'} bf16"
    if platform.machine() in ("x86_64", "AMD64"):
        if torch.cpu._is_amx_tile_supported():
            return True, "the CPU has AMX"
        if torch.cpu._is_avx512_bf16_supported():
            return True, "the CPU has AVX512-BF16"
        return False, f"the CPU has no native bf16 matmul ({torch.backends.cpu.get_cpu_capability()})"
    if platform.machine() in ("aarch64", "arm64"):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            flags = ""
        if " bf16" in flags:
            return True, "the CPU has the Arm bf16 extension"
        return False, "the CPU has no Arm bf16 extension"
    return False, f"no native bf16 known for {platform.machine()}"


def resolve_precision(configured: str) -> tuple[str, str]:
    """The precision to train in ("bf16" or "fp32") and the reason; an explicit setting wins over "auto"."""
    if configured != "auto":
        return configured, f"deepspeed.precision={configured}"
    fast, why = native_bf16()
    return ("bf16" if fast else "fp32"), f"deepspeed.precision=auto: {why}"


def local_world_size() -> int:
    """Ranks on this machine, from whichever launcher started them (1 when none says)."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def cpu_threads_per_rank() -> int:
    """Intra-op threads for one rank (on CPU its compute; on a GPU node its host work, such as DeepSpeed's CPU
    Adam under optimizer offload): OMP_NUM_THREADS when set, else this process's cores shared evenly among the
    ranks of the machine. torchrun's own default of OMP_NUM_THREADS=1, which it sets for every rank when the
    variable was unset, is not taken as a choice: it would leave CPU Adam on one core."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    torchrun_default = configured == "1" and "TORCHELASTIC_RUN_ID" in os.environ
    if configured.isdigit() and int(configured) > 0 and not torchrun_default:
        return int(configured)
    cores = len(os.sched_getaffinity(0))
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")  # Slurm already gave each task its own cores
    if per_task.isdigit() and int(per_task) > 0:
        return max(1, min(cores, int(per_task)))
    return max(1, cores // local_world_size())


def available_memory_gib(device: str) -> float:
    """Free memory where the model state will live: the current CUDA device's, or the host's (MemAvailable)."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free / 2**30
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


# Dense BF16 peak TFLOP/s per device (no sparsity), matched against torch.cuda.get_device_name(), the longest
# key first: the SXM boards report a bare "H100" / "H200" (e.g. "NVIDIA H100 80GB HBM3"), the others say so.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100": 989.0,  # SXM
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,  # SXM
    "H200 NVL": 835.0,
    "A100": 312.0,  # SXM and PCIe alike
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
    "MI300X": 1307.0,
}


def peak_for_device(name: str) -> float | None:
    """The dense BF16 peak of a device by its reported name, or None when the table does not know it."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def peak_tflops(override: float = 0.0) -> float | None:
    """The device's dense BF16 peak, from the override or the table; None on CPU or an unknown device."""
    if override > 0:
        return override
    if not torch.cuda.is_available():
        return None
    return peak_for_device(torch.cuda.get_device_name())
