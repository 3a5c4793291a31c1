"""M-RoPE positions for the connector (Qwen2-VL family), taken from the model's own function.

vLLM does not hand connectors the positions of a request's tokens; for plain RoPE they are the
token indices, for M-RoPE they are not.  The scheduler-side connector therefore calls the served
model's own `get_mrope_input_positions(prompt_token_ids, mm_features)` (the function vLLM's model
runner calls in `_init_mrope_positions`) on a light stand-in that carries just the HF config, so
the positions kvreuse writes with are the positions vLLM computes with, by construction.

## Why a chunk moves by one offset on all three axes

`get_mrope_input_positions` walks the prompt in order.  Write `s` for the running start index
(one more than the largest position so far; 0 at the beginning).  Then

* a text run of `n` tokens gets `(s + i, s + i, s + i)` for `i = 0..n-1`, and `s += n`;
* a media item with LLM grid `(T, H, W)` (H, W already divided by the spatial merge) and temporal
  factor `f` (1 for images; `second_per_grid_ts * tokens_per_second` for Qwen2.5-VL video, 1 for
  Qwen2-VL) gets, for its `T*H*W` placeholder tokens in (t, h, w) row-major order,
  `(s + floor(t*f), s + h, s + w)`, and `s += max(floor((T-1)*f), H-1, W-1) + 1`.

So every token of a chunk, text or media, has position `s_chunk + r`, where `s_chunk` is the
running start at the chunk's first token and `r` (a `[3]` vector) depends only on the chunk's
own content: its offset inside the text run, or its grid cell and the item's `(T, H, W, f)`.  A
chunk that is a whole media item, or text that does not straddle one, therefore has positions
`s_chunk + R` with `R` the same `[3, n]` pattern wherever it sits, and moving it from `s` to `s'`
adds `Δ = s' - s` to all three axes of all its tokens: exactly what `relocate` does when given
src `[3, n]` and dst `[3, n]`, and intra-chunk relative positions (what its deeper-layer K/V
depend on) are unchanged.  Video frames keep their temporal arithmetic: the `floor(t*f)` offsets
live in `R` and are carried unchanged; only the common `s` moves.  What follows a moved item moves
by the same rule because `s` after it depends on `s` before it plus the item's own extent.

A text chunk is not a multiple of anything: in index terms a text token at index `j` sits at
`j + δ` with `δ = Σ (extent - length)` over the media items before it (negative: a 16-token
112×112 image advances `s` by 4) — which is why kvreuse never assumes positions are indices.

`chunk_shift` checks the property per chunk (the worker refuses a load whose shift is not one
constant; it never happens for whole chunks, and tests assert it against the model's function).
"""

from __future__ import annotations

import inspect
import logging
import types
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger("kvreuse.connector")

PositionsFn = Callable[[Sequence[int], list], torch.Tensor]


class _Standin:
    """Enough of a model instance for `get_mrope_input_positions`: its config and its methods."""

    def __init__(self, cls: type, config: Any, extra: dict[str, Any]) -> None:
        self._cls = cls
        self.config = config
        self.__dict__.update(extra)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._cls, name)  # AttributeError propagates: the model needs more than we have
        if inspect.isfunction(attr):
            return types.MethodType(attr, self)
        return attr


def positions_fn_for(model_cls: type, hf_config: Any, **extra: Any) -> PositionsFn:
    """`fn(token_ids, mm_features) -> [3, N] int64`, the model's own M-RoPE positions."""
    if not hasattr(model_cls, "get_mrope_input_positions"):
        raise TypeError(f"{model_cls.__name__} has no get_mrope_input_positions")
    standin = _Standin(model_cls, hf_config, extra)
    fn = types.MethodType(model_cls.get_mrope_input_positions, standin)

    def positions(token_ids: Sequence[int], mm_features: list) -> torch.Tensor:
        feats = [f for f in (mm_features or []) if getattr(f, "modality", None) != "prompt_embeds"]
        pos, _delta = fn(list(token_ids), feats)
        pos = torch.as_tensor(pos, dtype=torch.int64)
        if pos.shape != (3, len(token_ids)):
            raise ValueError(f"M-RoPE positions have shape {list(pos.shape)}, expected [3, {len(token_ids)}]")
        return pos

    return positions


def positions_fn_from_vllm(vllm_config: Any) -> PositionsFn | None:
    """The served model's position function, or None when the model does not use M-RoPE."""
    mc = vllm_config.model_config
    if not getattr(mc, "uses_mrope", False):
        return None
    from vllm.model_executor.model_loader.utils import get_model_architecture

    cls, _ = get_model_architecture(mc)
    return positions_fn_for(cls, mc.hf_config, model_config=mc, vllm_config=vllm_config)


def text_positions(start: int, end: int) -> torch.Tensor:
    """`[3, end - start]`: text tokens at index positions on all three axes (no media before)."""
    return torch.arange(start, end, dtype=torch.int64).expand(3, -1).clone()


def chunk_shift(src: torch.Tensor, dst: torch.Tensor) -> int | None:
    """The one offset Δ with `dst == src + Δ` on every axis and token; None when there is none."""
    if src.shape != dst.shape or src.numel() == 0:
        return None
    d = dst.long() - src.long()
    first = int(d.reshape(-1)[0])
    return first if bool((d == first).all()) else None


def as_tuple(pos: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """Positions as nested tuples (hashable, cheap to ship in connector metadata)."""
    return tuple(tuple(int(x) for x in row) for row in pos.tolist())
