"""A real two-node Slurm cluster on this one machine, for testing the sbatch scripts as users run them.

`LocalSlurmCluster` starts its own munged, one slurmctld and two slurmd ("n1", "n2", one CPU each) from a
slurm.conf written into a temporary directory, on free ports, and tears all of it down again; the host's
Slurm and munge configuration is not touched (only /etc/hosts gains `127.0.0.1 n1 n2` if those do not
resolve). It needs root and Debian's `slurmctld slurmd slurm-client munge` packages (`.ci/slurm-setup.sh`);
`unavailable_reason()` says why a machine cannot run it, so tests skip instead of failing.

Requeued jobs may start again after `cred_expire` seconds (AuthInfo; Slurm's default is 120 s, 5 s here).

There is no slurmdbd, so no sacct: finished jobs are read from `scontrol show job`, which keeps them for
MinJobAge seconds (set to a day here).
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# added by tests/slurm/cluster.py"
NODES = ("n1", "n2")
PARTITION = "debug"
REQUIRED_BINARIES = (
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "scontrol",
    "scancel",
    "sinfo",
    "munged",
    "munge",
    "unmunge",
)
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    }
)


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def unavailable_reason() -> str | None:
    """Why this machine cannot run the local cluster (not root, binaries missing), or None if it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the local Slurm cluster needs root (it starts munged, slurmctld and slurmd)"
    missing = [name for name in REQUIRED_BINARIES if _which(name) is None]
    if missing:
        return f"Slurm/munge binaries missing ({', '.join(missing)}); run .ci/slurm-setup.sh"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (munged runs as it); reinstall the munge package (.ci/slurm-setup.sh)"
    return None


def _free_port_block(count: int, attempts: int = 50) -> list[int]:
    """`count` consecutive TCP ports that nothing listens on, from a random base (parallel runs rarely clash)."""
    for _ in range(attempts):
        base = random.randrange(41000, 45000 - count)
        ports = list(range(base, base + count))
        try:
            for port in ports:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("0.0.0.0", port))
        except OSError:
            continue
        return ports
    raise RuntimeError(f"no block of {count} free TCP ports found between 41000 and 45000")


def parse_scontrol_record(text: str) -> dict[str, str]:
    """`scontrol show job -o` prints one line of Key=Value pairs; values may contain spaces."""
    pairs = re.findall(r"(\S+?)=(.*?)(?=\s+[A-Za-z][\w:/]*=|\s*$)", text.strip())
    return dict(pairs)


class LocalSlurmCluster:
    """Context manager: a running cluster while inside, nothing left behind after."""

    def __init__(self, base_dir: Path | None = None, requeue_delay_s: int = 5) -> None:
        self.hostname = socket.gethostname().split(".")[0]
        self._own_base = base_dir is None
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="slurm-test-"))
        self.base.chmod(0o755)  # munged runs as user munge and must reach its directory inside
        self.conf = self.base / "slurm.conf"
        self.log_dir = self.base / "log"
        self.requeue_delay_s = requeue_delay_s
        self.ctld_port, *self.node_ports = _free_port_block(1 + len(NODES))
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if key != "SLURM_CONF":
                del self.env[key]
        self.munge_dir = self.base / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self._daemons: list[subprocess.Popen] = []

    # ---- set-up -------------------------------------------------------------------------------------------

    def __enter__(self) -> LocalSlurmCluster:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        try:
            self._start_munge()
            self._ensure_node_names_resolve()
            self._write_conf()
            self._start_daemons()
            self._wait_for_idle_nodes(timeout=60)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _start_munge(self) -> None:
        """A private munged (own key, socket and pid) run as user munge, so the host's munge is untouched and
        concurrent clusters do not share one. The key is owned by munge with mode 400, as munged demands."""
        self.munge_dir.mkdir(mode=0o755, exist_ok=True)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        for path in (self.munge_dir, key):
            shutil.chown(path, "munge", "munge")
        key.chmod(0o400)
        cmd = [
            _which("munged"), "--foreground",
            f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self.munge_dir}/munged.pid", f"--log-file={self.munge_dir}/munged.log",
            f"--seed-file={self.munge_dir}/munged.seed",
        ]  # fmt: skip
        self._daemons.append(
            subprocess.Popen(
                cmd,
                user="munge",
                group="munge",
                extra_groups=[],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        )
        deadline = time.monotonic() + 10
        while not self._munge_works():
            self._check_daemons_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not answer on {self.munge_socket} within 10s")
            time.sleep(0.1)

    def _munge_works(self) -> bool:
        socket_arg = f"--socket={self.munge_socket}"
        cred = subprocess.run(["munge", socket_arg, "--no-input"], capture_output=True)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge", socket_arg], input=cred.stdout, capture_output=True).returncode == 0

    def _ensure_node_names_resolve(self) -> None:
        """Jobs reach the first node by name (MASTER_ADDR=n1): point n1 and n2 at 127.0.0.1. The line stays
        after the cluster stops, since another cluster on this machine may be using it."""
        unresolved = []
        for node in NODES:
            try:
                socket.gethostbyname(node)
            except OSError:
                unresolved.append(node)
        if unresolved:
            with HOSTS_FILE.open("a") as hosts:
                hosts.write(f"127.0.0.1 {' '.join(unresolved)} {HOSTS_MARK}\n")

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(
            f"NodeName={name} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={port} CPUs=1 State=UNKNOWN"
            for name, port in zip(NODES, self.node_ports, strict=True)
        )
        # cred_expire is also how long a requeued job waits before it may start again (default 120 s);
        # sched_interval=1 makes the scheduler look again every second rather than every minute.
        self.conf.write_text(
            f"""# written by tests/slurm/cluster.py
ClusterName=pretraintest
SlurmctldHost={self.hostname}
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire={self.requeue_delay_s},socket={self.munge_socket}
StateSaveLocation={self.base}/state
SlurmdSpoolDir={self.base}/spool/%n
SlurmctldPidFile={self.base}/slurmctld.pid
SlurmdPidFile={self.base}/slurmd-%n.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
MinJobAge=86400
SlurmctldTimeout=300
SlurmdTimeout=300
MessageTimeout=30
InactiveLimit=0
KillWait=5
Waittime=0
{nodes}
PartitionName={PARTITION} Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start_daemons(self) -> None:
        """Foreground daemons (-D) as our own children, so teardown knows exactly which pids to stop."""
        commands = [[_which("slurmctld"), "-D", "-c", "-f", str(self.conf)]]
        commands += [[_which("slurmd"), "-D", "-f", str(self.conf), "-N", node] for node in NODES]
        for i, cmd in enumerate(commands):
            out = (self.log_dir / f"daemon-{i}.out").open("ab")
            self._daemons.append(
                subprocess.Popen(
                    cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
            out.close()
            if i == 0:
                self._wait_for_controller(timeout=30)

    def _wait_for_controller(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.run("scontrol", "ping", check=False).stdout.find("is UP") < 0:
            self._check_daemons_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"slurmctld did not answer within {timeout:.0f}s\n{self.logs()}")
            time.sleep(0.2)

    def _wait_for_idle_nodes(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(node) == "idle" for node in NODES):
                return
            self._check_daemons_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle within {timeout:.0f}s: {states}\n{self.logs()}")
            time.sleep(0.2)

    def _check_daemons_alive(self) -> None:
        for proc in self._daemons:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(proc.args)} exited with {proc.returncode}\n{self.logs()}")

    # ---- teardown -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Cancel jobs, shut the Slurm daemons down (politely, then by pid), stop munged, remove the temp dir."""
        slurm = [p for p in self._daemons if Path(str(p.args[0])).name.startswith("slurm")]
        if slurm and slurm[0].poll() is None:
            self.run("scancel", "--partition", PARTITION, check=False)
            self.run("scontrol", "shutdown", check=False)
        for proc in slurm:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for proc in self._daemons:  # munged last: slurmctld needs it to shut down
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
        self._daemons.clear()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    # ---- using it -----------------------------------------------------------------------------------------

    def run(
        self,
        *args: str,
        check: bool = True,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        """A command against this cluster (SLURM_CONF set, outer SLURM_* variables removed, `env` added);
        sbatch passes this environment on to the job."""
        result = subprocess.run(
            list(args),
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> int:
        """Submit and return the job id (`sbatch --parsable`); the job sees this environment plus `env`."""
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """The job's record from `scontrol show job` (empty if slurmctld no longer knows it)."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if result.returncode != 0 or not result.stdout.strip():
            return {}
        return parse_scontrol_record(result.stdout.splitlines()[0])

    def wait_for_state(
        self, job_id: int | str, states: set[str] | frozenset[str], timeout: float = 60
    ) -> dict[str, str]:
        """Poll until the job is in one of `states`; raise with the job record and daemon logs if it never is."""
        deadline = time.monotonic() + timeout
        record: dict[str, str] = {}
        while time.monotonic() < deadline:
            record = self.job(job_id)
            if record.get("JobState") in states:
                return record
            time.sleep(0.25)
        raise TimeoutError(
            f"job {job_id} not in {sorted(states)} after {timeout:.0f}s: {record}\n{self.logs()}"
        )

    def wait_for_job(self, job_id: int | str, timeout: float = 60) -> dict[str, str]:
        """Wait for a terminal state (COMPLETED, FAILED, CANCELLED, ...) and return the job record."""
        return self.wait_for_state(job_id, TERMINAL_STATES, timeout)

    def signal_job(self, job_id: int | str, sig: str = "USR1", batch_only: bool = True) -> None:
        """Signal a job as Slurm would before its time limit: the batch shell only (`--batch`), or the
        batch shell and every step (`--full`). Without either, scancel signals the steps but not the shell."""
        scope = "--batch" if batch_only else "--full"
        self.run("scancel", f"--signal={sig}", scope, str(job_id))

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)
