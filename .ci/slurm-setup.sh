#!/usr/bin/env bash
# Install what the local Slurm test cluster needs (tests/slurm): Debian's Slurm daemons, client and munge.
# Idempotent: does nothing when the binaries are already there. Needs root (or passwordless sudo) and apt-get;
# elsewhere it says why and exits 0, and the slurm tests then skip with that reason.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge)
needed=(slurmctld slurmd sbatch srun scontrol scancel sinfo munged munge unmunge)

missing=()
for bin in "${needed[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$bin")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "slurm-setup: already installed ($(slurmd -V 2>/dev/null || echo slurm))"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "slurm-setup: not root and no passwordless sudo; skipping (the slurm tests will skip)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "slurm-setup: no apt-get on this machine; install ${packages[*]} by hand to run tests/slurm" >&2
    exit 0
fi

echo "slurm-setup: installing ${packages[*]} (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
# --no-install-recommends keeps it to the daemons; the packages' postinst may fail to start services in a
# container without systemd, which is fine: the tests start their own daemons.
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}"
echo "slurm-setup: done ($(slurmd -V))"
