"""A KV connector that does nothing: what vLLM's connector machinery costs by itself.

For `bench/noreuse_bench.py --prefix-args`: vLLM alone with this connector set, against kvreuse,
tells kvreuse's own cost from that of running any connector (per-layer hooks, the connector's
share of each step's metadata and output).  No load, no save, no claim:

    python bench/noreuse_bench.py --prefix-args \
      '--kv-transfer-config {"kv_connector":"NullConnector","kv_connector_module_path":"bench.null_connector","kv_role":"kv_both"}'
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata


class NullConnector(KVConnectorBase_V1):
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        return

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return KVConnectorMetadata()
