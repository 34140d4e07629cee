"""Rewriting a table's rows online: a keyset walk in batches and compare-and-set updates.

:func:`rewrite_rows` walks a table by primary key (keyset pagination, never
``OFFSET``), ``batch_size`` rows at a time, each batch in its own short
transaction, and updates a row only if it still holds the bytes that were
read (compare-and-set), so an application writing the same rows at the same
time never loses its write. Rows already in the target form are skipped, so a
job killed at any moment and run again finishes the work, and a finished job
run again changes nothing. Memory holds one batch at a time.

:func:`walk_rows` is the walk alone, for jobs that only read (``verify``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Column, LargeBinary, Table, and_, bindparam, func, select, tuple_, update
from sqlalchemy import type_coerce as _type_coerce
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.types import NullType

from .._keytable import table_scope
from ..errors import KeyLifecycleError
from ..types import KMSEncrypted

__all__ = ["Progress", "ProgressCallback", "Transform", "raw", "rewrite_rows", "walk_rows"]


@dataclass
class Progress:
    """How far a row-rewriting job has come; passed to the ``progress`` callback.

    >>> str(Progress(table="patients", total=10, scanned=10, rewritten=4)).split(", ")[:2]
    ['patients: 10/10 rows scanned', '4 rewritten']
    """

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
#: (column, stored value) -> new stored value, or None to leave the cell alone
Transform = Callable[[Column[Any], Any], Any]


def raw(column: Column[Any]) -> Any:
    """The column as the driver returns it: no decryption, no conversion."""
    return _type_coerce(column, NullType()).label(column.name)


@contextmanager
def batch_connection(engine: Engine, connection: Connection | None) -> Iterator[Connection]:
    """``connection`` itself (a migration's), or a transaction of its own per batch."""
    if connection is not None:
        yield connection
    else:
        with engine.begin() as conn:
            yield conn


def _primary_key(table: Table) -> list[Column[Any]]:
    primary_key = list(table.primary_key.columns)
    if not primary_key:
        raise KeyLifecycleError(
            "a table needs a primary key to be rewritten online", table=table_scope(table)
        )
    if any(isinstance(column.type, KMSEncrypted) for column in primary_key):
        raise KeyLifecycleError(
            "an encrypted primary key cannot be rewritten online", table=table_scope(table)
        )
    return primary_key


def count_rows(engine: Engine, table: Table, connection: Connection | None = None) -> int:
    """How many rows ``table`` has."""
    with batch_connection(engine, connection) as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def walk_rows(
    engine: Engine,
    table: Table,
    columns: Sequence[Column[Any]],
    *,
    batch_size: int = 1000,
    connection: Connection | None = None,
) -> Iterator[tuple[Connection, Sequence[Row[Any]]]]:
    """Yield ``(connection, rows)`` per batch: the primary key, then ``columns`` as
    stored, in primary-key order; each batch in its own transaction unless
    ``connection`` is given."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    primary_key = _primary_key(table)
    last: tuple[Any, ...] | None = None
    while True:
        with batch_connection(engine, connection) as conn:
            rows = conn.execute(batch_query(primary_key, columns, last, batch_size)).all()
            if not rows:
                return
            yield conn, rows
        last = tuple(rows[-1][: len(primary_key)])


def batch_query(
    primary_key: Sequence[Column[Any]],
    columns: Sequence[Column[Any]],
    last: tuple[Any, ...] | None,
    batch_size: int,
) -> Any:
    """The keyset query of the batch after primary key ``last`` (the first when ``None``)."""
    query = select(*primary_key, *(raw(c) for c in columns))
    if last is not None:
        pk_key = tuple_(*primary_key) if len(primary_key) > 1 else primary_key[0]
        query = query.where(pk_key > (tuple_(*last) if len(last) > 1 else last[0]))
    return query.order_by(*primary_key).limit(batch_size)


def rewrite_rows(
    engine: Engine,
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
    primary_key = _primary_key(table)
    state = Progress(table=table_scope(table), total=count_rows(engine, table, connection))
    statements: dict[tuple[str, ...], Any] = {}
    # bind names, made once: pk_0.. for the key, old_/new_<column> per cell
    pk_names = [f"pk_{i}" for i in range(len(primary_key))]
    cells = [
        (len(primary_key) + offset, column, f"old_{column.name}", f"new_{column.name}")
        for offset, column in enumerate(columns)
    ]
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    last: tuple[Any, ...] | None = None
    while True:
        with batch_connection(engine, connection) as conn:
            rows = conn.execute(batch_query(primary_key, columns, last, batch_size)).all()
            if not rows:
                break
            _rewrite_batch(
                conn,
                rows,
                cells,
                pk_names,
                statements,
                state,
                table,
                primary_key,
                new_value_type,
                transform,
            )
            last = tuple(rows[-1][: len(primary_key)])
        state.scanned += len(rows)
        if progress is not None:
            progress(state)
    if progress is not None and state.scanned == 0:
        progress(state)
    return state


def _rewrite_batch(
    conn: Connection,
    rows: Sequence[Row[Any]],
    cells: list[tuple[int, Column[Any], str, str]],
    pk_names: list[str],
    statements: dict[tuple[str, ...], Any],
    state: Progress,
    table: Table,
    primary_key: list[Column[Any]],
    new_value_type: Callable[[Column[Any]], Any] | None,
    transform: Transform,
) -> None:
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
            _type_coerce(column, NullType()) == bindparam(f"old_{name}", type_=NullType())
        )
        value_type = new_value_type(column) if new_value_type else LargeBinary()
        values[name] = bindparam(f"new_{name}", type_=value_type)
    return update(table).where(and_(*conditions)).values(values)
