"""Run a HF transformers causal LM (CPU or GPU) and read back post-RoPE K/V per layer.

This is the ground truth tests and the quality benchmark compare kvreuse against: "KV computed
in context" is literally the model's cache after a forward over context + chunk.

Cache formats are normalized to `[num_layers, num_tokens, num_kv_heads, head_dim]`:
  * standard attention — K and V of each KV head (K after RoPE);
  * MLA (DeepSeek-V2 family) — the latent cache vLLM stores, one "head" of `[kv_c | k_pe]`
    (`kv_lora_rank + qk_rope_head_dim` channels, `k_pe` after RoPE), and an empty V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kvreuse.rope.spec import RopeSpec


@dataclass
class ChunkKV:
    """K/V of a run of tokens. k, v: `[num_layers, num_tokens, num_kv_heads, head_dim]`;
    positions: `[num_tokens]` (or `[3, num_tokens]` for M-RoPE)."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    def slice(self, start: int, end: int) -> "ChunkKV":
        return ChunkKV(self.k[:, start:end], self.v[:, start:end], self.positions[..., start:end])

    @staticmethod
    def cat(parts: Sequence["ChunkKV"]) -> "ChunkKV":
        return ChunkKV(torch.cat([p.k for p in parts], 1), torch.cat([p.v for p in parts], 1),
                       torch.cat([p.positions for p in parts], -1))


class ReferenceEncoder:
    """Wraps a HF causal LM (Llama, Qwen2, Qwen2-VL text path, DeepSeek-V2 MLA, ...).

    Args:
        model: a `PreTrainedModel` with a causal LM head (eval mode is set here).
        rope: the model's `RopeSpec`; derived from its config when omitted.
    """

    def __init__(self, model: torch.nn.Module, rope: RopeSpec | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        self.mla = getattr(text, "kv_lora_rank", None) is not None
        self.rope = rope or RopeSpec.from_hf_config(self.config)
        self.mrope = self.rope.mrope_section is not None
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------ positions
    def positions(self, start: int, n: int) -> torch.Tensor:
        """Text positions `[start, start + n)`: `[n]`, or `[3, n]` (same on every axis) for M-RoPE."""
        p = torch.arange(start, start + n)
        return p.view(1, -1).expand(3, -1).clone() if self.mrope else p

    def _position_ids(self, pos: torch.Tensor) -> torch.Tensor:
        pos = pos.to(self.device)
        return pos.view(3, 1, -1) if pos.dim() == 2 else pos.view(1, -1)

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode(self, tokens: Sequence[int] | torch.Tensor, *, start: int = 0,
               context: Sequence[int] | torch.Tensor | None = None,
               positions: torch.Tensor | None = None) -> ChunkKV:
        """K/V of `tokens`, encoded alone or right after `context`.

        The sequence `context + tokens` occupies positions `[start, start + len)` (or explicit
        `positions` for the whole sequence, e.g. M-RoPE image grids); only the chunk's slice is
        returned, with its positions.
        """
        chunk = _ids(tokens)
        ctx = _ids(context) if context is not None else chunk.new_empty(0)
        seq = torch.cat([ctx, chunk])
        pos = positions if positions is not None else self.positions(start, seq.numel())
        full = self._run(seq, pos, past=None)[1]
        return full.slice(ctx.numel(), seq.numel())

    @torch.no_grad()
    def logits(self, tokens: Sequence[int] | torch.Tensor, *, start: int, past: ChunkKV | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits `[len(tokens), vocab]` of `tokens` at `start..`, attending to `past` (any KV,
        e.g. relocated or patched chunks) as if it were the cache of the preceding positions."""
        ids = _ids(tokens)
        pos = positions if positions is not None else self.positions(start, ids.numel())
        return self._run(ids, pos, past=past)[0]

    def _run(self, ids: torch.Tensor, pos: torch.Tensor, past: ChunkKV | None) -> tuple[torch.Tensor, ChunkKV]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=self._to_hf(past)) if past is not None and past.num_tokens else DynamicCache()
        n_past = past.num_tokens if past is not None else 0
        mask = torch.ones(1, n_past + ids.numel(), dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids.view(1, -1).to(self.device), position_ids=self._position_ids(pos),
                         attention_mask=mask, past_key_values=cache, use_cache=True)
        kv = self._from_hf(out.past_key_values, n_past, pos)
        return out.logits[0].float(), kv

    # ------------------------------------------------------------------ cache conversion
    def _from_hf(self, cache, n_past: int, pos: torch.Tensor) -> ChunkKV:
        ks, vs = [], []
        for layer in cache.layers:
            k, v = layer.keys[0, :, n_past:], layer.values[0, :, n_past:]   # [H, N, D]
            if self.mla:  # keys = kv_c [1, N, R], values = rotated k_pe [1, N, rope]
                k, v = torch.cat([k, v], dim=-1), v[..., :0]
            ks.append(k.transpose(0, 1))
            vs.append(v.transpose(0, 1))
        return ChunkKV(torch.stack(ks), torch.stack(vs), pos.cpu())

    def _to_hf(self, kv: ChunkKV) -> list[tuple[torch.Tensor, torch.Tensor]]:
        data = []
        for l in range(kv.k.shape[0]):
            k = kv.k[l].transpose(0, 1).unsqueeze(0).to(self.device)            # [1, H, N, D]
            v = kv.v[l].transpose(0, 1).unsqueeze(0).to(self.device)
            if self.mla:
                r = self.rope.rot_offset
                k, v = k[..., :r].contiguous(), k[..., r:].contiguous()
            data.append((k.contiguous(), v.contiguous()))
        return data


def _ids(tokens) -> torch.Tensor:
    return torch.as_tensor(tokens, dtype=torch.long).flatten().cpu()
