"""Triton kernel: relocate + patch + scatter a chunk's KV into a paged cache (or a plain tensor).

One program handles `BLOCK_N` tokens x every head of one layer:

    K' = R(dst - src) (K + A_k B_k),   V' = V + A_v B_v     (fp32 inside, one rounding)

and writes both to `out + layer_off[l] + blk * s_blk + off * s_off + h * s_h + d` (V at `+ s_kv`),
with `blk, off = divmod(slot, block_size)`.  That one address formula covers vLLM 0.32's per-layer
`[B, H, N, C]` views under every `KVCacheLayout` (K|V split on C: `s_kv = D`; MLA latent: no V),
with the strides `kvreuse.layout.PagedLayout.kernel_strides` gives, and a dense `[L, N, H, D]`
output (identity slots, `block_size = 1`).  Layers live in separate tensors, so
each layer's destination (and factor) tensor is addressed as an element offset from the first
one's pointer: one launch covers a whole store entry.

The rotation is composed from the two table rows exactly as `kvreuse.ops.reference.delta_cos_sin`
does; either that fp32 table is read (`USE_TABLE`), or it is recomputed in-kernel from the
scaled positions (`fl32(pos / divisor)`, precomputed by the launcher) and `inv_freq`.  The launch
disables FMA contraction so the table path matches the PyTorch reference bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _patch_tile(a_base, b_base, rank, n3, h3, cols3, H, D, row_mask, col_mask):
    """`sum_r A[n, h, r] * B[h, r, col]` in fp32 for contiguous factors A `[N, H, rank]`, B `[H, rank, D]`.

    n3: `[BN, 1, 1]` int64 token ids, h3: `[1, BH, 1]` heads, cols3: `[1, 1, BC]` channels.
    """
    acc = tl.full([n3.shape[0], h3.shape[1], cols3.shape[2]], 0.0, tl.float32)
    a_row = a_base + (n3 * H + h3) * rank           # [BN, BH, 1]
    b_row = b_base + h3 * rank * D + cols3          # [1, BH, BC]
    for r in range(0, rank):
        a = tl.load(a_row + r, mask=row_mask, other=0.0).to(tl.float32)
        b = tl.load(b_row + r * D, mask=col_mask, other=0.0).to(tl.float32)
        acc += a * b
    return acc


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest-even bf16 -> fp32 by bit arithmetic (finite x; same on GPU and interpreter)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _delta_cos_sin(cos_ptr, sin_ptr, s_cs, tsrc_ptr, tdst_ptr, s_tsrc, s_tdst, inv_ptr, axis_ptr, mscale,
                   n2, f2, m2, USE_TABLE: tl.constexpr, ROW_ROUND: tl.constexpr, NORMALIZE: tl.constexpr):
    """cos/sin of the rotation src -> dst for tokens n2 `[BN, 1]` and frequencies f2 `[1, BF]`.

    In-kernel it mirrors `kvreuse.ops.reference.delta_cos_sin`: table rows `cos/sin(angle) * mscale`,
    both rows rounded to the keys' dtype when the engine rotates them with a 16-bit table
    (ROW_ROUND: 0 none, 1 bf16, 2 fp16), and the exact inverse `(c, -s) / (c² + s²)` (NORMALIZE).
    """
    if USE_TABLE:
        c = tl.load(cos_ptr + n2 * s_cs + f2, mask=m2, other=1.0)
        s = tl.load(sin_ptr + n2 * s_cs + f2, mask=m2, other=0.0)
    else:
        ax = tl.load(axis_ptr + f2, mask=m2, other=0).to(tl.int64)       # M-RoPE axis of each frequency
        inv = tl.load(inv_ptr + f2, mask=m2, other=0.0)
        ts = tl.load(tsrc_ptr + ax * s_tsrc + n2, mask=m2, other=0.0)  # fl32(pos / divisor)
        td = tl.load(tdst_ptr + ax * s_tdst + n2, mask=m2, other=0.0)
        a_s = ts * inv
        a_d = td * inv
        cs = tl.cos(a_s) * mscale
        ss = tl.sin(a_s) * mscale
        cd = tl.cos(a_d) * mscale
        sd = tl.sin(a_d) * mscale
        if ROW_ROUND == 1:
            cs = _round_bf16(cs)
            ss = _round_bf16(ss)
            cd = _round_bf16(cd)
            sd = _round_bf16(sd)
        if ROW_ROUND == 2:
            cs = cs.to(tl.float16).to(tl.float32)
            ss = ss.to(tl.float16).to(tl.float32)
            cd = cd.to(tl.float16).to(tl.float32)
            sd = sd.to(tl.float16).to(tl.float32)
        c = cd * cs + sd * ss
        s = sd * cs - cd * ss
        if NORMALIZE:
            norm = cs * cs + ss * ss
            c = c / norm
            s = s / norm
        same = ts == td                                                 # unmoved: exactly (1, 0)
        c = tl.where(same, 1.0, c)
        s = tl.where(same, 0.0, s)
    return c, s


@triton.jit
def relocate_scatter_kernel(
    k_ptr, v_ptr,                        # inputs [L, N, H, D], last dim contiguous
    sk_l, sk_n, sk_h,                    # k strides (elements)
    sv_l, sv_n, sv_h,                    # v strides (elements)
    out_ptr, out_loff_ptr,               # destination of layer 0; [L] int64 element offset of each layer's
    so_kv, so_blk, so_off, so_h,         # destination strides: K->V plane, block, in-block offset, head
    slot_ptr, block_size, num_slots,     # [N] slots (HAS_SLOTS), else slot = token index
    cos_ptr, sin_ptr, s_cs,              # [N, half] fp32 delta table (USE_TABLE)
    tsrc_ptr, tdst_ptr, s_tsrc, s_tdst,  # [A, N] fp32 scaled positions (in-kernel angles); axis stride
    inv_ptr, axis_ptr, mscale,           # [half] fp32 inv_freq, [half] int32 M-RoPE axis, table magnitude
    ak_ptr, ak_off_ptr, bk_ptr, bk_off_ptr, rk_ptr,   # K factors: bases, [L] offsets, [L] ranks
    av_ptr, av_off_ptr, bv_ptr, bv_off_ptr, rv_ptr,   # V factors
    N, H,
    D: tl.constexpr, ROT_LO: tl.constexpr, ROT_DIM: tl.constexpr, IS_NEOX: tl.constexpr,
    HAS_V: tl.constexpr, HAS_SLOTS: tl.constexpr, USE_TABLE: tl.constexpr,
    ROW_ROUND: tl.constexpr, NORMALIZE: tl.constexpr,
    PATCH_K: tl.constexpr, PATCH_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    HALF: tl.constexpr = ROT_DIM // 2
    BLOCK_F: tl.constexpr = BLOCK_R // 2
    HAS_PASS: tl.constexpr = (ROT_LO > 0) or (ROT_LO + ROT_DIM < D)
    layer = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)     # [BN]
    h = tl.arange(0, BLOCK_H)
    n_ok = n < N
    n3 = n[:, None, None]
    h3 = h[None, :, None]
    row_mask = n_ok[:, None, None] & (h3 < H)                                 # [BN, BH, 1]

    if HAS_SLOTS:
        slot = tl.load(slot_ptr + n, mask=n_ok, other=-1).to(tl.int64)
    else:
        slot = n
    ok = n_ok & (slot >= 0) & (slot < num_slots)      # -1 (vLLM padding) and strays are never written
    out_row = (out_ptr + tl.load(out_loff_ptr + layer)
               + (slot // block_size) * so_blk + (slot % block_size) * so_off)  # [BN]
    out3 = out_row[:, None, None] + h3 * so_h
    st_mask = ok[:, None, None] & (h3 < H)
    k_row = k_ptr + layer * sk_l + n3 * sk_n + h3 * sk_h                     # [BN, BH, 1]

    if PATCH_K:
        rank_k = tl.load(rk_ptr + layer)
        ak = ak_ptr + tl.load(ak_off_ptr + layer)
        bk = bk_ptr + tl.load(bk_off_ptr + layer)

    # ---- K: channels outside the rotary slice are copied (plus patch)
    if HAS_PASS:
        d = tl.arange(0, BLOCK_D)
        d3 = d[None, None, :]
        pas = (d3 < D) & ((d3 < ROT_LO) | (d3 >= ROT_LO + ROT_DIM))
        x = tl.load(k_row + d3, mask=row_mask & pas, other=0.0)
        if PATCH_K:
            x = (x.to(tl.float32) + _patch_tile(ak, bk, rank_k, n3, h3, d3, H, D, row_mask, pas & (h3 < H)))
        tl.store(out3 + d3, x.to(out_ptr.dtype.element_ty), mask=st_mask & pas)

    # ---- K: rotary slice
    n2 = n[:, None]
    if IS_NEOX:
        # pairs (i, i + HALF): two contiguous half tiles
        f = tl.arange(0, BLOCK_F)
        f3 = f[None, None, :]
        fm = f3 < HALF
        c, s = _delta_cos_sin(cos_ptr, sin_ptr, s_cs, tsrc_ptr, tdst_ptr, s_tsrc, s_tdst, inv_ptr, axis_ptr,
                              mscale, n2, f[None, :], n_ok[:, None] & (f[None, :] < HALF), USE_TABLE,
                              ROW_ROUND, NORMALIZE)
        c = c[:, None, :]
        s = s[:, None, :]
        c1 = ROT_LO + f3
        c2 = ROT_LO + HALF + f3
        x1 = tl.load(k_row + c1, mask=row_mask & fm, other=0.0).to(tl.float32)
        x2 = tl.load(k_row + c2, mask=row_mask & fm, other=0.0).to(tl.float32)
        if PATCH_K:
            x1 = x1 + _patch_tile(ak, bk, rank_k, n3, h3, c1, H, D, row_mask, fm & (h3 < H))
            x2 = x2 + _patch_tile(ak, bk, rank_k, n3, h3, c2, H, D, row_mask, fm & (h3 < H))
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        tl.store(out3 + c1, o1.to(out_ptr.dtype.element_ty), mask=st_mask & fm)
        tl.store(out3 + c2, o2.to(out_ptr.dtype.element_ty), mask=st_mask & fm)
    else:
        # pairs (2i, 2i + 1): one tile, split into even / odd lanes
        j = tl.arange(0, BLOCK_R)
        j3 = j[None, None, :]
        jm = j3 < ROT_DIM
        cols = ROT_LO + j3
        x = tl.load(k_row + cols, mask=row_mask & jm, other=0.0).to(tl.float32)
        if PATCH_K:
            x = x + _patch_tile(ak, bk, rank_k, n3, h3, cols, H, D, row_mask, jm & (h3 < H))
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_N, BLOCK_H, BLOCK_F, 2]))
        f = tl.arange(0, BLOCK_F)
        c, s = _delta_cos_sin(cos_ptr, sin_ptr, s_cs, tsrc_ptr, tdst_ptr, s_tsrc, s_tdst, inv_ptr, axis_ptr,
                              mscale, n2, f[None, :], n_ok[:, None] & (f[None, :] < HALF), USE_TABLE,
                              ROW_ROUND, NORMALIZE)
        c = c[:, None, :]
        s = s[:, None, :]
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        o = tl.reshape(tl.join(o1, o2), [BLOCK_N, BLOCK_H, BLOCK_R])
        tl.store(out3 + cols, o.to(out_ptr.dtype.element_ty), mask=st_mask & jm)

    # ---- V: patch only
    if HAS_V:
        d = tl.arange(0, BLOCK_D)
        d3 = d[None, None, :]
        dm = d3 < D
        v_row = v_ptr + layer * sv_l + n3 * sv_n + h3 * sv_h
        y = tl.load(v_row + d3, mask=row_mask & dm, other=0.0)
        if PATCH_V:
            rank_v = tl.load(rv_ptr + layer)
            av = av_ptr + tl.load(av_off_ptr + layer)
            bv = bv_ptr + tl.load(bv_off_ptr + layer)
            y = y.to(tl.float32) + _patch_tile(av, bv, rank_v, n3, h3, d3, H, D, row_mask, dm & (h3 < H))
        tl.store(out3 + so_kv + d3, y.to(out_ptr.dtype.element_ty), mask=st_mask & dm)


@triton.jit
def gather_kernel(
    cache_ptr, cache_loff_ptr,           # cache of layer 0; [L] int64 element offsets of each layer's
    sc_kv, sc_blk, sc_off, sc_h,         # cache strides: K->V plane, block, in-block offset, head
    slot_ptr, block_size,                # [N] slots
    k_ptr, v_ptr,                        # outputs [L, N, H, D] (v unused without HAS_V)
    so_l, so_n, so_h,                    # output strides (same for k and v)
    N, H,
    D: tl.constexpr, HAS_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    layer = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    n_ok = n < N
    slot = tl.load(slot_ptr + n, mask=n_ok, other=0).to(tl.int64)
    src = (cache_ptr + tl.load(cache_loff_ptr + layer)
           + (slot // block_size) * sc_blk + (slot % block_size) * sc_off)
    src3 = src[:, None, None] + h[None, :, None] * sc_h + d[None, None, :]
    mask = n_ok[:, None, None] & (h[None, :, None] < H) & (d[None, None, :] < D)
    dst3 = layer * so_l + n[:, None, None] * so_n + h[None, :, None] * so_h + d[None, None, :]
    kk = tl.load(src3, mask=mask)
    tl.store(k_ptr + dst3, kk.to(k_ptr.dtype.element_ty), mask=mask)
    if HAS_V:
        vv = tl.load(src3 + sc_kv, mask=mask)
        tl.store(v_ptr + dst3, vv.to(v_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
def _tiles(num_heads: int, head_dim: int, rotary_dim: int) -> tuple[int, int, int, int, int]:
    block_h = triton.next_power_of_2(num_heads)
    block_d = triton.next_power_of_2(head_dim)
    block_r = max(2, triton.next_power_of_2(rotary_dim))
    # ~4k elements per tile: enough bytes in flight per SM, few enough registers for x, partner, v
    block_n = max(1, min(64, 4096 // (block_h * block_d)))
    num_warps = 4 if block_n * block_h * block_d >= 2048 else 2
    return block_n, block_h, block_d, block_r, num_warps


def launch_relocate_scatter(k, v, dest, ang, rope, fk, fv) -> None:
    """Launch `relocate_scatter_kernel` over `k, v: [L, N, H, D]` (v may be None).

    dest: `kvreuse.ops.plan.Dest`; ang: `plan.Angles`; fk, fv: `plan.FactorPack | None`; rope: RopeSpec.
    """
    L, N, H, D = k.shape
    if N == 0 or L == 0:
        return
    assert k.stride(-1) == 1 and (v is None or v.stride(-1) == 1), "head_dim must be contiguous"
    block_n, block_h, block_d, block_r, num_warps = _tiles(H, D, rope.rotary_dim)
    dummy_f = ang.cos if ang.use_table else ang.t_src
    dummy_i = dest.layer_off
    vv = v if v is not None else k
    slots = dest.slots if dest.slots is not None else dummy_i
    pk, pv = fk, fv
    grid = (triton.cdiv(N, block_n), L)
    relocate_scatter_kernel[grid](
        k, vv, k.stride(0), k.stride(1), k.stride(2), vv.stride(0), vv.stride(1), vv.stride(2),
        dest.base, dest.layer_off, dest.s_kv, dest.s_blk, dest.s_off, dest.s_h,
        slots, dest.block_size, dest.num_slots,
        ang.cos if ang.use_table else dummy_f, ang.sin if ang.use_table else dummy_f,
        ang.cos.stride(0) if ang.use_table else 0,
        ang.t_src if not ang.use_table else dummy_f, ang.t_dst if not ang.use_table else dummy_f,
        0 if ang.use_table else (ang.t_src.stride(0) if ang.t_src.shape[0] > 1 else 0),
        0 if ang.use_table else (ang.t_dst.stride(0) if ang.t_dst.shape[0] > 1 else 0),
        ang.inv_freq if not ang.use_table else dummy_f, ang.axis if not ang.use_table else dummy_i,
        float(ang.mscale),
        pk.a_base if pk else k, pk.a_off if pk else dummy_i, pk.b_base if pk else k,
        pk.b_off if pk else dummy_i, pk.ranks if pk else dummy_i,
        pv.a_base if pv else k, pv.a_off if pv else dummy_i, pv.b_base if pv else k,
        pv.b_off if pv else dummy_i, pv.ranks if pv else dummy_i,
        N, H,
        D=D, ROT_LO=rope.rot_offset, ROT_DIM=rope.rotary_dim, IS_NEOX=rope.is_neox,
        HAS_V=v is not None, HAS_SLOTS=dest.slots is not None, USE_TABLE=ang.use_table,
        ROW_ROUND=ang.row_round, NORMALIZE=ang.normalize,
        PATCH_K=pk is not None, PATCH_V=pv is not None,
        BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_R=block_r,
        num_warps=num_warps, enable_fp_fusion=False,
    )


def launch_gather(dest, k_out, v_out) -> None:
    """Launch `gather_kernel`: read `dest`'s slots into `k_out, v_out: [L, N, H, D]` (v_out None: K only)."""
    L, N, H, D = k_out.shape
    if N == 0 or L == 0:
        return
    assert (v_out is None or k_out.stride() == v_out.stride()) and k_out.stride(-1) == 1
    block_n, block_h, block_d, _, num_warps = _tiles(H, D, 2)
    grid = (triton.cdiv(N, block_n), L)
    gather_kernel[grid](
        dest.base, dest.layer_off, dest.s_kv, dest.s_blk, dest.s_off, dest.s_h,
        dest.slots, dest.block_size,
        k_out, v_out if v_out is not None else k_out, k_out.stride(0), k_out.stride(1), k_out.stride(2),
        N, H, D=D, HAS_V=v_out is not None, BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
    )
