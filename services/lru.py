"""The one least-recently-used map every per-session cache in specd is built on.

Model services keep a KV cache and a committed context per session, the orchestrator a
max-gram index and a record of what each service holds; all are bounded the same way, and
losing an entry only ever costs a recomputation (a re-prefill, a full-context resend).

Pure: standard library only. Not thread-safe: each owner calls it from one thread.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

log = logging.getLogger(__name__)


class Lru(Generic[K, V]):
    """A map of at most `capacity` entries; adding one past it evicts the least recently used.

    `on_evict(key, value)` runs for every entry dropped by eviction (not by `pop`), so an
    owner can free what the value stands for (a llama.cpp sequence, say).

        >>> cache = Lru(2)
        >>> cache["a"] = 1; cache["b"] = 2; _ = cache.get("a"); cache["c"] = 3
        >>> list(cache)  # "b" was least recently used
        ['a', 'c']
    """

    def __init__(self, capacity: int, on_evict: Callable[[K, V], None] | None = None, what: str = "session") -> None:
        if capacity < 1:
            raise ValueError(f"an LRU map needs a capacity >= 1, got {capacity}")
        self.capacity = capacity
        self._on_evict = on_evict
        self._what = what
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The value, marked most recently used; None when absent."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The value without touching its recency; None when absent."""
        return self._entries.get(key)

    def get_or_create(self, key: K, create: Callable[[], V]) -> V:
        value = self.get(key)
        if value is None:
            value = create()
            self[key] = value
        return value

    def __setitem__(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self.evict_oldest()

    def evict_oldest(self) -> K | None:
        """Drops the least recently used entry (calling on_evict); its key, None when empty."""
        if not self._entries:
            return None
        key, value = self._entries.popitem(last=False)
        log.info("evicted %s %s (least recently used, at most %d)", self._what, key, self.capacity)
        if self._on_evict is not None:
            self._on_evict(key, value)
        return key

    def pop(self, key: K) -> V | None:
        """Removes an entry (no on_evict: the caller is freeing it); its value, None when absent."""
        return self._entries.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)
