"""A failed load whose request is aborted before its recompute must not leave unwritten blocks behind.

Under vLLM's "recompute" policy the failed blocks stay in vLLM's prefix cache for the failing
request to rewrite, and another request holding them counts on that; aborted first, the failing
request never does, and the next request with the same prompt answered from KV that was never
written (1-layer float32 model: a completely different answer), whether it hit those blocks after
the abort ("after") or held them from the failing step on ("with").  `SegmentedScheduler` evicts
failed blocks from the prefix cache (without it "after" fails) and rolls back every request
holding one (without it "with" fails).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("scenario", ["after", "with"])
def test_a_request_sharing_an_aborted_failed_load_is_answered_as_from_scratch(tiny_1layer, tmp_path, scenario):
    out = tmp_path / "out.json"
    log = tmp_path / "engine.log"
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "tests.support.failed_load_abort", str(tiny_1layer), str(out),
                             scenario],
                            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode
    text = log.read_text(errors="replace")
    assert rc == 0, text[-4000:]
    assert "failed to load" in text, "the injected load failure did not happen"
    r = json.loads(out.read_text())
    got, want = r["next"], r["reference"]
    assert want["cached_tokens"] == 0
    assert got["tokens"] == want["tokens"], (got, want)
    assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"])) < 1e-4, (got, want)
