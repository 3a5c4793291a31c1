"""The quality conditions through a real `kvreuse serve` on the embedded model (slow: one server).

Every condition must claim what it is built to claim (from /metrics), and the server's answers must
match the reference encoder's on the same contexts: accuracy within 1 point per condition and
class, and per-question agreement.  Blind reuse must still lose 3-hop chains through the server."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from bench.quality import server as S
from bench.quality import task

MODEL = Path(__file__).resolve().parents[2] / "bench" / "models" / "binder"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="embedded model not committed"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed"),
]
N_MAIN, N_REORDER = 8, 4


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from kvreuse.reference.encoder import ReferenceEncoder

    rng = random.Random(1234)
    main = [task.bench_example(rng) for _ in range(N_MAIN)]
    reo = [task.reorder_example(rng) for _ in range(N_REORDER)]
    log = tmp_path_factory.mktemp("quality_server") / "server.log"
    # vLLM's own scheduler (prefix claims), every condition on one server: the patch condition's requests
    # ask for patched_or_exact reuse, so its capture request computes c2/c3 in context instead of placing them
    with S.Serve(MODEL, S.server_config(36, S.store_bytes_for(MODEL, 36, N_MAIN, N_REORDER)), log=log,
                 extra=["--scheduler-cls", "vllm.v1.core.sched.scheduler.Scheduler"]) as srv:
        measured = S.measure(S.Client(srv.url), main, reo)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    enc = ReferenceEncoder(AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32))
    cmp = S.compare(measured, S.reference_preds(enc, main, reo))
    print("\n" + S.format_table(cmp))
    return cmp


@pytest.mark.parametrize("cond", S.SERVER_CONDITIONS)
def test_claims_as_built(compared, cond):
    r = compared[cond]
    assert r["claims_as_expected"], (r["claims"], r["expected_claims"])
    assert r["claims"].get("load_failures", 0) == 0


@pytest.mark.parametrize("cond", S.SERVER_CONDITIONS)
def test_matches_reference(compared, cond):
    r = compared[cond]
    assert abs(r["single_hop"] - r["reference_single_hop"]) <= 0.01, r
    assert abs(r["multi_hop"] - r["reference_multi_hop"]) <= 0.01, r
    assert r["agreement"] >= 0.99, r


def test_blind_loses_multi_hop_through_the_server(compared):
    assert compared["full"]["multi_hop"] - compared["blind"]["multi_hop"] >= 0.2
    assert compared["reorder"]["multi_hop"] > compared["blind"]["multi_hop"]
