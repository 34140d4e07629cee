"""The DDL that turns a plaintext column into the binary column an encrypted one needs, and back.

Used by ``op.encrypt_column``/``op.decrypt_column`` in migrations, around the
in-place conversion of :func:`~sqlalchemy_kms.lifecycle.columns.encrypt_column`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
from sqlalchemy.types import _Binary

from .._keytable import table_scope
from ..errors import KeyLifecycleError
from ..types import KMSEncrypted

__all__ = ["binary_to_plaintext_ddl", "plaintext_to_binary_ddl"]


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

