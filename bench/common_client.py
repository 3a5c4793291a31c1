"""vLLM's own benchmark client against each arm: the RAG and nothing-reusable benches' shared part.

    ap = bench_parser(__doc__, ...); add_client_options(ap, prompts=48)
    def prepare(rep):        # the repeat's dataset, the same for both arms, and unrelated warm-up prompts
        return jsonl_dataset(path, prompts, a.output_len) + load_args(a, seed), warm
    runs = client_arms(a.repeats, model_dir, prepare, serve_arm)
    m, ratios = client_medians(runs.runs); print_client_table(m, ratios, runs.runs)

`client_run` warms a server up, runs `vllm.benchmarks.serve` (what `vllm bench serve` runs) in this
process against it, and adds what the server's /metrics counted meanwhile, and the texts it generated.
`--model smollm2` serves the real pretrained model (`kvreuse.models.smollm2`) instead of the tiny
random one, with kvreuse's default configuration (fidelity "exact") unless `--kvreuse-config` says
otherwise; `same_output` is then the share of requests whose greedy output (every generated token) is
the same as vLLM alone's on the same prompt in the same repeat, and a third arm, vLLM alone with its
prefix cache off, gives the noise floor (`noise_floor_same_output`): a prefix hit alone changes how
many tokens a step computes, and with them the rounding of vLLM's CPU kernels, which can flip a greedy
token where the model hesitates.  Run it with `--concurrency 1`, so every arm batches alike.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

from bench.common_table import Col, print_table
from bench.serve_common import (ARMS, NOISE_FLOOR, ArmRuns, Server, alternate_arms, bench_model_spec,
                                build_bench_model, delta, fmt, median, prefix_cache_hits, prompt_tokens, ratio,
                                reuse_summary, settle)

MODELS = ("tiny", "smollm2")


@dataclass(frozen=True)
class BenchModel:
    """The served checkpoint, words to build prompts from (one token each), and its description."""

    dir: str
    words: list[str]
    tag: str
    text: str
    kvreuse_config: dict | None  # the kvreuse arm's config when `--kvreuse-config` is not given (None: serve_common's)
    arms: tuple[str, ...] = ARMS  # the real model adds the noise floor
    dtype: str = "bfloat16"  # served


def add_model_option(ap: argparse.ArgumentParser) -> None:
    """`--model`: the tiny random Llama (speed and mechanics) or SmolLM2-135M-Instruct (answers)."""
    ap.add_argument("--model", choices=MODELS, default="tiny",
                    help="tiny: 8-layer random-weight Llama, kvreuse at fidelity \"fast\" (speed and mechanics); "
                         "smollm2: SmolLM2-135M-Instruct, a real pretrained model (make setup builds it), kvreuse's "
                         "default configuration, outputs compared with vLLM alone's")


def bench_model(a: argparse.Namespace) -> BenchModel:
    """`--model`'s checkpoint (built offline once) and its words."""
    if getattr(a, "model", "tiny") == "smollm2":
        from transformers import AutoTokenizer

        from kvreuse.models.smollm2 import build_smollm2

        path = str(build_smollm2())
        vocab = AutoTokenizer.from_pretrained(path).get_vocab()
        # " word" is one token for these: a prompt of n of them is n tokens
        words = sorted(t[1:] for t in vocab if t.startswith("\u0120") and t[1:].isalpha() and t[1:].islower()
                       and len(t) > 3)
        dtype = getattr(a, "dtype", "bfloat16")
        return BenchModel(path, words, "SmolLM2-135M-Instruct", f"SmolLM2-135M-Instruct, {dtype}", {},
                          (*ARMS, NOISE_FLOOR), dtype)
    spec = bench_model_spec()
    path, words = build_bench_model(spec)
    return BenchModel(path, words, spec.tag(), "tiny llama 8 layers, hidden 512, bf16, random weights", None)


def add_client_options(ap: argparse.ArgumentParser, *, prompts: int) -> None:
    """`--prompts` (default `prompts`), `--concurrency` and `--output-len`: the load both arms get."""
    ap.add_argument("--prompts", type=int, default=prompts)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--output-len", type=int, default=32)


def jsonl_dataset(path: str | os.PathLike, prompts: list[str], output_len: int) -> list[str]:
    """Write `prompts` as a custom JSONL dataset at `path`; the client options that send it raw (no chat
    template), in file order, `output_len` tokens each."""
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p, "output_tokens": output_len}) + "\n")
    return ["--dataset-name", "custom", "--dataset-path", str(path), "--custom-output-len", str(output_len),
            "--skip-chat-template", "--disable-shuffle"]


def load_args(a: argparse.Namespace, seed: int) -> list[str]:
    """The client options of the load: `--prompts` requests, `--concurrency` at a time, EOS ignored."""
    return ["--num-prompts", str(a.prompts), "--max-concurrency", str(a.concurrency), "--request-rate", "inf",
            "--ignore-eos", "--seed", str(seed)]


def client_arms(repeats: int, model_dir: str, prepare: Callable[[int], tuple[list[str], list[str]]],
                serve_arm: Callable[[str, int], ContextManager[Server]], arms: tuple[str, ...] = ARMS) -> ArmRuns:
    """`alternate_arms` with `client_run` as the measure: `prepare(rep)` gives the repeat's (client options,
    warm-up prompts)."""
    def measure(srv: Server, rep: int, prepared: Any) -> dict:
        return client_run(srv, model_dir, *prepared)

    return alternate_arms(repeats, prepare, serve_arm, measure, arms)


def vllm_bench_serve(url: str, model_dir: str | os.PathLike, args: list[str]) -> dict:
    """Run vLLM's own benchmark client (`vllm.benchmarks.serve`, what `vllm bench serve` runs) in this process
    against `url`; `args` are its CLI options (dataset, concurrency, ...).  Returns its result dict with the
    per-request lists (`ttfts`, `input_lens`, ...) kept."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser()
    add_cli_args(p)
    ns = p.parse_args(["--base-url", url, "--model", str(model_dir), "--backend", "vllm",
                       "--endpoint", "/v1/completions", "--save-detailed", "--disable-tqdm",
                       "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
                       "--temperature", "0", *args])
    result = main(ns)
    if result.get("failed"):
        errs = [e for e in result.get("errors", []) if e]
        raise SystemExit(f"vllm.benchmarks.serve: {result['failed']} requests failed: {errs[:3]}")
    return result


CLIENT_FIGURES = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "request_throughput", "output_throughput",
                  "prompt_tokens", "placed_share", "prefix_cache_share", "load_ms_p50", "load_ms_mean", "gap_tokens")


def client_run(server: Server, model_dir: str, bench_args: list[str], warm: list[str]) -> dict:
    """Warm `server` up with `warm` prompts, then one `vllm_bench_serve` run: its TTFT and throughput figures
    plus what the server's /metrics counted meanwhile (placed share, prefix-cache share, `reuse_summary`)."""
    warm_up_completions(server.url, model_dir, warm)
    before = settle(server.url)
    res = vllm_bench_serve(server.url, model_dir, ["--num-warmups", "0", "--ready-check-timeout-sec", "0",
                                                   *bench_args])
    d = delta(settle(server.url), before)
    n_prompt = prompt_tokens(d)
    reuse = reuse_summary(d)
    return {"mean_ttft_ms": res["mean_ttft_ms"], "median_ttft_ms": res["median_ttft_ms"],
            "p99_ttft_ms": res["p99_ttft_ms"], "request_throughput": res["request_throughput"],
            "output_throughput": res["output_throughput"], "duration_s": res["duration"],
            "completed": res["completed"], "prompt_tokens": n_prompt,
            "placed_share": reuse["reused_tokens"] / n_prompt if n_prompt else None,
            "prefix_cache_share": prefix_cache_hits(d) / n_prompt if n_prompt else None,
            "ttfts_s": res["ttfts"], "texts": res["generated_texts"], **reuse}


def client_medians(runs: dict[str, list[dict]]) -> tuple[dict, dict]:
    """Per arm, the median over repeats of each of `CLIENT_FIGURES`; and the kvreuse / prefix ratios."""
    m = {arm: {k: median(r[k] for r in runs[arm]) for k in CLIENT_FIGURES} for arm in ARMS}
    k, p = m["kvreuse"], m["prefix"]
    ratios = {"mean_ttft_ratio": ratio(k["mean_ttft_ms"], p["mean_ttft_ms"]),
              "median_ttft_ratio": ratio(k["median_ttft_ms"], p["median_ttft_ms"]),
              "p99_ttft_ratio": ratio(k["p99_ttft_ms"], p["p99_ttft_ms"]),
              "throughput_ratio": ratio(k["request_throughput"], p["request_throughput"]),
              "output_throughput_ratio": ratio(k["output_throughput"], p["output_throughput"])}
    return m, ratios


def agreement(runs: dict[str, list[dict]]) -> dict:
    """`same_output`: the share of all requests whose output kvreuse generated exactly as vLLM alone did (same
    prompt, same repeat); `same_output_each`: per repeat; `noise_floor_*` the same of vLLM alone with its
    prefix cache off, where that arm ran."""
    out = {}
    for arm, name in (("kvreuse", "same_output"), (NOISE_FLOOR, "noise_floor_same_output")):
        if arm not in runs:
            continue
        each = [(sum(x == y for x, y in zip(k["texts"], p["texts"])), len(p["texts"]))
                for k, p in zip(runs[arm], runs["prefix"])]
        same, n = sum(s for s, _ in each), sum(t for _, t in each)
        out |= {name: same / n if n else None, name + "_each": [s / t if t else None for s, t in each],
                name + "_count": [same, n]}
    return out


def paired_ratios(runs: dict[str, list[dict]]) -> dict:
    """Per figure, the median over repeats of kvreuse / vLLM alone *within* each repeat (the two arms of a
    repeat run back to back, so a slow spell of the host weighs on both)."""
    out = {}
    for name, fig in (("mean_ttft_ratio", "mean_ttft_ms"), ("median_ttft_ratio", "median_ttft_ms"),
                      ("p99_ttft_ratio", "p99_ttft_ms"), ("throughput_ratio", "request_throughput")):
        out[name] = median(ratio(k[fig], p[fig]) for k, p in zip(runs["kvreuse"], runs["prefix"]))
        out[name + "_each"] = [ratio(k[fig], p[fig]) for k, p in zip(runs["kvreuse"], runs["prefix"])]
    return out


CLIENT_COLUMNS = (Col("arm", 8), "|", Col("TTFT ms mean", 12, ".1f"), Col("median", 8, ".1f"), Col("p99", 8, ".1f"),
                  "|", Col("req/s", 6, ".2f"), Col("out tok/s", 9, ".1f"), "|", Col("placed", 6, ".1%"),
                  Col("prefix hit", 10, ".1%"), "|", Col("load ms p50", 11, ".1f"), Col("mean", 6, ".1f"))


def print_client_table(m: dict, ratios: dict, runs: dict[str, list[dict]]) -> None:
    """Both arms' medians, the ratio row, kvreuse's counters of every repeat, and how many outputs agreed."""
    rows = [[arm, *(m[arm][k] for k in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "request_throughput",
                                        "output_throughput", "placed_share", "prefix_cache_share", "load_ms_p50",
                                        "load_ms_mean"))] for arm in ARMS]
    rows.append(["ratio", *(fmt(ratios[k]) for k in ("mean_ttft_ratio", "median_ttft_ratio", "p99_ttft_ratio",
                                                     "throughput_ratio", "output_throughput_ratio"))])
    print_table(CLIENT_COLUMNS, rows)
    for i, r in enumerate(runs["kvreuse"]):
        print(f"kvreuse repeat {i + 1}: claims by policy {r['claims_by_policy']}; segments {r['segments']}; "
              f"gap tokens {r['gap_tokens']}; loads {r['loads']} (failed {r['load_failures']}); patches captured "
              f"{r['captured_patches']}; chunks saved {r.get('saved_chunks')}, dropped {r['dropped_saves']}, deferred "
              f"{r.get('deferred_saves')}")
    same = agreement(runs)
    for name, label in (("same_output", "kvreuse"), ("noise_floor_same_output", "vLLM alone, prefix cache off")):
        if name in same:
            print(f"outputs identical to vLLM alone's, {label}: {same[name + '_count'][0]}/{same[name + '_count'][1]}"
                  f" (per repeat: {' '.join(fmt(x, '.0%') for x in same[name + '_each'])})")


def warm_up_completions(url: str, model: str, prompts: list[str], max_tokens: int = 4) -> None:
    """Send `prompts` (content unrelated to the measured run) so one-time start-up costs are not measured."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
    for p in prompts:
        client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0)
