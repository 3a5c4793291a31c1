"""Fixtures of the connector tests: tiny checkpoints built offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvreuse.models import TinySpec, build_tiny_model


@pytest.fixture(scope="session")
def tiny_1layer(tmp_path_factory) -> Path:
    """1-layer float32 Llama: a chunk's KV does not depend on its context, so reuse must be exact."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "l1",
                            TinySpec(num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=32))


@pytest.fixture(scope="session")
def tiny_2layer(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "l2", TinySpec(num_layers=2))
