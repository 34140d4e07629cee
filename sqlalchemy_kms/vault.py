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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final, NamedTuple

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
    inspect,
    select,
)
from sqlalchemy.engine import Connection, Dialect, Engine

from ._cipher import DataKeyCipher
from ._format import parse_header
from .cache import DEFAULT_MAX_AGE, DEFAULT_MAX_ENTRIES, KeyCache
from .errors import KeyTableMissingError, UnknownKeyVersionError
from .providers.base import KeyProvider, encryption_context

__all__ = ["DEFAULT_KEY_TABLE", "DEFAULT_REFRESH_INTERVAL", "KeyVault", "key_table"]

#: Name of the key table unless ``table_name`` says otherwise.
DEFAULT_KEY_TABLE: Final = "kms_data_keys"
#: Seconds after which a vault checks the key table again for a newer active key.
DEFAULT_REFRESH_INTERVAL: Final = 60.0

_VAULT_ATTR: Final = "_sqlalchemy_kms_vault"
_PENDING_INFO: Final = "sqlalchemy_kms.pending"

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
        self.metadata = MetaData()
        self.table = key_table(self.metadata, table_name, schema)
        self.cache: KeyCache[DataKeyCipher] = KeyCache(cache_max_entries, cache_max_age)
        self.refresh_interval = float(refresh_interval)
        self._active: dict[str, tuple[DataKeyCipher, float]] = {}
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._shares_writer = sync_engine.dialect.name == "sqlite"
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
            event.listen(self.engine, "commit", _forget_pending)
            event.listen(self.engine, "rollback", _forget_pending)

    def close(self) -> None:
        """Unbind from the engine and forget every cached key."""
        if vault_for(self.engine.dialect) is self:
            delattr(self.engine.dialect, _VAULT_ATTR)
        if self._shares_writer and event.contains(
            self.engine, "before_execute", _remember_connection
        ):
            event.remove(self.engine, "before_execute", _remember_connection)
            event.remove(self.engine, "commit", _forget_pending)
            event.remove(self.engine, "rollback", _forget_pending)
        self.clear_cache()

    def clear_cache(self) -> None:
        """Forget every unwrapped key; the next use asks the provider again."""
        with self._guard:
            self._active.clear()
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
        missing = KeyTableMissingError(
            f"the key table {self.table.fullname} does not exist; call vault.create_table() "
            "or run the migration that creates it"
        )
        return missing

    def create_key(self, table: Table | str) -> int:
        """Make sure ``table`` has an active data key, making one if needed.

        Returns the active key version. Use it to make keys ahead of time,
        for example in a deployment step.
        """
        scope = table_scope(table) if isinstance(table, Table) else table
        return self._active_cipher(scope).key_version

    def create_keys(self, metadata: MetaData) -> dict[str, int]:
        """:meth:`create_key` for every table of ``metadata`` that has encrypted columns."""
        from .types import KMSEncrypted

        versions = {}
        for table in metadata.sorted_tables:
            if any(isinstance(column.type, KMSEncrypted) for column in table.columns):
                versions[table_scope(table)] = self.create_key(table)
        return versions

    def active_key_version(self, table: Table | str) -> int:
        """The version of the key new values of ``table`` are encrypted with."""
        return self.create_key(table)

    def stats(self) -> dict[str, int]:
        """Counters for metrics: cache entries, hits, misses and provider calls."""
        counters = {
            "cache_entries": len(self.cache),
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
        }
        for operation, count in sorted(self.provider.calls.items()):
            counters[f"kms_{operation}"] = count
        return counters

    # -- connections ---------------------------------------------------------

    def _shared_connection(self) -> Connection | None:
        """On SQLite, the application's connection when it already holds a transaction."""
        if not self._shares_writer:
            return None
        ref = _current_connection.get()
        conn = ref() if ref is not None else None
        if conn is None or conn.engine is not self.engine or conn.closed:
            return None
        if not conn.in_transaction():
            return None
        dbapi_connection = conn.connection.dbapi_connection
        if not getattr(dbapi_connection, "in_transaction", False):
            return None
        return conn

    @contextmanager
    def _reading(self) -> Iterator[tuple[Connection, bool]]:
        shared = self._shared_connection()
        if shared is not None:
            yield shared, True
            return
        with self.engine.connect() as conn:
            yield conn, False

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def _select(self, conn: Connection, scope: str, version: int | None) -> _KeyRow | None:
        keys = self.table
        query = select(keys.c.key_version, keys.c.wrapped_key, keys.c.master_key_id)
        if version is None:
            query = query.where(and_(keys.c.scope == scope, keys.c.state == "enabled"))
            query = query.order_by(keys.c.key_version.desc()).limit(1)
        else:
            query = query.where(and_(keys.c.scope == scope, keys.c.key_version == version))
        try:
            row = conn.execute(query).first()
        except exc.DBAPIError as error:
            raise self._missing_table(error) from error
        if row is None:
            return None
        return _KeyRow(row[0], bytes(row[1]), row[2])

    def _insert(self, conn: Connection, scope: str, version: int) -> DataKeyCipher:
        generated = self.provider.generate_data_key(encryption_context(scope, version))
        conn.execute(
            self.table.insert().values(
                scope=scope,
                key_version=version,
                state="enabled",
                provider=self.provider.name,
                master_key_id=generated.master_key_id,
                wrapped_key=generated.wrapped,
                created_at=dt.datetime.now(dt.timezone.utc),
            )
        )
        return DataKeyCipher(generated.plaintext, version)

    def _insert_committed(self, scope: str, version: int) -> DataKeyCipher | None:
        """Make and commit a key in its own transaction; ``None`` if another process won."""
        try:
            with self.engine.begin() as conn:
                cipher = self._insert(conn, scope, version)
        except exc.IntegrityError:
            return None
        except exc.DBAPIError as error:
            raise self._missing_table(error) from error
        self.cache.put((scope, version), cipher)
        return cipher

    def _unwrap(self, scope: str, row: _KeyRow) -> DataKeyCipher:
        plaintext = self.provider.unwrap(
            row.wrapped, encryption_context(scope, row.version), row.master_key_id
        )
        return DataKeyCipher(plaintext, row.version)

    # -- active key ----------------------------------------------------------

    def _active_cipher(self, scope: str) -> DataKeyCipher:
        entry = self._active.get(scope)
        if entry is not None and time.monotonic() < entry[1]:
            return entry[0]
        with self._lock("active:" + scope):
            entry = self._active.get(scope)
            if entry is not None and time.monotonic() < entry[1]:
                return entry[0]
            shared = self._shared_connection()
            if shared is not None:
                return self._active_in_transaction(shared, scope)
            with self.engine.connect() as conn:
                row = self._select(conn, scope, None)
            if row is None:
                cipher = self._insert_committed(scope, 1)
                if cipher is None:  # lost the race: read the winner's key
                    with self.engine.connect() as conn:
                        row = self._select(conn, scope, None)
                    if row is None:
                        raise UnknownKeyVersionError(
                            "the key table refused a new key but holds none", table=scope
                        )
            if row is not None:
                cipher = self.cache.get_or_load(
                    (scope, row.version), lambda: self._unwrap(scope, row)
                )
            assert cipher is not None
            expires = min(
                time.monotonic() + self.refresh_interval,
                self.cache.expires_at((scope, cipher.key_version)),
            )
            self._active[scope] = (cipher, expires)
            return cipher

    def _pending(self, conn: Connection) -> dict[Any, DataKeyCipher]:
        pending: dict[Any, DataKeyCipher] = conn.info.setdefault(_PENDING_INFO, {})
        return pending

    def _active_in_transaction(self, conn: Connection, scope: str) -> DataKeyCipher:
        """SQLite, inside a write transaction: read or make the key on that connection."""
        pending = self._pending(conn)
        cipher = pending.get(scope)
        if cipher is not None:
            return cipher
        row = self._select(conn, scope, None)
        if row is not None:
            return self.cache.get_or_load((scope, row.version), lambda: self._unwrap(scope, row))
        cipher = self._insert(conn, scope, 1)
        # usable by this transaction only, until it commits
        pending[scope] = pending[(scope, cipher.key_version)] = cipher
        return cipher

    # -- keys by version -----------------------------------------------------

    def _cipher(self, scope: str, version: int) -> DataKeyCipher:
        cipher = self.cache.get((scope, version))
        if cipher is not None:
            return cipher
        shared = self._shared_connection()
        if shared is not None:
            cipher = self._pending(shared).get((scope, version))
            if cipher is not None:
                return cipher

        def load() -> DataKeyCipher:
            with self._reading() as (conn, _):
                row = self._select(conn, scope, version)
            if row is None:
                raise UnknownKeyVersionError(
                    "the key table holds no such key version", table=scope, key_version=version
                )
            return self._unwrap(scope, row)

        return self.cache.get_or_load((scope, version), load)

    # -- values (the hot path) -------------------------------------------------

    def encrypt(self, scope: str, aad: bytes, plaintext: bytes) -> bytes:
        """Encrypt one value of the column bound by ``aad`` (randomized)."""
        entry = self._active.get(scope)
        if entry is not None and time.monotonic() < entry[1]:
            return entry[0].encrypt(plaintext, aad)
        return self._active_cipher(scope).encrypt(plaintext, aad)

    def encrypt_deterministic(self, scope: str, column: str, aad: bytes, plaintext: bytes) -> bytes:
        """Encrypt one value of a deterministic column."""
        entry = self._active.get(scope)
        if entry is not None and time.monotonic() < entry[1]:
            cipher = entry[0]
        else:
            cipher = self._active_cipher(scope)
        return cipher.encrypt_deterministic(plaintext, scope, column, aad)

    def decrypt(self, scope: str, column: str, aad: bytes, stored: bytes) -> bytes:
        """Decrypt one stored value of the column bound by ``aad``."""
        algorithm, version = parse_header(stored)
        cipher = self.cache.get((scope, version)) or self._cipher(scope, version)
        return cipher.decrypt(stored, aad, algorithm=algorithm, scope=scope, column=column)
