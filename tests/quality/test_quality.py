"""Reduced quality benchmark on the embedded reference model (CPU, well under a minute).

Full prefill must answer 3-hop chains best; base + patch must beat blind reuse on them; the
in-context model must know its task; the checkpoint must load through the Auto classes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from bench.quality import conditions as C
from bench.quality import task
from kvreuse.reference.encoder import ChunkKV, ReferenceEncoder

MODEL = Path(__file__).resolve().parents[2] / "bench" / "models" / "binder"
pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="embedded model not committed")


@pytest.fixture(scope="module")
def enc():
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return ReferenceEncoder(AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32))


def test_tokenizer_round_trip():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    ex = task.bench_example(random.Random(0))
    text = " ".join(task.VOCAB[i] for i in ex.context_tokens)
    assert tok(text, add_special_tokens=True)["input_ids"] == ex.context_tokens
    assert tok.decode(ex.context_tokens) == text


def test_ordering_full_patched_blind(enc):
    rng = random.Random(7)
    tallies = {k: C.Tally() for k in ("full", "blind", "patched")}
    for _ in range(12):                                   # 12 contexts: 36 three-hop questions
        ex = task.bench_example(rng)
        qs = [q for q in ex.questions if q.depth == 3 or (q.depth == 1 and q.chunk > 0)]
        e = C.encode_example(enc, ex)
        order = [0, 1, 2]
        ref = C.score(enc, tallies["full"], ChunkKV.cat(e.full), qs, None)
        blind, _ = C.patched_chunks(enc, e, None, order)
        C.score(enc, tallies["blind"], ChunkKV.cat(blind), qs, ref)
        patched, fracs = C.patched_chunks(enc, e, C.PatchRule(), order)
        C.score(enc, tallies["patched"], ChunkKV.cat(patched), qs, ref)
    full, blind, patched = (tallies[k].acc("hop3") for k in ("full", "blind", "patched"))
    assert full >= 0.9, "the embedded model must answer 3-hop chains in context"
    assert full >= patched > blind, (full, patched, blind)
    assert tallies["full"].acc("hop1") >= 0.9
