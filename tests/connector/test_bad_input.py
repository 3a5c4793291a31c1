"""Bad input: answered with vLLM's own error or served correctly; budgets and memory stay bounded.

* A forced hash collision (unit, no server): `ChunkKey.of` patched to give every chunk one digest,
  so two different chunks share a key; the store serves neither chunk's KV for the other's tokens
  from any tier (device, disk, a queued ingest) and never merges one into the other.
* Server tests (slow): one `kvreuse serve` on the 1-layer float32 model (small device and disk
  budgets) and vLLM alone on the same model.  A prompt beyond `--max-model-len` gets vLLM's own
  400 and the server stays up; prompts in which every token is a chunk boundary (thousands of
  "<|im_start|>" or blank-line tokens) are served exactly as vLLM alone serves them, promptly,
  without growing the server's memory; a sampler reads every tier's bytes against its budget
  from /metrics every second for the whole module.
* Media (slow): a `kvreuse serve` on the 1-layer float32 tiny Qwen2-VL.  Invalid image data gets
  vLLM's own 400 and the server goes on serving; a hundred images in one request are served exactly
  as without kvreuse (the reference is the same server with `"kvreuse": false` and a fresh cache
  salt), also when they come back stored; more images than `--limit-mm-per-prompt` get vLLM's 400.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import httpx
import psutil
import pytest
import torch

from kvreuse.models import TinySpec, build_tiny_model
from kvreuse.store import ChunkEntry, ChunkKey, ModelFingerprint, ChunkStore
from kvreuse.store.config import StoreConfig
from connector_helpers import Server, free_port, vllm_argv

FP = ModelFingerprint("TestArch", "weights-collide", "float32")
MAX_LEN = 2048


def _entry(seed: int, context: bytes = b"isolated") -> ChunkEntry:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (16,), generator=g)
    k, v = torch.randn(2, 2, 16, 2, 8, generator=g)
    return ChunkEntry(ChunkKey.of(FP, ids), ids, torch.arange(16), k, v, context=context)


def test_forced_hash_collision_never_serves_the_other_chunks_kv(monkeypatch, tmp_path):
    monkeypatch.setattr(ChunkKey, "of", classmethod(lambda cls, *a, **kw: cls(b"\x5a" * 16)))
    a, b = _entry(1), _entry(2, context=b"ctx-b")
    assert a.key == b.key and not torch.equal(a.token_ids, b.token_ids)
    one = a.nbytes
    cfg = StoreConfig(device_bytes=4 * one, disk_path=str(tmp_path / "disk"), disk_bytes=1 << 20)
    with ChunkStore(cfg, FP, fit_patch=None) as store:
        store.put(a)
        assert store.get(a.key, b.token_ids) is None and store.contains(a.key, b.token_ids) is None
        # the colliding chunk saved as if it were `a` in another context: refused, `a` untouched
        assert store.ingest(b.key, b.token_ids, b.positions, b.k.clone(), b.v.clone(), context=b.context)
        store.flush()
        for ctx in (None, b.context):
            view = store.get(a.key, a.token_ids, context=ctx)
            assert view is not None and torch.equal(view.k, a.k) and torch.equal(view.v, a.v)
        assert store.evict(a.key)
        store.flush()
        assert store.contains(a.key) == "disk"
        assert store.get(a.key, b.token_ids) is None, "a disk hit is verified against the stored tokens"
        view = store.get(a.key, a.token_ids, timeout=30)
        assert view is not None and view.source == "disk" and torch.equal(view.k, a.k)
        store.remove(a.key)
        c = _entry(3)  # queued for ingest (or already stored): served to its own tokens only
        store.ingest(c.key, c.token_ids, c.positions, c.k.clone(), c.v.clone())
        assert store.get(c.key, b.token_ids) is None
        store.flush()
        assert store.get(c.key, b.token_ids) is None
        view = store.get(c.key, c.token_ids, timeout=30)
        assert view is not None and torch.equal(view.k, c.k)
        assert store.stats.token_mismatches >= 5
        for t in store.memory:
            assert t.used_bytes <= t.budget_bytes


# ------------------------------------------------------------------------------------------- servers
KVREUSE_CONFIG = {"device_bytes": "256KiB", "disk_bytes": "1MiB", "policy": {"fidelity": "fast"},
                  "cost": {"learn": False, "step_overhead_s": 0.0}}


class BudgetSampler(threading.Thread):
    """Reads kvreuse_store_bytes / kvreuse_store_budget_bytes of every tier from /metrics each second."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server, self.samples, self.over = server, 0, []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(1.0):
            try:
                m = self.server.metrics()
            except OSError:
                continue
            self.samples += 1
            for k, used in m.items():
                if k.startswith("kvreuse_store_bytes{"):
                    budget = m.get(k.replace("store_bytes", "store_budget_bytes"), 0.0)
                    if budget and used > budget:
                        self.over.append((k, used, budget))

    def stop(self) -> None:
        self._halt.set()
        self.join()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    model = build_tiny_model(root / "l1", TinySpec(num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1,
                                                   head_dim=32))
    p_on, p_off = free_port(), free_port()
    cfg = {**KVREUSE_CONFIG, "disk_path": str(root / "disk")}
    common = ["--port", "PORT", "--host", "127.0.0.1", "--enforce-eager", "--gpu-memory-utilization", "0.3",
              "--max-model-len", str(MAX_LEN), "--dtype", "float32", "--seed", "0"]
    on = Server([sys.executable, "-m", "kvreuse.cli", "serve", str(model), "--kvreuse-config", json.dumps(cfg),
                 *[str(p_on) if a == "PORT" else a for a in common]], p_on, root / "on.log")
    off = Server(vllm_argv(model, p_off, kv=None, extra=["--max-model-len", str(MAX_LEN)]), p_off, root / "off.log")
    sampler = None
    try:
        on.wait_ready()
        off.wait_ready()
        sampler = BudgetSampler(on)
        sampler.start()
        yield on, off, sampler
    finally:
        if sampler is not None:
            sampler.stop()
        on.stop()
        off.stop()


def _post(s: Server, path: str, body: dict, timeout: float = 300) -> httpx.Response:
    return httpx.post(s.url + path, json={"model": _model(s), **body}, timeout=timeout)


def _model(s: Server) -> str:
    return httpx.get(s.url + "/v1/models", timeout=30).json()["data"][0]["id"]


def _complete(s: Server, prompt: str):
    r = _post(s, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 1})
    assert r.status_code == 200, r.text[:500]
    ch = r.json()["choices"][0]
    return ch["text"], ch["logprobs"]["token_logprobs"], r.json()["usage"]


def _assert_same(got, want, tol=1e-4):
    assert got[0] == want[0], f"greedy tokens differ: {got[0]!r} vs {want[0]!r}"
    worst = max(abs(x - y) for x, y in zip(got[1], want[1]))
    assert worst <= tol, f"logprobs differ by {worst:.3g}"


def _tree_rss_mib(pid: int) -> float:
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20


@pytest.mark.slow
def test_prompt_beyond_max_model_len_is_vllms_own_400(servers):
    on, off, _ = servers
    prompt = " ".join(["kobe"] * (MAX_LEN + 500))
    for path, body in (("/v1/completions", {"prompt": prompt}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]})):
        got, want = _post(on, path, {**body, "max_tokens": 4}), _post(off, path, {**body, "max_tokens": 4})
        assert got.status_code == want.status_code == 400, (got.status_code, got.text[:300])
        assert got.json()["error"]["message"] == want.json()["error"]["message"]
    _assert_same(_complete(on, "kobe lada " * 20), _complete(off, "kobe lada " * 20))


@pytest.mark.slow
@pytest.mark.parametrize("unit,tokens", [("<|im_start|> ", 1), ("\n\n", 1), ("<|im_start|> \n\n kobe ", 3)])
def test_every_token_a_chunk_boundary_is_served_exactly(servers, unit, tokens):
    on, off, _ = servers
    body = unit * (1500 // tokens)
    prompts = [body + "lada kobe", "kobe " + body + "lada", body]
    rss0, m0 = _tree_rss_mib(on.proc.pid), on.metrics()
    for _ in range(2):  # the second round finds the first round's chunks stored
        for p in prompts:
            got, want = _complete(on, p), _complete(off, p)
            assert got[2]["prompt_tokens"] == want[2]["prompt_tokens"] >= 1000
            _assert_same(got, want)
    t0 = time.perf_counter()
    _assert_same(_complete(on, "kobe lada " * 20), _complete(off, "kobe lada " * 20))
    assert time.perf_counter() - t0 < 60, "the server stays responsive after boundary-only prompts"
    grew = _tree_rss_mib(on.proc.pid) - rss0
    looked = sum(v - m0.get(k, 0.0) for k, v in on.metrics().items() if k.startswith("kvreuse_chunk_lookups_total"))
    assert looked >= 1000, f"only {looked:.0f} chunks looked up: the prompt was not cut at every boundary token"
    assert grew < 128, f"server memory grew by {grew:.0f} MiB over six boundary-only prompts"


@pytest.mark.slow
def test_budgets_never_exceeded_and_no_engine_errors(servers):
    on, _, sampler = servers
    time.sleep(2)
    assert sampler.samples >= 5
    assert not sampler.over, f"tier above its budget: {sampler.over[:3]}"
    m = on.metrics()
    assert any(k.startswith("kvreuse_store_budget_bytes{") for k in m)
    log = on.log.read_text(errors="replace")
    assert "Traceback" not in log and "EngineDeadError" not in log


# ------------------------------------------------------------------------------------------- media
IMAGE_LIMIT = 128


@pytest.fixture(scope="module")
def vl_server(tmp_path_factory):
    from kvreuse.models.tiny_vl import TinyVLSpec, build_tiny_vl_model

    root = tmp_path_factory.mktemp("bad-media")
    model = build_tiny_vl_model(root / "q2vl", TinyVLSpec(arch="qwen2_vl"))
    port = free_port()
    cfg = {**KVREUSE_CONFIG, "device_bytes": "1MiB", "disk_path": str(root / "disk")}
    s = Server([sys.executable, "-m", "kvreuse.cli", "serve", str(model), "--kvreuse-config", json.dumps(cfg),
                "--port", str(port), "--host", "127.0.0.1", "--enforce-eager", "--gpu-memory-utilization", "0.3",
                "--max-model-len", "4096", "--dtype", "float32", "--seed", "0",
                "--limit-mm-per-prompt", json.dumps({"image": IMAGE_LIMIT, "video": 0})], port, root / "vl.log")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def _chat(s: Server, content: list, *, reference: bool = False, salt: str | None = None):
    extra = {"kv_transfer_params": {"kvreuse": False}, "cache_salt": salt} if reference else {}
    r = _post(s, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "max_tokens": 6,
                                          "temperature": 0, "logprobs": True, **extra})
    return r


def _answer(r: httpx.Response):
    assert r.status_code == 200, r.text[:500]
    ch = r.json()["choices"][0]
    return ch["message"]["content"], [t["logprob"] for t in ch["logprobs"]["content"]], r.json()["usage"]


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.mark.slow
def test_invalid_image_data_is_vllms_own_400(vl_server):
    import base64

    from kvreuse.models.trace import image_data_url

    good = image_data_url(7)
    png = base64.b64decode(good.split(",", 1)[1])
    bad = ["data:image/png;base64," + base64.b64encode(png[: len(png) // 3]).decode(),  # truncated PNG
           "data:image/png;base64," + base64.b64encode(bytes(range(256)) * 8).decode(),  # not an image
           "data:image/png;base64,@@not-base64@@",
           "data:image/jpeg;base64,"]
    for url in bad:
        r = _chat(vl_server, [_image(url), {"type": "text", "text": "kobe"}])
        assert 400 <= r.status_code < 500, (url[:40], r.status_code, r.text[:300])
        assert r.json()["error"]["message"]
    got = _answer(_chat(vl_server, [_image(good), {"type": "text", "text": "what is it"}]))
    assert got[0] is not None


@pytest.mark.slow
def test_a_hundred_images_in_one_request_are_served_exactly(vl_server):
    from kvreuse.models.trace import image_data_url

    urls = [image_data_url(100 + i % 25) for i in range(100)]  # 25 distinct pictures, each 4 times
    content = [part for i, u in enumerate(urls) for part in (_image(u), {"type": "text", "text": f"frame {i}"})]
    first = _answer(_chat(vl_server, content))
    assert first[2]["prompt_tokens"] >= 100 * 16
    ref = _answer(_chat(vl_server, content, reference=True, salt="ref-100"))
    _assert_same(first, ref)
    again = _answer(_chat(vl_server, content[::-1]))  # reversed: the stored pictures placed elsewhere
    _assert_same(again, _answer(_chat(vl_server, content[::-1], reference=True, salt="ref-100r")))
    too_many = [_image(image_data_url(900 + i % 3)) for i in range(IMAGE_LIMIT + 172)]
    r = _chat(vl_server, too_many)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert _answer(_chat(vl_server, content[:4]))[0] is not None
    m = vl_server.metrics()
    for k, used in m.items():
        if k.startswith("kvreuse_store_bytes{"):
            assert used <= m[k.replace("store_bytes", "store_budget_bytes")], k
