"""A stored chunk: base KV, the contexts it has been seen in, and the bookkeeping eviction needs.

Context signatures are opaque bytes chosen by the caller: :data:`ISOLATED` for a chunk encoded
alone, or a signature of the chunks that preceded it.  All KV of one entry is in one positional
frame, the entry's ``positions``; callers relocate before adding KV computed elsewhere.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from kvreuse.store.keys import ChunkKey

ISOLATED = b"isolated"

# Rough prefill cost of one token through one layer of a 7B-class model on a datacenter GPU;
# only ratios between entries matter to eviction, so callers with measured times pass those.
SECONDS_PER_TOKEN_LAYER = 2e-6


class PatchLike(Protocol):
    """What the store needs of a conditioning patch (``kvreuse.Patch``)."""

    nbytes: int

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def apply(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


# fit(delta_k, delta_v, *, base_k, base_v, dtype) -> patch (``kvreuse.fit_patch``'s signature);
# deltas and bases: [num_layers, num_tokens, num_kv_heads, head_dim]
FitPatch = Callable[..., Any]


def as_signature(ctx: bytes | str) -> bytes:
    """Context signatures are bytes; strings are taken as UTF-8."""
    if isinstance(ctx, str):
        return ctx.encode()
    if isinstance(ctx, (bytes, bytearray)):
        return bytes(ctx)
    raise TypeError(f"context signature must be bytes or str, got {type(ctx).__name__}")


def _cpu_int64(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype is torch.int64 and t.is_cpu


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class ChunkEntry:
    """One chunk's KV and metadata.

    Attributes:
        key: content key of the chunk.
        token_ids: ``[num_tokens]`` int64 (CPU); a hit is verified against it.
        positions: ``[num_tokens]`` or ``[3, num_tokens]`` (M-RoPE) int64 (CPU): the frame of all KV here.
        k, v: base KV, ``[num_layers, num_tokens, num_kv_heads, head_dim]``.
        context: signature of the context the base KV was computed in.
        in_context: full KV computed in other contexts, ``{signature: (k, v)}`` with base's shape.
        frames: ``{signature: positions}`` for in-context KV computed at other positions than the base:
            kept in its own frame, unrotated, so that an exact claim (same context, so same positions)
            reads it bit for bit as computed (a rotation into the base's frame and back rounds twice).
        patches: conditioning patches ``{signature: Patch}`` fitted on in-context − base.
        recompute_cost: estimated seconds to recompute this chunk's KV (vision encoder included).
        hits, last_use: reuse bookkeeping (``last_use`` in ``time.monotonic()`` seconds).
        preceding: ``{signature: ordered preceding chunk key digests}`` for the contexts above whose
            key lists are known; persisted with the entry so a restarted or remote directory can
            match survival and reorder, not only exact signatures.
    """

    key: ChunkKey
    token_ids: torch.Tensor
    positions: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    context: bytes = ISOLATED
    in_context: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    frames: dict[bytes, torch.Tensor] = field(default_factory=dict)
    patches: dict[bytes, Any] = field(default_factory=dict)
    recompute_cost: float = 0.0
    hits: int = 0
    last_use: float = field(default_factory=time.monotonic)
    preceding: dict[bytes, tuple[bytes, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.context = as_signature(self.context)
        if not isinstance(self.key, ChunkKey):
            raise TypeError(f"key: expected ChunkKey, got {type(self.key).__name__}")
        if not _cpu_int64(self.token_ids):  # (the save path hands over int64 CPU tensors: kept as they are)
            self.token_ids = torch.as_tensor(self.token_ids, dtype=torch.int64).cpu()
        if not _cpu_int64(self.positions):
            self.positions = torch.as_tensor(self.positions, dtype=torch.int64).cpu()
        if self.k.dim() != 4 or self.k.shape != self.v.shape or self.k.dtype != self.v.dtype:
            raise ValueError(f"k, v: expected equal [num_layers, num_tokens, num_kv_heads, head_dim], "
                             f"got {tuple(self.k.shape)} {self.k.dtype} and {tuple(self.v.shape)} {self.v.dtype}")
        n = self.k.shape[1]
        if self.token_ids.shape != (n,):
            raise ValueError(f"token_ids: expected [{n}], got {tuple(self.token_ids.shape)}")
        if self.positions.shape not in ((n,), (3, n)):
            raise ValueError(f"positions: expected [{n}] or [3, {n}], got {tuple(self.positions.shape)}")
        self.in_context = {as_signature(c): kv for c, kv in self.in_context.items()}
        for c, (ck, cv) in self.in_context.items():
            self._check_like_base(c, ck, cv)
        self.frames = {as_signature(c): torch.as_tensor(p, dtype=torch.int64).cpu() for c, p in self.frames.items()
                       if as_signature(c) in self.in_context}
        for c, p in self.frames.items():
            if p.shape != self.positions.shape:
                raise ValueError(f"frame of {c!r}: expected {tuple(self.positions.shape)}, got {tuple(p.shape)}")
        self.patches = {as_signature(c): p for c, p in self.patches.items()}
        if self.recompute_cost <= 0:
            self.recompute_cost = self.num_tokens * self.num_layers * SECONDS_PER_TOKEN_LAYER

    def _check_like_base(self, ctx: bytes, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.shape != self.k.shape or v.shape != self.k.shape or k.dtype != self.k.dtype or v.dtype != self.k.dtype:
            raise ValueError(f"in-context KV for {ctx!r}: expected {tuple(self.k.shape)} {self.k.dtype}, "
                             f"got {tuple(k.shape)} {k.dtype} / {tuple(v.shape)} {v.dtype}")

    # shapes
    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def nbytes(self) -> int:
        """Bytes this entry occupies in a memory tier."""
        n = _tensor_bytes(self.k) + _tensor_bytes(self.v)
        n += _tensor_bytes(self.token_ids) + _tensor_bytes(self.positions)
        n += sum(_tensor_bytes(a) + _tensor_bytes(b) for a, b in self.in_context.values())
        n += sum(_tensor_bytes(p) for p in self.frames.values())
        n += sum(int(p.nbytes) for p in self.patches.values())
        return n

    @property
    def demotable(self) -> bool:
        return bool(self.in_context)

    # mutation
    def own_frame(self, positions: torch.Tensor | None) -> bool:
        """Whether KV computed at ``positions`` is kept in a frame of its own (other positions than the base)."""
        return positions is not None and not torch.equal(positions.cpu(), self.positions)

    def context_nbytes(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None) -> int:
        """Bytes :meth:`add_context_kv` adds to this entry for ``k, v`` computed at ``positions``."""
        return _tensor_bytes(k) + _tensor_bytes(v) + (_tensor_bytes(positions) if self.own_frame(positions) else 0)

    def add_context_kv(self, context: bytes | str, k: torch.Tensor, v: torch.Tensor,
                       positions: torch.Tensor | None = None) -> None:
        """Record KV of this chunk computed in ``context``, at ``positions`` (None: the base's frame).

        k, v: ``[num_layers, num_tokens, num_kv_heads, head_dim]``; kept in their own frame (see ``frames``).
        """
        ctx = as_signature(context)
        self._check_like_base(ctx, k, v)
        if ctx != self.context:
            self.in_context[ctx] = (k.to(self.k.device), v.to(self.k.device))
            if self.own_frame(positions):
                self.frames[ctx] = torch.as_tensor(positions, dtype=torch.int64).cpu()

    def add_patch(self, context: bytes | str, patch: Any) -> None:
        """Record a conditioning patch for ``context``."""
        self.patches[as_signature(context)] = patch

    def drop_context_kv(self) -> list[tuple[bytes, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Demote: drop every full in-context KV; returns those of contexts that have no patch yet.

        Contexts with a patch keep being served from it ("patched"); the caller fits patches for
        the returned ones (k, v: ``[num_layers, num_tokens, num_kv_heads, head_dim]``, with the positions of
        their own frame, None in the base's) outside any lock and adds them with :meth:`add_patch`.  Until
        then this entry reads those contexts as base KV (the store keeps serving the dropped KV while the
        fit runs).
        """
        out = [(c, ck, cv, self.frames.get(c)) for c, (ck, cv) in self.in_context.items() if c not in self.patches]
        self.in_context, self.frames = {}, {}
        return out

    def has_context(self, context: bytes | str) -> bool:
        """Whether this entry holds KV or a patch for ``context`` (its own context included)."""
        ctx = as_signature(context)
        return ctx == self.context or ctx in self.in_context or ctx in self.patches

    def touch(self, now: float | None = None) -> None:
        self.hits += 1
        self.last_use = time.monotonic() if now is None else now

    # reads
    def view(self, context: bytes | str | None = None, *, tokens: slice | None = None,
             layers: slice | None = None) -> "ChunkView":
        """KV of this chunk as it reads in ``context`` (in the entry's positional frame), optionally partial.

        Uses, in order: the KV computed in exactly that context, the base plus that context's
        patch, the base alone.  ``tokens`` and ``layers`` are slices over the token and layer axes.
        """
        ctx = self.context if context is None else as_signature(context)
        ts = tokens if tokens is not None else slice(None)
        ls = layers if layers is not None else slice(None)
        if ctx == self.context:
            k, v, how = self.k[ls, ts], self.v[ls, ts], "exact"
        elif ctx in self.in_context:
            ck, cv = self.in_context[ctx]
            k, v, how = ck[ls, ts], cv[ls, ts], "exact"
            if ctx in self.frames:  # computed at other positions than the base: read in its own frame
                return ChunkView(key=self.key, token_ids=self.token_ids[ts], positions=self.frames[ctx][..., ts],
                                 k=k, v=v, how=how, context=ctx)
        elif ctx in self.patches:
            start, stop, step = ts.indices(self.num_tokens)
            if step != 1:
                raise ValueError(f"tokens: only contiguous ranges, got step {step}")
            patch = self.patches[ctx]
            if (start, stop) != (0, self.num_tokens):
                patch = patch.slice_tokens(start, stop)
            pk, pv = patch.apply(self.k[:, start:stop], self.v[:, start:stop])
            k, v, how = pk[ls], pv[ls], "patched"
        else:
            k, v, how = self.k[ls, ts], self.v[ls, ts], "base"
        return ChunkView(key=self.key, token_ids=self.token_ids[ts], positions=self.positions[..., ts],
                         k=k, v=v, how=how, context=ctx)

    def shallow_copy(self) -> "ChunkEntry":
        """A copy sharing the tensors, with its own context and patch maps (safe to serialise on
        another thread while this entry gains or drops contexts)."""
        return dataclasses.replace(self, in_context=dict(self.in_context), frames=dict(self.frames),
                                   patches=dict(self.patches), preceding=dict(self.preceding))

    def to(self, device: torch.device | str, *, pin: bool = False) -> "ChunkEntry":
        """A copy of this entry with every tensor on ``device`` (pinned when ``pin`` and CPU)."""

        def mv(t: torch.Tensor) -> torch.Tensor:
            out = t.to(device, copy=True)
            return out.pin_memory() if pin and out.device.type == "cpu" else out

        patches = {c: _patch_to(p, device) for c, p in self.patches.items()}
        return ChunkEntry(key=self.key, token_ids=self.token_ids, positions=self.positions,
                          k=mv(self.k), v=mv(self.v), context=self.context,
                          in_context={c: (mv(a), mv(b)) for c, (a, b) in self.in_context.items()},
                          frames=dict(self.frames), patches=patches, recompute_cost=self.recompute_cost,
                          hits=self.hits, last_use=self.last_use, preceding=dict(self.preceding))


def _patch_to(p: Any, device: torch.device | str) -> Any:
    """The patch with its factors on ``device`` (through ``to`` or a state-dict round trip)."""
    to = getattr(p, "to", None)
    if callable(to):
        return to(device)
    sd = p.state_dict()
    if all(t.device == torch.device(device) for t in sd.values()):
        return p
    return type(p).from_state_dict({n: t.to(device) for n, t in sd.items()})


@dataclass(frozen=True)
class ChunkView:
    """A (possibly partial) read of an entry for one context.

    k, v: ``[num_layers', num_tokens', num_kv_heads, head_dim]``; positions: ``[num_tokens']`` or
    ``[3, num_tokens']``; ``how`` is "exact", "patched" or "base"; ``source`` names where the
    store found it (a tier, "spill" for an entry on its way to disk, "ingest" for KV still queued,
    "demoting" for a demoted context's KV awaiting its patch fit).
    """

    key: ChunkKey
    token_ids: torch.Tensor
    positions: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    how: str
    context: bytes
    source: str = ""
