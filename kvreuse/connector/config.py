"""Connector configuration, built once from `kv_connector_extra_config` and validated there.

Every key is optional::

    {"chunking": {"min_tokens": 8, "max_tokens": 256, "avg_tokens": 16, "boundary_tokens": ["<|im_start|>"]},
     "policy": {"fidelity": "exact" | "accurate" | "fast", "repair_tokens": 16,
                "patch_energy": 0.99, "patch_max_rank": 16,
                "patch_budget": 0.05, "admission": "adaptive" | "always", "admission_window": 8,
                "admission_min_share": 0.02},
     "store": {"device_bytes": "1GiB", "host_bytes": ..., "disk_path": ..., ...},
     "save": true, "load": true, "isolation": "salt" | "salted_only", "load_timeout_seconds": 2.0,
     "weights_version": "..."}

`load_timeout_seconds`: the most a step waits for its loads from slow tiers (Redis, disk); a
chunk not loaded by then is a failed load, recomputed by vLLM (memory hits are always served).

`weights_version`: the weights' identity, declared (`kvreuse.connector.fingerprint`).  Required where
kvreuse cannot read the checkpoint's files (a remote or dummy loader, object storage); where it can,
it replaces the files' mtimes and inodes in the fingerprint, so hosts with their own copies of one
checkpoint share a Redis tier.  Change it whenever the weights change.

The store's budget keys (`device_bytes`, `host_bytes`, `disk_path`, `disk_bytes`, `redis_url`,
`redis_bytes`) are also accepted at the top level, exactly as the store documents them, so one
config dict serves `kv_connector_extra_config`, `--kvreuse-config` and `StoreConfig.from_dict`;
giving the same key both ways is an error.

A bad key or value raises `ConnectorConfigError` naming the key (e.g. `policy.fidelity`), which
vLLM surfaces at startup.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from kvreuse.errors import KVReuseError
from kvreuse.store.config import StoreConfig, StoreConfigError

# What a request may be served, strictest first (`kvreuse.connector.fidelity`): "exact" only KV bit for bit what
# vLLM computes; "accurate" approximate placements repaired by recomputing the tokens where their context changed;
# "fast" approximate placements unrepaired.
FIDELITY_LEVELS = ("exact", "accurate", "fast")
# where "accurate" repairs: "moved", from each change point (an approximate chunk that does not follow the chunk it
# was stored after); "every", from the start of every approximate chunk
REPAIR_SCOPES = ("moved", "every")
PATCH_FITS = ("demotion", "ingest")  # when a context's conditioning patch is fitted (`PolicyConfig`)
# "adaptive": when recent requests recur less than `admission_min_share`, a first-seen chunk is not saved
# (`kvreuse.connector.admission`; at fidelity "exact" a chunk recurs only after the same chunks);
# "always": every new chunk is saved.
ADMISSION_MODES = ("adaptive", "always")
# "salt": requests share chunks when their cache_salt is equal (unsalted requests form one pool);
# "salted_only": only salted requests store or place chunks (unsalted ones are served without kvreuse).
ISOLATION_MODES = ("salt", "salted_only")
STORE_KEYS = ("device_bytes", "host_bytes", "disk_path", "disk_bytes", "redis_url", "redis_bytes")
DEFAULT_STORE = {"device_bytes": "1GiB"}


class ConnectorConfigError(KVReuseError, ValueError):
    """A `kv_connector_extra_config` value is invalid; the message names the key."""


@dataclass(frozen=True)
class ChunkingConfig:
    """Content-defined cuts: a cut lands where the rolling hash hits, between min and max tokens.

    `boundary_tokens`: token strings that always start a new chunk (message starts); resolved to
    ids by the tokenizer at startup.  `end_tokens`: text that always ends a chunk where the
    tokenizer encodes it as one token (a paragraph break: retrieval pipelines join passages with
    blank lines, so each passage is cut the same way wherever it sits).
    """

    # with min 8: cuts where 3 hash bits are 0, chunks of ~15 tokens (p90 25).  A change point costs the chunk
    # that straddles it plus the resync: ~18 tokens on the raw agent trace, ~45 with min 16 / avg 32
    # (bench/gap_analysis.py)
    min_tokens: int = 8
    avg_tokens: int = 16
    max_tokens: int = 256
    boundary_tokens: tuple[str, ...] = ("<|im_start|>",)
    end_tokens: tuple[str, ...] = ("\n\n",)

    def __post_init__(self) -> None:
        if not 1 <= self.min_tokens <= self.avg_tokens <= self.max_tokens:
            raise ConnectorConfigError(
                f"chunking: need 1 <= min_tokens <= avg_tokens <= max_tokens, got "
                f"{self.min_tokens}, {self.avg_tokens}, {self.max_tokens}")


@dataclass(frozen=True)
class PolicyConfig:
    """`fidelity`: what KV a request may be served (`FIDELITY_LEVELS`; a request may tighten it, never loosen it).
    `repair_tokens`: under "accurate", the first tokens after each change point (an approximate chunk that does not
    follow the chunk it was stored after) are recomputed in place instead of placed, counted across chunks (the
    attention sinks of what follows, which depend most on their context); `repair_scope` "every": from the start of
    every approximate chunk.

    `capture_patches`: a stored chunk computed in a new context keeps that context's KV; `patch_fit`: when its
    patch is fitted, "demotion" (when memory pressure drops that KV, or at once where it finds no room or the store
    is demoting: a patch is read only in place of the KV) or "ingest" (at once, on the store's thread beside the forward).

    `admission`: which new chunks are saved (see `kvreuse.connector.admission`); "adaptive" saves
    only chunks seen before while the last `admission_window` requests recurred less than
    `admission_min_share` of their tokens (after vLLM's prefix hit), "always" saves every one.
    """

    fidelity: str = "exact"
    repair_tokens: int = 16
    repair_scope: str = "moved"
    patch_energy: float = 0.99
    patch_max_rank: int = 16
    patch_budget: float | None = 0.05   # patch bytes / chunk KV bytes (kvreuse.fit_patch); None: no cap
    capture_patches: bool = True
    patch_fit: str = "demotion"
    admission: str = "adaptive"
    admission_window: int = 8
    admission_min_share: float = 0.02

    def __post_init__(self) -> None:
        if self.fidelity not in FIDELITY_LEVELS:
            raise ConnectorConfigError(f"policy.fidelity: expected one of {FIDELITY_LEVELS}, got {self.fidelity!r}")
        if self.repair_scope not in REPAIR_SCOPES:
            raise ConnectorConfigError(f"policy.repair_scope: expected one of {REPAIR_SCOPES}, got {self.repair_scope!r}")
        if self.patch_fit not in PATCH_FITS:
            raise ConnectorConfigError(f"policy.patch_fit: expected one of {PATCH_FITS}, got {self.patch_fit!r}")
        if isinstance(self.repair_tokens, bool) or not isinstance(self.repair_tokens, int) or self.repair_tokens < 0:
            raise ConnectorConfigError(f"policy.repair_tokens: expected an integer >= 0, got {self.repair_tokens!r}")
        if self.admission not in ADMISSION_MODES:
            raise ConnectorConfigError(f"policy.admission: expected one of {ADMISSION_MODES}, got {self.admission!r}")
        if self.admission_window < 1:
            raise ConnectorConfigError(f"policy.admission_window: must be >= 1, got {self.admission_window!r}")
        if not 0.0 <= self.admission_min_share <= 1.0:
            raise ConnectorConfigError(f"policy.admission_min_share: must be in [0, 1], got "
                                       f"{self.admission_min_share!r}")
        if not 0.0 < self.patch_energy <= 1.0:
            raise ConnectorConfigError(f"policy.patch_energy: must be in (0, 1], got {self.patch_energy!r}")
        if self.patch_max_rank < 0:
            raise ConnectorConfigError(f"policy.patch_max_rank: must be >= 0, got {self.patch_max_rank!r}")
        if self.patch_budget is not None and (isinstance(self.patch_budget, bool)
                                              or not isinstance(self.patch_budget, (int, float))
                                              or self.patch_budget < 0):
            raise ConnectorConfigError(f"policy.patch_budget: expected a number >= 0 or null, got {self.patch_budget!r}")


@dataclass(frozen=True)
class CostConfig:
    """Where reuse pays (`kvreuse.connector.costs`): starting rates, learned online when `learn`."""

    min_tokens: int = 16
    prefill_s_per_token: float = 2e-4
    place_s_per_token: float = 1e-5
    step_overhead_s: float = 5e-3
    margin: float = 1.25
    learn: bool = True

    def __post_init__(self) -> None:
        if self.min_tokens < 1:
            raise ConnectorConfigError(f"cost.min_tokens: must be >= 1, got {self.min_tokens!r}")
        for name in ("prefill_s_per_token", "place_s_per_token", "step_overhead_s", "margin"):
            if getattr(self, name) < 0:
                raise ConnectorConfigError(f"cost.{name}: must be >= 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ConnectorConfig:
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    store: StoreConfig = field(default_factory=lambda: StoreConfig.from_dict(DEFAULT_STORE))
    save: bool = True
    load: bool = True
    isolation: str = "salt"
    load_timeout_seconds: float = 2.0
    weights_version: str | None = None

    def __post_init__(self) -> None:
        w = self.weights_version
        if w is not None and (not isinstance(w, str) or not w.strip()):
            raise ConnectorConfigError(f"weights_version: expected a non-empty string, got {w!r}")
        if self.isolation not in ISOLATION_MODES:
            raise ConnectorConfigError(f"isolation: expected one of {ISOLATION_MODES}, got {self.isolation!r}")
        t = self.load_timeout_seconds
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ConnectorConfigError(f"load_timeout_seconds: expected a number > 0, got {t!r}")

    def shares_chunks(self, cache_salt: str | None) -> bool:
        """Whether a request with this `cache_salt` may store or place chunks at all."""
        return self.isolation != "salted_only" or bool(cache_salt)

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> "ConnectorConfig":
        """Build from `kv_connector_extra_config` (unknown keys are errors, naming the key)."""
        extra = dict(extra or {})
        flat = {k: extra.pop(k) for k in STORE_KEYS if k in extra}
        if flat:
            nested = extra.get("store", {})
            if not isinstance(nested, Mapping):
                raise ConnectorConfigError(f"store: expected an object, got {type(nested).__name__}")
            both = sorted(set(flat) & set(nested))
            if both:
                raise ConnectorConfigError(f"{both[0]}: given both at the top level and under store")
            extra["store"] = {**nested, **flat}
        _known("", extra, {f.name for f in fields(cls)})
        kw: dict[str, Any] = {}
        if "chunking" in extra:
            kw["chunking"] = _section("chunking", extra["chunking"], ChunkingConfig)
        if "policy" in extra:
            if isinstance(extra["policy"], Mapping) and "mode" in extra["policy"]:
                raise ConnectorConfigError('policy.mode: replaced by policy.fidelity ("exact", the default: the answers '
                                           'vLLM alone gives; "accurate"; "fast", what "any" served)')
            kw["policy"] = _section("policy", extra["policy"], PolicyConfig)
        if "cost" in extra:
            kw["cost"] = _section("cost", extra["cost"], CostConfig)
        if "store" in extra:
            try:
                kw["store"] = StoreConfig.from_dict(extra["store"])
            except StoreConfigError as e:
                raise ConnectorConfigError(f"store.{e}" if "store" in extra and not flat else str(e)) from None
        for flag in ("save", "load"):
            if flag in extra:
                if not isinstance(extra[flag], bool):
                    raise ConnectorConfigError(f"{flag}: expected true or false, got {extra[flag]!r}")
                kw[flag] = extra[flag]
        for k in ("isolation", "load_timeout_seconds", "weights_version"):  # checked in __post_init__
            if k in extra:
                kw[k] = extra[k]
        return cls(**kw)


def _known(prefix: str, d: Mapping[str, Any], known: set[str]) -> None:
    for k in d:
        if k not in known:
            raise ConnectorConfigError(f"{prefix}{k}: unknown kvreuse config key (known: {', '.join(sorted(known))})")


def _section(name: str, value: Any, cls):
    if not isinstance(value, Mapping):
        raise ConnectorConfigError(f"{name}: expected an object, got {type(value).__name__}")
    types = {f.name: f.type for f in fields(cls)}
    _known(f"{name}.", value, set(types))
    kw = {}
    for k, v in value.items():
        want = types[k]
        if "tuple" in str(want):
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                raise ConnectorConfigError(f"{name}.{k}: expected a list of strings, got {v!r}")
            v = tuple(v)
        elif want in ("int", int) and (not isinstance(v, int) or isinstance(v, bool)):
            raise ConnectorConfigError(f"{name}.{k}: expected an integer, got {v!r}")
        elif want in ("float", float) and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise ConnectorConfigError(f"{name}.{k}: expected a number, got {v!r}")
        elif want in ("bool", bool) and not isinstance(v, bool):
            raise ConnectorConfigError(f"{name}.{k}: expected true or false, got {v!r}")
        elif want in ("str", str) and not isinstance(v, str):
            raise ConnectorConfigError(f"{name}.{k}: expected a string, got {v!r}")
        kw[k] = v
    return cls(**kw)
