"""`model_fingerprint` reads every identity dimension from a real vLLM config (no server started).

One `VllmConfig` of the tiny checkpoint is built; each dimension is then changed on a copy of it
(or, for the weights, in the checkpoint's files) and must change the fingerprint.  Weights kvreuse cannot
read (a dummy or remote loader, object storage, a hub model not downloaded) need `weights_version`.
"""

from __future__ import annotations

import copy
import shutil
import struct
import time

import pytest

from kvreuse.connector.config import ConnectorConfig, ConnectorConfigError
from kvreuse.connector.fingerprint import model_fingerprint
from kvreuse.models import TinySpec, build_tiny_model
from kvreuse.store.keys import checkpoint_identity
from tests.support.hub_cache import put_snapshot


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
    declared = model_fingerprint(cfg, weights_version="v1")
    st = path / "model.safetensors"
    saved = st.read_bytes()
    try:
        data = bytearray(saved)
        for i in range(len(data) - 64, len(data)):
            data[i] ^= 0x5A
        st.write_bytes(bytes(data))
        assert model_fingerprint(cfg).digest not in seen
        assert model_fingerprint(cfg, weights_version="v1") != declared  # the sampled blocks see this one
    finally:
        st.write_bytes(saved)
    assert model_fingerprint(cfg, weights_version="v1") == declared  # the same content again
    # a copy elsewhere: other files (a restart of this server stays warm, a copy is not known to be the same)
    moved = path.parent / "moved"
    shutil.copytree(path, moved)
    c = copy.deepcopy(cfg)
    c.model_config.model = str(moved)
    assert model_fingerprint(c).weights_id != model_fingerprint(cfg).weights_id
    # unless the weights are declared: then hosts with their own copies share entries
    assert model_fingerprint(c, weights_version="v1").weights_id == declared.weights_id
    shutil.rmtree(moved)


def _with(cfg, *, tp: int = 1, pp: int = 1):
    c = copy.deepcopy(cfg)
    c.parallel_config.tensor_parallel_size = tp
    c.parallel_config.pipeline_parallel_size = pp
    return c


def _edit(cfg, edit):
    c = copy.deepcopy(cfg)
    edit(c)
    return c


def test_a_weight_file_rewritten_in_place_with_the_same_size_changes_the_fingerprint(tiny_config):
    """A partial fine-tune saved in place: same names, sizes and header, and bytes the sampled blocks miss."""
    path, cfg = tiny_config
    st = path / "model.safetensors"
    saved = st.read_bytes()
    (n,) = struct.unpack("<Q", saved[:8])
    start, span = 8 + n, len(saved) - 8 - n
    assert span > 64 << 10
    base, content = model_fingerprint(cfg), checkpoint_identity(path, stamps=False)
    try:
        time.sleep(0.05)  # file timestamps are coarse: a rewrite within a few ms of the last write may keep the mtime
        with open(st, "r+b") as f:
            f.seek(start + span // 14)  # between the first two sampled blocks
            f.write(bytes(b ^ 0x5A for b in saved[start + span // 14:start + span // 14 + 64]))
        assert st.stat().st_size == len(saved) and checkpoint_identity(path, stamps=False) == content
        assert model_fingerprint(cfg).digest != base.digest
    finally:
        st.write_bytes(saved)


def test_weights_version_goes_into_the_fingerprint(tiny_config):
    path, cfg = tiny_config
    a, b = model_fingerprint(cfg, weights_version="2024-06"), model_fingerprint(cfg, weights_version="2024-07")
    assert a.digest != b.digest and model_fingerprint(cfg, weights_version="2024-06") == a
    assert model_fingerprint(cfg).digest not in (a.digest, b.digest)
    assert ConnectorConfig.from_extra_config({"weights_version": "2024-06"}).weights_version == "2024-06"
    assert ConnectorConfig.from_extra_config({}).weights_version is None
    for bad in ("", " ", 3, ["v1"]):
        with pytest.raises(ConnectorConfigError, match="^weights_version: expected a non-empty string"):
            ConnectorConfig.from_extra_config({"weights_version": bad})


def test_weights_it_cannot_read_need_weights_version(tiny_config, tmp_path):
    path, cfg = tiny_config
    configs = tmp_path / "configs"  # what a remote loader leaves locally: configs, no weight files
    configs.mkdir()
    shutil.copy(path / "config.json", configs)
    unreadable = {"dummy loader": _edit(cfg, lambda c: setattr(c.load_config, "load_format", "dummy")),
                  "configs only": _edit(cfg, lambda c: setattr(c.model_config, "model", str(configs))),
                  "object storage": _edit(cfg, lambda c: setattr(c.model_config, "model_weights", "s3://b/m")),
                  "hub model not downloaded": _edit(cfg, lambda c: setattr(c.model_config, "model", "org/absent"))}
    for what, c in unreadable.items():
        with pytest.raises(ConnectorConfigError, match=r"^weights_version: required.*"
                                                       r'set "weights_version" in kv_connector_extra_config'):
            model_fingerprint(c)
        v1 = model_fingerprint(c, weights_version="v1")
        assert "version:v1" in v1.weights_id, what
        assert model_fingerprint(c, weights_version="v2").digest != v1.digest, what
    # one weight file (a GGUF) is read like a directory: no version needed, and a rewrite is seen
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 512)
    c = _edit(cfg, lambda c: setattr(c.model_config, "model", str(gguf)))
    fp = model_fingerprint(c)
    assert "unread:" not in fp.weights_id and fp == model_fingerprint(c)
    time.sleep(0.05)
    with open(gguf, "r+b") as f:
        f.seek(1000)
        f.write(b"\0" * 8)
    assert model_fingerprint(c).digest != fp.digest


def test_the_connector_refuses_to_start_without_weights_version_where_it_cannot_read_the_weights(tiny_config):
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvreuse.connector.connector import KVReuseConnector
    from kvreuse.connector.plugin import register

    register()
    path, cfg = tiny_config
    c = _edit(cfg, lambda c: setattr(c.load_config, "load_format", "dummy"))
    c.kv_transfer_config = KVTransferConfig(kv_connector="KVReuseConnector", kv_role="kv_both")
    for role in (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER):
        with pytest.raises(ConnectorConfigError, match=r"weights_version: required.*'dummy'"):
            KVReuseConnector(c, role, None)


def test_a_hub_model_keeps_its_identity_across_hosts(tiny_config, tmp_path, monkeypatch):
    """A hub model is read from the local cache, whose blobs are named by their content: two hosts' caches
    (their own files, mtimes and inodes) give one fingerprint, so they share a Redis tier."""
    import huggingface_hub.constants

    path, cfg = tiny_config
    files = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    c = _edit(cfg, lambda c: setattr(c.model_config, "model", "org/tiny"))
    fps = []
    for host in ("host1", "host2"):
        put_snapshot(tmp_path / host, "org/tiny", files, "3" * 40)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / host))
        fps.append(model_fingerprint(c))
        time.sleep(0.05)
    assert fps[0] == fps[1] and "unread:" not in fps[0].weights_id


def test_a_hub_lora_not_in_the_local_cache_is_served_without_kvreuse(tmp_path, monkeypatch):
    """Never keyed by the adapter's name alone: until vLLM has its files, the request neither places nor saves."""
    import huggingface_hub.constants
    from vllm.lora.request import LoRARequest

    from kvreuse.connector.request_state import Phase
    from kvreuse.connector.scheduler import SchedulerSide
    from tests.support.sched_requests import SchedRequest, message

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    s = SchedulerSide(ConnectorConfig(), b"m" * 16, frozenset({2}), block_size=16)
    r = SchedRequest("r1", message(1, 100), lora_request=LoRARequest("sql", 1, "org/sql-lora"), hash_block=16)
    assert s.matched(r, 0) == 0 and s.reqs["r1"].phase is Phase.OFF
    base = SchedRequest("r2", message(1, 100), hash_block=16)
    s.matched(base, 0)
    assert s.reqs["r2"].phase is not Phase.OFF
