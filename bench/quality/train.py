"""Train the embedded reference model ("binder") on the binding task of `bench.quality.task`.

A standard `LlamaForCausalLM` (3 layers, d_model 96, 2 heads of 64, RoPE), so that vLLM loads
the same checkpoint.  Loss on answer tokens only.  Curriculum: single lookups first; 2-hop questions
join once single lookups are learned, 3-hop chains once 2-hop ones are.  Seeded and CPU-friendly.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.quality import task


@dataclass
class TrainConfig:
    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 3
    num_heads: int = 2
    head_dim: int = 64
    batch_size: int = 32
    questions_per_example: int = 8
    records: tuple[int, int] = (6, 12)       # records per chunk, inclusive range
    max_chunks: int = 3
    lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.01
    max_steps: int = 500
    max_minutes: float = 12.0
    eval_every: int = 250
    eval_examples: int = 48
    unlock_long: float = 0.80                # 1-hop accuracy on short contexts that unlocks full-size ones
    unlock_2hop: float = 0.90                # training accuracy on 1-hop that unlocks 2-hop questions
    unlock_3hop: float = 0.85                # ... on 2-hop that unlocks 3-hop chains
    target_3hop: float = 0.985               # stop when held-out 3-hop accuracy reaches this (twice)
    threads: int = 2
    init: str = "construct"                  # construct (circuit written in, see construct.py) | two_back | random


def model_config(cfg: TrainConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=task.VOCAB_SIZE, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        head_dim=cfg.head_dim, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=task.BOS, eos_token_id=task.EOS, pad_token_id=task.PAD,
        torch_dtype="float32", attention_bias=False, mlp_bias=False)


def init_two_back_head(model, head: int = 0, sharpness: float = 10.0, n_freq: int = 6) -> None:
    """Initialize layer 0's `head` as a "two tokens back" head (record `x = y`: y's slot reads x).

    From scratch, a small decoder sits on a long plateau before it forms the two heads an
    associative lookup needs (a positional head that marks each right-hand side with the variable it
    defines, and the lookup head that reads it); neither gets a gradient before the other exists.
    This seeds the first: every embedding gets a shared constant channel (0), and the head's query
    and key read only that channel with RoPE phases set so that q·k peaks at offset 2 over the
    `n_freq` fastest rotary frequencies.  The value/output maps are random, scaled so the copied
    token is about as large as an embedding.  Everything stays trainable.
    """
    cfg = model.config
    d, hd = cfg.hidden_size, cfg.head_dim
    emb = model.model.embed_tokens.weight
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        emb[:, 0] = 0.3
        x = model.model.layers[0].input_layernorm(emb[: len(task.VOCAB)])
        c = float(x[:, 0].mean())                                   # normalized constant channel
        half = hd // 2
        inv = 1.0 / (cfg.rope_parameters.get("rope_theta", 10000.0) if hasattr(cfg, "rope_parameters")
                     and cfg.rope_parameters else 10000.0) ** (torch.arange(0, hd, 2).float() / hd)
        q, k = torch.zeros(hd), torch.zeros(hd)
        q[:n_freq] = 1.0
        k[:n_freq] = torch.cos(2 * inv[:n_freq])
        k[half:half + n_freq] = torch.sin(2 * inv[:n_freq])
        r = math.sqrt(sharpness * 8.0 * math.sqrt(hd) / n_freq)     # margin ~ sharpness nats at offsets 1, 3
        rows = slice(head * hd, (head + 1) * hd)
        attn.q_proj.weight[rows] = 0.0
        attn.k_proj.weight[rows] = 0.0
        attn.q_proj.weight[rows, 0] = r * q / c
        attn.k_proj.weight[rows, 0] = r * k / c
        kv_rows = slice(head * hd, (head + 1) * hd)
        attn.v_proj.weight[kv_rows] = torch.randn(hd, d) / math.sqrt(d)
        attn.v_proj.weight[kv_rows, 0] = 0.0
        attn.o_proj.weight[:, rows] = torch.randn(d, hd) * 0.3 / (math.sqrt(hd) * math.sqrt(d))
        attn.o_proj.weight[0, rows] = 0.0


# ------------------------------------------------------------------------------------- batches
def _pick_questions(rng: random.Random, ex: task.Example, n: int, weights: dict[int, float]) -> list[task.Question]:
    """Up to n distinct variables: draw a depth by `weights` (among depths still available), then a
    variable of that depth."""
    res = ex.resolve()
    by_depth: dict[int, list[str]] = {}
    for name, (_, d, _) in res.items():
        if weights.get(d, 0) > 0:
            by_depth.setdefault(d, []).append(name)
    chosen: list[str] = []
    while by_depth and len(chosen) < n:
        ds = sorted(by_depth)
        d = rng.choices(ds, weights=[weights[x] for x in ds])[0]
        chosen.append(by_depth[d].pop(rng.randrange(len(by_depth[d]))))
        if not by_depth[d]:
            del by_depth[d]
    return ex.make_questions(chosen)


def make_batch(rng: random.Random, cfg: TrainConfig, weights: dict[int, float], short: bool = False):
    """ids, labels (-100 except at each question's last token), depth of each labelled question."""
    seqs, labs, depths = [], [], []
    for _ in range(cfg.batch_size):
        if max(weights) > 1 and rng.random() < 0.5:           # benchmark-shaped 3-chunk chains
            n = rng.randint(max(7, cfg.records[0]), cfg.records[1])
            make = task.bench_example if rng.random() < 0.75 else task.reorder_example
            ex = make(rng, n_records=n, n_refs=rng.randint(1, (n - 1) // (2 if make is task.bench_example else 3)))
        elif short:                                           # first stage: a few records only
            ex = task.random_example(rng, n_chunks=1, n_records=rng.randint(2, 8), ref_frac=(0.0, 0.0))
        else:
            n_chunks = rng.randint(1, cfg.max_chunks)
            sizes = [rng.randint(*cfg.records) for _ in range(n_chunks)]
            ex = task.random_example(rng, n_chunks=n_chunks, n_records=sizes,
                                     ref_frac=(0.2, 0.6) if max(weights) > 1 else (0.0, 0.5))
        qs = _pick_questions(rng, ex, cfg.questions_per_example, weights)
        ids = ex.context_tokens
        lab = [-100] * len(ids)
        for q in qs:
            ids += q.tokens + [q.answer_id]
            lab += [-100, -100, q.answer_id, -100]
            depths.append(q.depth)
        seqs.append(ids)
        labs.append(lab)
    t = max(map(len, seqs))
    x = torch.full((len(seqs), t), task.PAD, dtype=torch.long)
    y = torch.full((len(seqs), t), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        x[i, :len(s)] = torch.tensor(s)
        y[i, :len(l)] = torch.tensor(l)
    return x, y, torch.tensor(depths)


# ------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def eval_in_context(model, examples: list[task.Example], max_questions: int | None = None) -> dict:
    """Accuracy by question depth, one question per sequence (context + `? = name`), in context."""
    rows, ans, dep = [], [], []
    for ex in examples:
        ctx = ex.context_tokens
        qs = ex.questions if max_questions is None else ex.questions[:max_questions]
        for q in qs:
            rows.append(ctx + q.tokens)
            ans.append(q.answer_id)
            dep.append(q.depth)
    correct = []
    for i in range(0, len(rows), 256):
        part = rows[i:i + 256]
        t = max(map(len, part))
        x = torch.full((len(part), t), task.PAD, dtype=torch.long)
        last = torch.tensor([len(r) - 1 for r in part])
        for j, r in enumerate(part):
            x[j, :len(r)] = torch.tensor(r)
        logits = model(input_ids=x).logits
        pred = logits[torch.arange(len(part)), last].argmax(-1)
        correct += (pred == torch.tensor(ans[i:i + 256])).tolist()
    out = {}
    for d in sorted(set(dep)):
        sel = [c for c, dd in zip(correct, dep) if dd == d]
        out[f"hop{d}"] = sum(sel) / len(sel)
    return out


def heldout(seed: int, n: int) -> list[task.Example]:
    rng = random.Random(10_000 + seed)
    exs = [task.bench_example(rng) for _ in range(n)]
    for ex in exs:        # keep the held-out set balanced: all 3-hop and 2-hop, 6 single lookups
        rng.shuffle(ex.questions)
        ex.questions.sort(key=lambda q: -q.depth)
        ex.questions = [q for q in ex.questions if q.depth > 1] + [q for q in ex.questions if q.depth == 1][:6]
    return exs


# ------------------------------------------------------------------------------------- training
def train(out: str | Path, cfg: TrainConfig = TrainConfig(), log=print) -> dict:
    from transformers import LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = LlamaForCausalLM(model_config(cfg))
    model.config._attn_implementation = "sdpa"
    if cfg.init == "construct":
        from bench.quality.construct import construct

        construct(model, seed=cfg.seed)
    elif cfg.init == "two_back":
        init_two_back_head(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    evalset = heldout(cfg.seed, cfg.eval_examples)
    ema = {1: 0.0, 2: 0.0, 3: 0.0}
    weights = {1: 1.0}
    history, t0, hits, stage_steps = [], time.time(), 0, {}
    best = None
    short = cfg.init != "construct"
    if cfg.init == "construct":                 # the circuit is there: train on every depth at once
        weights = {1: 1.0, 2: 1.0, 3: 4.0}
        stage_steps = {"long": 0, "2hop": 0, "3hop": 0}
    for step in range(1, cfg.max_steps + 1):
        if 2 not in weights and ema[1] > cfg.unlock_2hop:
            weights = {1: 1.0, 2: 2.0}
            stage_steps["2hop"] = step
        if 3 not in weights and 2 in weights and ema[2] > cfg.unlock_3hop:
            weights = {1: 1.0, 2: 1.0, 3: 4.0}
            stage_steps["3hop"] = step
        lr = cfg.lr * min(1.0, step / cfg.warmup)
        elapsed = (time.time() - t0) / 60
        frac = max(step / cfg.max_steps, elapsed / cfg.max_minutes)
        if 3 in weights and frac > 0.8:                     # anneal over the last fifth of the budget
            lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - 0.8) / 0.2)))
        for g in opt.param_groups:
            g["lr"] = lr
        if short and ema[1] > cfg.unlock_long:
            short = False
            ema[1] = 0.0
            stage_steps["long"] = step
        x, y, depths = make_batch(rng, cfg, weights, short)
        model.train()
        logits = model(input_ids=x).logits
        mask = y != -100
        loss = torch.nn.functional.cross_entropy(logits[mask], y[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            ok = (logits[mask].argmax(-1) == y[mask]).float()
            for d in (1, 2, 3):
                sel = depths == d
                if sel.any():
                    ema[d] = 0.9 * ema[d] + 0.1 * ok[sel].mean().item()
        if step % 50 == 0:
            log(f"step {step} {elapsed:.1f} min loss {loss.item():.3f} lr {lr:.2e} "
                f"train acc 1/2/3-hop {ema[1]:.2f}/{ema[2]:.2f}/{ema[3]:.2f} stages {stage_steps}")
        stop = elapsed > cfg.max_minutes or step == cfg.max_steps
        if step % cfg.eval_every == 0 or stop:
            model.eval()
            acc = eval_in_context(model, evalset)
            history.append({"step": step, "minutes": round(elapsed, 2), **acc})
            log(f"eval step {step}: {acc}")
            score = (acc.get("hop3", 0), acc.get("hop2", 0), acc.get("hop1", 0))
            if 3 in weights and (best is None or score >= best):
                best = score
                save(model, out, cfg, history, stage_steps)
            hits = hits + 1 if acc.get("hop3", 0) >= cfg.target_3hop and frac > 0.3 else 0
            if hits >= 2 and 3 in weights:
                break
        if stop:
            break
    if best is None:
        save(model, out, cfg, history, stage_steps)
    return {"history": history, "stages": stage_steps}


def save(model, out: Path, cfg: TrainConfig, history: list, stages: dict) -> None:
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(out)
    (out / "training.json").write_text(json.dumps({"train_config": asdict(cfg), "history": history,
                                                   "curriculum_unlocked_at_step": stages}, indent=1))


def save_tokenizer(out: Path) -> None:
    """tokenizer.json + tokenizer_config.json; the class is named PreTrainedTokenizerFast so that
    transformers 4.x (and vLLM on it) loads it as well as 5.x."""
    out = Path(out)
    task.build_tokenizer().save_pretrained(out)
    p = out / "tokenizer_config.json"
    conf = json.loads(p.read_text())
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    p.write_text(json.dumps(conf, indent=2) + "\n")
