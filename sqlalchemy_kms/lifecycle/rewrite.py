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
from sqlalchemy.engine import Connection, Dialect, Engine, Row
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
#: column -> (the stored values of one batch -> their new stored values, None for a
#: cell to leave alone); asked once per column and job
Transform = Callable[[Column[Any]], Callable[[Sequence[Any]], list[Any]]]


class _StoredBytes(LargeBinary):
    """A new stored value, handed to the driver as the column type made it."""

    def bind_processor(self, dialect: Dialect) -> None:
        return None


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
    batches = _Batches(primary_key, columns, batch_size)
    while True:
        with batch_connection(engine, connection) as conn:
            rows = batches.next(conn)
            if not rows:
                return
            yield conn, rows


def stored_bytes(stored: Any) -> bytes | None:
    """A stored value as ``bytes`` (drivers may give ``bytearray`` or ``memoryview``);
    ``None`` for anything that is not binary (NULL, or plaintext text)."""
    if isinstance(stored, bytes):
        return stored
    if isinstance(stored, (bytearray, memoryview)):
        return bytes(stored)
    return None


class _Batches:
    """The keyset walk: each call of :meth:`next` reads the batch after the last one.

    Its two statements are built once: the first batch, and the batch after the
    primary key bound as ``last_0``, ``last_1``, ...
    """

    def __init__(
        self, primary_key: Sequence[Column[Any]], columns: Sequence[Column[Any]], batch_size: int
    ) -> None:
        self.width = len(primary_key)
        self.names = [f"last_{i}" for i in range(self.width)]
        marks = [
            bindparam(name, type_=column.type)
            for name, column in zip(self.names, primary_key, strict=True)
        ]
        pk_key = tuple_(*primary_key) if self.width > 1 else primary_key[0]
        self.first = (
            select(*primary_key, *(raw(c) for c in columns))
            .order_by(*primary_key)
            .limit(batch_size)
        )
        self.after = self.first.where(pk_key > (tuple_(*marks) if self.width > 1 else marks[0]))
        self.last: dict[str, Any] | None = None

    def next(self, conn: Connection) -> Sequence[Row[Any]]:
        if self.last is None:
            rows = conn.execute(self.first).all()
        else:
            rows = conn.execute(self.after, self.last).all()
        if rows:
            self.last = dict(zip(self.names, rows[-1], strict=False))
        return rows


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
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    state = Progress(table=table_scope(table), total=count_rows(engine, table, connection))
    statements: dict[tuple[str, ...], _CompareAndSet] = {}
    # bind names, made once: pk_0.. for the key, old_N/new_N per cell
    pk_names = [f"pk_{i}" for i in range(len(primary_key))]
    cells: list[_Cell] = [
        (
            len(primary_key) + offset,
            column.name,
            f"old_{offset}",
            f"new_{offset}",
            transform(column),
        )
        for offset, column in enumerate(columns)
    ]
    batches = _Batches(primary_key, columns, batch_size)
    while True:
        with batch_connection(engine, connection) as conn:
            rows = batches.next(conn)
            if not rows:
                break
            _rewrite_batch(
                conn, rows, cells, pk_names, statements, state, table, primary_key, new_value_type
            )
        state.scanned += len(rows)
        if progress is not None:
            progress(state)
    if progress is not None and state.scanned == 0:
        progress(state)
    return state


#: (position in the row, column name, old value's bind name, new value's, its transform)
_Cell = tuple[int, str, str, str, Callable[[Sequence[Any]], list[Any]]]


def _rewrite_batch(
    conn: Connection,
    rows: Sequence[Row[Any]],
    cells: list[_Cell],
    pk_names: list[str],
    statements: dict[tuple[str, ...], _CompareAndSet],
    state: Progress,
    table: Table,
    primary_key: list[Column[Any]],
    new_value_type: Callable[[Column[Any]], Any] | None,
) -> None:
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    width = len(pk_names)
    moved = [transform([row[position] for row in rows]) for position, *_, transform in cells]
    if len(cells) == 1 and width == 1:  # the common case, without the general loop
        [(position, name, old_name, new_name, _)] = cells
        [pk_name] = pk_names
        changed = [
            {pk_name: row[0], old_name: row[position], new_name: new}
            for row, new in zip(rows, moved[0], strict=True)
            if new is not None
        ]
        if changed:
            groups[(name,)] = changed
    else:
        for index, row in enumerate(rows):
            params: dict[str, Any] | None = None
            names: tuple[str, ...] = ()
            for (position, name, old_name, new_name, _), news in zip(cells, moved, strict=True):
                new = news[index]
                if new is not None:
                    if params is None:
                        params = dict(zip(pk_names, row[:width], strict=True))
                    params[old_name] = row[position]
                    params[new_name] = new
                    names += (name,)
            if params is not None:
                group = groups.get(names)
                if group is None:
                    group = groups[names] = []
                group.append(params)
    for names, batch in groups.items():
        statement = statements.get(names)
        if statement is None:
            binds = [
                (table.c[name], old_name, new_name)
                for _, name, old_name, new_name, _ in cells
                if name in names
            ]
            statement = statements[names] = _CompareAndSet(
                conn.dialect, table, primary_key, binds, new_value_type
            )
        done = statement.run(conn, batch)
        state.rewritten += done
        state.conflicts += len(batch) - done


class _CompareAndSet:
    """``UPDATE ... SET column = :new WHERE <primary key> AND column = :old`` for a set
    of changed columns, built once per job.

    When the new values are stored values already (``new_value_type`` not
    given), every value it binds is in the driver's form: the primary key
    through its type's bind processor, the old value as read, the new value as
    the column type made it. The statement is then compiled once and each batch
    goes to the driver as one executemany, without SQLAlchemy's per-row
    parameter processing. Otherwise it runs as a Core executemany.
    """

    def __init__(
        self,
        dialect: Dialect,
        table: Table,
        primary_key: list[Column[Any]],
        binds: list[tuple[Column[Any], str, str]],
        new_value_type: Callable[[Column[Any]], Any] | None,
    ) -> None:
        conditions = [column == bindparam(f"pk_{i}") for i, column in enumerate(primary_key)]
        values = {}
        for column, old_name, new_name in binds:
            conditions.append(
                _type_coerce(column, NullType()) == bindparam(old_name, type_=NullType())
            )
            value_type = new_value_type(column) if new_value_type else _StoredBytes()
            values[column.name] = bindparam(new_name, type_=value_type)
        self.statement = update(table).where(and_(*conditions)).values(values)
        self.driver: tuple[str, Callable[[dict[str, Any]], Any] | None] | None = None
        self.pk_processors: list[tuple[str, Callable[[Any], Any]]] = []
        if new_value_type is None:
            compiled = self.statement.compile(dialect=dialect)
            order = list(compiled.positiontup or ()) if compiled.positional else []
            arrange = (lambda params: tuple(params[k] for k in order)) if order else None
            self.driver = (compiled.string, arrange)
            for i, column in enumerate(primary_key):
                process = column.type.dialect_impl(dialect).bind_processor(dialect)
                if process is not None:
                    self.pk_processors.append((f"pk_{i}", process))

    def run(self, conn: Connection, batch: list[dict[str, Any]]) -> int:
        """Run the update for ``batch``; the rows it changed."""
        if self.driver is None:
            result = conn.execute(self.statement, batch)
        else:
            sql, arrange = self.driver
            for name, process in self.pk_processors:
                for params in batch:
                    params[name] = process(params[name])
            rows = batch if arrange is None else [arrange(params) for params in batch]
            result = conn.exec_driver_sql(sql, rows)
        return result.rowcount if result.rowcount >= 0 else len(batch)
