"""An exact prefix cache of recurrent states, for a serving engine (``ssdkit.inference.engine``).

A recurrent model's whole context is its cache (conv windows and state: a few MB, whatever the length),
so the cache after any prefix of a prompt is a complete snapshot: a later prompt that starts with the
same tokens resumes from it and prefills only the rest. :class:`PrefixCache` keeps such snapshots
(the model's cache for one row and the logits after the prefix), keyed by the prefix's token ids, in an
LRU bounded by bytes.

Where snapshots are taken is the engine's choice (:meth:`PrefixCache.boundaries`):

* at every multiple of ``interval`` tokens (so a long shared prefix hits at most ``interval - 1``
  tokens short);
* at the end of every prompt (an identical prompt hits its full length, however short);
* at the branch point: the longest prefix the new prompt shares with any cached prompt
  (:meth:`PrefixCache.longest_shared`), so that a third prompt sharing that prefix hits all of it.

Lookups are exact: a key is a hash chain over the ids, and a hit is confirmed by comparing the stored
ids, so a collision can cost a miss, never a wrong state. The arrays are kept as they are (JAX arrays
are immutable): storing one copies nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Any

import jax
import numpy as np


def _digest(previous: bytes, ids: np.ndarray) -> bytes:
    return hashlib.blake2b(previous + np.ascontiguousarray(ids, np.int32).tobytes(), digest_size=16).digest()


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The model's cache for one row after ``ids`` (the prefix), and the logits (1, vocab) after it."""

    ids: np.ndarray
    cache: Any
    logits: jax.Array

    @property
    def nbytes(self) -> int:
        leaves = jax.tree_util.tree_leaves((self.cache, self.logits))
        return int(sum(a.size * a.dtype.itemsize for a in leaves)) + self.ids.nbytes


@dataclasses.dataclass
class PrefixCacheStats:
    """Counters since the cache was made (read by ``/metrics``)."""

    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0  # prompt tokens not prefilled thanks to a hit
    lookup_tokens: int = 0  # prompt tokens looked up
    stored: int = 0
    evicted: int = 0


class PrefixChain:
    """The hash chain of one prompt: ``key(p)`` for any prefix length p in O(p mod interval)."""

    def __init__(self, ids: np.ndarray, interval: int):
        self.ids = np.asarray(ids, np.int32)
        self.interval = interval
        self._blocks = [b""]
        for start in range(0, len(self.ids) - interval + 1, interval):
            self._blocks.append(_digest(self._blocks[-1], self.ids[start:start + interval]))

    def key(self, length: int) -> bytes:
        full = length // self.interval
        tail = self.ids[full * self.interval:length]
        return _digest(self._blocks[full] + length.to_bytes(8, "little"), tail)


class PrefixCache:
    """Snapshots of recurrent caches by prefix, LRU, at most ``capacity_bytes`` in all.

    Not thread-safe: the engine's thread is its only user.
    """

    def __init__(self, capacity_bytes: int, interval: int):
        if interval < 1:
            raise ValueError(f"the snapshot interval must be >= 1 token, got {interval}")
        self.capacity_bytes = int(capacity_bytes)
        self.interval = int(interval)
        self._entries: collections.OrderedDict[bytes, Snapshot] = collections.OrderedDict()
        self._lengths: collections.Counter[int] = collections.Counter()  # lengths of stored prefixes
        self.nbytes = 0
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def chain(self, ids: np.ndarray) -> PrefixChain:
        return PrefixChain(ids, self.interval)

    def lookup(self, chain: PrefixChain) -> Snapshot | None:
        """The snapshot of the longest cached prefix of ``chain.ids`` (the whole prompt included), or None."""
        n = len(chain.ids)
        self.stats.lookups += 1
        self.stats.lookup_tokens += n
        candidates = sorted({p for p in self._lengths if p <= n}, reverse=True)
        for p in candidates:
            snap = self._entries.get(chain.key(p))
            if snap is not None and np.array_equal(snap.ids, chain.ids[:p]):
                self._entries.move_to_end(chain.key(p))
                self.stats.hits += 1
                self.stats.hit_tokens += p
                return snap
        return None

    def longest_shared(self, ids: np.ndarray) -> int:
        """The longest prefix ``ids`` shares with any cached snapshot's ids (0 if none)."""
        best = 0
        for snap in self._entries.values():
            m = min(len(snap.ids), len(ids))
            if m <= best:
                continue
            diff = np.flatnonzero(snap.ids[:m] != ids[:m])
            best = max(best, int(diff[0]) if diff.size else m)
        return best

    def boundaries(self, ids: np.ndarray, start: int) -> list[int]:
        """Where a prompt's prefill from ``start`` should stop to snapshot, ascending, the prompt's end
        last: the multiples of the interval, the branch point (:meth:`longest_shared`) and the end."""
        n = len(ids)
        points = set(range((start // self.interval + 1) * self.interval, n, self.interval))
        shared = self.longest_shared(ids)
        if start < shared < n:
            points.add(shared)
        points.add(n)
        return sorted(p for p in points if p > start)

    def store(self, chain: PrefixChain, length: int, cache: Any, logits: jax.Array) -> None:
        """Keep the cache after ``chain.ids[:length]`` (evicting the least recently used past the capacity;
        a snapshot larger than the whole capacity is not kept)."""
        key = chain.key(length)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        snap = Snapshot(chain.ids[:length].copy(), cache, logits)
        size = snap.nbytes
        if size > self.capacity_bytes:
            return
        while self.nbytes + size > self.capacity_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self._forget(old)
            self.stats.evicted += 1
        self._entries[key] = snap
        self._lengths[length] += 1
        self.nbytes += size
        self.stats.stored += 1

    def _forget(self, snap: Snapshot) -> None:
        self.nbytes -= snap.nbytes
        self._lengths[len(snap.ids)] -= 1
        if not self._lengths[len(snap.ids)]:
            del self._lengths[len(snap.ids)]

    def clear(self) -> None:
        self._entries.clear()
        self._lengths.clear()
        self.nbytes = 0
