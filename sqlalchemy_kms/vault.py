"""KeyVault: the facade that binds the key table, the keys and the provider to one engine.

A vault is bound to one engine. It keeps one active data key per table in a
key table of that database (``kms_data_keys`` by default), wrapped by the
provider's master key, and the unwrapped keys in a bounded in-memory store.
Encrypted columns find the vault through the engine they run on, so the
application code does not change::

    from sqlalchemy import create_engine
    from sqlalchemy_kms import KeyVault, LocalKms

    engine = create_engine("sqlite:///app.db")
    vault = KeyVault(engine, LocalKms(key_file="master.key"))
    vault.create_table()                 # the key table; idempotent
    Base.metadata.create_all(engine)     # keys for new encrypted tables are made here

The vault itself holds no logic of its own; it composes:

* :class:`~sqlalchemy_kms._keytable.KeyTable`: the key table and its queries;
* :class:`~sqlalchemy_kms._connections.Connections`: which connection key work uses;
* :class:`~sqlalchemy_kms._keys.KeyStore`: the unwrapped keys, bounded by count and age;
* :class:`~sqlalchemy_kms._keyloader.KeyLoader`: finds, makes and unwraps keys;
* :mod:`sqlalchemy_kms.lifecycle`: re-encrypt, status, verify, retire, destroy,
  rewrap, export and import.

How keys come to be
-------------------
A table's first data key is made ahead of time when ``create_all`` (or
:meth:`KeyVault.create_key`) creates the table, otherwise on first use. Either
way the wrapped key is committed in its own transaction before any value is
encrypted under it, so no committed row can outlive a rolled-back key. When
two processes make the first key of a table at the same moment, the key
table's primary key lets one win; the other reads the winner's key. On
SQLite, inside a transaction that already holds the write lock, the key is
written inside that transaction instead (see :mod:`sqlalchemy_kms._connections`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

from sqlalchemy import MetaData, Table
from sqlalchemy.engine import Connection, Dialect, Engine

from ._connections import Connections, database_work
from ._format import ALG_DETERMINISTIC, parse_header
from ._keyloader import KeyLoader
from ._keys import KeyStore
from ._keytable import (
    DEFAULT_KEY_TABLE,
    KeySeries,
    KeyTable,
    key_table,
    key_table_declaration,
    scope_of,
    table_scope,
)
from ._statements import StatementHooks
from .cache import DEFAULT_MAX_AGE, DEFAULT_MAX_ENTRIES, KeyCache
from .errors import ConfigurationError
from .lifecycle import backup as backup_jobs
from .lifecycle import columns as column_jobs
from .lifecycle import retire as retire_jobs
from .lifecycle import rewrap as rewrap_jobs
from .lifecycle import status as status_jobs
from .lifecycle import verify as verify_jobs
from .lifecycle.retire import DEFAULT_GRACE_PERIOD, MAX_REFRESH_INTERVAL
from .lifecycle.rewrite import Progress
from .lifecycle.status import TableStatus
from .lifecycle.verify import VerifyReport
from .providers.base import KeyProvider
from .providers.multi import MultiKms
from .types import VAULT_ATTR, encrypted_series, tables_of

__all__ = [
    "DEFAULT_KEY_TABLE",
    "DEFAULT_REFRESH_INTERVAL",
    "KeyVault",
    "key_table",
    "table_scope",
    "vault_for",
]

#: Seconds after which a vault checks the key table again for a newer active key.
DEFAULT_REFRESH_INTERVAL: Final = 60.0


def vault_for(dialect: Dialect) -> KeyVault | None:
    """The vault bound to the engine that owns ``dialect``, if any."""
    vault: KeyVault | None = getattr(dialect, VAULT_ATTR, None)
    return vault


class KeyVault:
    """Owns the key table, the key store and the provider for one database.

    :param engine: the engine (or ``AsyncEngine``) whose database holds both
        the encrypted tables and the key table.
    :param provider: the :class:`~sqlalchemy_kms.providers.base.KeyProvider`
        that wraps data keys (:class:`~sqlalchemy_kms.AwsKms` in production).
    :param table_name: name of the key table (default ``kms_data_keys``).
    :param schema: schema of the key table (default: the connection's).
    :param cache_max_entries: unwrapped keys kept in memory (default 1000);
        everything the vault keeps of a key counts toward it.
    :param cache_max_age: seconds an unwrapped key is used before the provider
        is asked again (default 300); revoked KMS access stops reads and
        writes within this time.
    :param refresh_interval: seconds after which the key table is read again
        to learn of a newer active key made by another process (default 60, at
        most 60: retiring a key relies on every process refreshing that often).
    :param grace_period: seconds after a rotation before this vault retires or
        destroys the older version (default 90: the longest refresh interval of
        any process, plus a margin). Lower it only when every process of the
        application uses a shorter ``refresh_interval``.

    :param replace: bind to an engine that already has a vault, closing that
        one; without it that is a :class:`~sqlalchemy_kms.errors.ConfigurationError`
        (two vaults on one engine would make keys under two master keys).

    Creating a vault binds it to the engine. On an async engine, the methods
    that read or write the database run inside ``run_sync``:
    ``await conn.run_sync(lambda _: vault.create_table())``.

    Example::

        >>> from sqlalchemy import create_engine
        >>> from sqlalchemy_kms import KeyVault, LocalKms
        >>> vault = KeyVault(create_engine("sqlite://"), LocalKms(bytes(32)))
        >>> vault.create_table()
        >>> vault.create_key("patients")
        1
        >>> vault
        <KeyVault table='kms_data_keys' provider=LocalKms(master_key_id='local:...')>
    """

    def __init__(
        self,
        engine: Any,
        provider: KeyProvider,
        *,
        table_name: str = DEFAULT_KEY_TABLE,
        schema: str | None = None,
        cache_max_entries: int = DEFAULT_MAX_ENTRIES,
        cache_max_age: float = DEFAULT_MAX_AGE,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        replace: bool = False,
    ) -> None:
        sync_engine: Engine = getattr(engine, "sync_engine", engine)
        if not isinstance(sync_engine, Engine):
            raise TypeError("KeyVault needs an Engine or AsyncEngine")
        if not isinstance(provider, KeyProvider):
            raise TypeError("provider must be a KeyProvider such as AwsKms or LocalKms")
        if not 0 < refresh_interval <= MAX_REFRESH_INTERVAL:
            raise ValueError(
                f"refresh_interval must be positive and at most {MAX_REFRESH_INTERVAL:.0f} "
                "seconds: retiring a key waits for every process to refresh"
            )
        if not grace_period >= 0:
            raise ValueError("grace_period must not be negative")
        self.grace_period = float(grace_period)
        self.engine = sync_engine
        self.provider = provider
        # the master keys that unwrap existing rows: the provider, and those it replaced
        self._unwrapping: KeyProvider = provider
        self.metadata = MetaData()
        #: The key table and its queries.
        self.key_table = KeyTable(self.metadata, table_name, schema)
        self.table = self.key_table.table
        #: The unwrapped keys of this process.
        self.keys = KeyStore(cache_max_entries, cache_max_age, refresh_interval)
        self.refresh_interval = float(refresh_interval)
        self.connections = Connections(
            sync_engine, on_commit=self.keys.adopt_pending, on_rollback=self.keys.discard_pending
        )
        self._is_async = bool(sync_engine.dialect.is_async)
        self.loader = KeyLoader(
            self.key_table,
            self.connections,
            self.keys,
            lambda: self.provider,
            unwrapping=lambda: self._unwrapping,
            is_async=self._is_async,
        )
        self.statements = StatementHooks(
            sync_engine,
            self.connections,
            self.keys,
            self.loader,
            refresh_interval=self.refresh_interval,
        )
        self._decrypt_failures = 0
        self._guard = threading.Lock()
        self._bind(replace)

    def __repr__(self) -> str:
        return f"<KeyVault table={self.table.fullname!r} provider={self.provider!r}>"

    @property
    def cache(self) -> KeyCache[Any]:
        """The bounded cache of unwrapped keys, by ``(table, purpose, version)``."""
        return self.keys.cache

    # -- binding -------------------------------------------------------------

    def _bind(self, replace: bool) -> None:
        dialect = self.engine.dialect
        previous = vault_for(dialect)
        if previous is not None and previous is not self:
            if not replace:
                raise ConfigurationError(
                    f"this engine already has a vault ({previous!r}); close it first, or "
                    "pass replace=True to replace it"
                )
            previous.close()
        setattr(dialect, VAULT_ATTR, self)
        self.connections.listen()
        self.statements.listen()

    def close(self) -> None:
        """Unbind from the engine and forget every cached key."""
        if vault_for(self.engine.dialect) is self:
            delattr(self.engine.dialect, VAULT_ATTR)
        self.connections.close()
        self.statements.close()
        self.clear_cache()

    def clear_cache(self) -> None:
        """Forget every unwrapped key; the next use asks the provider again."""
        self.keys.clear()

    # -- keys ------------------------------------------------------------------

    @database_work
    def create_table(self) -> None:
        """Create the key table if it does not exist (safe to call again)."""
        self.key_table.create(self.engine)

    @database_work
    def create_key(self, table: Table | str, *, search: bool = False) -> int:
        """Make sure ``table`` has an active data key (or search key), making one if needed.

        Returns the active version. Use it, or :meth:`create_keys`, to make
        keys ahead of time, for example in a deployment step.
        """
        return self.loader.active(KeySeries(scope_of(table), search)).key_version

    @database_work
    def create_keys(self, tables: MetaData | Table | Iterable[Table]) -> dict[str, dict[str, int]]:
        """Make the keys every encrypted table needs: a data key for randomized
        columns, a search key for deterministic ones.

        Returns ``{scope: {"data": version, "search": version}}`` for the
        tables with encrypted columns. ``create_all()`` does this by itself
        for each table it creates through an engine with a vault.
        """
        made: dict[str, dict[str, int]] = {}
        chosen = tables_of(tables)
        self.check_key_table(chosen)
        for series in encrypted_series(chosen):
            version = self.loader.active(series).key_version
            made.setdefault(series.scope, {})[series.purpose] = version
        return made

    def check_key_table(self, tables: Sequence[Table]) -> None:
        """Raise :class:`~sqlalchemy_kms.errors.ConfigurationError` when the models of
        encrypted ``tables`` hold another key table than this vault's: ``create_all``
        and autogenerate would create (or drop) the wrong one. ``create_all`` and
        :meth:`create_keys` check it first."""
        for table in tables:
            declared = key_table_declaration(table.metadata)
            if declared is None or not any(dep is table for dep in declared.dependents):
                continue  # no encrypted column: the key table is not its business
            if declared.automatic and self.connections.shared() is not None:
                continue  # a migration: Alembic builds each table in a MetaData of its own
            declared.refuse_other(self.table, f"the models of {table_scope(table)}")

    @database_work
    def active_key_version(self, table: Table | str, *, search: bool = False) -> int:
        """The version of the data key (or search key) new values of ``table`` use."""
        return self.loader.active(KeySeries(scope_of(table), search)).key_version

    @database_work
    def rotate_key(self, table: Table | str, *, search: bool = False) -> int:
        """Make a new active data key (or, with ``search=True``, search key) for ``table``.

        New values are encrypted with the new version at once, in this
        process, and in other processes within ``refresh_interval``; values
        under older versions stay readable. Returns the new version.

        The search key encrypts deterministic columns. Rotating the data key
        leaves it alone, so equality lookups and unique indexes on
        deterministic columns are unaffected by ordinary rotation.
        """
        return self.loader.rotate(KeySeries(scope_of(table), search))

    @database_work
    def key_versions(self, table: Table | str, *, search: bool = False) -> list[int]:
        """Enabled key versions of ``table``, newest first."""
        with self.connections.reading() as conn:
            rows = self.key_table.enabled(conn, KeySeries(scope_of(table), search))
        return [row.version for row in rows]

    @database_work
    def warm_up(self, tables: MetaData | Table | Iterable[Table]) -> int:
        """Unwrap every key the encrypted columns of ``tables`` may need, now.

        Makes missing keys, loads every version of each table's data and
        search keys into the cache, and returns how many keys are cached. Call
        it at start-up so that the first requests pay no KMS round trip; on
        an async engine, through ``await conn.run_sync(lambda _: vault.warm_up(md))``.
        """
        chosen = tables_of(tables)
        self.create_keys(chosen)
        for series in encrypted_series(chosen):
            self.loader.preload(series)
        return len(self.keys)

    # -- single values -------------------------------------------------------------

    def encrypt(self, scope: str, aad: bytes, plaintext: bytes) -> bytes:
        """Encrypt one value of the column bound by ``aad`` (randomized), as stored."""
        cipher = self.loader.active(KeySeries(scope, False))
        return cipher.encrypt(plaintext, aad)

    def encrypt_deterministic(self, scope: str, column: str, aad: bytes, plaintext: bytes) -> bytes:
        """Encrypt one value of a deterministic column under the active search key."""
        cipher = self.loader.active(KeySeries(scope, True))
        return cipher.encrypt_deterministic(plaintext, scope, column, aad)

    def decrypt(self, scope: str, column: str, aad: bytes, stored: bytes) -> bytes:
        """Decrypt one stored value of the column bound by ``aad``: the checked path
        (header, key version, algorithm and authentication)."""
        algorithm, version = parse_header(stored)
        cipher = self.loader.version(KeySeries(scope, algorithm == ALG_DETERMINISTIC), version)
        return cipher.decrypt(stored, aad, algorithm=algorithm, scope=scope, column=column)

    # -- lifecycle ---------------------------------------------------------------

    def _active_version(self, series: KeySeries) -> int:
        self.keys.forget(series)  # the key table's word, not this process's memory
        return self.loader.active(series).key_version

    @database_work
    def reencrypt(
        self,
        table: Table | MetaData | Sequence[Table],
        *,
        columns: Sequence[str] | None = None,
        batch_size: int = 1000,
        progress: Callable[[Progress], object] | None = None,
        connection: Connection | None = None,
    ) -> Progress:
        """Move every encrypted value of ``table`` to its active key, online.

        Batches of ``batch_size`` rows by primary key, each its own short
        transaction (or, with ``connection``, inside that connection's
        transaction, as in a migration); a row is updated only if it still
        holds what was read, so concurrent application writes are never
        lost; killed and run again, it resumes; run again when finished, it
        changes nothing. ``progress`` is called after each batch with a
        :class:`~sqlalchemy_kms.lifecycle.Progress`. Returns the final one.

        Given a ``MetaData`` or a list of tables, each table with encrypted
        columns is re-encrypted in turn (``columns`` then names columns of any
        of them), and the returned progress adds them up.
        """
        return column_jobs.reencrypt_tables(
            self.connections,
            tables_of(table),
            self._active_version,
            columns=columns,
            batch_size=batch_size,
            progress=progress,
            connection=connection,
        )

    @database_work
    def encrypt_column(
        self,
        table: Table,
        column: str,
        *,
        batch_size: int = 1000,
        progress: Callable[[Progress], object] | None = None,
        connection: Connection | None = None,
    ) -> Progress:
        """Encrypt the existing plaintext of one column in place, online and resumably.

        ``table`` describes the column as ``KMSEncrypted(...)``. On PostgreSQL
        and MySQL/MariaDB the column must first be made binary
        (``op.encrypt_column`` of :mod:`sqlalchemy_kms.alembic` does it in a
        migration, with :func:`~sqlalchemy_kms.lifecycle.plaintext_to_binary_ddl`);
        SQLite needs no DDL. While it runs, the application reads
        the column with ``KMSEncrypted(..., accept_plaintext=True)``.
        """
        return column_jobs.encrypt_column(
            self.connections,
            table,
            column,
            self._active_version,
            batch_size=batch_size,
            progress=progress,
            connection=connection,
        )

    @database_work
    def decrypt_column(
        self,
        table: Table,
        column: str,
        *,
        batch_size: int = 1000,
        progress: Callable[[Progress], object] | None = None,
        connection: Connection | None = None,
    ) -> Progress:
        """Write one column's plaintext back in place: the reverse of :meth:`encrypt_column`."""
        return column_jobs.decrypt_column(
            self.connections,
            table,
            column,
            batch_size=batch_size,
            progress=progress,
            connection=connection,
        )

    @database_work
    def status(self, tables: MetaData | Table | Sequence[Table]) -> list[TableStatus]:
        """Per table: key versions, their state and master key, and rows per version
        per column (counted by the database from the stored headers)."""
        return status_jobs.status(self.key_table, self.connections, tables_of(tables))

    @database_work
    def verify(
        self, tables: MetaData | Table | Sequence[Table], *, batch_size: int = 1000, shown: int = 5
    ) -> VerifyReport:
        """Decrypt every stored value of ``tables`` and report what fails: the
        auditor's proof that every value is readable. Returns a
        :class:`~sqlalchemy_kms.lifecycle.verify.VerifyReport`."""
        return verify_jobs.verify(
            self.engine, tables_of(tables), batch_size=batch_size, shown=shown
        )

    @database_work
    def retire_key(self, table: Table, version: int, *, search: bool = False) -> None:
        """Retire key ``version`` of ``table``. Refused
        (:class:`~sqlalchemy_kms.errors.KeyLifecycleError`) while it is active,
        within ``grace_period`` seconds after the next version was made (the
        error says from when it is allowed), or while any stored value uses it."""
        series = KeySeries(table_scope(table), search)
        retire_jobs.retire_key(
            self.key_table, self.connections, table, series, version, grace=self.grace_period
        )
        self.keys.forget(series)

    @database_work
    def check_destroyable(self, table: Table | str, version: int, *, search: bool = False) -> None:
        """Raise :class:`~sqlalchemy_kms.errors.KeyLifecycleError` unless key ``version``
        of ``table`` may be destroyed now (before asking a person to confirm)."""
        series = KeySeries(scope_of(table), search)
        retire_jobs.check_destroyable_version(
            self.key_table, self.connections, series, version, grace=self.grace_period
        )

    @database_work
    def destroy_key(
        self, table: Table | str, version: int, *, search: bool = False, confirm: bool = False
    ) -> None:
        """Delete a retired key for good (crypto-shredding); needs ``confirm=True``.

        Every value still under that key, here or in any backup, becomes
        unreadable: reading it raises
        :class:`~sqlalchemy_kms.errors.UnknownKeyVersionError`. Other processes
        that hold the key in memory keep it until their ``cache_max_age`` ends
        (see ``docs/security.md``).
        """
        series = KeySeries(scope_of(table), search)
        retire_jobs.destroy_key(
            self.key_table,
            self.connections,
            table,
            series,
            version,
            confirm=confirm,
            grace=self.grace_period,
        )
        self.keys.invalidate(series, version)

    @database_work
    def rewrap(self, provider: KeyProvider, *, table: Table | str | None = None) -> int:
        """Re-wrap every data key (or one table's) under ``provider``; no row is touched.

        With AWS KMS on both sides this is KMS ``ReEncrypt``. Afterwards this
        vault makes new keys under ``provider``, and still reads keys of
        tables not rewrapped (a partial rewrap) through the provider that
        made them. Returns the number of keys rewrapped.
        """
        source = self._unwrapping
        scope = None if table is None else scope_of(table)
        if provider is not self.provider:
            # both master keys unwrap from now on: if the rewrap stops half way (a KMS
            # outage, a refused row), the keys already moved stay readable
            self._unwrapping = MultiKms(provider, source)  # source's members, flattened
        done = rewrap_jobs.rewrap(self.key_table, self.connections, source, provider, scope=scope)
        self.provider = provider
        return done

    @database_work
    def export_keys(self) -> dict[str, Any]:
        """The key table as JSON-ready data (wrapped keys only: safe to back up)."""
        return backup_jobs.export_keys(self.key_table, self.connections)

    @database_work
    def import_keys(
        self,
        data: Mapping[str, Any],
        *,
        table: Table | str | None = None,
        version: int | None = None,
        search: bool = False,
    ) -> int:
        """Restore keys exported by :meth:`export_keys`; returns the number added.

        ``table`` restores one table's keys only; with ``version``, only that
        version of its data key (of its search key with ``search=True``).
        Every row is checked first (state, purpose, version range): one
        invalid row and nothing is imported. Keys already held are skipped,
        including one wrapped under another master key since (a rewrap); a
        different key under the same master key is a conflict
        (:class:`~sqlalchemy_kms.errors.KeyLifecycleError`, nothing imported).
        """
        added = backup_jobs.import_keys(
            self.key_table, self.connections, data, table=table, version=version, search=search
        )
        if added:
            self.clear_cache()
        return added

    # -- metrics -----------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters for metrics.

        ``cache_entries`` (unwrapped keys held); ``encrypted_statements``
        (statements that used encrypted columns) and ``cache_hits`` (those of
        them that needed no KMS call: counted once per statement, so the
        per-value hot path pays nothing); ``cache_misses`` (keys unwrapped
        through the provider); ``decrypt_failures`` (stored values that raised
        instead of decrypting); ``kms_<Operation>`` (provider calls by
        operation).
        """
        counters = {
            "cache_entries": len(self.keys),
            "encrypted_statements": self.statements.statements,
            "cache_hits": self.statements.hits,
            "cache_misses": self.keys.cache.misses,
            "decrypt_failures": self._decrypt_failures,
        }
        # each master key counts its own calls: the provider, and after a rewrap
        # the ones it replaced
        members = {id(m): m for p in (self.provider, self._unwrapping) for m in p.members}
        calls: dict[str, int] = {}
        for member in members.values():
            for operation, count in member.calls.items():
                calls[operation] = calls.get(operation, 0) + count
        for operation, count in sorted(calls.items()):
            counters[f"kms_{operation}"] = count
        return counters

    def count_decrypt_failure(self) -> None:
        """Count one stored value that raised instead of decrypting."""
        with self._guard:
            self._decrypt_failures += 1

    # -- connections -------------------------------------------------------------

    @contextmanager
    def using(self, connection: Connection) -> Iterator[Connection]:
        """Read and write the key table through ``connection`` inside this block.

        Keys made inside the block commit or roll back with ``connection``'s
        transaction and serve only it until it commits. Migrations use this:
        the migration's own transaction may hold locks (or a key table it just
        created) that another connection could not see or would wait for::

            with vault.using(op.get_bind()):
                vault.reencrypt(patients, connection=op.get_bind())
        """
        with self.connections.using(connection):
            yield connection

    def shares(self, connection: Connection) -> bool:
        """Whether key-table work in this thread or task runs on ``connection`` now
        (inside :meth:`using`, when the connection is open and of this engine)."""
        return self.connections.shared() is connection
