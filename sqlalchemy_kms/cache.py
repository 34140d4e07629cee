"""The bounded, thread-safe, in-memory cache of unwrapped data keys.

Unwrapped keys live only here, in process memory, never on disk. The cache
holds at most ``max_entries`` keys (the oldest loaded is dropped first) and
each for at most ``max_age`` seconds, after which the next use unwraps the
key through the KMS again: access revoked in the KMS stops reads and writes
within ``max_age``. When many threads miss the same key at once, one of them
loads it and the others wait for that result: one KMS call, not many.

An entry leaves the cache when it is evicted (the bound), replaced, invalidated
or found expired by :meth:`KeyCache.sweep`; ``on_evict`` is then told, outside
the cache's lock, so whoever keeps views of the value (prepared ciphers, the
hot path's maps) drops them too and nothing keeps the key alive.

A hit is one dictionary lookup and one clock comparison.

Example::

    >>> cache = KeyCache(max_entries=2, max_age=300)
    >>> cache.get_or_load(("patients", 1), lambda: "unwrapped key")
    'unwrapped key'
    >>> cache.get(("patients", 1))
    'unwrapped key'
    >>> cache.get(("patients", 2)) is None
    True
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["DEFAULT_MAX_AGE", "DEFAULT_MAX_ENTRIES", "KeyCache"]

#: Default number of unwrapped keys kept (tables x key versions).
DEFAULT_MAX_ENTRIES = 1000
#: Default seconds an unwrapped key is used before the KMS is asked again.
DEFAULT_MAX_AGE = 300.0

V = TypeVar("V")


class KeyCache(Generic[V]):
    """A bounded mapping from a key's identity to its unwrapped form, with a max age.

    ``clock`` (default :func:`time.monotonic`) can be replaced in tests.
    ``on_evict(key, value)`` is called for every entry that leaves the cache
    other than by :meth:`clear` (evicted, replaced, invalidated or swept).
    """

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_age: float = DEFAULT_MAX_AGE,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[Hashable, V], object] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if not max_age > 0:  # also refuses NaN
            raise ValueError("max_age must be positive")
        self.max_entries = max_entries
        self.max_age = float(max_age)
        self._clock = clock
        self._on_evict = on_evict
        self._entries: dict[Hashable, tuple[V, float]] = {}
        self._guard = threading.Lock()
        # key -> (its load lock, threads loading or waiting for it)
        self._loading: dict[Hashable, tuple[threading.Lock, int]] = {}
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return (
            f"<KeyCache entries={len(self._entries)} max_entries={self.max_entries} "
            f"max_age={self.max_age}>"
        )

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> V | None:
        """The cached value, or ``None`` if absent or older than ``max_age``."""
        entry = self._entries.get(key)
        if entry is not None and self._clock() < entry[1]:
            return entry[0]
        return None

    def expires_at(self, key: Hashable) -> float:
        """The clock reading at which ``key`` expires (``-inf`` when absent)."""
        entry = self._entries.get(key)
        return entry[1] if entry is not None else float("-inf")

    def oldest_expiry(self) -> float:
        """The earliest expiry of any entry (``inf`` when empty): until then
        :meth:`sweep` has nothing to drop."""
        with self._guard:
            for _value, expires in self._entries.values():
                return expires
        return float("inf")

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value``, dropping the oldest entries beyond ``max_entries``."""
        dropped: list[tuple[Hashable, V]] = []
        with self._guard:
            old = self._entries.pop(key, None)
            if old is not None and old[0] is not value:
                dropped.append((key, old[0]))
            while len(self._entries) >= self.max_entries:
                oldest = next(iter(self._entries))
                dropped.append((oldest, self._entries.pop(oldest)[0]))
            self._entries[key] = (value, self._clock() + self.max_age)
        self._evicted(dropped)

    def sweep(self) -> int:
        """Drop every expired entry now; returns how many were dropped.

        Entries expire in the order they were stored (one ``max_age`` for all),
        so this looks only at the expired ones and the first fresh one.
        """
        now = self._clock()
        dropped: list[tuple[Hashable, V]] = []
        with self._guard:
            while self._entries:
                key = next(iter(self._entries))
                value, expires = self._entries[key]
                if now < expires:
                    break
                del self._entries[key]
                dropped.append((key, value))
        self._evicted(dropped)
        return len(dropped)

    def _evicted(self, dropped: list[tuple[Hashable, V]]) -> None:
        if self._on_evict is not None:
            for key, value in dropped:
                self._on_evict(key, value)

    def reset_locks(self) -> None:
        """New locks, for a child process after ``fork()``: a lock held by another
        thread of the parent at the moment of the fork would never be released."""
        self._guard = threading.Lock()
        self._loading = {}

    def get_or_load(
        self, key: Hashable, load: Callable[[], V], *, single_flight: bool = True
    ) -> V:
        """The cached value, or the result of ``load()``, called once for concurrent misses.

        ``single_flight=False`` loads without waiting for other loaders: for
        callers that must never block their thread (an event loop), where a
        duplicate load is the lesser cost.
        """
        value = self.get(key)
        if value is not None:
            self.hits += 1
            return value
        if not single_flight:
            self.misses += 1
            value = load()
            self.put(key, value)
            return value
        with self._guard:
            lock, waiting = self._loading.get(key, (None, 0))
            if lock is None:
                lock = threading.Lock()
            self._loading[key] = (lock, waiting + 1)
        try:
            with lock:
                value = self.get(key)
                if value is not None:
                    self.hits += 1
                    return value
                self.misses += 1
                value = load()
                self.put(key, value)
                return value
        finally:
            # the lock lives only while someone loads or waits: the map stays bounded
            with self._guard:
                entry = self._loading.get(key)
                if entry is not None:
                    if entry[1] <= 1:
                        del self._loading[key]
                    else:
                        self._loading[key] = (entry[0], entry[1] - 1)

    def invalidate(self, key: Hashable) -> None:
        """Forget one entry."""
        with self._guard:
            old = self._entries.pop(key, None)
        self._evicted([(key, old[0])] if old is not None else [])

    def clear(self) -> None:
        """Forget every entry."""
        with self._guard:
            self._entries.clear()
