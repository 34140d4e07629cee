"""What the key table and the stored headers say: keys per table, rows per key version.

The database counts the rows from the stored headers (``substr`` of the first
six bytes, grouped), so a report over millions of rows reads no value and
needs no key.

Example::

    for table in vault.status(Base.metadata):
        for column in table.columns:
            print(table.table, column.column, column.rows_by_version)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    LargeBinary,
    MetaData,
    Table,
    bindparam,
    func,
    inspect,
    select,
    type_coerce,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import NoSuchTableError
from sqlalchemy.types import NullType, _Binary

from .._connections import Connections
from .._format import ALG_DETERMINISTIC, ALG_RANDOMIZED, FORMAT_VERSION, HEADER_SIZE, pack_header
from .._keytable import ENABLED, KeySeries, KeyTable, table_scope
from ..types import encrypted_columns
from .rewrite import stored_bytes

__all__ = ["ColumnStatus", "KeyStatus", "TableStatus", "rows_using", "status"]


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
    #: Values of the other mode (randomized values in a deterministic column, written
    #: before it became deterministic, or the reverse): ``reencrypt`` converts them.
    other_mode_rows: int = 0

    @property
    def total(self) -> int:
        """Every row of the table, counted once."""
        return (
            sum(self.rows_by_version.values())
            + self.null_rows
            + self.other_rows
            + self.other_mode_rows
        )

    @property
    def other_mode(self) -> str | None:
        """What the other-mode values are and what to do, when there are any."""
        return other_mode_advice(self.deterministic, self.other_mode_rows)


def other_mode_advice(deterministic: bool, count: int) -> str | None:
    """The report line for ``count`` values of the other mode in a column.

    >>> other_mode_advice(True, 3)
    '3 randomized in a deterministic column: run reencrypt'
    """
    if not count:
        return None
    found, column = (
        ("randomized", "deterministic")
        if deterministic
        else (
            "deterministic",
            "randomized",
        )
    )
    return f"{count} {found} in a {column} column: run reencrypt"


@dataclass
class TableStatus:
    """Keys and rows of one table."""

    table: str
    keys: list[KeyStatus]
    columns: list[ColumnStatus]


def _header(column: Column[Any]) -> Any:
    return func.substr(type_coerce(column, NullType()), 1, HEADER_SIZE)


def header_counts(conn: Connection, table: Table, column: Column[Any]) -> dict[Any, int]:
    """Rows of ``table`` per distinct stored header of ``column`` (``None``: NULL)."""
    header = _header(column)
    query = select(header, func.count()).select_from(table).group_by(header)
    return {value: count for value, count in conn.execute(query)}


def column_status(conn: Connection, table: Table, column: Column[Any]) -> ColumnStatus:
    """Rows per key version of one column, counted by the database from the headers."""
    deterministic = bool(column.type.deterministic)  # type: ignore[attr-defined]
    algorithm = ALG_DETERMINISTIC if deterministic else ALG_RANDOMIZED
    by_version: dict[int, int] = {}
    nulls = others = other_mode = 0
    for header, count in header_counts(conn, table, column).items():
        if header is None:
            nulls += count
            continue
        raw = stored_bytes(header)
        if raw is None or len(raw) < HEADER_SIZE or raw[0] != FORMAT_VERSION:
            others += count  # plaintext, or another format
            continue
        if raw[1] in (ALG_RANDOMIZED, ALG_DETERMINISTIC) and raw[1] != algorithm:
            other_mode += count  # the column's mode changed since these were written
            continue
        if raw[1] != algorithm:
            others += count
            continue
        version = int.from_bytes(raw[2:HEADER_SIZE], "big")
        by_version[version] = by_version.get(version, 0) + count
    return ColumnStatus(column.name, deterministic, by_version, nulls, others, other_mode)


def status(keys: KeyTable, connections: Connections, tables: Sequence[Table]) -> list[TableStatus]:
    """Keys and rows per key version for every table with encrypted columns."""
    report = []
    for table in tables:
        columns = encrypted_columns(table)
        if not columns:
            continue
        scope = table_scope(table)
        with connections.reading() as conn:
            rows = keys.rows(conn, scope)
            spread = [column_status(conn, table, column) for column in columns]
        newest: dict[str, int] = {}
        for row in rows:
            if row.state == ENABLED:
                purpose = row.series.purpose
                newest[purpose] = max(newest.get(purpose, 0), row.version)
        report.append(
            TableStatus(
                scope,
                [
                    KeyStatus(
                        row.series.purpose,
                        row.version,
                        row.state,
                        row.provider,
                        row.master_key_id,
                        row.created_at,
                        newest.get(row.series.purpose) == row.version,
                    )
                    for row in rows
                ],
                spread,
            )
        )
    return report


def rows_using_any_binary(conn: Connection, scope: str, series: KeySeries, version: int) -> int:
    """How many values of table ``scope`` (``schema.table``) start with the header of
    key ``version``, in any binary column the database reports: for a table known
    only by name."""
    schema, _, name = scope.rpartition(".")
    reflected = Table(name, MetaData(), schema=schema or None)
    try:
        inspect(conn).reflect_table(reflected, None)
    except NoSuchTableError:
        return 0
    algorithm = ALG_DETERMINISTIC if series.deterministic else ALG_RANDOMIZED
    header = pack_header(algorithm, version)
    count = 0
    for column in reflected.columns:
        if not isinstance(column.type, _Binary):
            continue
        query = (
            select(func.count())
            .select_from(reflected)
            .where(_header(column) == bindparam("header", header, type_=LargeBinary()))
        )
        count += int(conn.execute(query).scalar_one())
    return count


def rows_using(conn: Connection, table: Table, series: KeySeries, version: int) -> int:
    """How many stored values of ``table`` are under key ``version`` of ``series``."""
    algorithm = ALG_DETERMINISTIC if series.deterministic else ALG_RANDOMIZED
    header = pack_header(algorithm, version)
    count = 0
    for column in encrypted_columns(table):
        if column.type.deterministic != series.deterministic:  # type: ignore[attr-defined]
            continue
        query = (
            select(func.count())
            .select_from(table)
            .where(_header(column) == bindparam("header", header, type_=LargeBinary()))
        )
        count += int(conn.execute(query).scalar_one())
    return count
