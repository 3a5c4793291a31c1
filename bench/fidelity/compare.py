"""Each arm against vLLM alone on the same requests: agreement, accuracy, first-token drift, placed share, TTFT.

Per workload and arm (`row`):
  same_answer      share of greedy completions identical to the reference arm's (vLLM alone, prefix caching on)
  accuracy         share of completions stating the gold fact (`accuracy_ref`: the reference's)
  dlogprob_max / _median
                   |logprob of the reference's first generated token, this arm minus the reference|
  answer_dlogprob_max
                   the same |Δ logprob| over every generated position up to where the two answers part
  kl_mean          mean first-token KL(reference || arm), approximated on the reference's top-5 tokens: both
                   distributions restricted to those tokens and renormalized (a token outside the arm's top 5
                   gets the arm's 5th logprob)
  placed_share     prompt tokens kvreuse placed / prompt tokens (from the server's /metrics)
  prefix_hit_share prompt tokens vLLM's prefix cache served / prompt tokens
  ttft_ratio_mean / _p99
                   mean (p99) TTFT of this arm / the reference's, measured by streaming
  claims_by_policy kvreuse's claims by policy label
"""

from __future__ import annotations

import math
import statistics

REFERENCE = "vllm"


def drift_at(ans: dict, ref: dict, i: int) -> tuple[float | None, float | None]:
    """(|Δ logprob| of the reference's token, approximate top-5 KL(ref || ans)) at generated position `i`."""
    if i >= len(ref["tokens"]) or i >= len(ans["tops"]) or not ans["tops"][i]:
        return None, None
    rt, at, tok = ref["tops"][i], ans["tops"][i], ref["tokens"][i]
    if tok not in rt:
        return None, None
    floor = min(at.values())
    p = {t: math.exp(lp) for t, lp in rt.items()}
    q = {t: math.exp(at.get(t, floor)) for t in rt}
    zp, zq = sum(p.values()), sum(q.values())
    kl = sum(p[t] / zp * math.log((p[t] / zp) / (q[t] / zq)) for t in rt)
    return abs(at.get(tok, floor) - rt[tok]), kl


def answer_drift(ans: dict, ref: dict) -> float | None:
    """Largest |Δ logprob| over the positions where both arms saw the same generated tokens (up to and
    including the first token where their greedy answers part)."""
    out = None
    for i in range(min(len(ans["tokens"]), len(ref["tokens"]))):
        d, _ = drift_at(ans, ref, i)
        if d is not None:
            out = d if out is None else max(out, d)
        if ans["tokens"][i] != ref["tokens"][i]:
            break
    return out


def p99(xs: list[float]) -> float:
    """Nearest-rank 99th percentile."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(0.99 * len(s)) - 1))]


def row(arm: str, workload: str, run: dict, ref_run: dict) -> dict:
    """One arm's figures on one workload, against the reference arm's run of the same requests."""
    ans, ref = run["answers"], ref_run["answers"]
    assert [a["index"] for a in ans] == [r["index"] for r in ref], "arms answered different requests"
    drift = [drift_at(a, r, 0) for a, r in zip(ans, ref)]
    whole = [d for d in (answer_drift(a, r) for a, r in zip(ans, ref)) if d is not None]
    dlps = [d for d, _ in drift if d is not None]
    kls = [k for _, k in drift if k is not None]
    srv = run["server"]
    n_prompt = srv["prompt_tokens"]
    ttft, ttft_ref = [a["ttft_s"] for a in ans], [r["ttft_s"] for r in ref]
    return {"workload": workload, "arm": arm, "n": len(ans),
            "same_answer": sum(a["text"] == r["text"] for a, r in zip(ans, ref)) / len(ans),
            "accuracy": sum(a["correct"] for a in ans) / len(ans),
            "accuracy_ref": sum(r["correct"] for r in ref) / len(ref),
            "dlogprob_max": max(dlps) if dlps else None,
            "dlogprob_median": statistics.median(dlps) if dlps else None,
            "kl_mean": statistics.mean(kls) if kls else None,
            "answer_dlogprob_max": max(whole) if whole else None,
            "placed_share": srv["placed_tokens"] / n_prompt if n_prompt else None,
            "prefix_hit_share": srv["prefix_hit_tokens"] / n_prompt if n_prompt else None,
            "ttft_ms_mean": 1e3 * statistics.mean(ttft),
            "ttft_ratio_mean": statistics.mean(ttft) / statistics.mean(ttft_ref),
            "ttft_ratio_p99": p99(ttft) / p99(ttft_ref),
            "claims_by_policy": srv["claims_by_policy"], "load_failures": srv["load_failures"],
            "prompt_tokens": n_prompt}


def rows(runs: dict[str, dict[str, dict]], reference: str = REFERENCE) -> list[dict]:
    """Rows for every (workload, arm) of `runs` ({arm: {workload: run}}), workloads in run order."""
    ref = runs[reference]
    return [row(arm, wl, runs[arm][wl], ref[wl]) for wl in ref for arm in runs if wl in runs[arm]]


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(table: list[dict]) -> str:
    """The rows as a markdown table."""
    head = ("| workload | arm | same answer as vLLM | accuracy (vLLM) | first-token Δlogprob max / median "
            "| first-token KL mean | answer Δlogprob max | placed | prefix hit | TTFT vs vLLM mean / p99 "
            "| claims by policy |")
    lines = [head, "|" + "---|" * 11]
    for r in table:
        n = r["n"]
        claims = ", ".join(f"{k} {v}" for k, v in r["claims_by_policy"].items()) or "-"
        lines.append(
            f"| {r['workload']} | {r['arm']} | {round(r['same_answer'] * n)}/{n} ({r['same_answer']:.0%}) "
            f"| {r['accuracy']:.0%} ({r['accuracy_ref']:.0%}) | {_f(r['dlogprob_max'], '.3f')} / "
            f"{_f(r['dlogprob_median'], '.3f')} | {_f(r['kl_mean'], '.4f')} | {_f(r['answer_dlogprob_max'], '.3f')} "
            f"| {_f(r['placed_share'], '.0%')} "
            f"| {_f(r['prefix_hit_share'], '.0%')} | {r['ttft_ratio_mean']:.2f} / {r['ttft_ratio_p99']:.2f} "
            f"| {claims} |")
    return "\n".join(lines)
