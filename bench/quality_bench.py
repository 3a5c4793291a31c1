"""Quality benchmark: what naive chunk reuse loses, what the conditioning patch restores.

    python bench/quality_bench.py --out results/quality            # embedded model, full run
    python bench/quality_bench.py --out /tmp/q --quick             # reduced set (< 5 min on CPU)
    python bench/quality_bench.py --model PATH --out DIR           # any local HF causal LM
    python bench/quality_bench.py --out /tmp/q --examples 60 --reorder-examples 30 --serve --server-only
                                                                   # the same through `kvreuse serve`
    python bench/quality_bench.py --out DIR --server URL           # ... through a running server
    python bench/quality_bench.py --out bench/results/quality_gaps --examples 60 --reorder-examples 30 \
        --serve --server-only --raw-text                           # contexts as raw text: gaps

Contexts are three chunks of assignment records (`bench.quality.task`); questions are single
lookups (1 hop), 2-hop chains (followed at question time) and 3-hop chains across all three chunks
(which need the binding that chunk 2's tokens build by attending to chunk 1).  KV comes from the
reference encoder (HF transformers).  Conditions and measures: see `bench.quality.conditions`.

Outputs in --out: summary.json (each condition -> {"single_hop", "multi_hop", "patch_bytes_frac"};
single_hop = 1-hop questions on the reused chunks 2 and 3, multi_hop = 3-hop chains), details.json
(every condition and class, KL, per-layer errors, spectra, variants) and PNG plots.

Through a server (`--server URL`, or `--serve` to start `kvreuse serve` on --model): the conditions
full / blind / patch / survival / reorder are reproduced with requests (`bench.quality.server`
says how), on the same contexts, and compared with the reference encoder's answers; summary.json
gets a "server" key (per condition: accuracies, the reference counterpart's, per-question
agreement, claims per policy from /metrics) and server.json the details.  A server given by URL
must cut chunks every 3*records tokens (`server_config()`), run without vLLM prefix caching, and,
for `patch`, have a store budget about `store_bytes_for(...)` (it is filled before `patch`, so that
captured in-context KV is demoted to base + patch); the claim counts show whether it did what each
condition needs.  `patch` runs on a second server of the same config (started by --serve, or
--patch-server URL), its capturing requests asking for `fidelity: "exact"` so that c2 and c3 are
computed and captured rather than placed blind.

Raw text (`--raw-text`): the server conditions with each prompt sent as one text (the records,
space-joined, no chunk boundaries) and cut by content into chunks of --raw-chunking tokens; the chunks
straddling each change point are new and computed in place (gaps), the chunks inside each context
placed.  Claims by policy and the share of question-prompt tokens placed are reported per condition.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import conditions as C  # noqa: E402
from bench.quality import task  # noqa: E402
from bench.quality.server import SERVER_CONDITIONS  # noqa: E402
from kvreuse.reference.encoder import ChunkKV, ReferenceEncoder  # noqa: E402

DEFAULT_MODEL = ROOT / "bench" / "models" / "binder"
SUMMARY_CONDITIONS = ["full", "blind"] + [f"patch_r{r}" for r in C.RANKS] + ["survival", "reorder"]
# Variants of the default patch (energy 0.99, max rank 16, byte budget 5%, negligible 1e-3), for
# choosing defaults; "_nobudget" variants are the per-(layer, head) energy ranks alone.
VARIANTS = {
    "patch_default": C.PatchRule(),
    "patch_nobudget": C.PatchRule(budget=None),
    "patch_budget0.02": C.PatchRule(budget=0.02),
    "patch_budget0.1": C.PatchRule(budget=0.1),
    "patch_kweight1": C.PatchRule(k_weight=1.0),
    "patch_e0.5": C.PatchRule(energy=0.5),
    "patch_e0.8": C.PatchRule(energy=0.8),
    "patch_e0.9": C.PatchRule(energy=0.9),
    "patch_e0.95": C.PatchRule(energy=0.95),
    "patch_e0.999": C.PatchRule(energy=0.999),
    "patch_v_only": C.PatchRule(kinds="v"),
    "patch_k_only": C.PatchRule(kinds="k"),
    "patch_last_layer": C.PatchRule(layers=(-1,)),
    "patch_v_last_r2": C.PatchRule(kinds="v", layers=(-1,), max_rank=2, energy=1.0, budget=None),
    "patch_v_last_r4": C.PatchRule(kinds="v", layers=(-1,), max_rank=4, energy=1.0, budget=None),
    "patch_v_e0.9": C.PatchRule(kinds="v", energy=0.9),
    "patch_v_last": C.PatchRule(kinds="v", layers=(-1,)),
    "patch_v_last_e0.9": C.PatchRule(kinds="v", layers=(-1,), energy=0.9),
    "patch_v_last_r3": C.PatchRule(kinds="v", layers=(-1,), max_rank=3, energy=1.0, budget=None),
    "patch_neg0.05": C.PatchRule(negligible=0.05),
    "patch_neg0.2": C.PatchRule(negligible=0.2),
}


def classify(q: task.Question) -> str:
    if q.depth == 1:
        return "hop1" if q.chunk > 0 else "hop1_c0"
    return f"hop{q.depth}"


def load(model_path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    vocab = getattr(model.config, "vocab_size", 0)
    return model, vocab


def run(args) -> dict:
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    model, _ = load(Path(args.model))
    enc = ReferenceEncoder(model)
    n_layers = model.config.num_hidden_layers
    variants = {k: (C.PatchRule(**{**v.__dict__, "layers": (n_layers - 1,)}) if v.layers == (-1,) else v)
                for k, v in VARIANTS.items()}
    rng = random.Random(args.seed)
    main = [task.bench_example(rng, n_records=args.records, n_refs=args.refs) for _ in range(args.examples)]
    reo = [task.reorder_example(rng, n_records=args.records, n_refs=args.refs) for _ in range(args.reorder_examples)]

    tallies: dict[str, C.Tally] = {}
    tal = lambda name: tallies.setdefault(name, C.Tally())
    spec_k, spec_v, dnorm_k, dnorm_v = [], [], [], []
    t0 = time.time()
    for ex in tqdm(main, desc="contexts", disable=args.no_progress):
        e = C.encode_example(enc, ex)
        order = [0, 1, 2]
        qs = ex.questions
        truth = [e.full[i] for i in order]
        ref = C.score(enc, tal("full"), ChunkKV.cat(truth), qs, None, classify)
        reused = [1, 2]

        def measure(name: str, parts: list[ChunkKV], fracs: list[float] | None = None) -> None:
            t = tal(name)
            C.score(enc, t, ChunkKV.cat([parts[i] for i in order]), qs, ref, classify)
            ek, ev = C.rel_err([parts[i] for i in reused], [e.full[i] for i in reused])
            t.err_k.append(ek)
            t.err_v.append(ev)
            if fracs is not None:
                t.frac.extend(fracs)

        blind, fr = C.patched_chunks(enc, e, None, order)
        measure("blind", blind, fr)
        for r in C.RANKS:
            parts, fr = C.patched_chunks(enc, e, C.PatchRule(max_rank=r, energy=1.0, budget=None), order)
            measure(f"patch_r{r}", parts, fr)
        for name, rule in variants.items():
            parts, fr = C.patched_chunks(enc, e, rule, order)
            measure(name, parts, fr)

        # survival: c0 dropped; c1, c2 keep their in-context KV and move to the front
        surv_q = [q for q in qs if q.chunk > 0]
        surv_ref = ref[[j for j, q in enumerate(qs) if q.chunk > 0]]
        n1 = len(ex.chunk_tokens(1))
        surv = ChunkKV.cat([C.place(enc, e.full[1], 0), C.place(enc, e.full[2], n1)])
        C.score(enc, tal("survival"), surv, surv_q, surv_ref, classify)
        tal("survival").frac.extend([0.0, 0.0])
        recompute = enc.encode(ex.chunk_tokens(1) + ex.chunk_tokens(2), start=0)
        C.score(enc, tal("survival_recompute"), recompute, surv_q, surv_ref, classify)

        for i in reused:
            spec_k.append(C.spectrum(e.delta_k[i]))
            spec_v.append(C.spectrum(e.delta_v[i]))
            f = lambda d, b: (torch.linalg.vector_norm(d.float().flatten(1), dim=1)
                              / torch.linalg.vector_norm(b.float().flatten(1), dim=1))
            dnorm_k.append(f(e.delta_k[i], e.base[i].k))
            dnorm_v.append(f(e.delta_v[i], e.base[i].v))

    for ex in tqdm(reo, desc="reorder", disable=args.no_progress):
        e_old = C.encode_example(enc, ex, [0, 1, 2])
        new = [1, 0, 2]
        e_new = C.encode_example(enc, ex, new)
        qs = ex.questions
        ref = C.score(enc, tal("reorder_full"), ChunkKV.cat([e_new.full[i] for i in new]), qs, None, classify)
        C.score(enc, tal("reorder_original_order_full"), ChunkKV.cat([e_old.full[i] for i in [0, 1, 2]]), qs, None,
                classify)
        parts, fr = C.patched_chunks(enc, e_new, C.PatchRule(), new, fit_from=e_old)
        C.score(enc, tal("reorder"), ChunkKV.cat([parts[i] for i in new]), qs, ref, classify)
        tal("reorder").frac.extend(fr)
        parts, fr = C.patched_chunks(enc, e_new, C.PatchRule(), new)
        C.score(enc, tal("reorder_refit"), ChunkKV.cat([parts[i] for i in new]), qs, ref, classify)
        tal("reorder_refit").frac.extend(fr)
        ctx = [C.place(enc, e_old.full[i], e_new.offsets[i]) for i in range(3)]
        C.score(enc, tal("reorder_ctx"), ChunkKV.cat([ctx[i] for i in new]), qs, ref, classify)
        parts, _ = C.patched_chunks(enc, e_new, None, new)
        C.score(enc, tal("reorder_blind"), ChunkKV.cat([parts[i] for i in new]), qs, ref, classify)

    details = {name: t.summary() for name, t in tallies.items()}
    summary = {}
    for name in SUMMARY_CONDITIONS + [n for n in ("patch_default",) if n in details]:  # + kvreuse's default
        d = details[name]
        summary[name] = {"single_hop": d.get("hop1"), "multi_hop": d.get("hop3"),
                         "patch_bytes_frac": d.get("patch_bytes_frac", 0.0)}
    meta = {"model": str(args.model), "examples": args.examples, "reorder_examples": args.reorder_examples,
            "records_per_chunk": args.records, "refs": args.refs, "seed": args.seed,
            "chunk_tokens": 3 * args.records, "num_layers": n_layers,
            "seconds": round(time.time() - t0, 1),
            "definitions": {
                "single_hop": "1-hop questions on chunks 2 and 3 (chunk 1's KV is identical in every condition)",
                "multi_hop": "3-hop chains across all three chunks",
                "hop2": "2-hop chains (followable at question time)",
                "hop1_c0": "1-hop questions on chunk 1",
                "patch_rR": "blind base + patch fitted on this context's residue, rank exactly min(R, tokens, head_dim)",
                "patch_bytes_frac": "patch bytes / (K+V bytes of the chunk), averaged over reused chunks",
                "kl": "KL(full || condition) at the answer position, nats",
                "rel_err_k/v": "per layer ||X - X_full|| / ||X_full|| over the reused chunks",
                "survival": "answers vs the original context; KL vs the original full prefill",
                "survival_recompute": "full prefill of [c2, c3] without c1 (what recompute would give)",
                "reorder": "order [c2, c1, c3]; base + default patch fitted in order [c1, c2, c3]; "
                           "truth = reorder_full (full prefill of the new order)",
            }}
    details["_spectrum_k"] = C.finite_mean(spec_k)
    details["_spectrum_v"] = C.finite_mean(spec_v)
    details["_delta_rel_norm_k"] = torch.stack(dnorm_k).mean(0).tolist()
    details["_delta_rel_norm_v"] = torch.stack(dnorm_v).mean(0).tolist()
    details["_meta"] = meta
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "details.json").write_text(json.dumps(details, indent=1))
    plots(details, summary, out)
    return {"summary": summary, "details": details}


def plots(details: dict, summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 1. accuracy by condition
    names = SUMMARY_CONDITIONS + ["survival_recompute", "reorder_full", "reorder_ctx", "reorder_blind"]
    fig, ax = plt.subplots(figsize=(12, 4))
    w = 0.27
    for j, (cls, label) in enumerate([("hop1", "single-hop"), ("hop2", "2-hop"), ("hop3", "multi-hop (3-hop)")]):
        ys = [details[n].get(cls) or 0.0 for n in names]
        ax.bar([i + (j - 1) * w for i in range(len(names))], ys, w, label=label)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend()
    ax.set_title("accuracy by condition")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    # 2. per-layer relative KV error vs full prefill
    fig, axs = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axs[0], "rel_err_k", "K"), (axs[1], "rel_err_v", "V")):
        for n in ["blind", "patch_r1", "patch_r2", "patch_r4", "patch_r8", "patch_default"]:
            ys = details[n][key]
            ax.plot(range(len(ys)), ys, marker="o", label=n)
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_xlabel("layer")
        ax.set_title(f"relative {title} error vs full prefill (reused chunks)")
    axs[0].set_ylabel("||X - X_full|| / ||X_full||")
    axs[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "layer_error.png", dpi=120)
    plt.close(fig)

    # 3. singular-value energy of the residue per layer
    fig, axs = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axs[0], "_spectrum_k", "ΔK"), (axs[1], "_spectrum_v", "ΔV")):
        for l, row in enumerate(details[key]):
            if row[0] is None:
                ax.plot([], [], label=f"layer {l} (Δ = 0)")
                continue
            ax.plot(range(1, len(row) + 1), row, marker=".", label=f"layer {l}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank")
        ax.set_title(f"captured energy of {title} (per head, mean)")
        ax.axhline(0.99, color="grey", lw=0.5, ls="--")
    axs[0].set_ylabel("cumulative energy")
    axs[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "spectrum.png", dpi=120)
    plt.close(fig)

    # 4. accuracy / KL vs patch bytes
    fig, axs = plt.subplots(1, 2, figsize=(10, 4))
    xs = [summary[f"patch_r{r}"]["patch_bytes_frac"] * 100 for r in C.RANKS]
    for cls, label in (("hop1", "single-hop"), ("hop3", "multi-hop")):
        axs[0].plot(xs, [details[f"patch_r{r}"][cls] for r in C.RANKS], marker="o", label=label)
        axs[0].axhline(details["full"][cls], ls="--", lw=0.8, color=axs[0].lines[-1].get_color())
    for r, x in zip(C.RANKS, xs):
        axs[0].annotate(f"r{r}", (x, details[f"patch_r{r}"]["hop3"]), fontsize=7)
    axs[0].set_xscale("symlog", linthresh=1)
    axs[0].set_xlabel("patch bytes, % of chunk KV")
    axs[0].set_ylabel("accuracy (dashed: full prefill)")
    axs[0].legend()
    for cls in ("hop1", "hop2", "hop3"):
        axs[1].plot(xs, [details[f"patch_r{r}"]["kl"].get(cls, 0.0) for r in C.RANKS], marker="o", label=cls)
    axs[1].set_xscale("symlog", linthresh=1)
    axs[1].set_yscale("log")
    axs[1].set_xlabel("patch bytes, % of chunk KV")
    axs[1].set_ylabel("KL(full || patched) at the answer, nats")
    axs[1].legend()
    fig.tight_layout()
    fig.savefig(out / "rank_tradeoff.png", dpi=120)
    plt.close(fig)


def print_table(res: dict) -> None:
    d = res["details"]
    print(f"{'condition':28s} {'1-hop':>7s} {'2-hop':>7s} {'3-hop':>7s} {'KL3':>9s} {'bytes%':>7s}")
    for name in SUMMARY_CONDITIONS + [k for k in d if not k.startswith("_") and k not in SUMMARY_CONDITIONS]:
        x = d[name]
        f = lambda v: "   -   " if v is None else f"{v * 100:7.1f}"
        print(f"{name:28s} {f(x.get('hop1'))} {f(x.get('hop2'))} {f(x.get('hop3'))} "
              f"{x['kl'].get('hop3', float('nan')):9.2e} {x.get('patch_bytes_frac', 0.0) * 100:7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="HF checkpoint dir (default: embedded binder)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="reduced set (< 5 min on CPU)")
    ap.add_argument("--examples", type=int, default=None, help="contexts (default 400, quick 60)")
    ap.add_argument("--reorder-examples", type=int, default=None, help="reorder contexts (default 200, quick 30)")
    ap.add_argument("--records", type=int, default=12, help="records per chunk (3 tokens each)")
    ap.add_argument("--refs", type=int, default=3, help="cross-chunk references per chunk")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--server", default=None,
                    help="also measure through this running `kvreuse serve` (URL); it must cut chunks every "
                         "3*records tokens and run without vLLM prefix caching: see bench/quality/server.py")
    ap.add_argument("--serve", action="store_true",
                    help="start `kvreuse serve --model` on a free loopback port for the server measurement")
    ap.add_argument("--server-only", action="store_true",
                    help="with --server/--serve: skip the full reference run (variants, plots); the reference "
                         "numbers compared with the server's are computed on the same contexts regardless")
    ap.add_argument("--server-conditions", default=",".join(SERVER_CONDITIONS),
                    help=f"comma-separated subset of {','.join(SERVER_CONDITIONS)}")
    ap.add_argument("--patch-server", default=None,
                    help="with --server: a running server for `patch` "
                         "(default: --server itself); --serve starts one")
    ap.add_argument("--raw-text", action="store_true",
                    help="server conditions with each prompt sent as one raw text (/v1/completions, no chunk "
                         "boundaries) and chunks cut by content (--raw-chunking), so that gaps occur")
    ap.add_argument("--raw-chunking", default="4,8,48",
                    help="with --raw-text: content-defined chunk sizes min,avg,max in tokens (default 4,8,48)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    args.examples = args.examples or (60 if args.quick else 400)
    args.reorder_examples = args.reorder_examples or (30 if args.quick else 200)
    serving = bool(args.server or args.serve)
    if args.server_only and not serving:
        ap.error("--server-only needs --server URL or --serve")
    res = None
    if not args.server_only:
        res = run(args)
        print_table(res)
        print(f"wrote {args.out}/summary.json, details.json, accuracy.png, layer_error.png, spectrum.png, "
              f"rank_tradeoff.png")
    if serving:
        run_server(args)


def run_server(args) -> dict:
    """The server conditions on the same contexts as `run` (same seed), next to the reference
    encoder's answers; adds `"server"` to summary.json and writes server.json."""
    from contextlib import nullcontext

    from tqdm import tqdm

    from bench.quality import server as S

    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    main = [task.bench_example(rng, n_records=args.records, n_refs=args.refs) for _ in range(args.examples)]
    reo = [task.reorder_example(rng, n_records=args.records, n_refs=args.refs) for _ in range(args.reorder_examples)]
    progress = lambda it, **kw: tqdm(it, disable=args.no_progress, **kw)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    conds = [c for c in args.server_conditions.split(",") if c]
    bad = [c for c in conds if c not in SERVER_CONDITIONS]
    if bad:
        sys.exit(f"--server-conditions: unknown {bad} (known: {SERVER_CONDITIONS})")
    budget = S.store_bytes_for(args.model, 3 * args.records, args.examples, args.reorder_examples)
    chunking = tuple(int(x) for x in args.raw_chunking.split(","))
    config = (lambda **pol: S.raw_config(chunking, budget, **pol)) if args.raw_text else \
        (lambda **pol: S.server_config(3 * args.records, budget, **pol))
    kv_config, patch_config = config(), config()
    t0 = time.time()
    srv: dict[str, dict] = {}
    # blind needs a server that places base KV in a new context; patch one that refuses it (to capture)
    for confs, cfg, name, given in (([c for c in conds if c != "patch"], kv_config, "server", args.server),
                                    ([c for c in conds if c == "patch"], patch_config, "patch-server",
                                     args.patch_server or args.server)):
        if not confs:
            continue
        serve = S.Serve(args.model, cfg, log=out / f"{name}.log") if args.serve else None
        with (serve if serve is not None else nullcontext()):
            client = S.Client(serve.url if serve is not None else given, text=args.raw_text)
            res = S.measure(client, main, reo, conditions=confs, progress=progress)
        srv.update(res)
    srv = {c: srv[c] for c in conds}
    url = "kvreuse serve (started)" if args.serve else args.server
    model, _ = load(Path(args.model))
    ref = S.reference_preds(ReferenceEncoder(model), main, reo, progress=progress)
    if args.raw_text:
        from bench.quality import gaps

        ref.update(gaps.reference_preds(ReferenceEncoder(model), main, reo, chunking, chunking[0], progress=progress))
    cmp = S.compare(srv, ref)
    print(S.format_table(cmp))
    server = {c: {"single_hop": r["single_hop"], "multi_hop": r["multi_hop"], "reference": r["reference"],
                  "reference_single_hop": r["reference_single_hop"], "reference_multi_hop": r["reference_multi_hop"],
                  "agreement": r["agreement"], "claims": {k[7:]: v for k, v in r["claims"].items()
                                                          if k.startswith("claims_")},
                  "claims_as_expected": r["claims_as_expected"], "placed_share": r.get("placed_share"),
                  "reused_tokens": r["claims"].get("reused_tokens", 0), "query_tokens": r.get("query_tokens"),
                  "priming_claims_per_context": r.get("priming_claims_per_context", {}),
                  **{k: r[k] for k in ("reference_survival_recompute", "reference_gapfill") if k in r}}
              for c, r in cmp.items()}
    meta = {"url": url, "model": str(args.model),
            "examples": args.examples, "reorder_examples": args.reorder_examples, "seed": args.seed,
            "seconds": round(time.time() - t0, 1), "raw_text": args.raw_text,
            "kvreuse_config": kv_config if args.serve else None,
            "patch_kvreuse_config": patch_config if args.serve and "patch" in conds else None}
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() and not args.server_only else {}
    summary["server"] = {**server, "_meta": meta}
    summary_path.write_text(json.dumps(summary, indent=1))
    (out / "server.json").write_text(json.dumps({"compare": cmp, "reference": {k: {kk: vv for kk, vv in v.items()
                                                                                   if kk != "_preds"}
                                                                               for k, v in ref.items()},
                                                 "_meta": meta}, indent=1))
    print(f"wrote {summary_path} (\"server\"), {out / 'server.json'}")
    return cmp


if __name__ == "__main__":
    main()
