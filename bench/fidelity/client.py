"""One request at a time against a running server: the greedy answer, the first token's top logprobs,
TTFT (streamed), and what the server's /metrics counted over each workload.

Every request goes to raw `/v1/completions` (the chat template rendered here by the checkpoint's
tokenizer, so the assistant turn can be primed), greedy (temperature 0), `logprobs=5`, one at a time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from bench.fidelity.workloads import Request, render
from bench.serve_common import delta, labelled, prefix_cache_hits, prompt_tokens, settle

MAX_TOKENS = 12
TOP_LOGPROBS = 5


@dataclass
class Answer:
    """What one arm answered to one request."""

    workload: str
    index: int
    text: str                  # greedy completion after the primer
    correct: bool              # contains the gold fact
    ttft_s: float              # seconds to the first streamed token
    prompt_tokens: int
    cached_tokens: int         # vLLM's prompt_tokens_details (its prefix cache plus what a connector placed)
    tokens: list[str] = field(default_factory=list)            # the generated tokens
    tops: list[dict[str, float]] = field(default_factory=list)  # each one's top-`TOP_LOGPROBS` logprobs


def ask(client, model: str, prompt: str, req: Request, *, max_tokens: int = MAX_TOKENS,
        extra_body: dict | None = None) -> Answer:
    """Stream one greedy completion of `prompt` and collect its `Answer`."""
    t0 = time.perf_counter()
    first = None
    text, tokens, tops, usage = [], [], [], None
    for ev in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                        logprobs=TOP_LOGPROBS, stream=True, stream_options={"include_usage": True},
                                        extra_body=extra_body):
        if ev.choices:
            ch = ev.choices[0]
            if first is None and (ch.text or (ch.logprobs and ch.logprobs.tokens)):
                first = time.perf_counter() - t0
            text.append(ch.text or "")
            if ch.logprobs and ch.logprobs.tokens:
                tokens += ch.logprobs.tokens
                tops += ch.logprobs.top_logprobs or [{}] * len(ch.logprobs.tokens)
        if ev.usage is not None:
            usage = ev.usage
    out = "".join(text)
    details = getattr(usage, "prompt_tokens_details", None)
    return Answer(req.workload, req.index, out, req.correct(out),
                  first if first is not None else time.perf_counter() - t0,
                  usage.prompt_tokens if usage else 0, (details.cached_tokens or 0) if details else 0,
                  tokens, [dict(t or {}) for t in tops])


def client_for(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused", timeout=600, max_retries=0)


def run_workload(url: str, model: str, tokenizer, reqs: list[Request], *, extra_body: dict | None = None,
                 max_tokens: int = MAX_TOKENS) -> dict:
    """Send `reqs` one at a time; return their answers and what /metrics counted meanwhile."""
    client = client_for(url)
    before = settle(url)
    answers = [ask(client, model, render(r, tokenizer), r, max_tokens=max_tokens, extra_body=extra_body)
               for r in reqs]
    d = delta(settle(url), before)
    return {"answers": [asdict(a) for a in answers], "server": server_counts(d)}


def server_counts(d: dict[str, float]) -> dict:
    """The /metrics figures a fidelity row reports: prompt tokens, tokens kvreuse placed, vLLM's prefix-cache
    hits, and kvreuse's claims by policy, lookups by result, segments by kind, and what it saved (chunks handed
    to the store, saves dropped, patches fitted)."""
    return {"prompt_tokens": prompt_tokens(d), "placed_tokens": int(d.get("kvreuse_reused_tokens_total", 0)),
            "prefix_hit_tokens": prefix_cache_hits(d),
            "claims_by_policy": labelled(d, "kvreuse_claims_total", "policy"),
            "lookups": labelled(d, "kvreuse_chunk_lookups_total", "result"),
            "segments": labelled(d, "kvreuse_segments_total", "kind"),
            "load_failures": int(d.get("kvreuse_load_failures_total", 0)),
            "saved_chunks": int(d.get("kvreuse_saved_chunks_total", 0)),
            "dropped_saves": int(d.get("kvreuse_dropped_saves_total", 0)),
            "captured_patches": int(d.get("kvreuse_captured_patches_total", 0))}


def warm(url: str, model: str, tokenizer, reqs: list[Request]) -> None:
    """Send `reqs` (a pool of their own) so one-time start-up costs are not measured."""
    client = client_for(url)
    for r in reqs:
        ask(client, model, render(r, tokenizer), r, max_tokens=2)
