"""kvreuse's paged layout and fused kernels against vLLM 0.32's own code, on CPU (Triton interpreter).

Caches are allocated exactly as vLLM does (`get_kv_cache_config_from_groups` + `allocate_kv_cache`
under each `KVCacheLayout`, kernel block split included); FlashAttention's reading is vLLM's own
`kv_cache.transpose(1, 2).split(head_size, -1)`; the writer is vLLM's Triton
`triton_reshape_and_cache_flash`; attention is vLLM's Triton `unified_attention` (TRITON_ATTN) and,
for the MLA latent cache, its Triton MLA decode (TRITON_MLA) with the CPU MLA backend's writer;
CPU_ATTN's transposed pages are checked against vLLM's C++ CPU writer.
`tests/support/vllm_triton.py` explains how vLLM's kernels run here.

Comparisons: pure copies (gather, V) are bit-exact; K passes through one fp32 -> 16-bit rounding,
which Triton's interpreter does not always round to nearest, so K is compared within one rounding.
"""

from __future__ import annotations

import math
import zlib
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("triton")

from vllm.config import CacheConfig  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups  # noqa: E402
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheGroupSpec, KVCacheLayout,  # noqa: E402
                                        MLAAttentionSpec)
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402

from kvreuse.layout import KV_CACHE_LAYOUTS, Reading, allocate, layouts_from_kv_cache_config  # noqa: E402
from kvreuse.ops import gather, place  # noqa: E402
from kvreuse.ops.reference import relocate_reference  # noqa: E402
from kvreuse.paged import block_slots  # noqa: E402
from kvreuse.rope import freqs  # noqa: E402
from kvreuse.rope.spec import RopeSpec  # noqa: E402

from tests.kernels.cases import assert_bitwise, assert_close_rounding  # noqa: E402
from tests.support import vllm_triton  # noqa: E402

WRITER = "vllm.v1.attention.ops.triton_reshape_and_cache_flash"
HELPERS = "vllm.v1.attention.ops.triton_attention_helpers"
UNIFIED = "vllm.v1.attention.ops.triton_unified_attention"
DECODE = "vllm.v1.attention.ops.triton_decode_attention"
LAYOUTS = list(KV_CACHE_LAYOUTS)   # FlashAttention declares no layout set: vLLM accepts all six


@pytest.fixture(scope="module")
def vk(kernel_device):
    """vLLM's Triton writer, unified attention and MLA decode, interpreted (fresh module copies)."""
    if kernel_device != "cpu":
        pytest.skip("the interpreter proof runs on CPU hosts")
    mods = vllm_triton.load(WRITER, HELPERS, UNIFIED, DECODE)
    return SimpleNamespace(writer=mods[WRITER], unified=mods[UNIFIED], decode=mods[DECODE])


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def kernel_block(kv_layout: str, block_size: int, kernel_block_size: int) -> int:
    """What `prepare_kernel_block_sizes` picks: block-outermost layouts (other layers' pages between a
    block's kernel blocks) keep the scheduler's block; the others split to the backend's size."""
    return block_size if KVCacheLayout[kv_layout].is_block_outermost else kernel_block_size


def vllm_caches(kv_layout: str, spec, num_layers: int, num_blocks: int, kernel_block_size: int | None = None):
    """Per-layer caches from vLLM's own KV cache config and allocator; and kvreuse's layouts of them."""
    cc = CacheConfig(block_size=spec.block_size)
    cc.kv_cache_layout = kv_layout
    vcfg = SimpleNamespace(cache_config=cc, attention_config=SimpleNamespace(hisparse_config=None))
    names = [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]
    cfg = get_kv_cache_config_from_groups(vcfg, [KVCacheGroupSpec(names, spec)],
                                          num_blocks * num_layers * spec.page_size_bytes)
    assert cfg.num_blocks == num_blocks
    kbs = kernel_block(kv_layout, spec.block_size, kernel_block_size or spec.block_size)
    kv_caches = allocate_kv_cache(cfg, torch.device("cpu"), KVCacheLayout[kv_layout], [kbs])
    backend = "TRITON_MLA" if isinstance(spec, MLAAttentionSpec) else "FLASH_ATTN"
    layouts = layouts_from_kv_cache_config(kv_caches, cfg, {n: backend for n in names}, kv_cache_dtype="auto",
                                           kv_layout=kv_layout)
    return [kv_caches[n] for n in names], layouts[names[0]]


def flash_views(cache: torch.Tensor, head_size: int):
    """FlashAttention's reading (vllm/v1/attention/backends/flash_attn.py): [B, N, H, D] K and V."""
    return cache.transpose(1, 2).split(head_size, dim=-1)


def vllm_write(vk, cache, head_size, k, v, slots):
    key_cache, value_cache = flash_views(cache, head_size)
    one = torch.tensor(1.0)
    with vllm_triton.cuda_capability(9, 0):
        vk.writer.triton_reshape_and_cache_flash(k, v, key_cache, value_cache, slots, "auto", one, one)


def rope_for(head_size: int, rotary_dim: int | None = None, **kw) -> RopeSpec:
    rd = rotary_dim or head_size
    return RopeSpec(inv_freq=freqs.default_inv_freq(10000.0, rd), rotary_dim=rd, **kw)


def test_layout_table_is_vllms():
    """kvreuse's copy of KVCacheLayout (kept as data for hosts without vLLM) is vLLM's."""
    assert {m.name: m.value for m in KVCacheLayout} == KV_CACHE_LAYOUTS
    for m in KVCacheLayout:
        view_order = tuple(i - 1 for i in KV_CACHE_LAYOUTS[m.name] if i != 0)
        assert view_order == m.layer_view_order


# (heads, head_size, dtype, manager block size, kernel block size, start offset, chunk length)
GEOMETRIES = [
    (3, 40, torch.bfloat16, 16, 16, 5, 37),      # odd heads, head size 40, mid-block start
    (5, 72, torch.float16, 64, 64, 23, 50),
    (1, 24, torch.bfloat16, 64, 16, 61, 20),     # vLLM splits 64-token blocks into 16-token kernel blocks
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: f"h{g[0]}d{g[1]}b{g[3]}k{g[4]}")
@pytest.mark.parametrize("kv_layout", LAYOUTS)
def test_layout_matches_vllm_and_gather_reads_vllm_writer(vk, kv_layout, geom):
    h, d, dtype, bs, kbs, start, n = geom
    gen = _gen(kv_layout, geom)
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=h, head_size=d, dtype=dtype)
    caches, layout = vllm_caches(kv_layout, spec, 2, 6, kbs)
    kbs = kernel_block(kv_layout, bs, kbs)
    assert (layout.block_size, layout.kernel_block_size, layout.num_heads, layout.head_size) == (bs, kbs, h, d)
    if kbs == bs:   # kvreuse's own allocator (bench / GPU check, no vLLM there) strides as vLLM does
        ours, ours_layout = allocate(kv_layout, Reading.KV_SPLIT, num_layers=2, num_blocks=6, num_heads=h,
                                     block_size=bs, head_size=d, dtype=dtype)
        assert ours_layout.strides == layout.strides and ours[1].data_ptr() - ours[0].data_ptr() == \
            caches[1].data_ptr() - caches[0].data_ptr()
    blocks = torch.randperm(6, generator=gen)[: -(-(start + n) // bs)].tolist()
    slots = block_slots(blocks, bs, start, start + n)
    k = torch.randn(2, n, h, d, generator=gen).to(dtype)
    v = torch.randn(2, n, h, d, generator=gen).to(dtype)
    for layer, cache in enumerate(caches):
        vllm_write(vk, cache, d, k[layer], v[layer], slots)
    for backend in ("triton", "reference"):
        gk, gv = gather(caches, layout, slots, backend=backend)
        assert_bitwise(gk, k, f"{backend} K")
        assert_bitwise(gv, v, f"{backend} V")


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: f"h{g[0]}d{g[1]}b{g[3]}k{g[4]}")
@pytest.mark.parametrize("kv_layout", LAYOUTS)
def test_vllm_reads_what_kvreuse_placed(vk, kv_layout, geom):
    """Fused place (relocate src -> dst) == vLLM's writer given the dense relocated K/V, byte for byte."""
    h, d, dtype, bs, kbs, start, n = geom
    gen = _gen("place", kv_layout, geom)
    rope = rope_for(d, d - 8 if d > 32 else None, rot_offset=4 if d > 32 else 0)
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=h, head_size=d, dtype=dtype)
    placed, layout = vllm_caches(kv_layout, spec, 2, 6, kbs)
    written, _ = vllm_caches(kv_layout, spec, 2, 6, kbs)
    blocks = torch.randperm(6, generator=gen)[: -(-(start + n) // bs)].tolist()
    slots = block_slots(blocks, bs, start, start + n)
    k = torch.randn(2, n, h, d, generator=gen).to(dtype)
    v = torch.randn(2, n, h, d, generator=gen).to(dtype)
    src = torch.arange(n) + 3000
    dst = torch.arange(start, start + n)
    place(placed, layout, k, v, src, dst, slots, rope, backend="triton")
    k_dense = relocate_reference(k, src, dst, rope)                   # [L, n, H, D]
    for layer in range(2):
        vllm_write(vk, written[layer], d, k_dense[layer], v[layer], slots)
        kp, vp = flash_views(placed[layer], d)
        kw, vw = flash_views(written[layer], d)
        assert_close_rounding(kp, kw, f"K layer {layer}")             # whole cache: no stray writes either
        assert_bitwise(vp, vw, f"V layer {layer}")


def _torch_attention(q, k, v, ctx_len):
    """fp32 causal attention of the last q.shape[0] positions over k, v: [ctx_len, H, D] (GQA)."""
    rep = q.shape[1] // k.shape[1]
    kq, vq = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kq) / math.sqrt(q.shape[-1])
    qpos = torch.arange(ctx_len - q.shape[0], ctx_len)
    s = s.masked_fill(torch.arange(ctx_len)[None, :] > qpos[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), vq)


@pytest.mark.parametrize("kv_layout,dtype,bs,kbs", [("LBNHC", torch.float16, 16, 16), ("LBHNC", torch.float16, 64, 16),
                                                    ("LHBNC", torch.float32, 64, 64)])
def test_unified_attention_over_placed_chunk(vk, kv_layout, dtype, bs, kbs):
    """vLLM's Triton attention over [prefix | placed relocated chunk] == over [prefix | dense relocated chunk].

    (Triton's interpreter cannot run vLLM's attention on bf16 operands; fp16 and fp32 here.)
    """
    h, qh, d, prefix, n = 3, 6, 64, 21, 30
    gen = _gen("attn", kv_layout, str(dtype), bs)
    rope = rope_for(d)
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=h, head_size=d, dtype=dtype)
    placed, layout = vllm_caches(kv_layout, spec, 1, 5, kbs)
    written, _ = vllm_caches(kv_layout, spec, 1, 5, kbs)
    blocks = torch.randperm(5, generator=gen)[: -(-(prefix + n) // bs)].tolist()
    ctx = prefix + n
    slots = block_slots(blocks, bs, 0, ctx)
    kp, vp = torch.randn(prefix, h, d, generator=gen).to(dtype), torch.randn(prefix, h, d, generator=gen).to(dtype)
    k, v = torch.randn(n, h, d, generator=gen).to(dtype), torch.randn(n, h, d, generator=gen).to(dtype)
    src, dst = torch.arange(n) + 5000, torch.arange(prefix, ctx)
    k_dense = relocate_reference(k, src, dst, rope)
    for cache in (placed[0], written[0]):
        vllm_write(vk, cache, d, kp, vp, slots[:prefix])
    vllm_write(vk, written[0], d, k_dense, v, slots[prefix:])
    place(placed[0], layout, k, v, src, dst, slots[prefix:], rope, backend="triton")
    q = torch.randn(n, qh, d, generator=gen).to(dtype)
    # vLLM attends over kernel blocks: its block table maps scheduler block b to kernel blocks b * r + j
    r = bs // layout.kernel_block_size
    table = (torch.tensor(blocks)[:, None] * r + torch.arange(r)).flatten()[None].to(torch.int32)
    outs = []
    for cache in (placed[0], written[0]):
        key_cache, value_cache = flash_views(cache, d)
        out = torch.full_like(q, float("nan"))
        with vllm_triton.interpreted_stdlib():
            vk.unified.unified_attention(
                q=q, k=key_cache, v=value_cache, out=out, cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
                max_seqlen_q=n, seqused_k=torch.tensor([ctx], dtype=torch.int32), max_seqlen_k=ctx,
                softmax_scale=1 / math.sqrt(d), causal=True, window_size=(-1, -1), block_table=table, softcap=0.0,
                q_descale=None, k_descale=None, v_descale=None)
        outs.append(out)
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    want = _torch_attention(q, torch.cat([kp, k_dense]), torch.cat([vp, v]), ctx)
    torch.testing.assert_close(outs[0].float(), want, atol=3e-3 if dtype == torch.float16 else 2e-5, rtol=3e-3)


# ---------------------------------------------------------------------------------------------- MLA
def _mla_spec(bs, lora, rope_dim, dtype):
    return MLAAttentionSpec(block_size=bs, num_kv_heads=1, head_size=lora + rope_dim, dtype=dtype,
                            cache_dtype_str="auto")


def _cpu_mla_write(cache, kv_c, k_pe, slots):
    """vLLM's CPU MLA backend writer (CPUMLAImpl.do_kv_cache_update) on the [B, N, C] latent view."""
    from vllm.v1.attention.backends.mla.cpu_mla import CPUMLAImpl

    CPUMLAImpl.do_kv_cache_update(None, kv_c, k_pe.unsqueeze(1), cache.squeeze(1), slots, "auto", torch.tensor(1.0))


@pytest.mark.parametrize("bs,lora,rope_dim,start,n,dtype", [(16, 48, 16, 7, 29, torch.bfloat16),
                                                            (64, 96, 32, 40, 45, torch.float16)])
def test_mla_latent_cache(vk, bs, lora, rope_dim, start, n, dtype):
    """MLA: kvreuse gathers what vLLM's MLA writer wrote; places k_pe-relocated latents vLLM then reads."""
    gen = _gen("mla", bs, lora)
    spec = _mla_spec(bs, lora, rope_dim, dtype)
    caches, layout = vllm_caches("LBNHC", spec, 2, 5)
    assert layout.reading is Reading.MLA and not layout.has_v and layout.num_heads == 1
    blocks = torch.randperm(5, generator=gen)[: -(-(start + n) // bs)].tolist()
    slots = block_slots(blocks, bs, start, start + n)
    lat = torch.randn(2, n, 1, lora + rope_dim, generator=gen).to(dtype)   # [kv_c | k_pe] per token
    for layer in range(2):
        _cpu_mla_write(caches[layer], lat[layer, :, 0, :lora], lat[layer, :, 0, lora:], slots)
    gk, gv = gather(caches, layout, slots, backend="triton")
    assert_bitwise(gk, lat, "latent")
    assert gv.shape == (2, n, 1, 0)
    # place relocated latents (RoPE on the k_pe tail, GPT-J pairs as vLLM's MLA) vs the writer given dense ones
    rope = rope_for(lora + rope_dim, rope_dim, rot_offset=lora, is_neox=False)
    placed, _ = vllm_caches("LBNHC", spec, 2, 5)
    written, _ = vllm_caches("LBNHC", spec, 2, 5)
    src, dst = torch.arange(n) + 777, torch.arange(start, start + n)
    place(placed, layout, lat, None, src, dst, slots, rope, backend="triton")
    dense = relocate_reference(lat, src, dst, rope)
    assert torch.equal(dense[..., :lora], lat[..., :lora])             # kv_c does not move
    for layer in range(2):
        _cpu_mla_write(written[layer], dense[layer, :, 0, :lora], dense[layer, :, 0, lora:], slots)
        assert_bitwise(placed[layer][..., :lora], written[layer][..., :lora], "kv_c")
        assert_close_rounding(placed[layer], written[layer], "latent")


@pytest.mark.parametrize("kv_layout", ["LBNHC", "BLNHC"])
def test_triton_mla_decode_over_placed_chunk(vk, kv_layout):
    """vLLM's Triton MLA decode over a placed relocated latent chunk == the same over dense latents."""
    bs, lora, rope_dim, qh, prefix, n, dtype = 16, 64, 16, 4, 9, 27, torch.float16
    gen = _gen("mla-decode", kv_layout)
    spec = _mla_spec(bs, lora, rope_dim, dtype)
    placed, layout = vllm_caches(kv_layout, spec, 2, 4)
    rope = rope_for(lora + rope_dim, rope_dim, rot_offset=lora, is_neox=False)
    blocks = torch.randperm(4, generator=gen)[: -(-(prefix + n) // bs)].tolist()
    ctx = prefix + n
    slots = block_slots(blocks, bs, 0, ctx)
    pre = torch.randn(prefix, 1, lora + rope_dim, generator=gen).to(dtype)
    lat = torch.randn(n, 1, lora + rope_dim, generator=gen).to(dtype)
    src, dst = torch.arange(n) + 4000, torch.arange(prefix, ctx)
    place(placed[1], layout, pre, None, torch.arange(prefix), torch.arange(prefix), slots[:prefix], rope,
          backend="triton")
    place(placed[1], layout, lat, None, src, dst, slots[prefix:], rope, backend="triton")
    dense = torch.cat([pre, relocate_reference(lat, src, dst, rope)])     # [ctx, 1, C]
    q = torch.randn(3, qh, lora + rope_dim, generator=gen).to(dtype)      # 3 decode requests, same context
    splits = 2
    out = torch.zeros(3, qh, lora, dtype=dtype)
    lse = torch.zeros(3, qh, dtype=dtype)
    logits = torch.empty(3, qh, splits, lora + 1, dtype=torch.float32)
    kv = placed[1].squeeze(1).unsqueeze(2)                              # as TRITON_MLA binds and views it
    with vllm_triton.interpreted_stdlib():
        vk.decode.decode_attention_fwd(q, kv, kv[..., :lora], out, lse,
                                       torch.tensor([blocks] * 3, dtype=torch.int32),
                                       torch.tensor([ctx] * 3, dtype=torch.int32), logits, splits,
                                       1 / math.sqrt(lora + rope_dim), bs, is_mla=True)
    s = torch.einsum("bhc,kc->bhk", q.float(), dense[:, 0].float()) / math.sqrt(lora + rope_dim)
    want = torch.einsum("bhk,kc->bhc", s.softmax(-1), dense[:, 0, :lora].float())
    torch.testing.assert_close(out.float(), want, atol=3e-3, rtol=3e-3)


# ---------------------------------------------------------------------------------------------- CPU_ATTN
AMX = torch.cpu._is_amx_tile_supported()


@pytest.mark.parametrize("dtype,bs,h,d,start,n", [
    (torch.float32, 32, 3, 64, 9, 40), (torch.bfloat16, 128, 2, 80, 100, 61),
    pytest.param(torch.bfloat16, 128, 2, 64, 100, 61, marks=pytest.mark.skipif(not AMX, reason="no AMX tiles")),
    pytest.param(torch.bfloat16, 32, 3, 128, 5, 70, marks=pytest.mark.skipif(not AMX, reason="no AMX tiles"))])
def test_cpu_attn_layout_matches_vllm_cpu_writer(dtype, bs, h, d, start, n):
    """CPU_ATTN (LBHNC, Kᵀ then V per block and head; tiled where vLLM picks its AMX kernels): vLLM's C++
    writer vs kvreuse's gather and place."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, bs, d)
    gen = _gen("cpu", str(dtype), bs)
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=h, head_size=d, dtype=dtype)

    def caches():
        cc = CacheConfig(block_size=bs)
        cc.kv_cache_layout = "LBHNC"
        vcfg = SimpleNamespace(cache_config=cc, attention_config=SimpleNamespace(hisparse_config=None))
        names = ["model.layers.0.self_attn.attn"]
        cfg = get_kv_cache_config_from_groups(vcfg, [KVCacheGroupSpec(names, spec)], 4 * spec.page_size_bytes)
        kv = allocate_kv_cache(cfg, torch.device("cpu"), KVCacheLayout.LBHNC, [bs])
        return kv[names[0]], layouts_from_kv_cache_config(kv, cfg, {names[0]: "CPU_ATTN"}, kv_cache_dtype="auto",
                                                          kv_layout="LBHNC", isas={names[0]: isa})[names[0]]

    def vllm_cpu_write(cache, k, v, slots):   # as CPUAttentionBackendImpl.do_kv_cache_update does
        key_cache, value_cache = cache.view(cache.shape[0], h, bs * 2, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)

    blocks = torch.randperm(4, generator=gen)[: -(-(start + n) // bs)].tolist()
    slots = block_slots(blocks, bs, start, start + n)
    k, v = torch.randn(n, h, d, generator=gen).to(dtype), torch.randn(n, h, d, generator=gen).to(dtype)
    cache, layout = caches()
    assert layout.reading is (Reading.CPU_ATTN_AMX if isa == "amx" else Reading.CPU_ATTN)
    assert layout.kernel_strides() is None
    vllm_cpu_write(cache, k, v, slots)
    gk, gv = gather(cache, layout, slots)
    assert_bitwise(gk, k, "K")
    assert_bitwise(gv, v, "V")
    rope = rope_for(d)
    placed, _ = caches()
    written, _ = caches()
    src, dst = torch.arange(n) + 900, torch.arange(start, start + n)
    place(placed, layout, k, v, src, dst, slots, rope)                  # CPU: the reference path
    vllm_cpu_write(written, relocate_reference(k, src, dst, rope), v, slots)
    assert_bitwise(placed, written, "cache")


def test_cpu_attn_amx_tiles():
    """The AMX page as vLLM 0.32's writer lays it out (read with isa="amx" on a CPU with AMX tiles; checked
    against the writer itself above and at every connector start): keys in 16-token tiles with pairs of dims
    innermost, then values in 16-dim tiles with pairs of tokens innermost."""
    from kvreuse.layout import PagedLayout
    from kvreuse.paged import gather_kv, scatter_kv

    n, h, d = 64, 2, 32
    cache = torch.zeros(3, h, n, 2 * d)
    lay = PagedLayout(Reading.CPU_ATTN_AMX, 3, h, n, d, d, tuple(cache.stride()), cache.dtype, n, "CPU_ATTN")
    t = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, h, d)
    dim = torch.arange(d, dtype=torch.float32)[None, None, :].expand(n, h, d)
    for kv_is_t in (True, False):
        cache.zero_()
        scatter_kv(cache, lay, t if kv_is_t else dim, t if kv_is_t else dim, torch.arange(n, 2 * n))
        page = cache[1, 1].reshape(-1)                       # block 1, head 1
        for tok, dd in ((0, 1), (1, 0), (17, 3), (40, 30)):
            k_at = (tok // 16) * 16 * d + (dd // 2) * 32 + (tok % 16) * 2 + dd % 2
            v_at = n * d + (dd // 16) * 16 * n + (tok // 2) * 32 + (dd % 16) * 2 + tok % 2
            expect = float(tok if kv_is_t else dd)
            assert page[k_at] == expect and page[v_at] == expect, (tok, dd)
        k, v = gather_kv(cache, lay, torch.arange(n, 2 * n))
        assert torch.equal(k, t if kv_is_t else dim) and torch.equal(v, t if kv_is_t else dim)
