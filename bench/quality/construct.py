"""A hand-set starting point for the binder: the pointer-chasing circuit written into Llama weights.

Trained from scratch on CPU, small decoders sit on a long plateau before the two heads an
associative lookup needs appear together (neither gets a gradient before the other exists).  So the
training script starts from weights that already implement the circuit below and then trains all of
them on the task.  Residual layout (d_model 128):

    0        constant 1 (every token)
    1..20    T: own name code (20-d, low coherence)      21..30  T: own digit (one-hot)
    41..60   L: left-hand name, copied from 2 tokens back  61..70 L: digit part (unused)
    81..100  R: name retrieved by lookups                 101..110 R: digit retrieved by lookups
    121 "=" flag   122 "?" flag   123 SLOT: previous token is "=" (a right-hand side)

layer 0: head 0 attends two tokens back and copies T into L; head 1 attends one back and copies
         the "=" flag into SLOT.  (Positional heads: RoPE phases set on the fastest frequencies.)
layer 1: head 0 looks up its own name T among right-hand sides by their L (content codes on the
         slowest rotary frequencies, where RoPE barely moves over the context) and copies the
         slot's T into R.  At a right-hand side `a` of `d = a` this resolves `a` (cross-chunk
         binding); at a question `? = g` it fetches g's right-hand side.
layer 2: head 0 looks up the name in R and copies the slot's T and R into R: the 2nd and 3rd hop.
MLPs start at zero.  The LM head reads the digit part of R.
"""

from __future__ import annotations

import math

import torch

from bench.quality import task

T_NAME, T_DIG, L_NAME, R_NAME, R_DIG = 1, 21, 41, 81, 101
F_EQ, F_Q, F_SLOT = 121, 122, 123
NAME_DIM = 20


def name_codes(n: int, dim: int, seed: int, steps: int = 400) -> torch.Tensor:
    """n unit vectors in `dim` dims with low mutual coherence (a few hundred steps of repulsion)."""
    with torch.enable_grad():
        return _repel(n, dim, seed, steps)


def _repel(n: int, dim: int, seed: int, steps: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.01)
    for _ in range(steps):
        u = x / x.norm(dim=1, keepdim=True)
        c = u @ u.T - torch.eye(n)
        loss = (c.abs() ** 6).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (x / x.norm(dim=1, keepdim=True)).detach()


def _positional(attn, head: int, hd: int, offset: int, inv: torch.Tensor, c: float, n_freq: int = 6,
                sharpness: float = 12.0) -> None:
    half = hd // 2
    q, k = torch.zeros(hd), torch.zeros(hd)
    q[:n_freq] = 1.0
    k[:n_freq] = torch.cos(offset * inv[:n_freq])
    k[half:half + n_freq] = torch.sin(offset * inv[:n_freq])
    r = math.sqrt(sharpness * 8.0 * math.sqrt(hd) / n_freq)
    rows = slice(head * hd, (head + 1) * hd)
    attn.q_proj.weight[rows] = 0.0
    attn.k_proj.weight[rows] = 0.0
    attn.q_proj.weight[rows, 0] = r * q / c
    attn.k_proj.weight[rows, 0] = r * k / c


@torch.no_grad()
def construct(model, seed: int = 0, beta: float = 7.0, bonus: float = 4.0, head_scale: float = 6.0,
              noise: float = 0.003) -> None:
    """Write the circuit into `model` (a 3-layer LlamaForCausalLM, d_model >= 128, head_dim 64), then
    add N(0, noise) to every weight matrix so that unused heads and the MLPs can learn."""
    cfg = model.config
    d, hd, nh = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
    assert d >= 128 and hd == 64 and nh >= 2 and cfg.num_hidden_layers >= 3
    half = hd // 2
    theta = (cfg.rope_parameters or {}).get("rope_theta", 10000.0)
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    for p in model.parameters():
        p.zero_()
    for mod in model.modules():                         # RMSNorm weights back to 1
        if type(mod).__name__.endswith("RMSNorm"):
            mod.weight.fill_(1.0)

    codes = name_codes(len(task.NAMES), NAME_DIM, seed)
    emb = model.model.embed_tokens.weight
    emb[:, 0] = 1.0
    for i, n in enumerate(task.NAME_IDS):
        emb[n, T_NAME:T_NAME + NAME_DIM] = codes[i]
    for i, v in enumerate(task.VALUE_IDS):
        emb[v, T_DIG + i] = 1.0
    emb[task.EQ, F_EQ] = 1.0
    emb[task.Q, F_Q] = 1.0
    norm0 = math.sqrt(d / 2.0)                          # a token with two unit entries, after RMSNorm

    # ---- layer 0: two-back copy of T into L; one-back copy of the "=" flag into SLOT
    a0 = model.model.layers[0].self_attn
    _positional(a0, 0, hd, 2, inv, norm0)
    _positional(a0, 1, hd, 1, inv, norm0)
    for j in range(40):                                  # head 0 value channel j <- T dim j, out -> L
        a0.v_proj.weight[j, T_NAME + j] = 1.0 / norm0
        a0.o_proj.weight[L_NAME + j, j] = 1.0
    a0.v_proj.weight[hd + 0, F_EQ] = 1.0 / norm0
    a0.o_proj.weight[F_SLOT, hd + 0] = 1.0

    # ---- lookup heads: q = name code (from T in layer 1, from R in layer 2) on the slow rotary
    # pairs 22..31 (both halves), plus a constant on pair 21 meeting the SLOT flag in k
    slow = list(range(22, 32)) + list(range(22 + half, 32 + half))         # 20 dims
    for layer, src in ((1, T_NAME), (2, R_NAME)):
        at = model.model.layers[layer].self_attn
        for j, ch in enumerate(slow):
            at.q_proj.weight[ch, src + j] = beta
            at.k_proj.weight[ch, L_NAME + j] = 1.0
        at.q_proj.weight[21, 0] = bonus
        at.k_proj.weight[21, F_SLOT] = 1.0
        for j in range(40):                              # copy the slot's T into R
            at.v_proj.weight[j, T_NAME + j] = 1.0
            at.o_proj.weight[R_NAME + j, j] = 1.0 / 4.0
        if layer == 2:                                   # ... and its R (the hop resolved at layer 1)
            for j in range(10):
                at.v_proj.weight[40 + j, R_DIG + j] = 1.0
                at.o_proj.weight[R_DIG + j, 40 + j] = 1.0 / 4.0
    # ---- head: digits from R's digit part
    for i, v in enumerate(task.VALUE_IDS):
        model.lm_head.weight[v, R_DIG + i] = head_scale
    g = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        if p.dim() == 2:
            p.add_(torch.randn(p.shape, generator=g) * noise)
