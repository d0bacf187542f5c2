"""One real local Slurm cluster (two one-CPU nodes) per test session; tests skip cleanly where it cannot run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.slurm.cluster import LocalSlurmCluster, unavailable_reason


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurmCluster]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with LocalSlurmCluster() as cluster:
        yield cluster
