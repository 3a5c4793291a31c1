"""One `kvreuse serve` (see `ops_server.py`) for the whole session, shared by the isolation and
monitoring tests: server startup is the expensive part."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "connector"))  # test_e2e_server's connector_helpers

from tests.ops.ops_server import start_ops_server  # noqa: E402
from tests.support.redis_server import redis_server_or_skip  # noqa: E402


@pytest.fixture(scope="session")
def ops_server(tmp_path_factory):
    """The started server (`connector_helpers.Server`), with a real Redis tier behind it."""
    redis = redis_server_or_skip()
    try:
        server = start_ops_server(tmp_path_factory.mktemp("ops"), redis.url)
        try:
            yield server
        finally:
            server.stop()
    finally:
        redis.close()
