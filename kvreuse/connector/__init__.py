"""kvreuse as a vLLM v1 KV connector.

`kv_connector="KVReuseConnector"` works once the `vllm.general_plugins` entry point has run
(`kvreuse.connector.plugin:register`), or with `kv_connector_module_path="kvreuse.connector"`.
Importing this package does not import vLLM; the class is resolved on first access.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVReuseConnector"]


def __getattr__(name: str) -> Any:
    if name == "KVReuseConnector":
        from kvreuse.connector.connector import KVReuseConnector

        return KVReuseConnector
    raise AttributeError(name)
