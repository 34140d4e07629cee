"""KeyVault: the key table, the cache and the provider for one database.

A vault is bound to one engine. It keeps one active data key per table in a
key table of that database (``kms_data_keys`` by default), wrapped by the
provider's master key, and the unwrapped keys in a bounded in-memory
:class:`~sqlalchemy_kms.cache.KeyCache`. Encrypted columns find the vault
through the engine they run on, so the application code does not change::

    from sqlalchemy import create_engine
    from sqlalchemy_kms import KeyVault, LocalKms

    engine = create_engine("sqlite:///app.db")
    vault = KeyVault(engine, LocalKms(key_file="master.key"))
    vault.create_table()                 # the key table; idempotent
    Base.metadata.create_all(engine)     # keys for new encrypted tables are made here

How keys come to be
-------------------
A table's first data key is made ahead of time when ``create_all`` (or
:meth:`KeyVault.create_key`) creates the table, otherwise on first use. Either
way the wrapped key is committed in its own transaction before any value is
encrypted under it, so no committed row can outlive a rolled-back key. When
two processes make the first key of a table at the same moment, the key
table's primary key lets one win; the other reads the winner's key.

SQLite allows one writer at a time. When a key must be made while the
application's own SQLite transaction already holds the write lock, a second
connection could not write, so the vault writes the key row on the
application's connection, inside its transaction: the key and the rows it
protects commit or roll back together, and the key is used only by that
transaction until it commits.

Key table
---------
``scope`` (the table name, ``schema.table`` when the table has a schema),
``key_version`` (1, 2, ...), ``state`` (``enabled`` or ``retired``),
``provider``, ``master_key_id`` (the master key that wrapped it, as the
provider reports it: for AWS KMS the key ARN), ``wrapped_key`` (the
provider's ciphertext: for AWS KMS exactly ``CiphertextBlob``) and
``created_at``. The active key of a table is its highest enabled version.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    and_,
    event,
    exc,
    func,
    inspect,
    select,
)
from sqlalchemy.engine import Connection, Dialect, Engine

from ._cipher import DataKeyCipher
from ._format import (
    ALG_DETERMINISTIC,
    ALG_RANDOMIZED,
    HEADER_SIZE,
    SUBKEY_PREFIX_SIZE,
    pack_header,
    parse_header,
)
from .audit import key_event, kms_call
from .cache import DEFAULT_MAX_AGE, DEFAULT_MAX_ENTRIES, KeyCache
from .errors import KeyTableMissingError, UnknownKeyVersionError
from .providers.base import KeyProvider, encryption_context

if TYPE_CHECKING:
    from .rotation import Progress, TableStatus

__all__ = ["DEFAULT_KEY_TABLE", "DEFAULT_REFRESH_INTERVAL", "KeyVault", "key_table"]

#: Name of the key table unless ``table_name`` says otherwise.
DEFAULT_KEY_TABLE: Final = "kms_data_keys"
#: Seconds after which a vault checks the key table again for a newer active key.
DEFAULT_REFRESH_INTERVAL: Final = 60.0

#: Purpose of the keys that encrypt randomized values.
DATA: Final = "data"
#: Purpose of the keys that encrypt deterministic (searchable) values.
SEARCH: Final = "search"

#: A table's keys of one purpose: ``(scope, purpose)``.
KeyRing = tuple[str, str]

_VAULT_ATTR: Final = "_sqlalchemy_kms_vault"
_MAX_OPENERS: Final = 4096
_PENDING_INFO: Final = "sqlalchemy_kms.pending"

# The connection bound with KeyVault.using() in this thread/task.
_bound_connection: contextvars.ContextVar[weakref.ref[Connection] | None] = contextvars.ContextVar(
    "sqlalchemy_kms_bound_connection", default=None
)

# The connection whose statement is being executed in this thread/task (SQLite only).
_current_connection: contextvars.ContextVar[weakref.ref[Connection] | None] = (
    contextvars.ContextVar("sqlalchemy_kms_current_connection", default=None)
)


def key_table(
    metadata: MetaData, name: str = DEFAULT_KEY_TABLE, schema: str | None = None
) -> Table:
    """The key table's definition in ``metadata`` (for migrations and tools)."""
    return Table(
        name,
        metadata,
        Column("scope", String(255), primary_key=True),
        Column("purpose", String(16), primary_key=True),
        Column("key_version", Integer, primary_key=True, autoincrement=False),
        Column("state", String(16), nullable=False),
        Column("provider", String(32), nullable=False),
        Column("master_key_id", String(2048), nullable=False),
        Column("wrapped_key", LargeBinary, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        schema=schema,
    )


def vault_for(dialect: Dialect) -> KeyVault | None:
    """The vault bound to the engine that owns ``dialect``, if any."""
    vault: KeyVault | None = getattr(dialect, _VAULT_ATTR, None)
    return vault


def table_scope(table: Table) -> str:
    """The key scope of a table: its name, schema-qualified when it has a schema."""
    return f"{table.schema}.{table.name}" if table.schema else table.name


class _KeyRow(NamedTuple):
    version: int
    wrapped: bytes
    master_key_id: str


def _remember_connection(conn: Connection, *args: Any, **kwargs: Any) -> None:
    _current_connection.set(weakref.ref(conn))


def _forget_pending(conn: Connection) -> None:
    conn.info.pop(_PENDING_INFO, None)


class KeyVault:
    """Owns the key table, the key cache and the provider for one database.

    :param engine: the engine (or ``AsyncEngine``) whose database holds both
        the encrypted tables and the key table.
    :param provider: the :class:`~sqlalchemy_kms.providers.base.KeyProvider`
        that wraps data keys (:class:`~sqlalchemy_kms.AwsKms` in production).
    :param table_name: name of the key table (default ``kms_data_keys``).
    :param schema: schema of the key table (default: the connection's).
    :param cache_max_entries: unwrapped keys kept in memory (default 1000).
    :param cache_max_age: seconds an unwrapped key is used before the provider
        is asked again (default 300); revoked KMS access stops reads and
        writes within this time.
    :param refresh_interval: seconds after which the key table is read again
        to learn of a newer active key made by another process (default 60).

    Creating a vault binds it to the engine; a later vault for the same
    engine replaces it.

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
    ) -> None:
        sync_engine: Engine = getattr(engine, "sync_engine", engine)
        if not isinstance(sync_engine, Engine):
            raise TypeError("KeyVault needs an Engine or AsyncEngine")
        if not isinstance(provider, KeyProvider):
            raise TypeError("provider must be a KeyProvider such as AwsKms or LocalKms")
        if refresh_interval <= 0:
            raise ValueError("refresh_interval must be positive")
        self.engine = sync_engine
        self.provider = provider
        self._other_providers: list[KeyProvider] = []
        self.metadata = MetaData()
        self.table = key_table(self.metadata, table_name, schema)
        self.cache: KeyCache[DataKeyCipher] = KeyCache(cache_max_entries, cache_max_age)
        self.refresh_interval = float(refresh_interval)
        self._active: dict[KeyRing, tuple[DataKeyCipher, float]] = {}
        self._search: dict[str, tuple[list[DataKeyCipher], float]] = {}
        self._readers: dict[tuple[str, bytes], tuple[DataKeyCipher, float]] = {}
        self._openers: dict[bytes, tuple[AESGCM, float]] = {}
        self._result_rings: weakref.WeakKeyDictionary[Any, frozenset[KeyRing]] = (
            weakref.WeakKeyDictionary()
        )
        self._preloaded: dict[KeyRing, float] = {}
        self._decrypt_failures = 0
        self._guard = threading.Lock()
        self._locks: dict[KeyRing, threading.Lock] = {}
        self._shares_writer = sync_engine.dialect.name == "sqlite"
        self._is_async = bool(sync_engine.dialect.is_async)
        self._bind()

    def __repr__(self) -> str:
        return f"<KeyVault table={self.table.fullname!r} provider={self.provider!r}>"

    # -- binding -------------------------------------------------------------

    def _bind(self) -> None:
        dialect = self.engine.dialect
        previous = vault_for(dialect)
        if previous is not None and previous is not self:
            previous.close()
        setattr(dialect, _VAULT_ATTR, self)
        if self._shares_writer:
            event.listen(self.engine, "before_execute", _remember_connection)
        if self._is_async:
            event.listen(self.engine, "after_cursor_execute", self._preload_result_keys)
        event.listen(self.engine, "commit", _forget_pending)
        event.listen(self.engine, "rollback", _forget_pending)

    def close(self) -> None:
        """Unbind from the engine and forget every cached key."""
        if vault_for(self.engine.dialect) is self:
            delattr(self.engine.dialect, _VAULT_ATTR)
        for name, listener in (
            ("before_execute", _remember_connection),
            ("after_cursor_execute", self._preload_result_keys),
            ("commit", _forget_pending),
            ("rollback", _forget_pending),
        ):
            if event.contains(self.engine, name, listener):
                event.remove(self.engine, name, listener)
        self.clear_cache()

    def clear_cache(self) -> None:
        """Forget every unwrapped key; the next use asks the provider again."""
        with self._guard:
            self._active.clear()
            self._search.clear()
            self._readers.clear()
            self._openers.clear()
            self._preloaded.clear()
        self.cache.clear()

    # -- key table -----------------------------------------------------------

    def create_table(self) -> None:
        """Create the key table if it does not exist (safe to call again)."""
        try:
            self.metadata.create_all(self.engine, checkfirst=True)
        except exc.DatabaseError:
            # another process created it between our check and our CREATE
            if not self._key_table_exists():
                raise

    def _key_table_exists(self) -> bool:
        with self.engine.connect() as conn:
            return inspect(conn).has_table(self.table.name, schema=self.table.schema)

    def _missing_table(self, error: Exception) -> Exception:
        if self._key_table_exists():
            return error
        return KeyTableMissingError(
            f"the key table {self.table.fullname} does not exist; call vault.create_table() "
            "or run the migration that creates it"
        )

    def create_key(self, table: Table | str, *, search: bool = False) -> int:
        """Make sure ``table`` has an active data key (or search key), making one if needed.

        Returns the active version. Use it, or :meth:`create_keys`, to make
        keys ahead of time, for example in a deployment step.
        """
        return self._active_cipher(_scope_of(table), SEARCH if search else DATA).key_version

    def create_keys(self, tables: MetaData | Iterable[Table]) -> dict[str, dict[str, int]]:
        """Make the keys every encrypted table needs: a data key for randomized
        columns, a search key for deterministic ones.

        Returns ``{scope: {"data": version, "search": version}}`` for the
        tables with encrypted columns. ``create_all()`` does this by itself
        for each table it creates through an engine with a vault.
        """
        if isinstance(tables, MetaData):
            tables = tables.sorted_tables
        made: dict[str, dict[str, int]] = {}
        for table in tables:
            purposes = _purposes_needed(table)
            if purposes:
                made[table_scope(table)] = {
                    purpose: self._active_cipher(table_scope(table), purpose).key_version
                    for purpose in purposes
                }
        return made

    def active_key_version(self, table: Table | str, *, search: bool = False) -> int:
        """The version of the data key (or search key) new values of ``table`` use."""
        return self._active_cipher(_scope_of(table), SEARCH if search else DATA).key_version

    def rotate_key(self, table: Table | str, *, search: bool = False) -> int:
        """Make a new active data key (or, with ``search=True``, search key) for ``table``.

        New values are encrypted with the new version at once, in this
        process, and in other processes within ``refresh_interval``; values
        under older versions stay readable. Returns the new version.

        The search key encrypts deterministic columns. Rotating the data key
        leaves it alone, so equality lookups and unique indexes on
        deterministic columns are unaffected by ordinary rotation.
        """
        ring = (_scope_of(table), SEARCH if search else DATA)
        shared = self._shared_connection()
        if shared is not None:  # inside the caller's transaction (see _active_cipher)
            cipher = self._insert(shared, ring, self._newest_version(shared, ring) + 1)
            pending = self._pending(shared)
            pending[ring] = pending[(*ring, cipher.key_version)] = cipher
        else:
            with self._lock(ring):
                while True:
                    with self.engine.connect() as conn:
                        newest = self._newest_version(conn, ring)
                    made = self._insert_committed(ring, newest + 1)
                    if made is not None:
                        cipher = made
                        break
        self._forget_ring(ring)
        return cipher.key_version

    def _newest_version(self, conn: Connection, ring: KeyRing) -> int:
        query = select(func.max(self.table.c.key_version)).where(self._ring_filter(ring))
        try:
            newest = conn.execute(query).scalar()
        except exc.DBAPIError as error:
            raise self._missing_table(error) from error
        return int(newest or 0)

    def warm_up(self, tables: MetaData | Iterable[Table]) -> int:
        """Unwrap every key the encrypted columns of ``tables`` may need, now.

        Makes missing keys, loads every version of each table's data and
        search keys into the cache, and returns how many keys are cached. Call
        it at start-up so that the first requests pay no KMS round trip; on
        an async engine, through ``await conn.run_sync(lambda _: vault.warm_up(md))``.
        """
        if isinstance(tables, MetaData):
            tables = tables.sorted_tables
        tables = list(tables)
        self.create_keys(tables)
        for table in tables:
            for purpose in _purposes_needed(table):
                self._preload((table_scope(table), purpose))
        return len(self.cache)

    # -- lifecycle (the work is in sqlalchemy_kms.rotation) --------------------

    def reencrypt(
        self,
        table: Table,
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
        :class:`~sqlalchemy_kms.rotation.Progress`. Returns the final one.
        """
        from . import rotation

        return rotation.reencrypt(
            self,
            table,
            columns=columns,
            batch_size=batch_size,
            progress=progress,
            connection=connection,
        )

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
        migration, with :func:`~sqlalchemy_kms.rotation.plaintext_to_binary_ddl`);
        SQLite needs no DDL. While it runs, the application reads
        the column with ``KMSEncrypted(..., accept_plaintext=True)``.
        """
        from . import rotation

        return rotation.encrypt_column(
            self, table, column, batch_size=batch_size, progress=progress, connection=connection
        )

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
        from . import rotation

        return rotation.decrypt_column(
            self, table, column, batch_size=batch_size, progress=progress, connection=connection
        )

    def status(self, tables: MetaData | Sequence[Table]) -> list[TableStatus]:
        """Per table: key versions, their state and master key, and rows per version
        per column (counted by the database from the stored headers)."""
        from . import rotation

        return rotation.status(self, tables)

    def retire_key(self, table: Table, version: int, *, search: bool = False) -> None:
        """Retire key ``version`` of ``table``: refused while any stored value uses it
        (:class:`~sqlalchemy_kms.errors.KeyLifecycleError`) or while it is active."""
        from . import rotation

        rotation.retire_key(self, table, version, search=search)

    def destroy_key(
        self, table: Table | str, version: int, *, search: bool = False, confirm: bool = False
    ) -> None:
        """Delete a retired key for good (crypto-shredding); needs ``confirm=True``.

        Every value still under that key, here or in any backup, becomes
        unreadable: reading it raises
        :class:`~sqlalchemy_kms.errors.UnknownKeyVersionError`.
        """
        from . import rotation

        rotation.destroy_key(self, table, version, search=search, confirm=confirm)

    def rewrap(self, provider: KeyProvider, *, table: Table | str | None = None) -> int:
        """Re-wrap every data key (or one table's) under ``provider``; no row is touched.

        With AWS KMS on both sides this is KMS ``ReEncrypt``. Afterwards this
        vault uses ``provider``. Returns the number of keys rewrapped.
        """
        from . import rotation

        return rotation.rewrap(self, provider, table=table)

    def export_keys(self) -> dict[str, Any]:
        """The key table as JSON-ready data (wrapped keys only: safe to back up)."""
        from . import rotation

        return rotation.export_keys(self)

    def import_keys(self, data: Mapping[str, Any]) -> int:
        """Restore keys exported by :meth:`export_keys`; refuses conflicting ids."""
        from . import rotation

        return rotation.import_keys(self, data)

    def _forget_ring(self, ring: KeyRing) -> None:
        with self._guard:
            self._active.pop(ring, None)
            self._search.pop(ring[0], None)
            self._readers.clear()
            self._openers.clear()
            self._preloaded.clear()

    def key_versions(self, table: Table | str, *, search: bool = False) -> list[int]:
        """Enabled key versions of ``table``, newest first."""
        ring = (_scope_of(table), SEARCH if search else DATA)
        with self.engine.connect() as conn:
            return [row.version for row in self._select_enabled(conn, ring)]

    def stats(self) -> dict[str, int]:
        """Counters for metrics.

        ``cache_entries``; ``cache_misses`` (keys unwrapped through the
        provider) and ``cache_hits`` (key lookups of the resolution path that
        found the key in memory; the per-value fast path, one dictionary hit,
        is not counted); ``decrypt_failures`` (stored values that raised
        instead of decrypting); ``kms_<Operation>`` (provider calls by
        operation).
        """
        counters = {
            "cache_entries": len(self.cache),
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
            "decrypt_failures": self._decrypt_failures,
        }
        for operation, count in sorted(self.provider.calls.items()):
            counters[f"kms_{operation}"] = count
        return counters

    def _count_decrypt_failure(self) -> None:
        with self._guard:
            self._decrypt_failures += 1

    # -- connections ---------------------------------------------------------

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
        token = _bound_connection.set(weakref.ref(connection))
        try:
            yield connection
        finally:
            _bound_connection.reset(token)

    def _shared_connection(self) -> Connection | None:
        """The connection key-table work must share: one bound with :meth:`using`, or,
        on SQLite, the application's connection when it already holds a write lock."""
        bound_ref = _bound_connection.get()
        bound = bound_ref() if bound_ref is not None else None
        if bound is not None and not bound.closed and bound.dialect is self.engine.dialect:
            return bound
        if not self._shares_writer:
            return None
        ref = _current_connection.get()
        conn = ref() if ref is not None else None
        if conn is None or conn.dialect is not self.engine.dialect or conn.closed:
            return None
        if not conn.in_transaction():
            return None
        # the driver's own connection (sqlite3 or aiosqlite) knows whether it holds a lock
        if not getattr(conn.connection.driver_connection, "in_transaction", False):
            return None
        return conn

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        shared = self._shared_connection()
        if shared is not None:
            yield shared
            return
        with self.engine.connect() as conn:
            yield conn

    def _lock(self, ring: KeyRing) -> AbstractContextManager[Any]:
        """Single-flight lock of one key ring; none on an async engine, whose event loop
        must never block on a lock held across the driver's awaits (the key table's
        primary key settles races there)."""
        if self._is_async:
            return nullcontext()
        with self._guard:
            return self._locks.setdefault(ring, threading.Lock())

    # -- key rows ------------------------------------------------------------

    def _ring_filter(self, ring: KeyRing) -> Any:
        keys = self.table.c
        return and_(keys.scope == ring[0], keys.purpose == ring[1])

    def _run(self, conn: Connection, query: Any) -> list[_KeyRow]:
        try:
            rows = conn.execute(query).all()
        except exc.DBAPIError as error:
            raise self._missing_table(error) from error
        return [_KeyRow(row[0], bytes(row[1]), row[2]) for row in rows]

    def _select_enabled(self, conn: Connection, ring: KeyRing) -> list[_KeyRow]:
        keys = self.table.c
        query = (
            select(keys.key_version, keys.wrapped_key, keys.master_key_id)
            .where(self._ring_filter(ring), keys.state == "enabled")
            .order_by(keys.key_version.desc())
        )
        return self._run(conn, query)

    def _select_version(self, conn: Connection, ring: KeyRing, version: int) -> _KeyRow | None:
        keys = self.table.c
        query = select(keys.key_version, keys.wrapped_key, keys.master_key_id).where(
            self._ring_filter(ring), keys.key_version == version
        )
        rows = self._run(conn, query)
        return rows[0] if rows else None

    def _insert(self, conn: Connection, ring: KeyRing, version: int) -> DataKeyCipher:
        context = encryption_context(*ring, version)
        provider = self.provider
        generated = kms_call(
            "GenerateDataKey",
            context,
            provider.master_key_id,
            lambda: provider.generate_data_key(context),
        )
        conn.execute(
            self.table.insert().values(
                scope=ring[0],
                purpose=ring[1],
                key_version=version,
                state="enabled",
                provider=self.provider.name,
                master_key_id=generated.master_key_id,
                wrapped_key=generated.wrapped,
                created_at=dt.datetime.now(dt.timezone.utc),
            )
        )
        key_event(
            "rotate" if version > 1 else "create",
            ring[0],
            ring[1],
            version,
            generated.master_key_id,
        )
        return DataKeyCipher(generated.plaintext, version)

    def _insert_committed(self, ring: KeyRing, version: int) -> DataKeyCipher | None:
        """Make and commit a key in its own transaction; ``None`` if another process won."""
        try:
            with self.engine.begin() as conn:
                cipher = self._insert(conn, ring, version)
        except exc.IntegrityError:
            return None
        except exc.DBAPIError as error:
            raise self._missing_table(error) from error
        self.cache.put((*ring, version), cipher)
        return cipher

    def _provider_for(self, master_key_id: str) -> KeyProvider:
        """The provider that unwraps keys of ``master_key_id``: the vault's own, or one it
        used before a partial :meth:`rewrap`."""
        for provider in (self.provider, *self._other_providers):
            if provider.owns(master_key_id):
                return provider
        return self.provider

    def _unwrap(self, ring: KeyRing, row: _KeyRow) -> DataKeyCipher:
        context = encryption_context(*ring, row.version)
        provider = self._provider_for(row.master_key_id)
        plaintext = kms_call(
            "Decrypt",
            context,
            row.master_key_id,
            lambda: provider.unwrap(row.wrapped, context, row.master_key_id),
        )
        return DataKeyCipher(plaintext, row.version)

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A connection for a key-table change: the shared one, or a transaction of our own."""
        shared = self._shared_connection()
        if shared is not None:
            yield shared
            return
        with self.engine.begin() as conn:
            yield conn

    def _audit_change(
        self, operation: str, scope: str, purpose: str, version: int, master_key_id: str
    ) -> None:
        key_event(operation, scope, purpose, version, master_key_id)

    def _cipher_for_row(self, ring: KeyRing, row: _KeyRow) -> DataKeyCipher:
        return self.cache.get_or_load(
            (*ring, row.version), lambda: self._unwrap(ring, row), single_flight=not self._is_async
        )

    # -- active keys ---------------------------------------------------------

    def _active_cipher(self, scope: str, purpose: str) -> DataKeyCipher:
        ring = (scope, purpose)
        entry = self._active.get(ring)
        if entry is not None and time.monotonic() < entry[1]:
            return entry[0]
        # a connection that holds SQLite's write lock must not wait for a thread that
        # waits for that write lock: check before taking the ring's lock
        shared = self._shared_connection()
        if shared is not None:
            return self._active_in_transaction(shared, ring)
        with self._lock(ring):
            entry = self._active.get(ring)
            if entry is not None and time.monotonic() < entry[1]:
                return entry[0]
            cipher = self._load_or_make_active(ring)
            expires = min(
                time.monotonic() + self.refresh_interval,
                self.cache.expires_at((*ring, cipher.key_version)),
            )
            self._active[ring] = (cipher, expires)
            return cipher

    def _load_or_make_active(self, ring: KeyRing) -> DataKeyCipher:
        with self.engine.connect() as conn:
            rows = self._select_enabled(conn, ring)
        if rows:
            return self._cipher_for_row(ring, rows[0])
        made = self._insert_committed(ring, 1)
        if made is not None:
            return made
        with self.engine.connect() as conn:  # lost the race: read the winner's key
            rows = self._select_enabled(conn, ring)
        if not rows:
            raise UnknownKeyVersionError(
                "the key table refused a new key but holds no enabled one", table=ring[0]
            )
        return self._cipher_for_row(ring, rows[0])

    def _pending(self, conn: Connection) -> dict[Any, DataKeyCipher]:
        pending: dict[Any, DataKeyCipher] = conn.info.setdefault(_PENDING_INFO, {})
        return pending

    def _active_in_transaction(self, conn: Connection, ring: KeyRing) -> DataKeyCipher:
        """SQLite, inside a write transaction: read or make the key on that connection."""
        pending = self._pending(conn)
        cipher = pending.get(ring)
        if cipher is not None:
            return cipher
        rows = self._select_enabled(conn, ring)
        if rows:
            return self._cipher_for_row(ring, rows[0])
        cipher = self._insert(conn, ring, 1)
        # usable by this transaction only, until it commits
        pending[ring] = pending[(*ring, cipher.key_version)] = cipher
        return cipher

    def _search_ciphers(self, scope: str) -> list[DataKeyCipher]:
        """Every enabled search key of ``scope``, newest first (refreshed like the active key)."""
        entry = self._search.get(scope)
        if entry is not None and time.monotonic() < entry[1]:
            return entry[0]
        ring = (scope, SEARCH)
        self._active_cipher(scope, SEARCH)  # makes the first search key if needed
        shared = self._shared_connection()
        pending = self._pending(shared) if shared is not None else {}
        with self._reading() as conn:
            rows = self._select_enabled(conn, ring)
        ciphers = [
            pending.get((*ring, row.version)) or self._cipher_for_row(ring, row) for row in rows
        ]
        if shared is None:
            expires = min(
                [time.monotonic() + self.refresh_interval]
                + [self.cache.expires_at((*ring, c.key_version)) for c in ciphers]
            )
            self._search[scope] = (ciphers, expires)
        return ciphers

    # -- async engines -------------------------------------------------------

    def _preload_result_keys(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        """Async engines: load the keys a statement's encrypted result columns need
        while the statement still runs inside SQLAlchemy's greenlet.

        Rows of an async result are decoded after the ``await``, where the key
        table can no longer be queried; the keys must be in memory by then.
        """
        compiled = getattr(context, "compiled", None)
        if compiled is None:
            return
        rings = self._result_rings.get(compiled)
        if rings is None:
            rings = self._result_rings[compiled] = _encrypted_result_rings(compiled)
        for ring in rings:
            if time.monotonic() >= self._preloaded.get(ring, 0.0):
                self._preload(ring)
        # keys made inside this connection's transaction (SQLite) are not in the key
        # table for other connections yet
        for key, cipher in conn.info.get(_PENDING_INFO, {}).items():
            if len(key) == 3 and key[:2] in rings:
                algorithm = ALG_RANDOMIZED if key[1] == DATA else ALG_DETERMINISTIC
                self._readers[(key[0], pack_header(algorithm, key[2]))] = (
                    cipher,
                    time.monotonic() + self.refresh_interval,
                )

    def _preload(self, ring: KeyRing) -> None:
        keys = self.table.c
        query = select(keys.key_version, keys.wrapped_key, keys.master_key_id).where(
            self._ring_filter(ring)
        )
        with self.engine.connect() as conn:
            rows = self._run(conn, query)
        algorithm = ALG_RANDOMIZED if ring[1] == DATA else ALG_DETERMINISTIC
        expires = time.monotonic() + self.refresh_interval
        for row in rows:
            cipher = self._cipher_for_row(ring, row)
            key = (*ring, row.version)
            self._remember_reader(ring[0], pack_header(algorithm, row.version), cipher, key)
            expires = min(expires, self.cache.expires_at(key))
        self._preloaded[ring] = expires

    # -- keys by version -----------------------------------------------------

    def _cipher(self, ring: KeyRing, version: int) -> DataKeyCipher:
        key = (*ring, version)
        cipher = self.cache.get(key)
        if cipher is not None:
            return cipher
        shared = self._shared_connection()
        if shared is not None:
            cipher = self._pending(shared).get(key)
            if cipher is not None:
                return cipher

        def load() -> DataKeyCipher:
            with self._reading() as conn:
                row = self._select_version(conn, ring, version)
            if row is None:
                raise UnknownKeyVersionError(
                    "the key table holds no such key version", table=ring[0], key_version=version
                )
            if ring[1] == SEARCH:  # a search key this process has not seen: refresh the list
                with self._guard:
                    self._search.pop(ring[0], None)
            return self._unwrap(ring, row)

        return self.cache.get_or_load(key, load, single_flight=not self._is_async)

    # -- values (the hot path) -------------------------------------------------

    def encrypt(self, scope: str, aad: bytes, plaintext: bytes) -> bytes:
        """Encrypt one value of the column bound by ``aad`` (randomized)."""
        entry = self._active.get((scope, DATA))
        if entry is not None and time.monotonic() < entry[1]:
            return entry[0].encrypt(plaintext, aad)
        return self._active_cipher(scope, DATA).encrypt(plaintext, aad)

    def encrypt_deterministic(self, scope: str, column: str, aad: bytes, plaintext: bytes) -> bytes:
        """Encrypt one value of a deterministic column under the active search key."""
        entry = self._active.get((scope, SEARCH))
        if entry is not None and time.monotonic() < entry[1]:
            cipher = entry[0]
        else:
            cipher = self._active_cipher(scope, SEARCH)
        return cipher.encrypt_deterministic(plaintext, scope, column, aad)

    def decrypt(self, scope: str, column: str, aad: bytes, stored: bytes) -> bytes:
        """Decrypt one stored value of the column bound by ``aad``."""
        algorithm, version = parse_header(stored)
        ring = (scope, DATA if algorithm == ALG_RANDOMIZED else SEARCH)
        cipher = self.cache.get((*ring, version)) or self._cipher(ring, version)
        plaintext = cipher.decrypt(stored, aad, algorithm=algorithm, scope=scope, column=column)
        self._remember_reader(scope, stored[:HEADER_SIZE], cipher, (*ring, version))
        if algorithm == ALG_RANDOMIZED:
            self._remember_opener(stored, cipher, (*ring, version))
        return plaintext

    def _remember_opener(
        self, stored: bytes, cipher: DataKeyCipher, key: tuple[str, str, int]
    ) -> None:
        """Map a randomized value's ``header || salt`` to the subkey that opens it."""
        openers = self._openers
        if len(openers) >= _MAX_OPENERS:
            openers.clear()
        openers[stored[:SUBKEY_PREFIX_SIZE]] = (
            cipher.subkey(stored[HEADER_SIZE:SUBKEY_PREFIX_SIZE]),
            self.cache.expires_at(key),
        )

    def _remember_reader(
        self, scope: str, header: bytes, cipher: DataKeyCipher, key: tuple[str, str, int]
    ) -> None:
        """Let the next value with this header find its cipher with one dictionary hit."""
        readers = self._readers
        if len(readers) >= 2 * self.cache.max_entries:
            readers.clear()
        readers[(scope, header)] = (cipher, self.cache.expires_at(key))

    def reader(self, scope: str, header: bytes) -> DataKeyCipher | None:
        """The cipher of a stored value's header, if known and fresh: the hot path of
        :class:`~sqlalchemy_kms.KMSEncrypted` reads; ``None`` sends it to :meth:`decrypt`."""
        entry = self._readers.get((scope, header))
        if entry is not None and time.monotonic() < entry[1]:
            return entry[0]
        return None


def _scope_of(table: Table | str) -> str:
    return table_scope(table) if isinstance(table, Table) else table


def _encrypted_result_rings(compiled: Any) -> frozenset[KeyRing]:
    """The key rings the encrypted columns of a compiled statement's result use."""
    from .types import KMSEncrypted

    rings = set()
    for entry in getattr(compiled, "_result_columns", None) or ():
        column_type = entry[3]
        if isinstance(column_type, KMSEncrypted) and column_type._binding is not None:
            purpose = SEARCH if column_type.deterministic else DATA
            rings.add((column_type._binding.scope, purpose))
    return frozenset(rings)


def _purposes_needed(table: Table) -> list[str]:
    from .types import KMSEncrypted

    kinds = {
        column.type.deterministic
        for column in table.columns
        if isinstance(column.type, KMSEncrypted)
    }
    return [purpose for purpose, det in ((DATA, False), (SEARCH, True)) if det in kinds]
