"""Shared fixtures: one prepared debug corpus per session, and a helper that runs the real 2-rank trainer."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def debug_artifacts(tmp_path_factory) -> Path:
    """Tokenizer and shards of the embedded corpus under the debug experiment, built once per session."""
    from pretrain.app import compose_pretrain_config, prepare_data

    artifacts = tmp_path_factory.mktemp("artifacts")
    prepare_data(compose_pretrain_config(["+experiment=debug", f"paths.artifacts={artifacts}"]))
    return artifacts
