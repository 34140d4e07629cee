"""The key table: its definition and every query on it.

One row per key version of one table and one mode::

    scope          the table's name, ``schema.table`` when it has a schema
    purpose        ``data`` (randomized columns) or ``search`` (deterministic columns)
    key_version    1, 2, ... up to 2**31 - 1 (the stored format's limit)
    state          ``enabled`` or ``retired``
    provider       the provider's short name (``aws-kms``, ``local``)
    master_key_id  the master key that wrapped it (for AWS KMS the key ARN)
    wrapped_key    the provider's ciphertext of the data key
    created_at     when the key was made

Named CHECK constraints (``ck_<table>_purpose``, ``ck_<table>_state``,
``ck_<table>_key_version``) hold ``purpose``, ``state`` and ``key_version`` to
those values, and on MySQL and MariaDB ``scope``, ``purpose`` and ``state`` use
the binary collation ``utf8mb4_bin``, so ``People`` and ``people`` are two
tables with two keys, and ``ENABLED`` is not ``enabled``.

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
    CheckConstraint,
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
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.naming import conv
from sqlalchemy.types import TypeEngine

from ._format import MAX_KEY_VERSION
from .errors import ConfigurationError, KeyLifecycleError, KeyTableMissingError

__all__ = [
    "DEFAULT_KEY_TABLE",
    "ENABLED",
    "KEY_TABLE_INFO",
    "PURPOSES",
    "RETIRED",
    "STATES",
    "KeyRow",
    "KeySeries",
    "KeyTable",
    "KeyTableDeclaration",
    "declared_key_table",
    "depend_on_key_table",
    "key_table",
    "key_table_declaration",
    "scope_for",
    "scope_of",
    "table_scope",
]

#: Name of the key table unless ``table_name`` says otherwise.
DEFAULT_KEY_TABLE: Final = "kms_data_keys"
#: A key new values may be written under (the highest one is active).
ENABLED: Final = "enabled"
#: A key no longer written under; refused as active, kept for reading until destroyed.
RETIRED: Final = "retired"
#: Every state a key row may hold (the key table's CHECK constraint says so too).
STATES: Final = (ENABLED, RETIRED)
#: Every purpose a key row may hold: ``data`` (randomized columns), ``search`` (deterministic).
PURPOSES: Final = ("data", "search")

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


# -- the key table of a MetaData ---------------------------------------------------------

#: The ``MetaData.info`` key under which a metadata records its key table.
KEY_TABLE_INFO: Final = "sqlalchemy_kms.key_table"


class KeyTableDeclaration:
    """What a ``MetaData`` records of its key table, in ``metadata.info[KEY_TABLE_INFO]``.

    :param name: the key table's name.
    :param schema: its schema.
    :param automatic: ``True`` for the default key table added when a
        ``KMSEncrypted`` column was attached to a table of the metadata,
        ``False`` once :func:`key_table` declared it.

    >>> metadata = MetaData()
    >>> _ = key_table(metadata, "app_keys", schema="vault")
    >>> metadata.info[KEY_TABLE_INFO]
    KeyTableDeclaration('vault.app_keys', automatic=False)
    """

    __slots__ = ("automatic", "dependents", "name", "schema")

    def __init__(self, name: str, schema: str | None, *, automatic: bool) -> None:
        self.name = name
        self.schema = schema
        self.automatic = automatic
        #: The tables made to depend on the key table (the metadata's encrypted tables).
        self.dependents: list[Table] = []

    @property
    def fullname(self) -> str:
        """``schema.name``, or the name alone."""
        return f"{self.schema}.{self.name}" if self.schema else self.name

    def __repr__(self) -> str:
        return f"KeyTableDeclaration({self.fullname!r}, automatic={self.automatic})"

    def refuse_other(
        self, used: Table, subject: str, holder: str = "this KeyVault", consequence: str = ""
    ) -> None:
        """Raise :class:`~sqlalchemy_kms.errors.ConfigurationError` unless ``used`` (a
        vault's key table) is this declared one: the one home of that rule's message.

        >>> declared = KeyTableDeclaration("kms_data_keys", None, automatic=True)
        >>> declared.refuse_other(key_table(MetaData(), "app_keys"), "the models")
        Traceback (most recent call last):
        ...
        sqlalchemy_kms.errors.ConfigurationError: the models use the key table ...
        """
        if self.fullname == used.fullname:
            return
        schema = "" if used.schema is None else f", schema={used.schema!r}"
        because = f"{consequence}; " if consequence else ""
        raise ConfigurationError(
            f"{subject} use the key table {self.fullname}"
            f"{' (the default)' if self.automatic else ''}, but {holder} uses "
            f"{used.fullname}: {because}declare it in the models with "
            f"key_table(metadata, {used.name!r}{schema}), or give the KeyVault the models' "
            "key table"
        )


def key_table_declaration(metadata: MetaData) -> KeyTableDeclaration | None:
    """What ``metadata`` records of its key table, while that table is part of it.

    >>> key_table_declaration(MetaData()) is None
    True
    """
    declaration = metadata.info.get(KEY_TABLE_INFO)
    if not isinstance(declaration, KeyTableDeclaration):
        return None
    if declaration.fullname not in metadata.tables:  # removed by hand: nothing declared
        return None
    return declaration


def declared_key_table(metadata: MetaData) -> Table | None:
    """The key table of ``metadata``, declared by :func:`key_table` or added with its
    first encrypted column; ``None`` when it has neither.

    >>> metadata = MetaData()
    >>> declared_key_table(metadata) is None
    True
    >>> keys = key_table(metadata)
    >>> declared_key_table(metadata) is keys
    True
    """
    declaration = key_table_declaration(metadata)
    return None if declaration is None else metadata.tables[declaration.fullname]


def depend_on_key_table(table: Table) -> Table:
    """Make ``table`` (a table with encrypted columns) depend on its metadata's key
    table, adding the default one (``kms_data_keys``) when the metadata has none.

    ``create_all`` then creates the key table first (and ``drop_all`` drops it
    last), and autogenerate finds it among the models. Returns the key table.

    >>> from sqlalchemy import Column, Integer
    >>> metadata = MetaData()
    >>> patients = Table("patients", metadata, Column("id", Integer, primary_key=True))
    >>> depend_on_key_table(patients).name
    'kms_data_keys'
    >>> [t.name for t in metadata.sorted_tables]
    ['kms_data_keys', 'patients']
    """
    metadata = table.metadata
    declaration = key_table_declaration(metadata)
    if declaration is None:
        keys = key_table(metadata)
        declaration = metadata.info[KEY_TABLE_INFO]
        declaration.automatic = True
    else:
        keys = metadata.tables[declaration.fullname]
    if keys is not table and not any(t is table for t in declaration.dependents):
        table.add_is_dependent_on(keys)
        declaration.dependents.append(table)
    return keys


def _declare(metadata: MetaData, name: str, schema: str | None) -> Table | None:
    """Record ``name``/``schema`` as the key table of ``metadata``; the table when
    ``metadata`` holds it already (``None``: the caller defines it).

    An automatic key table of another name is replaced, its dependents moved to
    the new one; a declared one is not: one metadata has one key table.
    """
    current = key_table_declaration(metadata)
    wanted = KeyTableDeclaration(name, schema, automatic=False)
    if current is not None:
        if current.fullname == wanted.fullname:
            current.automatic = False
            return metadata.tables[current.fullname]
        if not current.automatic:
            raise ConfigurationError(
                f"this MetaData declares the key table {current.fullname} already, so it "
                f"cannot declare {wanted.fullname} too: one MetaData has one key table"
            )
        metadata.remove(metadata.tables[current.fullname])
        del metadata.info[KEY_TABLE_INFO]
        replacement = key_table(metadata, name, schema)
        declared: KeyTableDeclaration = metadata.info[KEY_TABLE_INFO]
        for dependent in current.dependents:
            # the dependency on the removed table stays, harmless: create_all and
            # drop_all order only the tables of the metadata
            if metadata.tables.get(dependent.key) is dependent:
                dependent.add_is_dependent_on(replacement)
                declared.dependents.append(dependent)
        return replacement
    metadata.info[KEY_TABLE_INFO] = wanted
    return metadata.tables.get(wanted.fullname)  # a table of that name already: adopted


def key_table(
    metadata: MetaData, name: str = DEFAULT_KEY_TABLE, schema: str | None = None
) -> Table:
    """Declare the key table of ``metadata`` and return its definition.

    A metadata gets the default key table (``kms_data_keys``) by itself as
    soon as a ``KMSEncrypted`` column is attached to one of its tables, so
    that ``create_all`` creates it and Alembic's autogenerate neither drops it
    nor forgets it. Call this to give it the name and schema of the
    :class:`~sqlalchemy_kms.KeyVault`'s key table when they are not the
    default ones, before or after the models are defined; called again with
    the same name, it returns the same table. Migrations and tools create the
    key table from this definition too.

    >>> key_table(MetaData()).c.keys()[:3]
    ['scope', 'purpose', 'key_version']
    >>> metadata = MetaData()
    >>> keys = key_table(metadata, "app_keys", schema="vault")
    >>> keys.fullname, key_table(metadata, "app_keys", schema="vault") is keys
    ('vault.app_keys', True)
    """
    declared = _declare(metadata, name, schema)
    if declared is not None:
        return declared
    return Table(
        name,
        metadata,
        Column("scope", _exact_string(255), primary_key=True),
        Column("purpose", _exact_string(16), primary_key=True),
        Column("key_version", Integer, primary_key=True, autoincrement=False),
        Column("state", _exact_string(16), nullable=False),
        Column("provider", String(32), nullable=False),
        Column("master_key_id", String(2048), nullable=False),
        Column("wrapped_key", LargeBinary, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        CheckConstraint(_one_of("purpose", PURPOSES), name=conv(f"ck_{name}_purpose")),
        CheckConstraint(_one_of("state", STATES), name=conv(f"ck_{name}_state")),
        CheckConstraint(
            f"key_version BETWEEN 1 AND {MAX_KEY_VERSION}", name=conv(f"ck_{name}_key_version")
        ),
        schema=schema,
    )


def _exact_string(length: int) -> TypeEngine[str]:
    # MySQL's and MariaDB's default collations ignore case: ``People`` would share the key
    # of ``people`` and ``ENABLED`` would pass for ``enabled``. The binary collation does not.
    return String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
    )


def _one_of(column: str, values: tuple[str, ...]) -> str:
    # ``length`` too: MySQL and MariaDB ignore trailing spaces in ``=``, even in a binary
    # collation, so ``'enabled '`` would pass for ``'enabled'``
    return " OR ".join(
        f"({column} = '{value}' AND length({column}) = {len(value)})" for value in values
    )


def table_scope(table: Table) -> str:
    """The key scope of a table: its name, schema-qualified when it has a schema.

    A table's name may not contain a dot (:class:`~sqlalchemy_kms.errors.ConfigurationError`):
    ``Table("clinic.patients")`` would take the scope, and so the keys and the
    associated data, of ``Table("patients", schema="clinic")``.
    """
    return scope_for(table.name, table.schema)


def scope_for(name: str, schema: str | None = None) -> str:
    """The key scope of the table ``name`` in ``schema`` (see :func:`table_scope`).

    >>> scope_for("patients", "clinic")
    'clinic.patients'
    """
    if "." in name:
        raise ConfigurationError(
            "an encrypted table's name cannot contain a dot, which separates the schema in "
            "its key scope; name the schema with schema=",
            table=name,
        )
    return f"{schema}.{name}" if schema else name


def scope_of(table: Table | str) -> str:
    """The key scope of a table or of a scope given as a string."""
    return table_scope(table) if isinstance(table, Table) else table


def _checked_row(row: Any) -> KeyRow:
    """A key-table row as a :class:`KeyRow`; a purpose the CHECK constraints would refuse
    (only a key table made before them holds one) is a clear error, not a crash. A
    state other than ``enabled``/``retired`` is kept as read: such a row is never an
    enabled key, and retire and destroy refuse it."""
    if row.purpose not in PURPOSES:
        raise KeyLifecycleError(
            f"the key table's row is invalid (purpose {row.purpose!r}): a key's purpose is "
            "'data' or 'search'; correct or delete the row",
            table=row.scope,
            key_version=row.key_version,
        )
    return KeyRow(
        KeySeries.of(row.scope, row.purpose),
        row.key_version,
        row.state,
        row.provider,
        row.master_key_id,
        bytes(row.wrapped_key),
        row.created_at,
    )


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
        except exc.IntegrityError:
            raise  # the table is there: a duplicate key (a lost race) or a constraint
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

    def _key_rows(
        self, conn: Connection, query: Any, series: KeySeries | None = None
    ) -> list[KeyRow]:
        rows = self._execute(conn, query)
        if series is not None:
            # compared again here: a key table made before its binary collation (MySQL,
            # MariaDB) answers another table's ``People`` rows, or ``DATA`` rows, too
            rows = [r for r in rows if (r.scope, r.purpose) == (series.scope, series.purpose)]
        return [_checked_row(row) for row in rows]

    def enabled(self, conn: Connection, series: KeySeries) -> list[KeyRow]:
        """The enabled versions of ``series``, newest (the active one) first."""
        keys = self.table.c
        query = (
            select(self.table)
            .where(self._series(series), keys.state == ENABLED)
            .order_by(keys.key_version.desc())
        )
        # and ``ENABLED`` rows, in a key table made before its binary collation
        return [row for row in self._key_rows(conn, query, series) if row.state == ENABLED]

    def versions(self, conn: Connection, series: KeySeries) -> list[KeyRow]:
        """Every version of ``series`` (enabled or retired), oldest first."""
        query = select(self.table).where(self._series(series)).order_by(self.table.c.key_version)
        return self._key_rows(conn, query, series)

    def version(self, conn: Connection, series: KeySeries, version: int) -> KeyRow | None:
        """One version of ``series``, or ``None`` if the key table has no such row."""
        query = select(self.table).where(
            self._series(series), self.table.c.key_version == version
        )
        rows = self._key_rows(conn, query, series)
        return rows[0] if rows else None

    def lock_version(self, conn: Connection, series: KeySeries, version: int) -> KeyRow | None:
        """One version of ``series``, its row locked until ``conn``'s transaction ends
        (``SELECT ... FOR UPDATE``; SQLite's write transaction locks the whole file)."""
        query = (
            select(self.table)
            .where(self._series(series), self.table.c.key_version == version)
            .with_for_update()
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

