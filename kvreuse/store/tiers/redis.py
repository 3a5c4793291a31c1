"""Shared tier: entries in Redis (one server or a Redis Cluster), under one byte budget shared by all stores.

Names.  An entry is ``<p>e:<model fingerprint hex>:<key hex>``: the fingerprint is the store's
own (each tensor/pipeline-parallel rank has its own), so ranks and models that share a Redis never
overwrite or evict each other's entries by name.  ``<p>`` is the namespace on a single server; on a
cluster the budget is split into ``CLUSTER_SHARDS`` shards with hash-tagged prefixes
(``<ns>{s<i>}:``), so an entry and the accounting it is evicted by live in one slot, and the
shards spread over the cluster's nodes.

Accounting lives in Redis next to the entries, so every process sees the same totals (per
shard): ``<p>bytes`` (value bytes held), ``<p>prio`` (zset: entry name -> eviction priority),
``<p>size`` (hash: name -> bytes), ``<p>clock`` (the GDSF clock), ``<p>meta`` (hash: name -> the
entry's :class:`~kvreuse.store.persist.IndexRecord`, what a scheduler's directory needs) and
``<p>ver`` (bumped on every change of ``meta``).  A put is one Lua script that evicts
lowest-priority entries until the new one fits, so the budget holds with concurrent writers.
Entries above Redis' 512 MiB value limit are not stored here.

Faults are misses, never errors.  A lost connection backs its failure domain off: the server, or on a
cluster the shard whose node was lost (the other shards keep working).  While backed off, calls there
return at once as misses, without touching the network; the first call after the back-off tries again
(redis-py reconnects by itself and reloads the scripts).  The back-off starts at ``retry_seconds`` and
doubles with every failed try up to ``max_retry_seconds``; a call that succeeds resets it.  The cluster
client itself makes one try a call (its own retries, with their backoff, held each call to a dead node
for 2-5 s), and asks for a topology refresh that the next call runs, which finds a promoted replica.
An error reply (READONLY replica, OOM under ``maxmemory``, NOPERM from an ACL, a cluster slot without a
node) fails that one call.  Both are counted in ``errors``.

A read is several GETRANGE calls, not one atomic read, so another instance's overwrite can tear it.
An entry is deleted as corrupt only while it still starts with the prefix its read began on (one Lua
compare-and-delete); a torn read is a failed load or a miss and deletes nothing.
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Iterator

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from kvreuse.store.keys import ChunkKey
from kvreuse.store.persist import PREFIX_BYTES, EntryCorrupt, EntryHeader, decode_header, header_length

MAX_VALUE_BYTES = 512 * 2**20 - 4096
CLUSTER_SHARDS = 16

_PUT = """
local bytes_k, prio_k, size_k, clock_k, meta_k, ver_k, key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local budget, size, policy = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[5]
if size > budget then return -1 end
local old = redis.call('HGET', size_k, key)
if old then
  redis.call('DECRBY', bytes_k, old); redis.call('HDEL', size_k, key)
  redis.call('ZREM', prio_k, key); redis.call('DEL', key); redis.call('HDEL', meta_k, key)
end
local used = tonumber(redis.call('GET', bytes_k) or '0')
local evicted = 0
while used + size > budget do
  local v = redis.call('ZRANGE', prio_k, 0, 0, 'WITHSCORES')
  if #v == 0 then used = 0; break end
  local vs = tonumber(redis.call('HGET', size_k, v[1]) or '0')
  redis.call('ZREM', prio_k, v[1]); redis.call('HDEL', size_k, v[1]); redis.call('DEL', v[1])
  redis.call('HDEL', meta_k, v[1])
  used = used - vs; evicted = evicted + 1
  if policy == 'cost' then redis.call('SET', clock_k, v[2]) end
end
local prio = tonumber(ARGV[6])
if policy == 'cost' then prio = tonumber(redis.call('GET', clock_k) or '0') + tonumber(ARGV[4]) end
redis.call('SET', key, ARGV[1]); redis.call('HSET', size_k, key, size)
redis.call('ZADD', prio_k, prio, key); redis.call('SET', bytes_k, used + size)
redis.call('HSET', meta_k, key, ARGV[7]); redis.call('INCR', ver_k)
return evicted
"""

_TOUCH = """
if redis.call('ZSCORE', KEYS[2], KEYS[3]) == false then return 0 end
local prio = tonumber(ARGV[2])
if ARGV[1] == 'cost' then prio = tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(ARGV[3]) end
redis.call('ZADD', KEYS[2], 'XX', prio, KEYS[3])
return 1
"""

# Delete an entry and its accounting.  With a version (ARGV[1], the entry's first ARGV[2] bytes as a read
# began with them), only while the entry still starts with it: a read torn by another writer's overwrite
# must not delete the newer entry.  An entry already gone has its accounting removed all the same (a put
# writes both at once, so accounting without an entry is left over from a deletion outside kvreuse).
# Returns -1 when the entry changed since (kept), else how many entries were deleted.
_REMOVE = """
if ARGV[1] ~= '' then
  local cur = redis.call('GETRANGE', KEYS[6], 0, tonumber(ARGV[2]) - 1)
  if cur ~= '' and cur ~= ARGV[1] then return -1 end
end
local s = redis.call('HGET', KEYS[3], KEYS[6])
if s then redis.call('DECRBY', KEYS[1], s); redis.call('HDEL', KEYS[3], KEYS[6]) end
redis.call('ZREM', KEYS[2], KEYS[6])
if redis.call('HDEL', KEYS[4], KEYS[6]) == 1 then redis.call('INCR', KEYS[5]) end
return redis.call('DEL', KEYS[6])
"""

# Connection-level failures: back off, then retry.  Anything else redis-py raises (error replies,
# cluster routing failures) fails the call alone.
_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)
_FAILED = (redis.RedisError, RedisClusterException)


def is_cluster(url: str, timeout_seconds: float = 2.0) -> bool:
    """Whether ``url`` names a Redis Cluster node (``INFO cluster``); False when unreachable."""
    c = redis.Redis.from_url(url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds)
    try:
        return bool(c.info("cluster").get("cluster_enabled"))
    except _FAILED:
        return False
    finally:
        c.close()


class RedisReader:
    """Range reads of one entry value (GETRANGE); a concurrent eviction shows up as a short read.

    ``version``: the entry's prefix as its header was read (magic, header length, header checksum; the
    header holds the payload's checksums, so another entry under the same name has another prefix).
    """

    def __init__(self, tier: "RedisTier", name: str, header: EntryHeader, version: bytes, shard: str) -> None:
        self.tier, self.name, self.header, self.version, self.shard = tier, name, header, version, shard

    def read(self, offset: int, n: int) -> bytes:
        b = self.tier.call(lambda c: c.getrange(self.name, offset, offset + n - 1), default=None, shard=self.shard)
        if b is None:  # unreachable or refused: the load fails, the entry itself is not suspect
            raise OSError(f"Redis read at {offset} failed")
        if len(b) != n:
            raise EntryCorrupt(f"short read at {offset} (entry evicted meanwhile)")
        return b

    def close(self) -> None:
        pass


class RedisTier:
    """Serialized entries in Redis; every failure to reach Redis is a miss and is counted in ``errors``.

    ``cluster``: None detects it from the server (``INFO cluster``) once at start.
    """

    name = "redis"

    def __init__(self, url: str, budget_bytes: int, model: bytes, *, policy: str = "cost",
                 namespace: str = "kvreuse:", timeout_seconds: float = 2.0, bulk_timeout_seconds: float = 120.0,
                 retry_seconds: float = 0.5, max_retry_seconds: float = 8.0, cluster: bool | None = None) -> None:
        assert policy in ("cost", "lru")
        self.budget_bytes, self.model, self.policy = budget_bytes, model, policy
        self.ns, self.model_hex = namespace, model.hex()
        self.retry_seconds, self.max_retry_seconds = retry_seconds, max_retry_seconds
        self.cluster = is_cluster(url, timeout_seconds) if cluster is None else cluster
        if self.cluster:
            self.prefixes = [f"{namespace}{{s{i}}}:" for i in range(CLUSTER_SHARDS)]
            # one try a call: kvreuse's back-off decides when a lost node is tried again
            opts = dict(socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds,
                        retry=Retry(NoBackoff(), 0))
            self.client = redis.RedisCluster.from_url(url, **opts)
            self.bulk = redis.RedisCluster.from_url(url, **{**opts, "socket_timeout": bulk_timeout_seconds})
        else:
            self.prefixes = [namespace]
            self.client = redis.Redis.from_url(url, socket_timeout=timeout_seconds,
                                               socket_connect_timeout=timeout_seconds)
            # Writes move whole entries (up to 512 MiB) and run the eviction script: a longer read timeout.
            self.bulk = redis.Redis.from_url(url, socket_timeout=bulk_timeout_seconds,
                                             socket_connect_timeout=timeout_seconds)
        self.shard_budget = budget_bytes // len(self.prefixes)
        self._put = self.client.register_script(_PUT)
        self._touch = self.client.register_script(_TOUCH)
        self._remove = self.client.register_script(_REMOVE)
        self._down: dict[str | None, tuple[float, float]] = {}  # failure domain -> (back off until, last back-off)
        self.errors = 0
        self.evictions = 0
        self.dropped_corrupt = 0  # entries deleted because a read found their bytes corrupt

    # ---------------------------------------------------------------- names
    def _prefix(self, key: ChunkKey) -> str:
        return self.prefixes[zlib.crc32(key.digest) % len(self.prefixes)]

    def _meta(self, p: str) -> list[str]:
        return [f"{p}bytes", f"{p}prio", f"{p}size", f"{p}clock", f"{p}meta", f"{p}ver"]

    def entry_name(self, key: ChunkKey, model: bytes | None = None) -> str:
        """The Redis key of ``key``'s entry under ``model``'s fingerprint (default: this store's)."""
        return f"{self._prefix(key)}e:{self.model_hex if model is None else model.hex()}:{key.hex()}"

    # ---------------------------------------------------------------- calls
    def _domain(self, shard: str | None) -> str | None:
        """The failure domain of a call: the server (""), or on a cluster the shard (its node); None for a
        cluster call over several shards, which has none of its own."""
        if not self.cluster:
            return ""
        return shard

    def available(self, shard: str | None = None) -> bool:
        """Whether a call to ``shard`` (a prefix; None: the server) would be tried now, not backed off."""
        return time.monotonic() >= self._down.get(self._domain(shard), (0.0, 0.0))[0]

    def backoff_seconds(self, shard: str | None = None) -> float:
        """The current back-off of ``shard``'s failure domain (0 while it answers)."""
        return self._down.get(self._domain(shard), (0.0, 0.0))[1]

    def call(self, fn: Any, default: Any = None, *, bulk: bool = False, shard: str | None = None) -> Any:
        """``fn(client)``, or ``default`` when Redis is unreachable or answers with an error (counted).

        ``shard``: the prefix every key ``fn`` touches lives under, whose node a cluster call reaches; a
        cluster call without one (several shards) is never backed off, only failed."""
        dom = self._domain(shard)
        if time.monotonic() < self._down.get(dom, (0.0, 0.0))[0]:  # backed off
            return default
        try:
            out = fn(self.bulk if bulk else self.client)
        except _DOWN:
            self.errors += 1
            now = time.monotonic()
            until, last = self._down.get(dom, (0.0, 0.0))
            if dom is not None and now >= until:  # not already backed off by a call that failed meanwhile
                wait = min(self.max_retry_seconds, 2 * last) if last else self.retry_seconds
                self._down[dom] = (now + wait, wait)
            return default
        except _FAILED:
            self.errors += 1
            return default
        self._down.pop(dom, None)
        return out

    # ---------------------------------------------------------------- entries
    def put_blob(self, key: ChunkKey, blob: bytes, *, cost: float, hits: int) -> bool:
        """Store a serialized entry, evicting others as needed; False if it cannot be stored now."""
        if len(blob) > min(self.shard_budget, MAX_VALUE_BYTES):
            return False
        try:
            h = decode_header(blob[:PREFIX_BYTES + header_length(blob[:PREFIX_BYTES])], model=self.model, key=key)
        except EntryCorrupt:
            return False
        delta = (hits + 1) * cost / max(len(blob), 1)
        p = self._prefix(key)
        r = self.call(lambda c: self._put(keys=[*self._meta(p), self.entry_name(key)],
                                          args=[blob, self.shard_budget, len(blob), delta, self.policy,
                                                time.time(), h.record().pack()], client=c), default=None, bulk=True,
                      shard=p)
        if r is None or r < 0:
            return False
        self.evictions += int(r)
        return True

    def touch(self, key: ChunkKey, *, nbytes: int, cost: float, hits: int) -> None:
        delta = (hits + 1) * cost / max(nbytes, 1)
        p = self._prefix(key)
        m = self._meta(p)
        self.call(lambda c: self._touch(keys=[m[3], m[1], self.entry_name(key)],
                                        args=[self.policy, time.time(), delta], client=c), shard=p)

    def contains(self, key: ChunkKey) -> bool:
        return bool(self.call(lambda c: c.exists(self.entry_name(key)), default=0, shard=self._prefix(key)))

    def remove(self, key: ChunkKey) -> None:
        """Delete ``key``'s entry and its accounting, whatever it holds."""
        self._remove_if(key, b"")

    def drop_corrupt(self, key: ChunkKey, version: bytes) -> bool:
        """Delete ``key``'s entry that a read found corrupt, only if it is still the entry that read began
        on (its prefix is still ``version``, :attr:`RedisReader.version`); True if deleted.

        A read is several GETRANGE calls: one torn by another instance's overwrite (or an eviction and a
        new put) sees bytes of two entries, and the newer entry is kept.  Counted in ``dropped_corrupt``.
        """
        r = self._remove_if(key, version)
        if r is not None and r > 0:
            self.dropped_corrupt += 1
        return bool(r is not None and r > 0)

    def _remove_if(self, key: ChunkKey, version: bytes) -> int | None:
        p = self._prefix(key)
        m = self._meta(p)
        return self.call(lambda c: self._remove(keys=[m[0], m[1], m[2], m[4], m[5], self.entry_name(key)],
                                                args=[version, PREFIX_BYTES], client=c), shard=p)

    def open(self, key: ChunkKey) -> RedisReader | None:
        """A range reader over ``key``'s value, or None (absent, unreachable, changed under the read, or a
        bad header: removed)."""
        name, shard = self.entry_name(key), self._prefix(key)
        prefix = self.call(lambda c: c.getrange(name, 0, PREFIX_BYTES - 1), default=None, shard=shard)
        if not prefix:
            return None
        try:
            n = header_length(prefix)
        except EntryCorrupt:
            self.drop_corrupt(key, prefix)
            return None
        head = self.call(lambda c: c.getrange(name, 0, PREFIX_BYTES + n - 1), default=None, shard=shard)
        if head is None or head[:PREFIX_BYTES] != prefix:  # overwritten between the two reads: a miss
            return None
        try:
            h = decode_header(head, model=self.model, key=key)
        except EntryCorrupt:
            self.drop_corrupt(key, prefix)
            return None
        return RedisReader(self, name, h, prefix, shard)

    def get_blob(self, key: ChunkKey) -> bytes | None:
        return self.call(lambda c: c.get(self.entry_name(key)), default=None, bulk=True, shard=self._prefix(key))

    # ---------------------------------------------------------------- index (for directories)
    def index_version(self) -> tuple[int | None, ...] | None:
        """Each shard's change counter (None for a shard that cannot be read; None when none can)."""
        vers = tuple(self.call(lambda c, p=p: int(c.get(f"{p}ver") or 0), default=None, shard=p)
                     for p in self.prefixes)
        return None if all(v is None for v in vers) else vers

    def index_records(self, model: bytes, limit: int) -> dict[bytes, bytes] | None:
        """Packed :class:`IndexRecord` of every entry of ``model`` (at most ``limit``), by key digest.

        One HSCAN per shard; a shard that cannot be read contributes nothing (its entries cannot be
        read either); None when no shard can be read (the caller keeps what it had).
        """
        pattern = f"e:{model.hex()}:*"
        out: dict[bytes, bytes] = {}
        read = 0
        for p in self.prefixes:
            def f(c: Any, p: str = p) -> dict[bytes, bytes]:
                got: dict[bytes, bytes] = {}
                for name, rec in c.hscan_iter(f"{p}meta", match=p + pattern, count=1000):
                    got[bytes.fromhex(name.decode()[-32:])] = rec
                    if len(out) + len(got) >= limit:
                        break
                return got
            got = self.call(f, default=None, shard=p)
            if got is None:
                continue
            read += 1
            out.update(got)
            if len(out) >= limit:
                break
        return out if read else None

    # ---------------------------------------------------------------- accounting
    def used_bytes(self) -> int | None:
        """Bytes held by all stores sharing this Redis namespace (None when unreachable)."""
        u = self.usage()
        return None if u is None else u[0]

    def usage(self) -> tuple[int, int] | None:
        """(bytes, entries) held by all stores sharing this Redis namespace, read from the accounting
        (no scan); None when unreachable."""
        per = [self.call(lambda c, p=p: (int(c.get(f"{p}bytes") or 0), int(c.hlen(f"{p}size"))), default=None, shard=p)
               for p in self.prefixes]
        if any(u is None for u in per):
            return None
        return sum(u[0] for u in per), sum(u[1] for u in per)

    def _entry_names(self, c: Any) -> Iterator[bytes]:
        for p in self.prefixes:
            yield from c.scan_iter(match=f"{p}e:*", count=1000)

    def actual_bytes(self) -> int | None:
        """Sum of the stored values' lengths, measured (for tests / audits)."""
        return self.call(lambda c: sum(c.strlen(k) for k in self._entry_names(c)), default=None)

    def close(self) -> None:
        self.client.close()
        self.bulk.close()
