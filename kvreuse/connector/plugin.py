"""`vllm.general_plugins` entry point: makes `"kv_connector": "KVReuseConnector"` known to vLLM."""

from __future__ import annotations

NAME = "KVReuseConnector"


def register() -> None:
    """Register KVReuseConnector with vLLM's KVConnectorFactory (idempotent; vLLM calls it per process)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(NAME, "kvreuse.connector.connector", NAME)

