"""The key table: its definition and every query on it.

One row per key version of one table and one mode::

    scope          the table's name, ``schema.table`` when it has a schema
    purpose        ``data`` (randomized columns) or ``search`` (deterministic columns)
    key_version    1, 2, ...
    state          ``enabled`` or ``retired``
    provider       the provider's short name (``aws-kms``, ``local``)
    master_key_id  the master key that wrapped it (for AWS KMS the key ARN)
    wrapped_key    the provider's ciphertext of the data key
    created_at     when the key was made

The active key of a table is its highest enabled version. Nothing else in the
package writes SQL against this table: every read and write is a method of
:class:`KeyTable`, given the connection to run on.

Example::

    >>> from sqlalchemy import MetaData, create_engine
    >>> keys = KeyTable(MetaData())
    >>> engine = create_engine("sqlite://")
    >>> keys.metadata.create_all(engine)
    >>> with engine.connect() as conn:
    ...     keys.newest_version(conn, KeySeries("patients", deterministic=False))
    0
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
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
    exc,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

from .errors import KeyTableMissingError

__all__ = [
    "DEFAULT_KEY_TABLE",
    "ENABLED",
    "RETIRED",
    "KeyRow",
    "KeySeries",
    "KeyTable",
    "key_table",
    "scope_of",
    "table_scope",
]

#: Name of the key table unless ``table_name`` says otherwise.
DEFAULT_KEY_TABLE: Final = "kms_data_keys"
#: A key new values may be written under (the highest one is active).
ENABLED: Final = "enabled"
#: A key no longer written under; refused as active, kept for reading until destroyed.
RETIRED: Final = "retired"

# the key table's ``purpose`` column spells the deterministic axis this way
_PURPOSE = {False: "data", True: "search"}
_DETERMINISTIC = {"data": False, "search": True}


class KeySeries(NamedTuple):
    """The versions of one table's key for one mode: randomized columns use one
    series, deterministic columns (the table's *search key*) another.

    >>> KeySeries("patients", deterministic=True).purpose
    'search'
    """

    scope: str
    deterministic: bool

    @property
    def purpose(self) -> str:
        """The key table's ``purpose`` value of this series."""
        return _PURPOSE[self.deterministic]

    @classmethod
    def of(cls, scope: str, purpose: str) -> KeySeries:
        """The series of a key-table row's ``scope`` and ``purpose``."""
        return cls(scope, _DETERMINISTIC[purpose])


class KeyRow(NamedTuple):
    """One key version as the key table holds it (wrapped)."""

    series: KeySeries
    version: int
    state: str
    provider: str
    master_key_id: str
    wrapped: bytes
    created_at: dt.datetime | None


def key_table(
    metadata: MetaData, name: str = DEFAULT_KEY_TABLE, schema: str | None = None
) -> Table:
    """The key table's definition in ``metadata`` (for migrations and tools).

    >>> key_table(MetaData()).c.keys()[:3]
    ['scope', 'purpose', 'key_version']
    """
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


def table_scope(table: Table) -> str:
    """The key scope of a table: its name, schema-qualified when it has a schema."""
    return f"{table.schema}.{table.name}" if table.schema else table.name


def scope_of(table: Table | str) -> str:
    """The key scope of a table or of a scope given as a string."""
    return table_scope(table) if isinstance(table, Table) else table


class KeyTable:
    """The key table of one database and the queries on it.

    :param metadata: where the table is defined (a vault keeps its own).
    :param name: the table's name.
    :param schema: its schema (default: the connection's).
    """

    def __init__(
        self, metadata: MetaData, name: str = DEFAULT_KEY_TABLE, schema: str | None = None
    ) -> None:
        self.metadata = metadata
        self.table = key_table(metadata, name, schema)

    def __repr__(self) -> str:
        return f"<KeyTable {self.table.fullname!r}>"

    # -- the table itself ----------------------------------------------------

    def create(self, engine: Engine) -> None:
        """Create the key table if it does not exist (safe to call again, and from
        several processes at once)."""
        try:
            self.metadata.create_all(engine, tables=[self.table], checkfirst=True)
        except exc.DatabaseError:
            # another process created it between our check and our CREATE
            with engine.connect() as conn:
                if not self.exists(conn):
                    raise

    def exists(self, conn: Connection) -> bool:
        """Whether the key table exists in ``conn``'s database."""
        return bool(inspect(conn).has_table(self.table.name, schema=self.table.schema))

    def missing_error(self) -> KeyTableMissingError:
        """The error that says the key table does not exist, with what to do."""
        return KeyTableMissingError(
            f"the key table {self.table.fullname} does not exist; call vault.create_table() "
            "or run the migration that creates it"
        )

    def _execute(self, conn: Connection, statement: Any, params: Any = None) -> Any:
        try:
            return conn.execute(statement, params)
        except exc.DBAPIError as error:
            # asked on a connection of its own: the failed statement may have left this
            # one's transaction unusable (PostgreSQL)
            with conn.engine.connect() as other:
                missing = not self.exists(other)
            if missing:
                raise self.missing_error() from error
            raise

    # -- reading ---------------------------------------------------------------

    def _series(self, series: KeySeries) -> Any:
        keys = self.table.c
        return and_(keys.scope == series.scope, keys.purpose == series.purpose)

    def _key_rows(self, conn: Connection, query: Any) -> list[KeyRow]:
        return [
            KeyRow(
                KeySeries.of(row.scope, row.purpose),
                row.key_version,
                row.state,
                row.provider,
                row.master_key_id,
                bytes(row.wrapped_key),
                row.created_at,
            )
            for row in self._execute(conn, query)
        ]

    def enabled(self, conn: Connection, series: KeySeries) -> list[KeyRow]:
        """The enabled versions of ``series``, newest (the active one) first."""
        keys = self.table.c
        query = (
            select(self.table)
            .where(self._series(series), keys.state == ENABLED)
            .order_by(keys.key_version.desc())
        )
        return self._key_rows(conn, query)

    def versions(self, conn: Connection, series: KeySeries) -> list[KeyRow]:
        """Every version of ``series`` (enabled or retired), oldest first."""
        query = select(self.table).where(self._series(series)).order_by(self.table.c.key_version)
        return self._key_rows(conn, query)

    def version(self, conn: Connection, series: KeySeries, version: int) -> KeyRow | None:
        """One version of ``series``, or ``None`` if the key table has no such row."""
        query = select(self.table).where(
            self._series(series), self.table.c.key_version == version
        )
        rows = self._key_rows(conn, query)
        return rows[0] if rows else None

    def newest_version(self, conn: Connection, series: KeySeries) -> int:
        """The highest version of ``series`` in any state (0 when it has none)."""
        query = select(func.max(self.table.c.key_version)).where(self._series(series))
        return int(self._execute(conn, query).scalar() or 0)

    def rows(self, conn: Connection, scope: str | None = None) -> list[KeyRow]:
        """Every row (or one table's), ordered by table, mode and version."""
        keys = self.table.c
        query = select(self.table).order_by(keys.scope, keys.purpose, keys.key_version)
        if scope is not None:
            query = query.where(keys.scope == scope)
        return self._key_rows(conn, query)

    # -- writing ---------------------------------------------------------------

    def insert(
        self,
        conn: Connection,
        series: KeySeries,
        version: int,
        *,
        provider: str,
        master_key_id: str,
        wrapped: bytes,
    ) -> None:
        """Add an enabled key version; ``IntegrityError`` if the version exists."""
        self._execute(
            conn,
            self.table.insert().values(
                scope=series.scope,
                purpose=series.purpose,
                key_version=version,
                state=ENABLED,
                provider=provider,
                master_key_id=master_key_id,
                wrapped_key=wrapped,
                created_at=dt.datetime.now(dt.timezone.utc),
            ),
        )

    def insert_rows(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Add rows given as column-name mappings (a restored backup)."""
        if rows:
            self._execute(conn, self.table.insert(), list(rows))

    def set_state(self, conn: Connection, series: KeySeries, version: int, state: str) -> None:
        """Change the state of one key version."""
        keys = self.table.c
        self._execute(
            conn,
            update(self.table)
            .where(self._series(series), keys.key_version == version)
            .values(state=state),
        )

    def delete_retired(self, conn: Connection, series: KeySeries, version: int) -> int:
        """Delete one retired key version; returns the rows deleted (0 or 1)."""
        keys = self.table.c
        result = self._execute(
            conn,
            self.table.delete().where(
                self._series(series), keys.key_version == version, keys.state == RETIRED
            ),
        )
        return int(result.rowcount)

    def replace_wrapped(
        self,
        conn: Connection,
        row: KeyRow,
        *,
        provider: str,
        master_key_id: str,
        wrapped: bytes,
    ) -> int:
        """Store a key wrapped anew, if the row still holds ``row.wrapped``."""
        keys = self.table.c
        result = self._execute(
            conn,
            update(self.table)
            .where(
                self._series(row.series),
                keys.key_version == row.version,
                keys.wrapped_key == row.wrapped,
            )
            .values(wrapped_key=wrapped, master_key_id=master_key_id, provider=provider),
        )
        return int(result.rowcount)

