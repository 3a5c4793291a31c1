"""Shared tier: entries in a Redis server (single node), under one byte budget shared by all stores.

Accounting lives in Redis next to the entries, so every process sees the same totals:
``<ns>bytes`` (value bytes held), ``<ns>prio`` (zset: entry key -> eviction priority),
``<ns>size`` (hash: entry key -> bytes) and ``<ns>clock`` (the GDSF clock).  A put is one Lua
script that evicts lowest-priority entries until the new one fits, so the budget holds even with
concurrent writers.  Entries above Redis' 512 MiB value limit are not stored here.

A lost connection is a miss, never an error: the tier backs off for ``retry_seconds`` and then
tries again; redis-py reconnects by itself and reloads the scripts.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from kvreuse.store.keys import ChunkKey
from kvreuse.store.persist import PREFIX_BYTES, EntryCorrupt, EntryHeader, decode_header, header_length

MAX_VALUE_BYTES = 512 * 2**20 - 4096

_PUT = """
local bytes_k, prio_k, size_k, clock_k, key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local budget, size, policy = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[5]
if size > budget then return -1 end
local old = redis.call('HGET', size_k, key)
if old then
  redis.call('DECRBY', bytes_k, old); redis.call('HDEL', size_k, key)
  redis.call('ZREM', prio_k, key); redis.call('DEL', key)
end
local used = tonumber(redis.call('GET', bytes_k) or '0')
local evicted = 0
while used + size > budget do
  local v = redis.call('ZRANGE', prio_k, 0, 0, 'WITHSCORES')
  if #v == 0 then used = 0; break end
  local vs = tonumber(redis.call('HGET', size_k, v[1]) or '0')
  redis.call('ZREM', prio_k, v[1]); redis.call('HDEL', size_k, v[1]); redis.call('DEL', v[1])
  used = used - vs; evicted = evicted + 1
  if policy == 'cost' then redis.call('SET', clock_k, v[2]) end
end
local prio = tonumber(ARGV[6])
if policy == 'cost' then prio = tonumber(redis.call('GET', clock_k) or '0') + tonumber(ARGV[4]) end
redis.call('SET', key, ARGV[1]); redis.call('HSET', size_k, key, size)
redis.call('ZADD', prio_k, prio, key); redis.call('SET', bytes_k, used + size)
return evicted
"""

_TOUCH = """
if redis.call('ZSCORE', KEYS[2], KEYS[3]) == false then return 0 end
local prio = tonumber(ARGV[2])
if ARGV[1] == 'cost' then prio = tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(ARGV[3]) end
redis.call('ZADD', KEYS[2], 'XX', prio, KEYS[3])
return 1
"""

_REMOVE = """
local s = redis.call('HGET', KEYS[3], KEYS[4])
if s then redis.call('DECRBY', KEYS[1], s); redis.call('HDEL', KEYS[3], KEYS[4]) end
redis.call('ZREM', KEYS[2], KEYS[4]); return redis.call('DEL', KEYS[4])
"""

_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)


class RedisReader:
    """Range reads of one entry value (GETRANGE); a concurrent eviction shows up as a short read."""

    def __init__(self, tier: "RedisTier", name: str, header: EntryHeader) -> None:
        self.tier, self.name, self.header = tier, name, header

    def read(self, offset: int, n: int) -> bytes:
        b = self.tier._call(lambda c: c.getrange(self.name, offset, offset + n - 1), default=None)
        if b is None or len(b) != n:
            raise EntryCorrupt(f"short read at {offset} (entry evicted or Redis unreachable)")
        return b

    def close(self) -> None:
        pass


class RedisTier:
    """Serialized entries in Redis; every failure to reach Redis is a miss and is counted in ``errors``."""

    name = "redis"

    def __init__(self, url: str, budget_bytes: int, model: bytes, *, policy: str = "cost",
                 namespace: str = "kvreuse:", timeout_seconds: float = 2.0, bulk_timeout_seconds: float = 120.0,
                 retry_seconds: float = 0.5) -> None:
        assert policy in ("cost", "lru")
        self.budget_bytes, self.model, self.policy = budget_bytes, model, policy
        self.ns = namespace
        self.retry_seconds = retry_seconds
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_seconds,
                                           socket_connect_timeout=timeout_seconds)
        # Writes move whole entries (up to 512 MiB) and run the eviction script: a longer read timeout.
        self.bulk = redis.Redis.from_url(url, socket_timeout=bulk_timeout_seconds,
                                         socket_connect_timeout=timeout_seconds)
        self._put = self.client.register_script(_PUT)
        self._touch = self.client.register_script(_TOUCH)
        self._remove = self.client.register_script(_REMOVE)
        self._meta = [f"{namespace}bytes", f"{namespace}prio", f"{namespace}size", f"{namespace}clock"]
        self._down_until = 0.0
        self.errors = 0
        self.evictions = 0

    def _name(self, key: ChunkKey) -> str:
        return f"{self.ns}e:{key.hex()}"

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _call(self, fn: Any, default: Any = None, *, bulk: bool = False) -> Any:
        if not self.available:
            return default
        try:
            return fn(self.bulk if bulk else self.client)
        except _DOWN:
            self.errors += 1
            self._down_until = time.monotonic() + self.retry_seconds
            return default

    def put_blob(self, key: ChunkKey, blob: bytes, *, cost: float, hits: int) -> bool:
        """Store a serialized entry, evicting others as needed; False if it cannot be stored now."""
        if len(blob) > min(self.budget_bytes, MAX_VALUE_BYTES):
            return False
        delta = (hits + 1) * cost / max(len(blob), 1)
        r = self._call(lambda c: self._put(keys=[*self._meta, self._name(key)],
                                           args=[blob, self.budget_bytes, len(blob), delta, self.policy,
                                                 time.time()], client=c), default=None, bulk=True)
        if r is None or r < 0:
            return False
        self.evictions += int(r)
        return True

    def touch(self, key: ChunkKey, *, nbytes: int, cost: float, hits: int) -> None:
        delta = (hits + 1) * cost / max(nbytes, 1)
        self._call(lambda c: self._touch(keys=[self._meta[3], self._meta[1], self._name(key)],
                                         args=[self.policy, time.time(), delta], client=c))

    def contains(self, key: ChunkKey) -> bool:
        return bool(self._call(lambda c: c.exists(self._name(key)), default=0))

    def remove(self, key: ChunkKey) -> None:
        self._call(lambda c: self._remove(keys=[*self._meta[:3], self._name(key)], client=c))

    def open(self, key: ChunkKey) -> RedisReader | None:
        """A range reader over ``key``'s value, or None (absent, unreachable, or a bad header: removed)."""
        name = self._name(key)
        prefix = self._call(lambda c: c.getrange(name, 0, PREFIX_BYTES - 1), default=None)
        if not prefix:
            return None
        try:
            n = header_length(prefix)
            head = self._call(lambda c: c.getrange(name, 0, PREFIX_BYTES + n - 1), default=None)
            if head is None:
                return None
            h = decode_header(head, model=self.model, key=key)
        except EntryCorrupt:
            self.remove(key)
            return None
        return RedisReader(self, name, h)

    def get_blob(self, key: ChunkKey) -> bytes | None:
        return self._call(lambda c: c.get(self._name(key)), default=None, bulk=True)

    def used_bytes(self) -> int | None:
        """Bytes held by all stores sharing this Redis namespace (None when unreachable)."""
        v = self._call(lambda c: c.get(self._meta[0]), default=None)
        return None if v is None else int(v)

    def actual_bytes(self) -> int | None:
        """Sum of the stored values' lengths, measured (for tests / audits)."""
        def f(c: redis.Redis) -> int:
            return sum(c.strlen(k) for k in c.scan_iter(match=f"{self.ns}e:*", count=1000))
        return self._call(f, default=None)

    def close(self) -> None:
        self.client.close()
        self.bulk.close()
