"""Backend selection: explicit argument, environment override, fallbacks and refusals."""

from __future__ import annotations

import pytest
import torch

from kvreuse.layout import from_vllm_view
from kvreuse.ops import backends, gather, relocate

from tests.kernels.cases import make_rope


def test_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.choose(torch.device("cpu")) == "reference"


def test_env_override_read_per_call(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.choose(torch.device("cuda")) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="unknown ops backend"):
        backends.choose(torch.device("cpu"))
    assert backends.choose(torch.device("cpu"), "reference") == "reference"   # argument wins


def test_kernel_refuses_what_it_cannot_do(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.choose(torch.device("cuda"), kernel_ok=False) == "reference"
    with pytest.raises(ValueError, match="does not handle"):
        backends.choose(torch.device("cpu"), "triton", kernel_ok=False)
    if backends.cuda_ext() is None:
        with pytest.raises(RuntimeError, match="not built"):
            backends.choose(torch.device("cuda"), "cuda")


def test_reference_paths_on_cpu():
    d, rope = make_rope("neox")
    k = torch.randn(5, 2, d, dtype=torch.float64)             # float64: reference only
    src, dst = torch.arange(5), torch.arange(5) + 3
    assert relocate(k, src, dst, rope).dtype == torch.float64
    cache = torch.randn(4, 2, 4, 2 * d)                          # CPU_ATTN layout
    layout = from_vllm_view(cache, "CPU_ATTN", num_kv_heads=2, head_size=d)
    assert layout.kernel_strides() is None                       # transposed keys: reference only
    k2, v2 = gather(cache, layout, torch.tensor([0, 5, 9]))
    assert k2.shape == (3, 2, d)
    # token 5 = block 1, offset 1: keys are the transposed [D, N] page, values the [N, D] page after it
    page = cache[1, 0].reshape(-1)
    assert torch.equal(k2[1, 0], page[: d * 4].view(d, 4)[:, 1]) and torch.equal(v2[1, 0], page[d * 4:].view(4, d)[1])
    with pytest.raises(ValueError, match="lie in"):
        gather(cache, layout, torch.tensor([0, 99]))
