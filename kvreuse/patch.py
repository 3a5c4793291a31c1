"""Conditioning patches: the low-rank residue a chunk absorbs from its neighbours.

`ΔK, ΔV = KV(in context) − KV(base)`, both in the same positional frame, is fitted per layer
and KV head by a truncated SVD: `Δ[:, h, :] ≈ A_h B_h` with `A_h: [num_tokens, r]` and
`B_h: [r, head_dim]`.  The rank of each (layer, head) is the smallest that captures `energy`
of the squared singular values, capped at `max_rank`; layers whose residue is negligible next
to the KV it corrects carry none; and by default the whole patch is held to 5% of the chunk's
KV bytes, spent on the components that are largest relative to the KV they correct (the
quality benchmark found the residue in a few deep layers, mostly in V: a fixed rank everywhere
costs 15-25% of the KV for the same accuracy).  Applying a patch is `K' = R(Δp)(K + A_k B_k)`,
`V' = V + A_v B_v` (see `relocate_and_patch`).

Storage: within a layer, every head's factors are padded with zero columns to that layer's
largest rank, so one layer is two dense tensors; `ranks` keeps each head's own rank and
`nbytes` counts exactly the bytes of the stored tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvreuse.ops.reference import compute_dtype, relocate_reference
from kvreuse.ops.validate import check_kv, check_positions_pair, check_same
from kvreuse.rope.spec import RopeSpec


@dataclass
class Factors:
    """Rank-r factors of one layer's residue (K or V).

    a: `[num_tokens, num_kv_heads, r]`, b: `[num_kv_heads, r, head_dim]`; ranks: per-head rank ≤ r.
    """

    a: torch.Tensor
    b: torch.Tensor
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        assert self.a.dim() == 3 and self.b.dim() == 3, "factors are 3-D"
        assert self.a.shape[1] == self.b.shape[0] and self.a.shape[2] == self.b.shape[1]
        assert len(self.ranks) == self.a.shape[1] and max(self.ranks, default=0) <= self.a.shape[2]

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`A B` per head. # [num_tokens, num_kv_heads, head_dim]"""
        return torch.einsum("nhr,hrd->nhd", self.a.to(dtype), self.b.to(dtype))

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


@dataclass
class Patch:
    """Per-layer low-rank residues of a chunk's K and V (None = rank 0 for that layer)."""

    k: list[Factors | None]
    v: list[Factors | None]
    num_tokens: int
    num_kv_heads: int
    head_dim: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.k) != len(self.v):
            raise ValueError(f"patch has {len(self.k)} K layers but {len(self.v)} V layers")

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored factor tensors."""
        return sum(f.nbytes for f in self.k + self.v if f is not None)

    def ranks(self) -> torch.Tensor:
        """Per (layer, K|V, head) rank. # [num_layers, 2, num_kv_heads] int64"""
        out = torch.zeros(self.num_layers, 2, self.num_kv_heads, dtype=torch.long)
        for l in range(self.num_layers):
            for i, f in enumerate((self.k[l], self.v[l])):
                if f is not None:
                    out[l, i] = torch.tensor(f.ranks)
        return out

    def apply(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(K + A_k B_k, V + A_v B_v)` in fp32, rounded once. k, v: `[num_layers, num_tokens, H, D]`."""
        self._check_target(k, v)
        ct = compute_dtype(k.dtype)
        return (_add(k, self.k, ct), _add(v, self.v, ct))

    def slice_tokens(self, start: int, end: int) -> "Patch":
        """The patch of tokens `[start, end)` (factors B are shared, A rows are sliced)."""
        cut = lambda fs: [None if f is None else Factors(f.a[start:end], f.b, f.ranks) for f in fs]
        return Patch(cut(self.k), cut(self.v), end - start, self.num_kv_heads, self.head_dim, dict(self.meta))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor map (for persistence); rank-0 layers are absent."""
        d: dict[str, torch.Tensor] = {"shape": torch.tensor([self.num_layers, self.num_tokens,
                                                             self.num_kv_heads, self.head_dim])}
        for kind, fs in (("k", self.k), ("v", self.v)):
            for l, f in enumerate(fs):
                if f is not None:
                    d[f"{kind}.{l}.a"], d[f"{kind}.{l}.b"] = f.a, f.b
                    d[f"{kind}.{l}.ranks"] = torch.tensor(f.ranks, dtype=torch.int32)
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "Patch":
        num_layers, n, h, dim = (int(x) for x in d["shape"].tolist())
        fs = {"k": [None] * num_layers, "v": [None] * num_layers}
        for kind in fs:
            for l in range(num_layers):
                if f"{kind}.{l}.a" in d:
                    fs[kind][l] = Factors(d[f"{kind}.{l}.a"], d[f"{kind}.{l}.b"],
                                          tuple(int(r) for r in d[f"{kind}.{l}.ranks"].tolist()))
        return cls(fs["k"], fs["v"], n, h, dim)

    def _check_target(self, k: torch.Tensor, v: torch.Tensor) -> None:
        want = (self.num_layers, self.num_tokens, self.num_kv_heads, self.head_dim)
        for name, x in (("k", k), ("v", v)):
            if tuple(x.shape) != want:
                raise ValueError(f"patch is for {name} of shape {list(want)}, got {list(x.shape)}")


def _add(x: torch.Tensor, fs: list[Factors | None], ct: torch.dtype) -> torch.Tensor:
    out = x.to(ct).clone()
    for l, f in enumerate(fs):
        if f is not None:
            out[l] += f.dense(ct)
    return out.to(x.dtype)


def fit_patch(delta_k: torch.Tensor, delta_v: torch.Tensor, *, energy: float = 0.99, max_rank: int = 16,
              budget: float | None = 0.05, k_weight: float = 0.1, base_k: torch.Tensor | None = None,
              base_v: torch.Tensor | None = None, negligible: float = 1e-3,
              dtype: torch.dtype | None = None) -> Patch:
    """Fit rank-m factors to a chunk's residue.

    Ranks are chosen in two steps.  Per (layer, K|V, head): the smallest rank whose singular values
    capture `energy` of the residue, capped at `max_rank`.  Then, when `budget` is set, the patch
    is held to `budget` × the chunk's KV bytes by keeping rank-1 components in order of their
    share of the KV they correct (`σ² / ‖base‖²` of that layer and kind; `σ²` without a base),
    K components weighted by `k_weight`, until the next one would not fit.  The byte budget is
    what makes patches small by default: residue concentrates in a few deep layers, and the
    budget spends the bytes there instead of spreading a fixed rank everywhere.  V comes first
    because V residue flows straight into the attention output while K residue only reweights
    it; on the quality benchmark's binder model patching K alone restored nothing and V alone
    restored everything (bench/quality_bench.py, `patch_k_only` / `patch_v_only`).

    Args:
        delta_k, delta_v: `[num_layers, num_tokens, num_kv_heads, head_dim]`, in-context minus base
            KV in the base's positional frame.
        energy: fraction of the squared Frobenius norm to capture per (layer, head), in (0, 1].
        max_rank: cap on every rank (0 gives an empty patch).
        budget: cap on `Patch.nbytes` as a fraction of the chunk's K+V bytes (in the factors'
            dtype); None for no cap (exactly the energy/max_rank ranks).
        k_weight: weight of K components against V components when spending the budget.
        base_k, base_v: the base KV; a layer whose `‖Δ‖_F ≤ negligible · ‖base‖_F` gets rank 0, and the
            budget ranks components relative to them.  Without them only an all-zero residue is
            negligible and components are ranked by absolute energy.
        dtype: storage dtype of the factors (default: `delta_k.dtype`).
    """
    check_kv("delta_k", delta_k, ndim=(4,))
    check_same("delta_k", delta_k, "delta_v", delta_v)
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if max_rank < 0:
        raise ValueError(f"max_rank must be >= 0, got {max_rank}")
    if budget is not None and not 0.0 <= budget:
        raise ValueError(f"budget must be >= 0 (a fraction of the chunk's KV bytes) or None, got {budget}")
    for name, base in (("base_k", base_k), ("base_v", base_v)):
        if base is not None and base.shape != delta_k.shape:
            raise ValueError(f"{name} shape {list(base.shape)} differs from delta shape {list(delta_k.shape)}")
    num_layers, n, h, d = delta_k.shape
    dtype = dtype or delta_k.dtype
    svds: dict[tuple[str, int], _LayerSVD] = {}
    for kind, delta, base in (("k", delta_k, base_k), ("v", delta_v, base_v)):
        for l in range(num_layers):
            svd = _svd_layer(delta[l], None if base is None else base[l], energy, max_rank, negligible)
            if svd is not None:
                svds[kind, l] = svd
    if budget is not None:
        if k_weight < 0:
            raise ValueError(f"k_weight must be >= 0, got {k_weight}")
        elem = torch.empty((), dtype=dtype).element_size()
        _allocate(svds, budget * 2 * num_layers * n * h * d * elem, h * (n + d) * elem, {"k": k_weight, "v": 1.0})
    fits = {kind: [svds[kind, l].factors(dtype) if (kind, l) in svds else None for l in range(num_layers)]
            for kind in ("k", "v")}
    return Patch(fits["k"], fits["v"], n, h, d,
                 {"energy": energy, "max_rank": max_rank, "budget": budget, "k_weight": k_weight})


@dataclass
class _LayerSVD:
    """Per-head SVD of one layer's residue and the rank kept per head."""

    u: torch.Tensor          # [H, N, k]
    s: torch.Tensor          # [H, k]
    vh: torch.Tensor         # [H, k, D]
    ranks: torch.Tensor      # [H] int64
    scale: float             # ‖base‖² of the layer (1 without a base): the budget's yardstick

    def factors(self, dtype: torch.dtype) -> Factors | None:
        r = int(self.ranks.max()) if self.ranks.numel() else 0
        if r == 0:
            return None
        keep = (torch.arange(r)[None, :] < self.ranks[:, None]).to(self.s.dtype)   # zero beyond each head's rank
        root = self.s[:, :r].sqrt() * keep
        a = (self.u[:, :, :r] * root[:, None, :]).permute(1, 0, 2)                 # [N, H, r]
        b = self.vh[:, :r, :] * root[:, :, None]                                    # [H, r, D]
        return Factors(a.to(dtype).contiguous(), b.to(dtype).contiguous(), tuple(int(x) for x in self.ranks))


def _svd_layer(delta: torch.Tensor, base: torch.Tensor | None, energy: float, max_rank: int,
               negligible: float) -> _LayerSVD | None:
    # delta: [num_tokens, num_kv_heads, head_dim]
    x = delta.to(torch.float64 if delta.dtype == torch.float64 else torch.float32)
    norm = torch.linalg.vector_norm(x)
    if max_rank == 0 or norm == 0 or x.shape[-1] == 0:
        return None
    base_sq = 1.0
    if base is not None:
        base_norm = torch.linalg.vector_norm(base.to(x.dtype))
        if norm <= negligible * base_norm:
            return None
        base_sq = float(base_norm.square()) or 1.0
    u, s, vh = torch.linalg.svd(x.permute(1, 0, 2), full_matrices=False)   # [H,N,k] [H,k] [H,k,D]
    e = s.square()
    captured = e.cumsum(-1) / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
    # smallest r with captured[r-1] >= energy (tolerate fp rounding at energy == 1)
    ranks = (captured < energy - 1e-12).sum(-1) + 1
    ranks = torch.where(e.sum(-1) > 0, ranks.clamp(max=min(max_rank, s.shape[-1])), torch.zeros_like(ranks))
    if int(ranks.max()) == 0:
        return None
    return _LayerSVD(u, s, vh, ranks, base_sq)


def _allocate(svds: dict[tuple[str, int], _LayerSVD], budget_bytes: float, bytes_per_rank: int,
              weights: dict[str, float]) -> None:
    """Trim ranks so the padded factors fit `budget_bytes`, keeping the largest weighted relative
    components (`weights[kind] · σ² / ‖base‖²`; a component of gain 0 is never kept).

    A layer's factors are padded to its largest head rank, so raising that maximum by one costs
    `bytes_per_rank` (= H·(N + D)·elem); components below the current maximum are free.
    """
    comps = []                                                  # (gain, layer key, head, rank index)
    for key, svd in svds.items():
        gains = (weights[key[0]] * svd.s.square() / svd.scale).tolist()
        for head, r in enumerate(svd.ranks.tolist()):
            comps += [(gains[head][j], key, head, j) for j in range(r)]
    comps.sort(key=lambda c: -c[0])
    kept = {key: torch.zeros_like(svd.ranks) for key, svd in svds.items()}
    used = 0.0
    for gain, key, head, j in comps:
        if gain <= 0 or j != int(kept[key][head]):
            continue                                            # a head's components are taken in order
        width = int(kept[key].max())
        cost = bytes_per_rank if j + 1 > width else 0
        if used + cost > budget_bytes:
            continue
        used += cost
        kept[key][head] = j + 1
    for key, svd in svds.items():
        svd.ranks = kept[key]


def relocate_and_patch(k: torch.Tensor, v: torch.Tensor, src_pos: torch.Tensor, dst_pos: torch.Tensor,
                       rope: RopeSpec, patch: Patch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Place a chunk's KV (all layers) at `dst_pos`: `K' = R(Δp)(K + A_k B_k)`, `V' = V + A_v B_v`.

    k, v: `[num_layers, num_tokens, num_kv_heads, head_dim]` computed at `src_pos` (`[num_tokens]` or
    `[3, num_tokens]`).  fp32 inside, one rounding.  Without a patch V is returned as is.
    """
    check_kv("k", k, rope, ndim=(4,))
    check_kv("v", v, ndim=(4,))
    if k.shape[:2] != v.shape[:2] or k.dtype != v.dtype or k.device != v.device:
        raise ValueError(f"k {list(k.shape)} {k.dtype} and v {list(v.shape)} {v.dtype} must agree in "
                         "layers, tokens, dtype and device")
    src_pos, dst_pos = check_positions_pair(rope, src_pos, dst_pos, k.shape[1])
    if patch is None:
        return relocate_reference(k, src_pos, dst_pos, rope), v
    patch._check_target(k, v)
    ct = compute_dtype(k.dtype)
    dk = torch.stack([f.dense(ct) if f is not None else torch.zeros(k.shape[1:], dtype=ct, device=k.device)
                      for f in patch.k])
    return relocate_reference(k, src_pos, dst_pos, rope, delta_k=dk), _add(v, patch.v, ct)
