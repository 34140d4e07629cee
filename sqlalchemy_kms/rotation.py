"""The key lifecycle: re-encrypt, encrypt or decrypt columns in place, report,
retire, destroy, rewrap, export and import.

Everything here is reached through :class:`~sqlalchemy_kms.KeyVault` methods
(``vault.reencrypt(...)``, ``vault.status(...)``, ...); this module holds the
work itself.

Online row rewriting
--------------------
:func:`reencrypt`, :func:`encrypt_column` and :func:`decrypt_column` share one
job: they walk a table by primary key (keyset pagination, never ``OFFSET``),
``batch_size`` rows at a time, each batch in its own short transaction, and
update a row only if it still holds the bytes that were read
(compare-and-set), so an application writing the same rows at the same time
never loses its write. Rows that are already in the target form are skipped,
so a job killed at any moment and run again finishes the work, and a finished
job run again changes nothing. Memory holds one batch at a time.

Example::

    vault.rotate_key(patients)                  # new writes use key 2 at once
    vault.reencrypt(patients, progress=print)   # move old rows to key 2
    vault.retire_key(patients, 1)               # refused while a row uses key 1
    vault.destroy_key(patients, 1, confirm=True)
"""

from __future__ import annotations

import base64
import datetime as dt
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    LargeBinary,
    MetaData,
    Table,
    and_,
    bindparam,
    func,
    select,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import NullType, _Binary

from ._format import ALG_DETERMINISTIC, ALG_RANDOMIZED, HEADER_SIZE, pack_header, parse_header
from .audit import kms_call
from .errors import InvalidCiphertextError, KeyLifecycleError
from .providers.base import KeyProvider, encryption_context
from .types import KMSEncrypted
from .vault import DATA, SEARCH, table_scope

if TYPE_CHECKING:
    from .vault import KeyVault

__all__ = [
    "ColumnStatus",
    "KeyStatus",
    "Progress",
    "TableStatus",
]

EXPORT_FORMAT = "sqlalchemy-kms-keys"
EXPORT_VERSION = 1


@dataclass
class Progress:
    """How far a row-rewriting job has come; passed to the ``progress`` callback."""

    table: str
    total: int
    scanned: int = 0
    rewritten: int = 0
    conflicts: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        """Seconds since the job started."""
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Rows scanned per second."""
        elapsed = self.elapsed
        return self.scanned / elapsed if elapsed > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"{self.table}: {self.scanned}/{self.total} rows scanned, {self.rewritten} rewritten, "
            f"{self.conflicts} changed meanwhile, {self.rate:.0f} rows/s"
        )


ProgressCallback = Callable[[Progress], object]
# (column, stored value) -> new stored value, or None to leave the cell alone
Transform = Callable[[Column[Any], Any], Any]


def encrypted_columns(table: Table) -> list[Column[Any]]:
    """The columns of ``table`` whose type is :class:`KMSEncrypted`."""
    return [column for column in table.columns if isinstance(column.type, KMSEncrypted)]


def _raw(column: Column[Any]) -> Any:
    """The column as the driver returns it: no decryption, no conversion."""
    return type_coerce(column, NullType()).label(column.name)


@contextmanager
def _batch_connection(vault: KeyVault, connection: Connection | None) -> Iterator[Connection]:
    if connection is not None:
        yield connection
    else:
        with vault.engine.begin() as conn:
            yield conn


def rewrite_rows(
    vault: KeyVault,
    table: Table,
    columns: Sequence[Column[Any]],
    transform: Transform,
    *,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    connection: Connection | None = None,
    new_value_type: Callable[[Column[Any]], Any] | None = None,
) -> Progress:
    """Walk ``table`` by primary key and rewrite ``columns`` through ``transform``."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    primary_key = list(table.primary_key.columns)
    if not primary_key:
        raise KeyLifecycleError(
            "a table needs a primary key to be rewritten online", table=table_scope(table)
        )
    if any(isinstance(column.type, KMSEncrypted) for column in primary_key):
        raise KeyLifecycleError(
            "an encrypted primary key cannot be rewritten online", table=table_scope(table)
        )
    with _batch_connection(vault, connection) as conn:
        total = int(conn.execute(select(func.count()).select_from(table)).scalar_one())
    state = Progress(table=table_scope(table), total=total)
    last: tuple[Any, ...] | None = None
    statements: dict[tuple[str, ...], Any] = {}
    # bind names, made once: pk_0.. for the key, old_/new_<column> per cell
    pk_names = [f"pk_{i}" for i in range(len(primary_key))]
    cells = [
        (len(primary_key) + offset, column, f"old_{column.name}", f"new_{column.name}")
        for offset, column in enumerate(columns)
    ]
    pk_key = tuple_(*primary_key) if len(primary_key) > 1 else primary_key[0]
    while True:
        query = select(*primary_key, *(_raw(c) for c in columns))
        if last is not None:
            query = query.where(pk_key > (tuple_(*last) if len(last) > 1 else last[0]))
        query = query.order_by(*primary_key).limit(batch_size)
        with _batch_connection(vault, connection) as conn:
            rows = conn.execute(query).all()
            if not rows:
                break
            groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for row in rows:
                params: dict[str, Any] = dict(zip(pk_names, row, strict=False))
                changed = []
                for position, column, old_name, new_name in cells:
                    stored = row[position]
                    new = transform(column, stored)
                    if new is not None:
                        changed.append(column.name)
                        params[old_name] = stored
                        params[new_name] = new
                if changed:
                    groups.setdefault(tuple(changed), []).append(params)
            for names, batch in groups.items():
                statement = statements.get(names)
                if statement is None:
                    statement = statements[names] = _compare_and_set(
                        table, primary_key, names, new_value_type
                    )
                result = conn.execute(statement, batch)
                done = result.rowcount if result.rowcount >= 0 else len(batch)
                state.rewritten += done
                state.conflicts += len(batch) - done
            last = tuple(rows[-1][: len(primary_key)])
        state.scanned += len(rows)
        if progress is not None:
            progress(state)
    if progress is not None and state.scanned == 0:
        progress(state)
    return state


def _compare_and_set(
    table: Table,
    primary_key: list[Column[Any]],
    names: tuple[str, ...],
    new_value_type: Callable[[Column[Any]], Any] | None,
) -> Any:
    conditions = [column == bindparam(f"pk_{i}") for i, column in enumerate(primary_key)]
    values = {}
    for name in names:
        column = table.c[name]
        conditions.append(
            type_coerce(column, NullType()) == bindparam(f"old_{name}", type_=NullType())
        )
        value_type = new_value_type(column) if new_value_type else LargeBinary()
        values[name] = bindparam(f"new_{name}", type_=value_type)
    return update(table).where(and_(*conditions)).values(values)


# -- re-encryption ---------------------------------------------------------------


def _as_bytes(stored: Any) -> bytes | None:
    if isinstance(stored, bytes):
        return stored
    if isinstance(stored, (bytearray, memoryview)):
        return bytes(stored)
    return None


def _encrypting_transform(vault: KeyVault, table: Table, *, legacy: bool) -> Transform:
    """Re-encrypt every value not under the table's active key (and, with
    ``legacy``, encrypt plaintext values)."""
    scope = table_scope(table)
    targets = {
        DATA: pack_header(ALG_RANDOMIZED, vault.active_key_version(scope)),
        SEARCH: None,
    }

    def target_header(column_type: KMSEncrypted) -> bytes:
        if not column_type.deterministic:
            return targets[DATA]  # type: ignore[return-value]
        if targets[SEARCH] is None:
            version = vault.active_key_version(scope, search=True)
            targets[SEARCH] = pack_header(ALG_DETERMINISTIC, version)
        return targets[SEARCH]  # type: ignore[return-value]

    dialect = vault.engine.dialect
    # the column types' own processors: their fast paths, and their errors
    processors: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {}

    def transform(column: Column[Any], stored: Any) -> Any:
        if stored is None:
            return None
        column_type: KMSEncrypted = column.type  # type: ignore[assignment]
        raw = _as_bytes(stored)
        if raw is not None and raw[:HEADER_SIZE] == target_header(column_type):
            return None  # already under the active key
        if column.name not in processors:
            processors[column.name] = (
                column_type.result_processor(dialect, None),
                column_type.bind_processor(dialect),
            )
        decrypt, encrypt = processors[column.name]
        if raw is not None and _parses(raw):
            value = decrypt(raw)
        elif legacy:
            value = column_type._codec.from_legacy(stored)
        else:
            raise InvalidCiphertextError(
                "stored value is plaintext; encrypt the column with encrypt_column()",
                table=scope,
                column=column.name,
            )
        return encrypt(value)

    return transform


def _parses(raw: bytes) -> bool:
    try:
        parse_header(raw)
    except InvalidCiphertextError:
        return False
    return True


def reencrypt(
    vault: KeyVault,
    table: Table,
    *,
    columns: Sequence[str] | None = None,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    connection: Connection | None = None,
) -> Progress:
    """Move every encrypted value of ``table`` to the active data key (randomized
    columns) or search key (deterministic columns)."""
    chosen = _chosen_columns(table, columns)
    vault._forget_ring((table_scope(table), DATA))
    vault._forget_ring((table_scope(table), SEARCH))
    with _using(vault, connection):
        transform = _encrypting_transform(vault, table, legacy=False)
        return rewrite_rows(
            vault,
            table,
            chosen,
            transform,
            batch_size=batch_size,
            progress=progress,
            connection=connection,
        )


def _chosen_columns(table: Table, names: Sequence[str] | None) -> list[Column[Any]]:
    columns = encrypted_columns(table)
    if names is not None:
        columns = [column for column in columns if column.name in set(names)]
        unknown = set(names) - {column.name for column in columns}
        if unknown:
            raise KeyLifecycleError(
                f"not encrypted columns of the table: {', '.join(sorted(unknown))}",
                table=table_scope(table),
            )
    return columns


@contextmanager
def _using(vault: KeyVault, connection: Connection | None) -> Iterator[None]:
    if connection is None:
        yield
    else:
        with vault.using(connection):
            yield


# -- encrypting and decrypting columns in place ----------------------------------------


def encrypt_column(
    vault: KeyVault,
    table: Table,
    column: str,
    *,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    connection: Connection | None = None,
) -> Progress:
    """Encrypt the plaintext values of ``table.c[column]`` in place.

    ``table`` describes the column as it will be: ``KMSEncrypted(...)``. The
    database column must already hold binary values or, on SQLite, any value
    (see :func:`plaintext_to_binary_ddl` for the DDL that converts a text
    column of PostgreSQL or MySQL). Run the application with
    ``KMSEncrypted(..., accept_plaintext=True)`` while this runs.
    """
    target = _chosen_columns(table, [column])
    with _using(vault, connection):
        transform = _encrypting_transform(vault, table, legacy=True)
        return rewrite_rows(
            vault,
            table,
            target,
            transform,
            batch_size=batch_size,
            progress=progress,
            connection=connection,
        )


def decrypt_column(
    vault: KeyVault,
    table: Table,
    column: str,
    *,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    connection: Connection | None = None,
) -> Progress:
    """Write the plaintext of ``table.c[column]`` back in place (the reverse step).

    On PostgreSQL and MySQL the binary column receives each value's text as
    UTF-8 bytes, ready for :func:`binary_to_plaintext_ddl`; on SQLite it
    receives the value as the plaintext type stores it. While this runs the
    application reads with ``accept_plaintext=True``.
    """
    [target] = _chosen_columns(table, [column])
    column_type: KMSEncrypted = target.type  # type: ignore[assignment]
    binding = column_type._binding
    assert binding is not None
    sqlite = vault.engine.dialect.name == "sqlite"

    def transform(col: Column[Any], stored: Any) -> Any:
        raw = _as_bytes(stored)
        if raw is None or not _parses(raw):
            return None  # NULL, or plaintext already
        value = column_type._codec.decode(
            vault.decrypt(binding.scope, binding.column, binding.aad, raw)
        )
        if sqlite:
            return value
        return column_type._codec.legacy_text(value)

    def value_type(col: Column[Any]) -> Any:
        return column_type.inner_type if sqlite else LargeBinary()

    with _using(vault, connection):
        return rewrite_rows(
            vault,
            table,
            [target],
            transform,
            batch_size=batch_size,
            progress=progress,
            connection=connection,
            new_value_type=value_type,
        )


def plaintext_to_binary_ddl(table: Table, column: str, dialect: Any) -> list[str]:
    """The DDL that turns a plaintext column into the binary column
    ``table.c[column]`` (a ``KMSEncrypted``) needs, keeping each value's text.

    PostgreSQL: ``ALTER COLUMN ... TYPE BYTEA USING convert_to(col::text, 'UTF8')``;
    MySQL/MariaDB: ``MODIFY ... VARBINARY(n)`` (or a BLOB type); SQLite: nothing,
    its columns hold any value.
    """
    return _retype_ddl(table, column, dialect, to_binary=True)


def binary_to_plaintext_ddl(table: Table, column: str, dialect: Any) -> list[str]:
    """The DDL that turns the binary column back into its inner (plaintext) type,
    after :func:`decrypt_column` wrote each value's text into it."""
    return _retype_ddl(table, column, dialect, to_binary=False)


def _retype_ddl(table: Table, name: str, dialect: Any, *, to_binary: bool) -> list[str]:
    column = table.c[name]
    column_type: KMSEncrypted = column.type  # type: ignore[assignment]
    preparer = dialect.identifier_preparer
    qualified = preparer.format_table(table)
    quoted = preparer.quote(column.name)
    binary = column_type.dialect_impl(dialect).compile(dialect=dialect)
    plain = column_type.inner_type.compile(dialect=dialect)
    null = "NULL" if column.nullable else "NOT NULL"
    if dialect.name == "postgresql" and isinstance(column_type.inner_type, _Binary):
        return []  # BYTEA either way: the bytes are the plaintext
    if dialect.name == "postgresql":
        if to_binary:
            using = f"convert_to({quoted}::text, 'UTF8')"
            return [f"ALTER TABLE {qualified} ALTER COLUMN {quoted} TYPE {binary} USING {using}"]
        using = f"CAST(convert_from({quoted}, 'UTF8') AS {plain})"
        return [f"ALTER TABLE {qualified} ALTER COLUMN {quoted} TYPE {plain} USING {using}"]
    if dialect.name in ("mysql", "mariadb"):
        return [f"ALTER TABLE {qualified} MODIFY {quoted} {binary if to_binary else plain} {null}"]
    if dialect.name == "sqlite":
        return []
    raise KeyLifecycleError(
        f"no in-place conversion DDL for {dialect.name}", table=table_scope(table), column=name
    )


# -- status ----------------------------------------------------------------------------


@dataclass
class KeyStatus:
    """One row of the key table."""

    purpose: str
    key_version: int
    state: str
    provider: str
    master_key_id: str
    created_at: dt.datetime | None
    active: bool


@dataclass
class ColumnStatus:
    """How the stored values of one encrypted column are spread over key versions."""

    column: str
    deterministic: bool
    rows_by_version: dict[int, int]
    null_rows: int
    other_rows: int  # plaintext or not our format

    @property
    def total(self) -> int:
        return sum(self.rows_by_version.values()) + self.null_rows + self.other_rows


@dataclass
class TableStatus:
    """Keys and rows of one table."""

    table: str
    keys: list[KeyStatus]
    columns: list[ColumnStatus]


def key_rows(vault: KeyVault, scope: str | None = None) -> list[Any]:
    """Rows of the key table (all, or one table's), ordered."""
    keys = vault.table
    query = select(keys).order_by(keys.c.scope, keys.c.purpose, keys.c.key_version)
    if scope is not None:
        query = query.where(keys.c.scope == scope)
    with vault._reading() as conn:
        try:
            return list(conn.execute(query))
        except DBAPIError as error:
            raise vault._missing_table(error) from error


def _header_counts(conn: Connection, table: Table, column: Column[Any]) -> dict[Any, int]:
    header = func.substr(type_coerce(column, NullType()), 1, HEADER_SIZE)
    query = select(header, func.count()).select_from(table).group_by(header)
    return {value: count for value, count in conn.execute(query)}


def column_status(conn: Connection, table: Table, column: Column[Any]) -> ColumnStatus:
    """Rows per key version of one column, counted by the database from the headers."""
    column_type: KMSEncrypted = column.type  # type: ignore[assignment]
    algorithm = ALG_DETERMINISTIC if column_type.deterministic else ALG_RANDOMIZED
    by_version: dict[int, int] = {}
    nulls = others = 0
    for header, count in _header_counts(conn, table, column).items():
        if header is None:
            nulls += count
            continue
        raw = _as_bytes(header)
        if raw is None or len(raw) < HEADER_SIZE or raw[0] != 1 or raw[1] not in (1, 2):
            others += count
            continue
        if raw[1] != algorithm:
            # values of the other algorithm (the column's mode changed): count apart
            others += count
            continue
        version = int.from_bytes(raw[2:6], "big")
        by_version[version] = by_version.get(version, 0) + count
    return ColumnStatus(column.name, column_type.deterministic, by_version, nulls, others)


def status(vault: KeyVault, tables: MetaData | Sequence[Table]) -> list[TableStatus]:
    """Keys and rows per key version for every table with encrypted columns."""
    if isinstance(tables, MetaData):
        tables = tables.sorted_tables
    report = []
    for table in tables:
        columns = encrypted_columns(table)
        if not columns:
            continue
        scope = table_scope(table)
        rows = key_rows(vault, scope)
        newest: dict[str, int] = {}
        for row in rows:
            if row.state == "enabled":
                newest[row.purpose] = max(newest.get(row.purpose, 0), row.key_version)
        keys = [
            KeyStatus(
                row.purpose,
                row.key_version,
                row.state,
                row.provider,
                row.master_key_id,
                row.created_at,
                newest.get(row.purpose) == row.key_version,
            )
            for row in rows
        ]
        with vault._reading() as conn:
            spread = [column_status(conn, table, column) for column in columns]
        report.append(TableStatus(scope, keys, spread))
    return report


# -- retire and destroy ----------------------------------------------------------------


def _ring_of(search: bool) -> str:
    return SEARCH if search else DATA


def rows_using(vault: KeyVault, table: Table, version: int, *, search: bool = False) -> int:
    """How many stored values of ``table`` are under key ``version``."""
    algorithm = ALG_DETERMINISTIC if search else ALG_RANDOMIZED
    header = pack_header(algorithm, version)
    count = 0
    with vault._reading() as conn:
        for column in encrypted_columns(table):
            if column.type.deterministic != search:  # type: ignore[attr-defined]
                continue
            prefix = func.substr(type_coerce(column, NullType()), 1, HEADER_SIZE)
            query = (
                select(func.count())
                .select_from(table)
                .where(prefix == bindparam("header", header, type_=LargeBinary()))
            )
            count += int(conn.execute(query).scalar_one())
    return count


def retire_key(vault: KeyVault, table: Table, version: int, *, search: bool = False) -> None:
    """Mark key ``version`` of ``table`` retired; refused while any row uses it
    or while it is the active key."""
    scope = table_scope(table)
    purpose = _ring_of(search)
    keys = vault.table
    versions = {row.key_version: row for row in key_rows(vault, scope) if row.purpose == purpose}
    row = versions.get(version)
    if row is None:
        raise KeyLifecycleError("no such key version", table=scope, key_version=version)
    if row.state == "retired":
        return
    enabled = [v for v, r in versions.items() if r.state == "enabled"]
    if version == max(enabled):
        raise KeyLifecycleError(
            "the active key cannot be retired; rotate first", table=scope, key_version=version
        )
    in_use = rows_using(vault, table, version, search=search)
    if in_use:
        raise KeyLifecycleError(
            f"{in_use} stored values still use this key; re-encrypt the table first",
            table=scope,
            key_version=version,
        )
    with vault._writing() as conn:
        conn.execute(
            update(keys)
            .where(keys.c.scope == scope, keys.c.purpose == purpose, keys.c.key_version == version)
            .values(state="retired")
        )
    vault._audit_change("retire", scope, purpose, version, row.master_key_id)
    vault._forget_ring((scope, purpose))


def destroy_key(
    vault: KeyVault,
    table: Table | str,
    version: int,
    *,
    search: bool = False,
    confirm: bool = False,
) -> None:
    """Delete retired key ``version`` of ``table`` for good (crypto-shredding).

    Every value still encrypted under it (in this database, its backups or
    exports) can never be decrypted again. Requires ``confirm=True``.
    """
    scope = table_scope(table) if isinstance(table, Table) else table
    purpose = _ring_of(search)
    if confirm is not True:
        raise KeyLifecycleError(
            "destroying a key makes every value under it unreadable for good; "
            "pass confirm=True to do it",
            table=scope,
            key_version=version,
        )
    keys = vault.table
    rows = [r for r in key_rows(vault, scope) if r.purpose == purpose and r.key_version == version]
    if not rows:
        raise KeyLifecycleError("no such key version", table=scope, key_version=version)
    if rows[0].state != "retired":
        raise KeyLifecycleError(
            "only a retired key can be destroyed; retire it first",
            table=scope,
            key_version=version,
        )
    with vault._writing() as conn:
        conn.execute(
            keys.delete().where(
                keys.c.scope == scope,
                keys.c.purpose == purpose,
                keys.c.key_version == version,
                keys.c.state == "retired",
            )
        )
    vault.cache.invalidate((scope, purpose, version))
    vault._audit_change("destroy", scope, purpose, version, rows[0].master_key_id)
    vault._forget_ring((scope, purpose))


# -- rewrap ------------------------------------------------------------------------------


def rewrap(vault: KeyVault, provider: KeyProvider, *, table: Table | str | None = None) -> int:
    """Wrap every data key (or one table's) under ``provider``'s master key.

    No row is touched. With AWS KMS on both sides the key is re-wrapped by
    KMS ``ReEncrypt`` and never leaves KMS in plaintext. Keys already wrapped
    under the target master key are skipped, so a rewrap can be run again.
    Afterwards the vault uses ``provider``. Returns the number of keys rewrapped.
    """
    scope = None if table is None else (table_scope(table) if isinstance(table, Table) else table)
    keys = vault.table
    target_id = provider.resolved_master_key_id()
    done = 0
    for row in key_rows(vault, scope):
        if row.provider == provider.name and row.master_key_id == target_id:
            continue
        context = encryption_context(row.scope, row.purpose, row.key_version)
        source = vault._provider_for(row.master_key_id)
        wrapped, master_key_id = kms_call(
            "ReEncrypt",
            context,
            row.master_key_id,
            partial(
                provider.rewrap_from,
                source,
                bytes(row.wrapped_key),
                context,
                row.master_key_id,
            ),
        )
        with vault._writing() as conn:
            conn.execute(
                update(keys)
                .where(
                    keys.c.scope == row.scope,
                    keys.c.purpose == row.purpose,
                    keys.c.key_version == row.key_version,
                    keys.c.wrapped_key == bytes(row.wrapped_key),
                )
                .values(wrapped_key=wrapped, master_key_id=master_key_id, provider=provider.name)
            )
        vault._audit_change("rewrap", row.scope, row.purpose, row.key_version, master_key_id)
        done += 1
    if provider is not vault.provider:
        # new keys are made under the new master key; keys of tables not rewrapped
        # (a partial rewrap) are still unwrapped by the provider that made them
        vault._other_providers = [
            p for p in (vault.provider, *vault._other_providers) if p is not provider
        ]
        vault.provider = provider
    return done


# -- export and import -------------------------------------------------------------------


def export_keys(vault: KeyVault) -> dict[str, Any]:
    """The key table as JSON-ready data: wrapped keys only, safe to keep as a backup."""
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "keys": [
            {
                "scope": row.scope,
                "purpose": row.purpose,
                "key_version": row.key_version,
                "state": row.state,
                "provider": row.provider,
                "master_key_id": row.master_key_id,
                "wrapped_key": base64.b64encode(bytes(row.wrapped_key)).decode("ascii"),
                "created_at": row.created_at.isoformat() if row.created_at else None,
            }
            for row in key_rows(vault)
        ],
    }


def _imported_row(item: Mapping[str, Any]) -> dict[str, Any]:
    created = item.get("created_at")
    purpose = str(item["purpose"])
    if purpose not in (DATA, SEARCH):
        raise ValueError("unknown purpose")
    return {
        "scope": str(item["scope"]),
        "purpose": purpose,
        "key_version": int(item["key_version"]),
        "state": str(item["state"]),
        "provider": str(item["provider"]),
        "master_key_id": str(item["master_key_id"]),
        "wrapped_key": base64.b64decode(item["wrapped_key"], validate=True),
        "created_at": dt.datetime.fromisoformat(created)
        if created
        else dt.datetime.now(dt.timezone.utc),
    }


def import_keys(vault: KeyVault, data: Mapping[str, Any]) -> int:
    """Restore keys from :func:`export_keys` data; refuses conflicting ids.

    A key whose (table, purpose, version) already exists with the same wrapped
    key is skipped; one with a different wrapped key is a conflict, and then
    nothing is imported. Returns the number of keys added.
    """
    if data.get("format") != EXPORT_FORMAT or data.get("version") != EXPORT_VERSION:
        raise KeyLifecycleError("not a sqlalchemy-kms key export (format version 1)")
    existing = {
        (row.scope, row.purpose, row.key_version): bytes(row.wrapped_key) for row in key_rows(vault)
    }
    try:
        incoming = [_imported_row(item) for item in data["keys"]]
    except (KeyError, TypeError, ValueError) as error:
        raise KeyLifecycleError(
            f"the key export is damaged ({type(error).__name__}); nothing imported"
        ) from None
    new_rows = []
    for row in incoming:
        ident = (row["scope"], row["purpose"], row["key_version"])
        if ident in existing:
            if existing[ident] != row["wrapped_key"]:
                raise KeyLifecycleError(
                    "the key table holds a different key with the same id; nothing imported",
                    table=ident[0],
                    key_version=ident[2],
                )
            continue
        new_rows.append(row)
    if new_rows:
        with vault._writing() as conn:
            conn.execute(vault.table.insert(), new_rows)
        for row in new_rows:
            vault._audit_change(
                "import", row["scope"], row["purpose"], row["key_version"], row["master_key_id"]
            )
        vault.clear_cache()
    return len(new_rows)
