"""Finding a key: read the key table, unwrap through the provider, hold it in the store.

:class:`KeyLoader` is the complete path behind the hot path's
:class:`~sqlalchemy_kms._keys.KeyStore`: it answers "which key do new values
of this table use", "which keys can equality match" and "which key is
version N", making a table's first key when it has none, and committing a
new key before any value is encrypted under it (or, inside a shared
connection, inside that connection's transaction; see
:mod:`sqlalchemy_kms._connections`).

Every lookup starts with a sweep of the store, so keys past their age are
dropped no later than the next key operation of the vault on any table.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from sqlalchemy import exc
from sqlalchemy.engine import Connection

from ._cipher import DataKeyCipher
from ._connections import Connections
from ._format import MAX_KEY_VERSION
from ._keys import KeyStore
from ._keytable import KeyRow, KeySeries, KeyTable
from .audit import key_event, kms_call
from .errors import ConfigurationError, KeyLifecycleError, UnknownKeyVersionError
from .providers.base import KeyProvider, encryption_context

__all__ = ["KeyLoader"]


class KeyLoader:
    """Reads, makes and unwraps the keys of one vault.

    :param provider: returns the provider new keys are made with (it changes on rewrap).
    :param unwrapping: returns the provider that unwraps existing keys: the same, or
        one that also holds the master keys it replaced.
    :param is_async: an async engine: never block the event loop on a lock.
    """

    def __init__(
        self,
        keys: KeyTable,
        connections: Connections,
        store: KeyStore,
        provider: Callable[[], KeyProvider],
        *,
        unwrapping: Callable[[], KeyProvider] | None = None,
        is_async: bool,
    ) -> None:
        self.keys = keys
        self.connections = connections
        self.store = store
        self._provider = provider
        self._unwrapping = unwrapping or provider
        self._is_async = is_async

    def _lock(self, series: KeySeries) -> AbstractContextManager[Any]:
        """Single-flight lock of one series; none on an async engine, whose event loop
        must never block on a lock held across the driver's awaits (the key table's
        primary key settles races there)."""
        return nullcontext() if self._is_async else self.store.lock(series)

    # -- making keys -------------------------------------------------------------

    def make(self, conn: Connection, series: KeySeries, version: int) -> DataKeyCipher:
        """Make key ``version`` of ``series`` with the provider and insert it on ``conn``.

        A key is inserted only under a master key the unwrapping provider owns:
        a row this vault would refuse to unwrap later is never written, nor a
        value encrypted under it now.
        """
        context = encryption_context(series.scope, series.purpose, version)
        provider = self._provider()
        generated = kms_call(
            "GenerateDataKey",
            context,
            provider.master_key_id,
            lambda: provider.generate_data_key(context),
        )
        unwrapping = self._unwrapping()
        if not unwrapping.owns(generated.master_key_id, resolve=True):
            raise ConfigurationError(
                f"{provider!r} made a key under master key {generated.master_key_id}, which "
                f"{unwrapping!r} does not own, so this vault could not read it back: a "
                "provider's owns() must answer for every master key id its calls return",
                table=series.scope,
                key_version=version,
                master_key_id=generated.master_key_id,
                operation="GenerateDataKey",
            )
        self.keys.insert(
            conn,
            series,
            version,
            provider=provider.name,
            master_key_id=generated.master_key_id,
            wrapped=generated.wrapped,
        )
        key_event(
            "rotate" if version > 1 else "create",
            series.scope,
            series.purpose,
            version,
            generated.master_key_id,
        )
        return DataKeyCipher(generated.plaintext, version)

    def _make_committed(self, series: KeySeries, version: int) -> DataKeyCipher | None:
        """Make and commit a key in its own transaction; ``None`` if another process won."""
        try:
            with self.connections.engine.begin() as conn:
                cipher = self.make(conn, series, version)
        except exc.IntegrityError:
            return None
        return self.store.put(series, cipher)

    def rotate(self, series: KeySeries) -> int:
        """Make the next version of ``series`` and return it."""
        shared = self.connections.shared()
        if shared is not None:  # inside the caller's transaction
            cipher = self.make(shared, series, self.keys.newest_version(shared, series) + 1)
            pending = self.connections.pending(shared)
            pending[series] = pending[(series, cipher.key_version)] = cipher
        else:
            with self._lock(series):
                while True:
                    with self.connections.engine.connect() as conn:
                        newest = self.keys.newest_version(conn, series)
                    if newest >= MAX_KEY_VERSION:
                        raise KeyLifecycleError(
                            "the key has reached its last version", table=series.scope
                        )
                    made = self._make_committed(series, newest + 1)
                    if made is not None:
                        cipher = made
                        break
                    with self.connections.engine.connect() as conn:
                        moved = self.keys.newest_version(conn, series) > newest
                    if not moved:  # refused, but not by another process's new version
                        raise KeyLifecycleError(
                            f"the key table refused version {newest + 1}", table=series.scope
                        )
        self.store.forget(series)
        return cipher.key_version

    # -- unwrapping ---------------------------------------------------------------

    def unwrap(self, row: KeyRow) -> DataKeyCipher:
        """Unwrap one key row through the provider (one KMS call).

        Every key row, the active key and older versions alike, comes through
        here. The provider uses only rows of the master keys it was given
        (:meth:`~sqlalchemy_kms.providers.base.KeyProvider.unwrap`): any other
        raises :class:`~sqlalchemy_kms.errors.ForeignMasterKeyError` before
        the key is unwrapped (the audit trail records the call with that
        outcome, as a warning); nothing is encrypted or decrypted under it.
        """
        context = encryption_context(row.series.scope, row.series.purpose, row.version)
        provider = self._unwrapping()
        plaintext = kms_call(
            "Decrypt",
            context,
            row.master_key_id,
            lambda: provider.unwrap(row.wrapped, context, row.master_key_id),
        )
        return DataKeyCipher(plaintext, row.version)

    def _held(self, row: KeyRow) -> DataKeyCipher:
        return self.store.get_or_load(
            row.series, row.version, lambda: self.unwrap(row), single_flight=not self._is_async
        )

    # -- the questions ------------------------------------------------------------

    def active(self, series: KeySeries) -> DataKeyCipher:
        """The key new values of ``series`` are written under (made if none exists)."""
        self.store.sweep()
        keys = self.store.fresh(series)
        if keys is not None and keys.active is not None:
            return keys.active
        # a connection that holds SQLite's write lock must not wait for a thread that
        # waits for that write lock: check before taking the series' lock
        shared = self.connections.shared()
        if shared is not None:
            return self._active_in_transaction(shared, series)
        with self._lock(series):
            keys = self.store.fresh(series)
            if keys is not None and keys.active is not None:
                return keys.active
            cipher = self._load_or_make_active(series)
            self.store.set_active(series, cipher)
            return cipher

    def _load_or_make_active(self, series: KeySeries) -> DataKeyCipher:
        with self.connections.engine.connect() as conn:
            rows = self.keys.enabled(conn, series)
        if rows:
            return self._held(rows[0])
        made = self._make_committed(series, 1)
        if made is not None:
            return made
        with self.connections.engine.connect() as conn:  # lost the race: read the winner's
            rows = self.keys.enabled(conn, series)
        if not rows:
            raise UnknownKeyVersionError(
                "the key table refused a new key but holds no enabled one", table=series.scope
            )
        return self._held(rows[0])

    def _active_in_transaction(self, conn: Connection, series: KeySeries) -> DataKeyCipher:
        """Inside a shared connection: read or make the key on that connection."""
        pending = self.connections.pending(conn)
        cipher: DataKeyCipher | None = pending.get(series)
        if cipher is not None:
            return cipher
        rows = self.keys.enabled(conn, series)
        if rows:
            return self._held(rows[0])
        cipher = self.make(conn, series, 1)
        # usable by this transaction only, until it commits
        pending[series] = pending[(series, cipher.key_version)] = cipher
        return cipher

    def enabled(self, series: KeySeries) -> list[DataKeyCipher]:
        """Every enabled key of ``series``, newest first (equality matches them all)."""
        self.active(series)  # makes the first key if needed
        keys = self.store.fresh(series)
        if keys is not None and keys.enabled is not None:
            return keys.enabled
        shared = self.connections.shared()
        pending = self.connections.pending(shared) if shared is not None else {}
        with self.connections.reading() as conn:
            rows = self.keys.enabled(conn, series)
        ciphers = [pending.get((series, row.version)) or self._held(row) for row in rows]
        if shared is None:
            self.store.set_enabled(series, ciphers)
        return ciphers

    def version(self, series: KeySeries, version: int) -> DataKeyCipher:
        """Key ``version`` of ``series``; :class:`UnknownKeyVersionError` if the key
        table has no such key (never made, or destroyed)."""
        self.store.sweep()
        cipher = self.store.get(series, version)
        if cipher is not None:
            return cipher
        shared = self.connections.shared()
        if shared is not None:
            pending: DataKeyCipher | None = self.connections.pending_items(shared).get(
                (series, version)
            )
            if pending is not None:
                return pending

        def load() -> DataKeyCipher:
            with self.connections.reading() as conn:
                row = self.keys.version(conn, series, version)
            if row is None:
                raise UnknownKeyVersionError(
                    "the key table holds no such key version",
                    table=series.scope,
                    key_version=version,
                )
            if series.deterministic:  # a search key this process has not seen
                self.store.forget(series)
            return self.unwrap(row)

        return self.store.get_or_load(series, version, load, single_flight=not self._is_async)

    def preload(self, series: KeySeries) -> int:
        """Unwrap every version of ``series`` into the store; returns how many."""
        self.store.sweep()
        with self.connections.engine.connect() as conn:
            rows = self.keys.versions(conn, series)
        for row in rows:
            self._held(row)
        return len(rows)
