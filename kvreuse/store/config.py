"""Store configuration: the tier budgets an operator sets.

The same keys are accepted in ``kv_connector_extra_config`` and ``kvreuse serve --kvreuse-config``::

    {"device_bytes": "2GiB", "host_bytes": "16GiB",
     "disk_path": "/var/cache/kvreuse", "disk_bytes": "200GiB",
     "redis_url": "redis://cache:6379/0", "redis_bytes": "64GiB"}

Every tier is optional.  A tier with a path or URL but no budget is refused, so a budget is
always explicit; a budget of 0 disables its tier.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, fields
from typing import Any, Mapping
from urllib.parse import urlparse

from kvreuse.errors import KVReuseError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
_REDIS_SCHEMES = ("redis", "rediss", "unix")


class StoreConfigError(KVReuseError, ValueError):
    """A store configuration value is invalid; the message names the key."""


def parse_size(value: int | float | str, *, key: str = "size") -> int:
    """Parse a byte count given as an int or a string such as ``"2GiB"``, ``"512MiB"``, ``"1.5GB"``.

    Raises:
        StoreConfigError: naming ``key`` when the value is malformed or negative.
    """
    if isinstance(value, bool):
        raise StoreConfigError(f"{key}: expected a byte count, got {value!r}")
    if isinstance(value, (int, float)):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m is None:
            raise StoreConfigError(f"{key}: malformed size {value!r} (expected e.g. 1024, '512MiB', '2GiB', '1.5GB')")
        unit = m.group(2).lower()
        if unit not in _UNITS:
            raise StoreConfigError(f"{key}: unknown unit {m.group(2)!r} in {value!r}")
        n = float(m.group(1)) * _UNITS[unit]
    else:
        raise StoreConfigError(f"{key}: expected a byte count, got {type(value).__name__} {value!r}")
    if n < 0:
        raise StoreConfigError(f"{key}: budget must be >= 0, got {value!r}")
    return int(n)


@dataclass(frozen=True)
class StoreConfig:
    """Byte budgets and locations of the store's tiers; ``None`` means the tier is absent.

    Attributes:
        device_bytes: budget of the device tier (GPU memory; CPU tensors where there is no GPU).
        host_bytes: budget of the host tier (pinned CPU memory where CUDA is available).
        disk_path: directory of the disk tier; created if missing.
        disk_bytes: budget of the disk tier (file bytes, headers included).
        redis_url: ``redis://``, ``rediss://`` or ``unix://`` URL of the shared tier.
        redis_bytes: budget of the shared tier (value bytes), shared by every store using it.
    """

    device_bytes: int | None = None
    host_bytes: int | None = None
    disk_path: str | None = None
    disk_bytes: int | None = None
    redis_url: str | None = None
    redis_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("device_bytes", "host_bytes", "disk_bytes", "redis_bytes"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise StoreConfigError(f"{name}: budget must be an int >= 0, got {v!r}")
        if (self.disk_path is None) != (self.disk_bytes is None):
            missing = "disk_bytes" if self.disk_bytes is None else "disk_path"
            raise StoreConfigError(f"{missing}: the disk tier needs both disk_path and disk_bytes")
        if (self.redis_url is None) != (self.redis_bytes is None):
            missing = "redis_bytes" if self.redis_bytes is None else "redis_url"
            raise StoreConfigError(f"{missing}: the Redis tier needs both redis_url and redis_bytes")
        if self.disk_path is not None:
            _check_dir(self.disk_path)
        if self.redis_url is not None:
            _check_redis_url(self.redis_url)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StoreConfig":
        """Build a config from a mapping with exactly the documented keys (any may be absent).

        Raises:
            StoreConfigError (a ``ValueError``): naming the bad key for an unknown key, a malformed
            or negative size, or a disk path that cannot be created or written.
        """
        if not isinstance(d, Mapping):
            raise StoreConfigError(f"store config: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        for k in d:
            if k not in known:
                raise StoreConfigError(f"{k}: unknown store config key (known: {', '.join(sorted(known))})")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if v is None:
                continue
            if k.endswith("_bytes"):
                kw[k] = parse_size(v, key=k)
            else:
                if not isinstance(v, str) or not v:
                    raise StoreConfigError(f"{k}: expected a non-empty string, got {v!r}")
                kw[k] = v
        return cls(**kw)


def _check_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StoreConfigError(f"disk_path: cannot create or write {path!r}: {e.strerror or e}") from None


def _check_redis_url(url: str) -> None:
    u = urlparse(url)
    if u.scheme not in _REDIS_SCHEMES:
        raise StoreConfigError(f"redis_url: scheme must be one of {_REDIS_SCHEMES}, got {url!r}")
    if u.scheme != "unix" and not u.hostname:
        raise StoreConfigError(f"redis_url: no host in {url!r}")
    try:
        _ = u.port
    except ValueError:
        raise StoreConfigError(f"redis_url: bad port in {url!r}") from None
