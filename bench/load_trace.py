"""The load test's mixed trace: what each simulated client sends, and how one request is sent.

Request kinds (each client draws one per turn from `KINDS`, seeded):
  * ``raw_agent``  — a sliding-window agent as one raw `/v1/completions` text: the client's last
    four frames joined by separator words, then a new instruction (one frame enters per turn);
  * ``chat_agent`` — the same window as chat messages (system prompt, one tool message per frame);
  * ``rag_para``   — 3-5 passages of a shared pool joined by blank lines ("\\n\\n") plus a question;
  * ``rag_space``  — the same, joined by spaces (change points fall inside chunks);
  * ``reorder``    — the client's previous RAG passages again, shuffled;
  * ``cancel``     — a RAG request whose client gives up after 20-300 ms (vLLM aborts it);
  * ``disconnect`` — a streamed RAG request closed after the first few chunks.
Completed requests are streamed (time to first token measured) with greedy decoding and logprobs,
so they can be replayed against a server without kvreuse and compared token for token.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field

import httpx

from kvreuse.models import tiny_words

KINDS = {"raw_agent": 0.2, "chat_agent": 0.2, "rag_para": 0.2, "rag_space": 0.14, "reorder": 0.1,
         "cancel": 0.08, "disconnect": 0.08}
SEPARATOR = "kobe lada"  # between raw-text frames
_WORDS = tiny_words()


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(n))


@dataclass
class Trace:
    """Shared content of one run: a passage pool, a system prompt, per-client agent frames."""

    seed: int
    passages: int = 48
    max_tokens: int = 8

    def passage(self, i: int) -> str:
        return words(self.seed * 100_000 + i, 90 + (i * 37) % 60)

    def frame(self, client: int, i: int) -> str:
        return words(self.seed * 100_000 + 10_000 + client * 1_000 + i, 60 + (i * 13) % 40)

    @property
    def system(self) -> str:
        return words(self.seed * 100_000 + 99_999, 40)


@dataclass
class Outcome:
    """One request as sent and as answered (``status``: done, cancelled, disconnected, error)."""

    kind: str
    endpoint: str
    body: dict
    status: str = "done"
    http_status: int | None = None
    error: str | None = None
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    ttft_s: float | None = None
    latency_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    t_start: float = 0.0
    response_id: str | None = None  # the server's id ("cmpl-..."), the prefix of its request id in the server log


class Client:
    """One simulated client: its own agent window and RAG history, drawn from `random.Random(seed, client)`."""

    def __init__(self, trace: Trace, client: int, url: str, model: str) -> None:
        self.trace, self.client, self.url, self.model = trace, client, url, model
        self.rng = random.Random(trace.seed * 1_000 + client)
        self.turn = 0
        self.last_rag: list[int] = []
        self.http = httpx.Client(base_url=url, timeout=httpx.Timeout(600.0, connect=10.0))

    def next_request(self) -> tuple[str, str, dict]:
        """(kind, endpoint, body without stream options) of this client's next request."""
        kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        tr = self.trace
        base = {"model": self.model, "max_tokens": tr.max_tokens, "temperature": 0}
        if kind in ("raw_agent", "chat_agent"):
            self.turn += 1
            frames = [tr.frame(self.client, i) for i in range(self.turn, self.turn + 4)]
            ask = words(self.rng.randrange(1 << 30), 6)
            if kind == "raw_agent":
                return kind, "/v1/completions", {**base, "prompt": f"{tr.system} {SEPARATOR} " +
                                                 f" {SEPARATOR} ".join(frames) + f" {ask}", "logprobs": 1}
            msgs = [{"role": "system", "content": tr.system}] + [{"role": "tool", "content": f} for f in frames]
            return kind, "/v1/chat/completions", {**base, "messages": msgs + [{"role": "user", "content": ask}],
                                                  "logprobs": True}
        if kind == "reorder" and self.last_rag:
            pick = self.last_rag[:]
            while len(pick) > 1 and pick == self.last_rag:
                self.rng.shuffle(pick)
        else:
            pick = self.rng.sample(range(tr.passages), self.rng.randint(3, 5))
        self.last_rag = pick
        joiner = " " if kind == "rag_space" else "\n\n"
        prompt = joiner.join(tr.passage(i) for i in pick) + joiner + words(self.rng.randrange(1 << 30), 8)
        if kind in ("cancel", "disconnect"):
            return kind, "/v1/completions", {**base, "prompt": prompt, "max_tokens": 64}
        return kind, "/v1/completions", {**base, "prompt": prompt, "logprobs": 1}

    def send(self) -> Outcome:
        kind, endpoint, body = self.next_request()
        out = Outcome(kind, endpoint, body, t_start=time.time())
        try:
            if kind == "cancel":
                self._cancel(out)
            elif kind == "disconnect":
                self._disconnect(out)
            else:
                self._stream(out)
        except (httpx.TransportError, ValueError) as e:  # refused, reset, bad JSON: a server fault
            out.status, out.error = "error", f"{type(e).__name__}: {e}"
        return out

    def _cancel(self, out: Outcome) -> None:
        try:
            r = self.http.post(out.endpoint, json=out.body, timeout=self.rng.uniform(0.02, 0.3))
            out.http_status = r.status_code
            out.status = "done_uncompared" if r.status_code == 200 else "error"
        except httpx.TimeoutException:
            out.status = "cancelled"

    def _disconnect(self, out: Outcome) -> None:
        body = {**out.body, "stream": True}
        with self.http.stream("POST", out.endpoint, json=body) as r:
            out.http_status = r.status_code
            if r.status_code != 200:
                out.status, out.error = "error", r.read().decode(errors="replace")[:300]
                return
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen >= 1 + self.rng.randrange(3):
                        break
        out.status = "disconnected"

    def _stream(self, out: Outcome) -> None:
        chat = out.endpoint.endswith("chat/completions")
        body = {**out.body, "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        with self.http.stream("POST", out.endpoint, json=body) as r:
            out.http_status = r.status_code
            if r.status_code != 200:
                out.status, out.error = "error", r.read().decode(errors="replace")[:300]
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if ev.get("error"):
                    out.status, out.error = "error", json.dumps(ev["error"])[:300]
                    return
                out.response_id = out.response_id or ev.get("id")
                if ev.get("usage"):
                    out.prompt_tokens = ev["usage"]["prompt_tokens"]
                    out.cached_tokens = ((ev["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                for ch in ev.get("choices") or []:
                    piece, lps, toks, _ = text_and_logprobs(ch, chat, delta=True)
                    if piece and out.ttft_s is None:
                        out.ttft_s = time.perf_counter() - t0
                    out.text += piece
                    out.logprobs += lps
                    out.tokens += toks
        out.latency_s = time.perf_counter() - t0

    def close(self) -> None:
        self.http.close()


def text_and_logprobs(choice: dict, chat: bool, *, delta: bool) -> tuple[str, list[float], list[str], list[dict]]:
    """Text, token logprobs, tokens and top logprobs ({token: logprob} per position) of one choice of a
    completions / chat response (streamed: ``delta``)."""
    lp = choice.get("logprobs") or {}
    if chat:
        text = (choice.get("delta" if delta else "message") or {}).get("content") or ""
        content = lp.get("content") or []
        return (text, [t["logprob"] for t in content], [t["token"] for t in content],
                [{x["token"]: x["logprob"] for x in t.get("top_logprobs") or []} for t in content])
    keep = [i for i, x in enumerate(lp.get("token_logprobs") or []) if x is not None]
    pick = lambda xs: [xs[i] for i in keep] if xs else []  # noqa: E731
    return (choice.get("text") or "", pick(lp.get("token_logprobs")), pick(lp.get("tokens")),
            [t or {} for t in pick(lp.get("top_logprobs"))])


def replay(http: httpx.Client, out: Outcome) -> tuple[str, list[float], list[str], list[dict]]:
    """The same request, unstreamed, against another server (`http`'s base URL), with the top two
    logprobs per position (to tell a near tie from a wrong answer)."""
    chat = out.endpoint.endswith("chat/completions")
    body = {**out.body, **({"top_logprobs": 2} if chat else {"logprobs": 2})}
    for attempt in range(3):
        try:
            r = http.post(out.endpoint, json=body)
            break
        except (httpx.RemoteProtocolError, httpx.ConnectError):
            # a pooled keep-alive connection the server closed just as it was reused (uvicorn drops idle
            # connections after 5 s): a new connection, once the server is back; persistent errors raise
            if attempt == 2:
                raise
            time.sleep(1.0 + attempt)
    r.raise_for_status()
    return text_and_logprobs(r.json()["choices"][0], chat, delta=False)
