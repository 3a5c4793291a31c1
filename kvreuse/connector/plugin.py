"""`vllm.general_plugins` entry point: makes `"kv_connector": "KVReuseConnector"` known to vLLM."""

from __future__ import annotations

NAME = "KVReuseConnector"


def register() -> None:
    """Register KVReuseConnector with vLLM's KVConnectorFactory (idempotent; vLLM calls it per process)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(NAME, "kvreuse.connector.connector", NAME)
    _maybe_count_encoder_runs()


ENCODER_LOG_ENV = "KVREUSE_TEST_ENCODER_LOG"


def _maybe_count_encoder_runs() -> None:
    """Test hook: with `KVREUSE_TEST_ENCODER_LOG=path`, every vision-encoder call of the Qwen2-VL family
    appends `modality count` lines to `path` (the items it encoded).  Off unless the variable is set;
    tests use it to count encoder runs independently of the connector's own metrics."""
    import os

    path = os.environ.get(ENCODER_LOG_ENV)
    if not path:
        return
    import functools
    import importlib

    for mod, cls_name in (("vllm.model_executor.models.qwen2_vl", "Qwen2VLForConditionalGeneration"),
                          ("vllm.model_executor.models.qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")):
        cls = getattr(importlib.import_module(mod), cls_name)
        if getattr(cls.embed_multimodal, "_kvreuse_counted", False):
            continue

        def wrap(orig):
            @functools.wraps(orig)
            def embed_multimodal(self, **kwargs):
                lines = []
                for key, modality in (("image_grid_thw", "image"), ("video_grid_thw", "video")):
                    grid = kwargs.get(key)
                    if grid is not None:
                        n = sum(len(g) if getattr(g, "dim", lambda: 1)() > 1 else 1 for g in grid) \
                            if isinstance(grid, (list, tuple)) else len(grid)
                        lines.append(f"{modality} {n}\n")
                with open(path, "a") as f:
                    f.writelines(lines)
                return orig(self, **kwargs)

            embed_multimodal._kvreuse_counted = True
            return embed_multimodal

        cls.embed_multimodal = wrap(cls.embed_multimodal)
