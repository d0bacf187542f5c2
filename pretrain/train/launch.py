"""Starting the ranks: join an existing launcher (srun, torchrun, deepspeed), or start local processes.

`python -m pretrain` typed on a workstation has no launcher around it; it then starts `train.local_processes`
copies of itself (one per GPU, or 2 on CPU so ZeRO-3 really shards), each with the torchrun-style environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import torch

from data.log import get_logger

log = get_logger(__name__)

# Seconds the surviving ranks get to exit after SIGTERM (they may be hung in a collective) before SIGKILL.
STOP_GRACE_S = 20.0


def under_launcher() -> bool:
    """True when a launcher already set this process's rank (torchrun/deepspeed: RANK; srun: SLURM_STEP_ID)."""
    return "RANK" in os.environ or ("SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ)


def accept_launcher_arguments(argv: list[str] | None = None) -> None:
    """Take the `--local_rank=N` (or `--local_rank N`) the deepspeed launcher passes to every rank out of the
    command line, into LOCAL_RANK, so that only Hydra overrides remain."""
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            del argv[i]
            return
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            del argv[i : i + 2]
            return


def default_local_processes(configured: int) -> int:
    if configured > 0:
        return configured
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_local(n: int, argv: list[str]) -> int:
    """Run `python -m pretrain argv...` as `n` ranks on this machine; the first failure stops the others."""
    port = _free_port()
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n))
    if not torch.cuda.is_available():
        base.setdefault("DS_ACCELERATOR", "cpu")
        base.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // n)))
    log.info("starting %d local ranks (master port %d)", n, port)
    procs: list[subprocess.Popen] = []

    def forward(signum, _frame):  # Ctrl-C or a scheduler's signal reaches every rank
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    # Installed before the ranks start: a caught signal is reset to the default in a started program, an ignored
    # one stays ignored. A launcher started in the background by a script (`cmd &`) inherits SIGINT ignored; its
    # ranks would inherit that too and train on through the SIGINT forwarded to them.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    for rank in range(n):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n))
        procs.append(subprocess.Popen([sys.executable, "-m", "pretrain", *argv], env=env))
    code = 0
    kill_at = None  # after a failure: when the survivors get SIGKILL if SIGTERM did not stop them
    try:
        while procs:
            for proc in list(procs):
                ret = proc.poll()
                if ret is None:
                    continue
                procs.remove(proc)
                if ret != 0 and code == 0:
                    code = ret
                    log.error("a rank exited with code %d; stopping the others", ret)
                    for other in procs:
                        other.terminate()
                    kill_at = time.monotonic() + STOP_GRACE_S
            if kill_at is not None and time.monotonic() > kill_at:
                for proc in procs:
                    proc.kill()
            time.sleep(0.2)
    finally:
        for proc in procs:
            proc.kill()
    return code
