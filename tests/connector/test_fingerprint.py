"""`model_fingerprint` reads every identity dimension from a real vLLM config (no server started).

One `VllmConfig` of the tiny checkpoint is built; each dimension is then changed on a copy of it
(or, for the weights, in the checkpoint's files) and must change the fingerprint.
"""

from __future__ import annotations

import copy
import shutil

import pytest

from kvreuse.connector.connector import model_fingerprint
from kvreuse.models import TinySpec, build_tiny_model


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    from vllm.engine.arg_utils import EngineArgs

    d = build_tiny_model(tmp_path_factory.mktemp("fp") / "m", TinySpec(num_layers=1, hidden_size=64, num_heads=2,
                                                                      num_kv_heads=1, head_dim=32))
    return d, EngineArgs(model=str(d), dtype="float32", enforce_eager=True, max_model_len=256).create_engine_config()


def test_model_fingerprint_covers_each_dimension(tiny_config):
    path, cfg = tiny_config
    base = model_fingerprint(cfg)
    assert base == model_fingerprint(cfg) and base.weights_id.split("#")[0] != f"unread:{path}"
    assert base.kv_cache_dtype == "auto" and base.quantization == "none" and (base.tp_size, base.pp_size) == (1, 1)
    seen = {base.digest}

    def variant(edit):
        c = copy.deepcopy(cfg)
        edit(c)
        return model_fingerprint(c)

    for fp in (variant(lambda c: setattr(c.cache_config, "cache_dtype", "fp8")),
               variant(lambda c: setattr(c.model_config, "quantization", "fp8")),
               variant(lambda c: setattr(c.parallel_config, "tensor_parallel_size", 2)),
               variant(lambda c: setattr(c.parallel_config, "pipeline_parallel_size", 2)),
               variant(lambda c: setattr(c.model_config, "dtype", __import__("torch").bfloat16))):
        assert fp.digest not in seen
        seen.add(fp.digest)
    tp2 = model_fingerprint(_with(cfg, tp=2))
    r1 = model_fingerprint(_with(cfg, tp=2), tp_rank=1)
    assert r1.digest != tp2.digest and r1 == tp2.for_rank(1)
    pp2 = _with(cfg, pp=2)
    assert model_fingerprint(pp2, pp_rank=1).digest != model_fingerprint(pp2).digest
    # the checkpoint's tensors rewritten in place (same names, sizes and header): other weights identity
    st = path / "model.safetensors"
    saved = st.read_bytes()
    try:
        data = bytearray(saved)
        for i in range(len(data) - 64, len(data)):
            data[i] ^= 0x5A
        st.write_bytes(bytes(data))
        assert model_fingerprint(cfg).digest not in seen
    finally:
        st.write_bytes(saved)
    assert model_fingerprint(cfg) == base
    # the same checkpoint served from another directory keeps its identity (a restart stays warm)
    moved = path.parent / "moved"
    shutil.copytree(path, moved)
    c = copy.deepcopy(cfg)
    c.model_config.model = str(moved)
    assert model_fingerprint(c).weights_id == base.weights_id


def _with(cfg, *, tp: int = 1, pp: int = 1):
    c = copy.deepcopy(cfg)
    c.parallel_config.tensor_parallel_size = tp
    c.parallel_config.pipeline_parallel_size = pp
    return c
