"""Fixtures of the multimodal tests: tiny Qwen2-VL / Qwen2.5-VL checkpoints built offline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "connector"))  # connector_helpers

from kvreuse.models.tiny_vl import TinyVLSpec, build_tiny_vl_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory) -> Path:
    """1-layer float32 Qwen2-VL: a chunk's KV does not depend on its context, so reuse must be exact."""
    return build_tiny_vl_model(tmp_path_factory.mktemp("models") / "q2vl", TinyVLSpec(arch="qwen2_vl"))


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_bf16(tmp_path_factory) -> Path:
    return build_tiny_vl_model(tmp_path_factory.mktemp("models") / "q25vl",
                               TinyVLSpec(arch="qwen2_5_vl", dtype="bfloat16", seed=1))
