"""Caches kvreuse cannot address are refused at startup, with the backend and the KV dtype named.

Unit level: `kvreuse.layout` on vLLM-shaped views and on vLLM's own KV cache config (quantized
specs, state groups, several groups).  End to end (slow): a vLLM CPU server asked for an fp8 KV
cache with the connector must fail to start, naming CPU_ATTN and fp8 — never at the first request.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvreuse.errors import KVReuseError
from kvreuse.layout import PagedLayout, Reading, check_kv_layout, from_vllm_view

H, D = 2, 32


@pytest.mark.parametrize("backend,cache_dtype,tensor_dtype", [
    ("FLASH_ATTN", "fp8", torch.uint8),                 # vLLM stores fp8 KV as bytes
    ("TRITON_ATTN", "fp8_e4m3", torch.float8_e4m3fn),
    ("TRITON_ATTN", "int8_per_token_head", torch.int8),
    ("FLASHINFER", "nvfp4", torch.uint8),
    ("CPU_ATTN", "fp8_e5m2", torch.float8_e5m2),
    ("FLASH_ATTN", "auto", torch.float8_e4m3fn),        # a quantized tensor whatever the string says
])
def test_quantized_kv_is_refused(backend, cache_dtype, tensor_dtype):
    cache = torch.zeros(4, H, 16, 2 * D, dtype=tensor_dtype)
    with pytest.raises(KVReuseError) as e:
        from_vllm_view(cache, backend, num_kv_heads=H, head_size=D, kv_cache_dtype=cache_dtype)
    msg = str(e.value)
    assert backend in msg and cache_dtype in msg and str(tensor_dtype) in msg


@pytest.mark.parametrize("backend", ["FLEX_ATTENTION", "TRITON_ATTN_DIFFKV", "FLASHMLA_SPARSE", None])
def test_unknown_backend_is_refused(backend):
    cache = torch.zeros(4, H, 16, 2 * D, dtype=torch.bfloat16)
    with pytest.raises(KVReuseError) as e:
        from_vllm_view(cache, backend, num_kv_heads=H, head_size=D)
    assert repr(backend) in str(e.value) and "bfloat16" in str(e.value)


def test_geometry_and_stride_order_are_checked():
    ok = torch.zeros(4, H, 16, 2 * D, dtype=torch.float16)
    lay = from_vllm_view(ok, "FLASH_ATTN", num_kv_heads=H, head_size=D, block_size=64, kv_layout="LBHNC")
    assert isinstance(lay, PagedLayout) and lay.reading is Reading.KV_SPLIT and lay.kernel_block_size == 16
    assert lay.block_size == 64 and lay.kernel_strides() == (D, H * 16 * 2 * D, 2 * D, 16 * 2 * D)
    with pytest.raises(KVReuseError, match="LBNHC"):         # LBHNC strides are not LBNHC's
        check_kv_layout(ok, "LBNHC")
    with pytest.raises(KVReuseError, match="head size 24"):
        from_vllm_view(ok, "FLASH_ATTN", num_kv_heads=H, head_size=24)
    with pytest.raises(KVReuseError, match=r"\[2, 4, 16, 2, 32\]"):   # vLLM < 0.32 5-D caches
        from_vllm_view(torch.zeros(2, 4, 16, H, D), "FLASH_ATTN", num_kv_heads=H, head_size=D)
    mla = from_vllm_view(torch.zeros(4, 1, 16, 80, dtype=torch.bfloat16), "TRITON_MLA", num_kv_heads=1, head_size=80)
    assert mla.reading is Reading.MLA and not mla.has_v and mla.kernel_strides() == (80, 16 * 80, 80, 16 * 80)


def _vllm_config(spec_groups, kv_layout="LBNHC", num_blocks=4):
    """A KVCacheConfig and its caches, from vLLM's own functions."""
    from vllm.config import CacheConfig
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec, KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    cc = CacheConfig(block_size=spec_groups[0][1].block_size)
    cc.kv_cache_layout = kv_layout
    vcfg = SimpleNamespace(cache_config=cc, attention_config=SimpleNamespace(hisparse_config=None))
    groups = [KVCacheGroupSpec(names, spec) for names, spec in spec_groups]
    per_block = max(len(n) * s.page_size_bytes for n, s in spec_groups)
    cfg = get_kv_cache_config_from_groups(vcfg, groups, num_blocks * per_block)
    return cfg, allocate_kv_cache(cfg, torch.device("cpu"), KVCacheLayout[kv_layout])


def test_vllm_fp8_spec_refused_before_any_request():
    pytest.importorskip("vllm")
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode

    from kvreuse.layout import layouts_from_kv_cache_config

    names = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    spec = FullAttentionSpec(block_size=16, num_kv_heads=H, head_size=D, dtype=torch.uint8,
                             kv_quant_mode=KVQuantMode.FP8_PER_TENSOR)
    cfg, caches = _vllm_config([(names, spec)])
    with pytest.raises(KVReuseError, match=r"'FLASH_ATTN'.*'fp8'"):
        layouts_from_kv_cache_config(caches, cfg, dict.fromkeys(names, "FLASH_ATTN"), kv_cache_dtype="fp8",
                                     kv_layout="LBNHC")


def test_several_kv_cache_groups_refused_by_the_worker():
    pytest.importorskip("vllm")
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from kvreuse.connector.config import ConnectorConfig
    from kvreuse.connector.worker import WorkerSide
    from kvreuse.layout import layouts_from_kv_cache_config
    from kvreuse.rope import freqs
    from kvreuse.rope.spec import RopeSpec
    from kvreuse.store import ModelFingerprint

    full = FullAttentionSpec(block_size=16, num_kv_heads=H, head_size=D, dtype=torch.float16)
    swa = SlidingWindowSpec(block_size=16, num_kv_heads=H, head_size=D, dtype=torch.float16, sliding_window=64)
    groups = [(["model.layers.0.self_attn.attn"], full), (["model.layers.1.self_attn.attn"], swa)]
    cfg, caches = _vllm_config(groups, kv_layout="BLHNC")
    layouts = layouts_from_kv_cache_config(caches, cfg, dict.fromkeys(caches, "FLASH_ATTN"), kv_cache_dtype="auto",
                                           kv_layout="BLHNC")
    assert sorted(lay.group for lay in layouts.values()) == [0, 1]
    rope = RopeSpec(inv_freq=freqs.default_inv_freq(10000.0, D), rotary_dim=D)
    w = WorkerSide(ConnectorConfig(), rope, ModelFingerprint("Tiny", "w", "float16"))
    try:
        with pytest.raises(KVReuseError, match="2 KV cache groups"):
            w.register(caches, "FLASH_ATTN", H, D, layouts=layouts)
    finally:
        w.close()


@pytest.mark.slow
def test_server_with_fp8_kv_fails_at_startup(tmp_path):
    pytest.importorskip("vllm")
    from kvreuse.models import TinySpec, build_tiny_model
    from tests.connector.connector_helpers import Server, free_port, vllm_argv

    model = build_tiny_model(tmp_path / "l1", TinySpec(num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1,
                                                       head_dim=32))
    port = free_port()
    kv = {"kv_connector": "KVReuseConnector", "kv_role": "kv_both"}
    s = Server(vllm_argv(model, port, kv=kv, dtype="bfloat16", extra=["--kv-cache-dtype", "fp8"]), port,
               tmp_path / "fp8.log")
    assert s.wait_exit(300) != 0
    log = s.log.read_text()
    assert "kvreuse cannot address a quantized KV cache" in log and "CPU_ATTN" in log and "'fp8'" in log
