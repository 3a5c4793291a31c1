"""Read a `RopeSpec` off a vLLM rotary module (imports vLLM; only the connector and tests use it)."""

from __future__ import annotations

import dataclasses

import torch

from kvreuse.errors import UnsupportedRope


def spec_from_vllm(cls, rotary_emb: torch.nn.Module, *, rot_offset: int = 0):
    from vllm.model_executor.layers import rotary_embedding as re

    refuse = {
        "DynamicNTKScalingRotaryEmbedding": "dynamic NTK rescales the base with the sequence length",
        "DynamicNTKAlphaRotaryEmbedding": "dynamic NTK (alpha) rescales the base with the sequence length",
        "Phi3LongRoPEScaledRotaryEmbedding": "LongRoPE switches factors at a sequence-length threshold",
        "DualChunkRotaryEmbedding": "dual-chunk attention maps positions into chunk-local frames",
    }
    name = type(rotary_emb).__name__
    if name in refuse:
        raise UnsupportedRope(f"{name} cannot be relocated exactly: {refuse[name]}")

    rd = rotary_emb.rotary_dim
    kw = dict(rotary_dim=rd, is_neox=bool(rotary_emb.is_neox_style), rot_offset=rot_offset,
              base=float(rotary_emb.base))
    if type(rotary_emb) in (re.RotaryEmbedding,):
        spec = cls(inv_freq=rotary_emb._compute_inv_freq(rotary_emb.base), scaling="default", **kw)
    elif isinstance(rotary_emb, re.LinearScalingRotaryEmbedding):
        factors = rotary_emb.scaling_factors
        if len(factors) != 1:
            raise UnsupportedRope("linear scaling with several factors selects a table per request")
        spec = cls(inv_freq=rotary_emb._compute_inv_freq(rotary_emb.base), position_divisor=float(factors[0]),
                   scaling="linear", **kw)
    elif isinstance(rotary_emb, re.Llama3RotaryEmbedding):
        spec = cls(inv_freq=rotary_emb._compute_inv_freq(rotary_emb.base), scaling="llama3", **kw)
    elif isinstance(rotary_emb, (re.YaRNScalingRotaryEmbedding, re.DeepseekScalingRotaryEmbedding)) \
            and type(rotary_emb).__name__ in ("YaRNScalingRotaryEmbedding", "DeepseekScalingRotaryEmbedding"):
        scaling = "yarn" if isinstance(rotary_emb, re.YaRNScalingRotaryEmbedding) else "deepseek_yarn"
        spec = cls(inv_freq=rotary_emb._compute_inv_freq(rotary_emb.scaling_factor),
                   mscale=float(rotary_emb.mscale), scaling=scaling, **kw)
    elif isinstance(rotary_emb, re.MRotaryEmbedding):
        inv = rotary_emb._compute_inv_freq(rotary_emb.base if rotary_emb.scaling_factor is None
                                           else rotary_emb.scaling_factor)
        spec = cls(inv_freq=inv, mscale=float(rotary_emb.mscale),
                   mrope_section=tuple(rotary_emb.mrope_section),
                   mrope_interleaved=bool(rotary_emb.mrope_interleaved),
                   scaling="mrope" if rotary_emb.scaling_factor is None else "mrope_yarn", **kw)
    else:
        raise UnsupportedRope(f"{name} is not known to kvreuse; it cannot be relocated exactly")

    cache = getattr(rotary_emb, "cos_sin_cache", None)
    if cache is None:
        raise UnsupportedRope(f"{name} has no cos_sin_cache to check against")
    spec = dataclasses.replace(spec, max_position=int(cache.shape[0]))
    _verify(spec, cache, name)
    return spec


def _verify(spec, cache: torch.Tensor, name: str) -> None:
    """Our table must equal the module's at sampled rows (after the module's own dtype cast)."""
    n = cache.shape[0]
    rows = torch.unique(torch.tensor([0, 1, 2, 3, 17, n // 3, n // 2, n - 2, n - 1]).clamp(0, n - 1))
    cos, sin = spec.cos_sin(rows, with_mscale=True) if spec.mrope_section is None else \
        _scalar_rows(spec, rows)
    ours = torch.cat([cos, sin], dim=-1).to(cache.dtype)
    theirs = cache[rows.to(cache.device)].cpu()
    if not torch.equal(ours, theirs):
        worst = (ours.float() - theirs.float()).abs().max().item()
        raise UnsupportedRope(f"{name}: kvreuse's rotary table differs from the module's (max |diff| {worst:.3g}); "
                              "refusing to relocate approximately")


def _scalar_rows(spec, rows):
    # M-RoPE tables are indexed by one scalar position per axis; text rows use the same on all axes.
    pos = rows.view(1, -1).expand(3, -1)
    return spec.cos_sin(pos, with_mscale=True)
