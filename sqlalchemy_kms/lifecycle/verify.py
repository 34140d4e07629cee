"""Verify: decrypt every stored value of the encrypted tables and report what fails.

Where :mod:`.status` counts rows per key version from the stored headers
without a key, ``verify`` proves that every value can be read: it walks each
table by primary key in batches (the keyset walk of :mod:`.rewrite`) and
decrypts every value of every encrypted column through the column type's own
result processing, exactly as the application would read it. The values are
checked and dropped, never kept or reported; a failure is reported by its
primary key, the error's class and the error's reason, which never holds
plaintext. Use it after a restore, an import, a rewrap, or before destroying
a key::

    report = vault.verify(Base.metadata)        # or verify(engine, [patients])
    if not report.ok:
        for table in report.tables:
            for column in table.columns:
                for failed in column.failed:
                    print(table.table, column.column, failed.primary_key, failed.error)
    print(f"{report.failures} of {report.values} values did not decrypt")

A key that cannot be had (an unknown version, a KMS that refuses) fails every
value under it; it is asked for once per table, not once per value. A table
without a usable primary key (none, or an encrypted one) is read in one
streamed query, and its failing rows are named by their position
(``{"row": 4}``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Column, Table, select

from .._format import ALG_DETERMINISTIC, ALG_RANDOMIZED, parse_header
from .._keytable import table_scope
from ..errors import (
    InvalidCiphertextError,
    KMSAccessDeniedError,
    KMSError,
    KMSUnavailableError,
    SQLAlchemyKMSError,
    UnknownKeyVersionError,
)
from ..types import KMSEncrypted, encrypted_columns
from .rewrite import raw, walk_rows
from .status import other_mode_advice

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = ["ColumnCheck", "FailedValue", "TableCheck", "VerifyReport", "verify"]

#: Primary key name of the rows of a table without a usable primary key (their position).
POSITION: Final = "row"


@dataclass(frozen=True)
class FailedValue:
    """One stored value that did not decrypt: where it is and why, never what it holds."""

    #: The row's primary key by column name (``{"row": n}`` for a table without one).
    primary_key: dict[str, Any]
    #: The class name of the error, e.g. ``"InvalidCiphertextError"``.
    error: str
    #: The library error's reason, on one line; ``None`` for other errors.
    reason: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {"primary_key": dict(self.primary_key), "error": self.error, "reason": self.reason}


@dataclass
class ColumnCheck:
    """What verifying one encrypted column found."""

    column: str
    deterministic: bool
    #: Values per key version, as their headers say (counted whether they decrypt or not).
    rows_by_version: dict[int, int] = field(default_factory=dict)
    null_rows: int = 0
    #: Values without a header of ours: plaintext (``accept_plaintext=True``) or damaged.
    other_rows: int = 0
    #: Values of the other mode: randomized values in a deterministic column (written
    #: before the column became deterministic; equality cannot find them), or the
    #: reverse. ``reencrypt`` converts them.
    other_mode_rows: int = 0
    #: Values that could not be checked: their key could not be had from the KMS
    #: (unreachable, access denied, key disabled). Not failures: see
    #: :attr:`VerifyReport.kms_problems`.
    unchecked: int = 0
    #: Values that did not decrypt (all are counted; ``failed`` lists the first few).
    failures: int = 0
    failed: list[FailedValue] = field(default_factory=list)

    @property
    def values(self) -> int:
        """Stored values checked (every row but the NULLs)."""
        return sum(self.rows_by_version.values()) + self.other_rows + self.other_mode_rows

    @property
    def other_mode(self) -> str | None:
        """What the other-mode values are and what to do, when there are any."""
        return other_mode_advice(self.deterministic, self.other_mode_rows)

    @property
    def ok(self) -> bool:
        """Whether every value decrypted."""
        return self.failures == 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data (key versions as strings, in order)."""
        return {
            "column": self.column,
            "deterministic": self.deterministic,
            "rows_by_version": {
                str(version): count for version, count in sorted(self.rows_by_version.items())
            },
            "null_rows": self.null_rows,
            "other_rows": self.other_rows,
            "other_mode_rows": self.other_mode_rows,
            "unchecked": self.unchecked,
            "failures": self.failures,
            "failed_rows": [failed.as_dict() for failed in self.failed],
        }


@dataclass
class TableCheck:
    """What verifying one table found: its rows and each encrypted column."""

    table: str
    rows: int = 0
    columns: list[ColumnCheck] = field(default_factory=list)
    #: One line per key the KMS did not give: the key, its master key and the error.
    kms_problems: list[str] = field(default_factory=list)

    @property
    def unchecked(self) -> int:
        """Values that could not be checked in all columns (their key was not had)."""
        return sum(column.unchecked for column in self.columns)

    @property
    def values(self) -> int:
        """Stored values checked in all columns."""
        return sum(column.values for column in self.columns)

    @property
    def failures(self) -> int:
        """Values that did not decrypt in all columns."""
        return sum(column.failures for column in self.columns)

    @property
    def ok(self) -> bool:
        """Whether every value of the table was checked and decrypted."""
        return self.failures == 0 and self.unchecked == 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "table": self.table,
            "rows": self.rows,
            "failures": self.failures,
            "unchecked": self.unchecked,
            "kms_problems": list(self.kms_problems),
            "columns": [column.as_dict() for column in self.columns],
        }


@dataclass
class VerifyReport:
    """The result of :func:`verify`: one :class:`TableCheck` per table verified."""

    tables: list[TableCheck] = field(default_factory=list)

    @property
    def values(self) -> int:
        """Stored values checked in all tables."""
        return sum(table.values for table in self.tables)

    @property
    def failures(self) -> int:
        """Values that did not decrypt in all tables."""
        return sum(table.failures for table in self.tables)

    @property
    def unchecked(self) -> int:
        """Values that could not be checked (their key was not had from the KMS)."""
        return sum(table.unchecked for table in self.tables)

    @property
    def kms_problems(self) -> list[str]:
        """One line per key the KMS did not give, in all tables."""
        return [problem for table in self.tables for problem in table.kms_problems]

    @property
    def ok(self) -> bool:
        """Whether every stored value was checked and decrypted."""
        return self.failures == 0 and self.unchecked == 0

    @property
    def failed_columns(self) -> list[str]:
        """``table.column`` of each column with a failure, in the order checked."""
        return [
            f"{table.table}.{column.column}"
            for table in self.tables
            for column in table.columns
            if column.failures
        ]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data (primary key values as the database returned them)."""
        return {
            "ok": self.ok,
            "failures": self.failures,
            "unchecked": self.unchecked,
            "kms_problems": self.kms_problems,
            "tables": [table.as_dict() for table in self.tables],
        }


def verify(
    engine: Engine, tables: Sequence[Table], *, batch_size: int = 1000, shown: int = 5
) -> VerifyReport:
    """Decrypt every stored value of ``tables``' encrypted columns; report what fails.

    Tables without encrypted columns are skipped. ``batch_size`` rows are read
    per query; ``shown`` failing values are listed per column (all are
    counted). The values are decrypted through the vault bound to ``engine``
    (:class:`~sqlalchemy_kms.KeyVault` binds itself to its engine).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if shown < 0:
        raise ValueError("shown must not be negative")
    return VerifyReport(
        [
            _verify_table(engine, table, batch_size, shown)
            for table in tables
            if encrypted_columns(table)
        ]
    )


def _has_usable_primary_key(table: Table) -> bool:
    primary_key = list(table.primary_key.columns)
    return bool(primary_key) and not any(isinstance(c.type, KMSEncrypted) for c in primary_key)


def _batches(
    engine: Engine, table: Table, columns: Sequence[Column[Any]], batch_size: int
) -> Iterator[tuple[list[str], list[tuple[tuple[Any, ...], tuple[Any, ...]]]]]:
    """The table's rows in batches: (primary key names, [(key values, stored values)])."""
    if _has_usable_primary_key(table):
        names = [column.name for column in table.primary_key.columns]
        width = len(names)
        for _conn, rows in walk_rows(engine, table, columns, batch_size=batch_size):
            yield names, [(tuple(row[:width]), tuple(row[width:])) for row in rows]
        return
    # no key to walk by: one streamed query, the rows named by their position
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, max_row_buffer=batch_size)
        position = 0
        for partition in result.execute(select(*(raw(c) for c in columns))).partitions(batch_size):
            batch = []
            for row in partition:
                position += 1
                batch.append(((position,), tuple(row)))
            yield [POSITION], batch


def _header(stored: Any) -> tuple[int, int] | None:
    """(algorithm, key version) of a stored value, ``None`` when it is not ours."""
    if not isinstance(stored, (bytes, bytearray, memoryview)):
        return None
    try:
        return parse_header(bytes(stored))
    except InvalidCiphertextError:
        return None


def _kms_problem(table: str, error: KMSError) -> str:
    """One line for a key the KMS did not give: which key, which master key, why."""
    what = (
        "access denied"
        if isinstance(error, KMSAccessDeniedError)
        else "cannot reach KMS"
        if isinstance(error, KMSUnavailableError)
        else "KMS refused"
    )
    version = f" key version {error.key_version}" if error.key_version is not None else ""
    master = f" (master key {error.master_key_id})" if error.master_key_id else ""
    return f"{what}: {table}{version}{master}: {type(error).__name__}: {_reason(error)}"


def _reason(error: BaseException) -> str | None:
    if not isinstance(error, SQLAlchemyKMSError):
        return None  # another error's message may quote the value: only its class is told
    return " ".join(str(error.reason).split())


def _verify_table(engine: Engine, table: Table, batch_size: int, shown: int) -> TableCheck:
    columns = encrypted_columns(table)
    types: list[KMSEncrypted] = [column.type for column in columns]  # type: ignore[misc]
    check = TableCheck(
        table_scope(table),
        columns=[
            ColumnCheck(c.name, bool(t.deterministic)) for c, t in zip(columns, types, strict=True)
        ],
    )
    dialect = engine.dialect
    # a key that cannot be had fails every value under it: remembered by its header,
    # so that the KMS is not asked again for each value
    broken_keys: dict[tuple[int, int], BaseException] = {}
    for names, batch in _batches(engine, table, columns, batch_size):
        check.rows += len(batch)
        for key_values, stored_values in batch:
            for column_type, found, stored in zip(types, check.columns, stored_values, strict=True):
                if stored is None:
                    found.null_rows += 1
                    continue
                header = _header(stored)
                if header is None:
                    found.other_rows += 1
                elif header[0] != (ALG_DETERMINISTIC if found.deterministic else ALG_RANDOMIZED):
                    found.other_mode_rows += 1
                else:
                    version = header[1]
                    found.rows_by_version[version] = found.rows_by_version.get(version, 0) + 1
                error: BaseException | None = broken_keys.get(header) if header else None
                if error is None:
                    try:
                        column_type.process_result_value(stored, dialect)
                    except Exception as failure:
                        error = failure
                        if header is not None and isinstance(
                            failure, (KMSError, UnknownKeyVersionError)
                        ):
                            broken_keys[header] = failure
                            if isinstance(failure, KMSError):
                                check.kms_problems.append(_kms_problem(check.table, failure))
                if error is None:
                    continue
                if isinstance(error, KMSError):
                    found.unchecked += 1  # the KMS said nothing of the value itself
                    continue
                found.failures += 1
                if len(found.failed) < shown:
                    found.failed.append(
                        FailedValue(
                            dict(zip(names, key_values, strict=True)),
                            type(error).__name__,
                            _reason(error),
                        )
                    )
    return check
