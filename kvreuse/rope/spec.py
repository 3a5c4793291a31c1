"""`RopeSpec`: everything relocation needs to know about a model's rotary embedding.

A spec reproduces the serving engine's fp32 angle table (`angle = fl32(fl32(p / s) * inv_freq)`)
so that relocating a key by `p -> p'` means "undo the table's rotation at p, apply the table's
rotation at p'" — exactly what a re-prefill at p' would have written, up to one rounding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from kvreuse.errors import UnsupportedRope
from kvreuse.rope import freqs

# HF model types whose rotary pairs are interleaved (GPT-J style) rather than split halves.
_GPTJ_STYLE_MODEL_TYPES = frozenset({"gptj", "codegen", "deepseek_v2", "chatglm", "glm"})
# HF model types that encode positions without RoPE (learned absolute positions, ALiBi): a chunk's KV holds
# its positions in every layer's input, so it cannot be moved.  Falcon uses ALiBi where `alibi` is set.
_NO_ROPE_MODEL_TYPES = frozenset({"gpt2", "gpt_bigcode", "opt", "bloom", "mpt", "jais", "gpt_neo", "biogpt",
                                  "xglm", "bert", "roberta", "xlm-roberta"})
_LENGTH_DEPENDENT = {
    "dynamic": "dynamic NTK rescales the base with the sequence length, so a chunk's keys depend on "
               "how long the prompt was when they were computed",
    "longrope": "LongRoPE switches between short and long factors at a sequence-length threshold",
    "su": "LongRoPE ('su') switches between short and long factors at a sequence-length threshold",
    "dual_chunk": "dual-chunk attention maps positions into chunk-local frames",
}


@dataclass(frozen=True, eq=False)
class RopeSpec:
    """Rotary embedding of one model, enough to move post-RoPE keys to new positions.

    Attributes:
        rotary_dim: number of rotated channels (partial rotary: less than the head dim).
        inv_freq: fp32 inverse frequencies, `[rotary_dim // 2]`, bit-equal to the engine's.
        is_neox: True for split halves (NeoX / Llama), False for interleaved pairs (GPT-J).
        position_divisor: linear scaling divides positions by this (in fp32) before the product.
        mscale: magnitude factor folded into cos/sin (YaRN attention factor); relocation cancels it.
        mrope_section: (t, h, w) frequency counts for M-RoPE (Qwen2-VL family), else None.
        mrope_interleaved: frequencies cycle t,h,w,t,h,w... (Qwen3-VL) instead of contiguous sections.
        rot_offset: first rotated channel inside the stored vector (MLA: `kv_lora_rank`, the rotary
            `k_pe` sits after the latent `kv_c`).
        max_position: positions must lie in `[0, max_position)` when set (the engine's table size).
        scaling: name of the scheme, for messages and fingerprints.
    """

    rotary_dim: int
    inv_freq: torch.Tensor
    is_neox: bool = True
    position_divisor: float = 1.0
    mscale: float = 1.0
    mrope_section: tuple[int, int, int] | None = None
    mrope_interleaved: bool = False
    rot_offset: int = 0
    max_position: int | None = None
    scaling: str = "default"
    base: float = 10000.0
    _axis_of_freq: torch.Tensor | None = field(default=None, repr=False)
    _tables: dict = field(default_factory=dict, init=False, repr=False)  # (dtype, device) -> rows 0.. (`table_rows`)

    def __post_init__(self) -> None:
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even number, got {self.rotary_dim}")
        inv = torch.as_tensor(self.inv_freq, dtype=torch.float32).detach().cpu().contiguous()
        if inv.shape != (self.rotary_dim // 2,):
            raise ValueError(f"inv_freq must have shape [{self.rotary_dim // 2}], got {list(inv.shape)}")
        object.__setattr__(self, "inv_freq", inv)
        if self.rot_offset < 0:
            raise ValueError(f"rot_offset must be >= 0, got {self.rot_offset}")
        if self.mrope_section is not None:
            section = tuple(int(s) for s in self.mrope_section)
            if len(section) != 3 or sum(section) != self.rotary_dim // 2:
                raise ValueError(f"mrope_section {section} must have 3 entries summing to rotary_dim // 2 "
                                 f"= {self.rotary_dim // 2}")
            object.__setattr__(self, "mrope_section", section)
            object.__setattr__(self, "_axis_of_freq", _mrope_axes(section, self.rotary_dim // 2,
                                                                   self.mrope_interleaved))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf_config(cls, config: Any, *, rot_offset: int | None = None, is_neox: bool | None = None,
                       layer_type: str | None = None) -> "RopeSpec":
        """Build from a transformers config (or a plain dict).

        Handles `rope_parameters` (transformers >= 5) and `rope_theta` + `rope_scaling` (older),
        partial rotary (`partial_rotary_factor`, `rotary_pct`, or an explicit `rotary_dim` as in
        GPT-J), text configs nested in VLM configs, per-layer-type parameters (Gemma 3: pass
        `layer_type="full_attention"` or `"sliding_attention"`), and MLA (`kv_lora_rank`): then the
        rotary part is `qk_rope_head_dim` GPT-J-paired channels at `rot_offset` (default
        `kv_lora_rank`, vLLM's latent-cache layout `[kv_c | k_pe]`).  `is_neox` overrides the layout
        guess (e.g. HF's DeepSeek-V3 cache stores `k_pe` de-interleaved: `is_neox=True`).
        """
        cfg = _as_dict(config)
        if isinstance(cfg.get("text_config"), Mapping) or hasattr(cfg.get("text_config"), "to_dict"):
            text = _as_dict(cfg["text_config"])
            cfg = {**cfg, **{k: v for k, v in text.items() if v is not None}}
        params = dict(cfg.get("rope_parameters") or {})
        if params and all(isinstance(v, Mapping) for v in params.values()):
            if layer_type is None:
                raise UnsupportedRope(f"this model uses a different RoPE per layer type ({', '.join(sorted(params))}); "
                                      "build one RopeSpec per type with layer_type=...")
            if layer_type not in params:
                raise ValueError(f"layer_type {layer_type!r} not in {sorted(params)}")
            params = dict(params[layer_type])
        legacy = dict(cfg.get("rope_scaling") or {})
        params = {**legacy, **params}
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        base = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        model_type = str(cfg.get("model_type", ""))
        if model_type in _NO_ROPE_MODEL_TYPES or (model_type == "falcon" and cfg.get("alibi")):
            raise UnsupportedRope(f"model type {model_type!r} encodes positions without RoPE (learned absolute "
                                  "positions or ALiBi), so its KV cannot be moved to another position")

        mla = cfg.get("kv_lora_rank") is not None and cfg.get("qk_rope_head_dim") is not None
        if mla:
            rotary_dim = int(cfg["qk_rope_head_dim"])
            offset = int(cfg["kv_lora_rank"]) if rot_offset is None else rot_offset
        else:
            head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
            factor = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0)))
            rotary_dim = int(cfg.get("rotary_dim") or head_dim * (factor if factor is not None else 1.0))
            offset = 0 if rot_offset is None else rot_offset
        neox = (model_type not in _GPTJ_STYLE_MODEL_TYPES) if is_neox is None else is_neox
        if mla and is_neox is None:
            neox = False  # vLLM's MLA rotates k_pe with interleaved (GPT-J) pairs
        max_pos = int(cfg.get("max_position_embeddings") or 0) or None
        mrope = params.get("mrope_section")
        if rope_type == "mrope":
            rope_type = "default"
        return _build(rope_type, params, base=base, rotary_dim=rotary_dim, is_neox=neox,
                      rot_offset=offset, max_position=max_pos, mrope_section=mrope,
                      mrope_interleaved=bool(params.get("mrope_interleaved", False)))

    @classmethod
    def from_vllm(cls, rotary_emb: torch.nn.Module, *, rot_offset: int = 0) -> "RopeSpec":
        """Build from a vLLM rotary module (what `get_rope` returns), checked against its table.

        The spec is derived from the module's own attributes and then verified row by row against
        the module's `cos_sin_cache`; a module whose table is not `cos/sin(t * inv_freq) * mscale`
        raises `UnsupportedRope` rather than relocating approximately.
        """
        from kvreuse.rope import vllm_adapter  # imports vLLM lazily

        return vllm_adapter.spec_from_vllm(cls, rotary_emb, rot_offset=rot_offset)

    # ------------------------------------------------------------------ angle tables
    def angles(self, pos: torch.Tensor) -> torch.Tensor:
        """fp32 rotation angles. `pos`: `[N]` (or `[3, N]` for M-RoPE) -> `[N, rotary_dim // 2]`."""
        pos = self.check_positions(pos)
        inv = self.inv_freq.to(pos.device)
        t = pos.to(torch.float32)
        if self.position_divisor != 1.0:
            t = t / self.position_divisor
        if pos.dim() == 1:
            return t[:, None] * inv[None, :]
        ang = t[:, :, None] * inv[None, None, :]                       # [3, N, half]
        axis = self._axis_of_freq.to(pos.device)                       # [half] in {0, 1, 2}
        return ang.gather(0, axis.view(1, 1, -1).expand(1, ang.shape[1], -1)).squeeze(0)

    def cos_sin(self, pos: torch.Tensor, *, with_mscale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 `(cos, sin)`, each `[N, rotary_dim // 2]`; `with_mscale` gives the engine's table."""
        ang = self.angles(pos)
        cos, sin = ang.cos(), ang.sin()
        if with_mscale and self.mscale != 1.0:
            cos, sin = cos * self.mscale, sin * self.mscale
        return cos, sin

    def table_rows(self, pos: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine's table rows at `pos`: `cos_sin(pos, with_mscale=True)`, rounded to `dtype` when
        given (as the engine casts its table to the activation dtype).  # each [N, rotary_dim // 2]

        1-D positions read a table of rows `0..` built once (grown to a power of two past the highest
        position asked, at most `max_position` rows: the size of the engine's own table).  cos and sin
        are elementwise, so a row has the same bits in the table as computed alone, and a load reads
        its rows instead of running cos/sin, which PyTorch spreads over its threads at ~2k elements.
        """
        pos = self.check_positions(pos)
        if pos.dim() != 1 or pos.numel() == 0:
            c, s = self.cos_sin(pos, with_mscale=True)
            return (c, s) if dtype is None else (c.to(dtype), s.to(dtype))
        need = int(pos.max()) + 1
        tab = self._tables.get((dtype, pos.device))
        if tab is None or tab[0].shape[0] < need:
            n = 1 << (need - 1).bit_length()
            if self.max_position is not None:
                n = min(n, self.max_position)
            c, s = self.cos_sin(torch.arange(n, device=pos.device), with_mscale=True)
            tab = self._tables[(dtype, pos.device)] = (c, s) if dtype is None else (c.to(dtype), s.to(dtype))
        return tab[0].index_select(0, pos), tab[1].index_select(0, pos)  # (indexing with [] goes parallel at 3k)

    def check_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Validate a position tensor's shape, dtype and range; returns it as int64."""
        if not isinstance(pos, torch.Tensor):
            pos = torch.as_tensor(pos)
        if pos.is_floating_point() or pos.is_complex():
            raise TypeError(f"positions must be an integer tensor, got {pos.dtype}")
        if pos.dim() == 2:
            if pos.shape[0] != 3:
                raise ValueError(f"2-D positions must be [3, num_tokens] (M-RoPE), got {list(pos.shape)}")
            if self.mrope_section is None:
                raise ValueError("[3, num_tokens] positions given to a RoPE without mrope_section")
        elif pos.dim() != 1:
            raise ValueError(f"positions must be [num_tokens] or [3, num_tokens], got {list(pos.shape)}")
        if pos.numel():
            lo, hi = int(pos.min()), int(pos.max())
            if lo < 0 or (self.max_position is not None and hi >= self.max_position):
                raise ValueError(f"positions must lie in [0, {self.max_position}); got [{lo}, {hi}]")
        return pos.long()

    @property
    def num_pos_axes(self) -> int:
        return 3 if self.mrope_section is not None else 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (for fingerprints and persisted headers)."""
        return {"rotary_dim": self.rotary_dim, "is_neox": self.is_neox, "base": self.base,
                "position_divisor": self.position_divisor, "mscale": self.mscale,
                "mrope_section": list(self.mrope_section) if self.mrope_section else None,
                "mrope_interleaved": self.mrope_interleaved, "rot_offset": self.rot_offset,
                "max_position": self.max_position, "scaling": self.scaling,
                "inv_freq": self.inv_freq.tolist()}

    def with_offset(self, rot_offset: int) -> "RopeSpec":
        """The same rotation applied at another channel offset (MLA cache layouts differ)."""
        return dataclasses.replace(self, rot_offset=rot_offset)


def _mrope_axes(section: tuple[int, int, int], half: int, interleaved: bool) -> torch.Tensor:
    """Which position axis (0=t, 1=h, 2=w) drives each frequency index. # [half] int64"""
    idx = torch.arange(half)
    if not interleaved:
        return torch.repeat_interleave(torch.arange(3), torch.tensor(section))
    axes = torch.zeros(half, dtype=torch.long)
    axes[(idx % 3 == 1) & (idx < section[1] * 3)] = 1
    axes[(idx % 3 == 2) & (idx < section[2] * 3)] = 2
    return axes


_ALIASED_KEYS = ("hidden_size", "num_attention_heads", "head_dim", "max_position_embeddings", "rotary_dim",
                 "rotary_pct", "partial_rotary_factor", "rope_theta", "rope_scaling", "model_type",
                 "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim")


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        d = config.to_dict()
        for key in _ALIASED_KEYS:  # attribute_map aliases (GPT-J's n_embd, n_head, ...) are not in to_dict()
            if d.get(key) is None and getattr(config, key, None) is not None:
                d[key] = getattr(config, key)
        # transformers 5 keeps standardized rope params as an attribute
        rp = getattr(config, "rope_parameters", None)
        if rp is not None:
            d["rope_parameters"] = dict(rp)
        return d
    raise TypeError(f"expected a transformers config or a dict, got {type(config).__name__}")


def _build(rope_type: str, params: Mapping[str, Any], *, base: float, rotary_dim: int, is_neox: bool,
           rot_offset: int, max_position: int | None, mrope_section, mrope_interleaved: bool) -> RopeSpec:
    """Map a rope_type and its parameters to a spec, mirroring the engine's choice of module."""
    if rope_type in _LENGTH_DEPENDENT:
        raise UnsupportedRope(f"rope_type {rope_type!r} cannot be relocated exactly: {_LENGTH_DEPENDENT[rope_type]}")
    common = dict(rotary_dim=rotary_dim, is_neox=is_neox, rot_offset=rot_offset, base=base,
                  mrope_section=tuple(mrope_section) if mrope_section else None,
                  mrope_interleaved=mrope_interleaved, scaling=rope_type)
    if mrope_section and rope_type not in ("default", "yarn"):
        raise UnsupportedRope(f"M-RoPE with rope_type {rope_type!r} is not supported")
    mrope_factor = 4 if mrope_section else 1  # the engine sizes M-RoPE tables 4x (video timestamps)
    if rope_type == "default":
        mp = max_position * mrope_factor if max_position else None
        return RopeSpec(inv_freq=freqs.default_inv_freq(base, rotary_dim), max_position=mp, **common)
    if rope_type == "linear":
        factor = params["factor"]
        if isinstance(factor, (list, tuple)):
            raise UnsupportedRope("linear scaling with several factors selects a table per request")
        mp = int(max_position * factor) if max_position else None
        return RopeSpec(inv_freq=freqs.default_inv_freq(base, rotary_dim), position_divisor=float(factor),
                        max_position=mp, **common)
    if rope_type == "llama3":
        inv = freqs.llama3_inv_freq(base, rotary_dim, params["factor"], params["low_freq_factor"],
                                    params["high_freq_factor"], params["original_max_position_embeddings"])
        return RopeSpec(inv_freq=inv, max_position=max_position, **common)
    if rope_type in ("yarn", "deepseek_yarn", "deepseek_llama_scaling"):
        factor = float(params["factor"])
        orig = int(params.get("original_max_position_embeddings") or max_position)
        deepseek = rope_type != "yarn"
        inv = freqs.yarn_inv_freq(base, rotary_dim, factor, orig, params.get("beta_fast", 32),
                                  params.get("beta_slow", 1), True if deepseek else params.get("truncate", True))
        ms, ms_all = params.get("mscale"), params.get("mscale_all_dim")
        if deepseek:
            mscale = freqs.yarn_mscale(factor, float(ms or 1)) / freqs.yarn_mscale(factor, float(ms_all or 0))
        elif params.get("attention_factor") is not None:
            mscale = float(params["attention_factor"])
        elif ms and ms_all:
            mscale = freqs.yarn_mscale(factor, ms) / freqs.yarn_mscale(factor, ms_all)
        else:
            mscale = freqs.yarn_mscale(factor)
        mp = int(orig * factor) * (4 if mrope_section else 1)
        return RopeSpec(inv_freq=inv, mscale=float(mscale), max_position=mp, **common)
    raise UnsupportedRope(f"rope_type {rope_type!r} is not known to kvreuse; it cannot be relocated exactly")
