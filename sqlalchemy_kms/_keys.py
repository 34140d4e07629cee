"""The unwrapped keys of this process: one :class:`TableKeys` per key series, bounded together.

:class:`KeyStore` owns every unwrapped data key the process holds. Each key
is one :class:`~sqlalchemy_kms._cipher.DataKeyCipher` in a bounded
:class:`~sqlalchemy_kms.cache.KeyCache` (``cache_max_entries`` keys, each for
at most ``cache_max_age`` seconds). What the hot path needs of the keys of
one table and mode lives in one :class:`TableKeys`:

* the active key (what new values are written under) and, for deterministic
  columns, every enabled key newest first (what equality must match);
* the keys by stored header, and the subkeys of the salts seen (so a read is
  one dictionary hit);
* nothing else: no entry of it outlives the key it was made from. When the
  cache evicts a key, or finds it expired, the store removes it from its
  :class:`TableKeys`; an empty :class:`TableKeys` is dropped.

Freshness is one number: :attr:`KeyStore.fresh_until`, the earliest moment
any entry expires (a key's ``cache_max_age``, an active key's
``refresh_interval``). Before it, every entry is fresh, so the hot path
compares the clock once; after it, the next lookup of any table sweeps the
store and drops what expired.

Example::

    >>> import os
    >>> from sqlalchemy_kms._cipher import DataKeyCipher
    >>> from sqlalchemy_kms._keytable import KeySeries
    >>> store = KeyStore(max_entries=10, max_age=300, refresh_interval=60)
    >>> series = KeySeries("patients", deterministic=False)
    >>> cipher = store.put(series, DataKeyCipher(os.urandom(32), key_version=1))
    >>> store.set_active(series, cipher)
    >>> store.fresh(series).active is cipher
    True
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._cipher import MAX_READER_SUBKEYS, DataKeyCipher, header_of, salt_prefix
from ._format import ALG_DETERMINISTIC, ALG_RANDOMIZED, pack_header
from ._keytable import KeySeries
from .cache import KeyCache

__all__ = ["KeyStore", "TableKeys"]

_NEVER: Final = float("inf")


class TableKeys:
    """The unwrapped keys of one key series (one table, one mode) in this process.

    Holds references only to keys the store's cache holds; the store removes
    them when the cache lets a key go.
    """

    __slots__ = ("_openers", "active", "by_header", "deterministic", "enabled", "series")

    def __init__(self, series: KeySeries) -> None:
        self.series = series
        self.deterministic = series.deterministic
        #: The key new values are written under, while fresh; ``None`` until read.
        self.active: DataKeyCipher | None = None
        #: Every enabled key, newest first (deterministic equality matches them all).
        self.enabled: list[DataKeyCipher] | None = None
        #: Stored header -> the key it names.
        self.by_header: dict[bytes, DataKeyCipher] = {}
        # header || salt -> the subkey that opens randomized values of that writer
        self._openers: dict[bytes, AESGCM] = {}

    def __repr__(self) -> str:
        versions = sorted(cipher.key_version for cipher in self.by_header.values())
        return f"<TableKeys {self.series.scope!r} deterministic={self.deterministic} {versions}>"

    def open(self, stored: bytes, aad: bytes, column: str) -> bytes | None:
        """The plaintext of a stored value whose key this object holds, else ``None``.

        Unchecked (the hot path): a value of another mode or an unknown version
        gives ``None``; a value that fails authentication raises
        ``cryptography.exceptions.InvalidTag``. The caller's complete path
        raises the documented error for both.
        """
        if self.deterministic:
            cipher = self.by_header.get(header_of(stored))
            if cipher is None:
                return None
            return cipher.open(stored, aad, self.series.scope, column)
        prefix = salt_prefix(stored)
        aead = self._openers.get(prefix)
        if aead is None:
            cipher = self.by_header.get(header_of(stored))
            if cipher is None:
                return None
            aead = cipher.subkey(stored[len(cipher.header) : len(prefix)])
            if len(self._openers) >= MAX_READER_SUBKEYS:
                self._openers.pop(next(iter(self._openers)), None)
            self._openers[prefix] = aead
        return DataKeyCipher.open_salted(aead, stored, aad)

    def _add(self, cipher: DataKeyCipher) -> None:
        algorithm = ALG_DETERMINISTIC if self.deterministic else ALG_RANDOMIZED
        self.by_header[pack_header(algorithm, cipher.key_version)] = cipher

    def _drop(self, cipher: DataKeyCipher) -> None:
        """Forget ``cipher`` and everything made from it."""
        for header, known in list(self.by_header.items()):
            if known is cipher:
                del self.by_header[header]
                for prefix in [p for p in self._openers if p.startswith(header)]:
                    del self._openers[prefix]
        if self.active is cipher:
            self.active = None
        if self.enabled is not None and any(known is cipher for known in self.enabled):
            self.enabled = None

    def _empty(self) -> bool:
        return not self.by_header and self.active is None and self.enabled is None


class KeyStore:
    """Every unwrapped key of one vault, bounded by count and age together.

    :param max_entries: unwrapped keys kept (tables x modes x versions).
    :param max_age: seconds a key is used before it is unwrapped again.
    :param refresh_interval: seconds an active key (and a list of enabled keys)
        is used before the key table is read again.
    :param clock: replaceable in tests (default :func:`time.monotonic`).
    """

    def __init__(
        self,
        max_entries: int,
        max_age: float,
        refresh_interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.refresh_interval = float(refresh_interval)
        self._clock = clock
        self._guard = threading.RLock()
        self._tables: dict[KeySeries, TableKeys] = {}
        # series -> when its active key / enabled list must be read again
        self._refresh: dict[KeySeries, float] = {}
        #: The earliest moment any entry expires: before it, everything is fresh.
        self.fresh_until = _NEVER
        self.cache: KeyCache[DataKeyCipher] = KeyCache(
            max_entries, max_age, clock=clock, on_evict=self._evicted
        )
        # striped single-flight locks: a fixed number, however many tables
        self._locks = tuple(threading.Lock() for _ in range(64))
        _LIVE_STORES.add(self)

    def __repr__(self) -> str:
        return f"<KeyStore tables={len(self._tables)} keys={len(self.cache)}>"

    def __len__(self) -> int:
        return len(self.cache)

    # -- the hot path ------------------------------------------------------------

    def fresh(self, series: KeySeries) -> TableKeys | None:
        """The keys of ``series`` if every entry of the store is fresh, else ``None``
        (the caller's complete path then calls :meth:`sweep` through the loader)."""
        if self._clock() < self.fresh_until:
            return self._tables.get(series)
        return None

    # -- filling ----------------------------------------------------------------------

    def get(self, series: KeySeries, version: int) -> DataKeyCipher | None:
        """The unwrapped key ``version`` of ``series``, if held and fresh."""
        return self.cache.get((series.scope, series.purpose, version))

    def get_or_load(
        self,
        series: KeySeries,
        version: int,
        load: Callable[[], DataKeyCipher],
        *,
        single_flight: bool = True,
    ) -> DataKeyCipher:
        """The key ``version`` of ``series``, loaded (once for concurrent callers) if needed."""
        key = (series.scope, series.purpose, version)
        cipher = self.cache.get_or_load(key, load, single_flight=single_flight)
        self._index(series, cipher)
        return cipher

    def put(self, series: KeySeries, cipher: DataKeyCipher) -> DataKeyCipher:
        """Hold ``cipher`` as the key ``cipher.key_version`` of ``series``."""
        self.cache.put((series.scope, series.purpose, cipher.key_version), cipher)
        self._index(series, cipher)
        return cipher

    def _index(self, series: KeySeries, cipher: DataKeyCipher) -> None:
        with self._guard:
            if self.cache.get((series.scope, series.purpose, cipher.key_version)) is not cipher:
                return  # evicted meanwhile (a bound smaller than the keys in use)
            keys = self._tables.get(series)
            if keys is None:
                keys = self._tables[series] = TableKeys(series)
            keys._add(cipher)
            self.fresh_until = min(self.fresh_until, self.cache.expires_at(
                (series.scope, series.purpose, cipher.key_version)
            ))

    def set_active(self, series: KeySeries, cipher: DataKeyCipher) -> None:
        """Use ``cipher`` for new values of ``series`` until the refresh interval ends."""
        with self._guard:
            if self.get(series, cipher.key_version) is not cipher:
                return  # not held (evicted, or pending in a transaction): not shared
            self._table(series).active = cipher
            self._until(series)

    def set_enabled(self, series: KeySeries, ciphers: Sequence[DataKeyCipher]) -> None:
        """Remember the enabled keys of ``series``, newest first, until the refresh ends."""
        with self._guard:
            if any(self.get(series, c.key_version) is not c for c in ciphers):
                return
            self._table(series).enabled = list(ciphers)
            self._until(series)

    def _table(self, series: KeySeries) -> TableKeys:
        keys = self._tables.get(series)
        if keys is None:
            keys = self._tables[series] = TableKeys(series)
        return keys

    def _until(self, series: KeySeries) -> None:
        until = self._refresh.get(series)
        if until is None:
            until = self._refresh[series] = self._clock() + self.refresh_interval
        self.fresh_until = min(self.fresh_until, until)

    def lock(self, series: KeySeries) -> threading.Lock:
        """The single-flight lock of ``series`` (one of a fixed set)."""
        return self._locks[hash(series) % len(self._locks)]

    # -- letting go ------------------------------------------------------------------

    def sweep(self) -> None:
        """Drop every expired key and every active key or list due for a refresh."""
        if self._clock() < self.fresh_until:
            return
        self.cache.sweep()
        with self._guard:
            now = self._clock()
            for series, until in list(self._refresh.items()):
                if now >= until:
                    del self._refresh[series]
                    keys = self._tables.get(series)
                    if keys is not None:
                        keys.active = keys.enabled = None
                        if keys._empty():
                            del self._tables[series]
            self.fresh_until = min([self.cache.oldest_expiry(), *self._refresh.values()])

    def _evicted(self, key: Hashable, cipher: DataKeyCipher) -> None:
        entry: tuple[str, str, int] = key  # type: ignore[assignment]
        series = KeySeries.of(entry[0], entry[1])
        with self._guard:
            keys = self._tables.get(series)
            if keys is not None:
                keys._drop(cipher)
                if keys._empty():
                    del self._tables[series]
                    self._refresh.pop(series, None)

    def forget(self, series: KeySeries) -> None:
        """Read ``series`` from the key table again on next use (after a key change);
        held keys stay for reading."""
        with self._guard:
            self._refresh.pop(series, None)
            keys = self._tables.get(series)
            if keys is not None:
                keys.active = keys.enabled = None
                if keys._empty():
                    del self._tables[series]

    def invalidate(self, series: KeySeries, version: int) -> None:
        """Drop one key version (destroyed)."""
        self.cache.invalidate((series.scope, series.purpose, version))
        self.forget(series)

    def adopt_pending(self, pending: Mapping[Any, DataKeyCipher]) -> None:
        """Keys made inside a transaction that committed (pending on its connection,
        see :mod:`sqlalchemy_kms._connections`): held from now on like any other."""
        for key, cipher in pending.items():
            if isinstance(key, tuple) and isinstance(key[0], KeySeries):
                self.put(key[0], cipher)

    def discard_pending(self, pending: Mapping[Any, DataKeyCipher]) -> None:
        """Keys made inside a transaction that rolled back never existed: drop them."""
        for key, cipher in pending.items():
            held = (
                isinstance(key, tuple)
                and isinstance(key[0], KeySeries)
                and self.get(key[0], key[1]) is cipher
            )
            if held:
                self.invalidate(key[0], key[1])

    def clear(self) -> None:
        """Drop every key."""
        with self._guard:
            self.cache.clear()
            self._tables.clear()
            self._refresh.clear()
            self.fresh_until = _NEVER

    def tables(self) -> int:
        """How many key series have state in this store."""
        return len(self._tables)

    def _after_fork(self) -> None:
        self._guard = threading.RLock()
        self._locks = tuple(threading.Lock() for _ in range(len(self._locks)))
        self.cache.reset_locks()


_LIVE_STORES: weakref.WeakSet[KeyStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_LIVE_STORES):
        store._after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork()
    os.register_at_fork(after_in_child=_after_fork_in_child)
