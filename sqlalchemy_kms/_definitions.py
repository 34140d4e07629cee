"""The definitions an encrypted column cannot honour, refused when its table is defined and
again before the table is created."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import (
    Column,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Table,
    UniqueConstraint,
    event,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.visitors import iterate

from ._keytable import table_scope
from ._query import PRIMARY_KEY_REASON, RELATIONSHIP_HINT, is_encrypted_type
from .errors import ConfigurationError, UnsupportedQueryError

__all__ = ["refuse_unworkable", "refuse_unworkable_column"]

# Checked when an encrypted column joins its table, when the table is complete (its
# constraints and indexes attached), when an index or unique constraint is added
# later, and again before the table is created (create_all, Alembic's create_table):
# each raises before anything runs.

_RANDOMIZED_INDEX = (
    "a randomized encrypted column cannot have a unique constraint or an index: it stores "
    "equal values differently, so the constraint accepts duplicates and no lookup can use the "
    "index; use KMSEncrypted(..., deterministic=True) for a column that must be unique or "
    "searched, or drop the constraint or index"
)
_EXPRESSION_INDEX = (
    "an index cannot be built on an expression of an encrypted column: the expression would "
    "be computed over the stored ciphertext; index the column itself (deterministic columns "
    "only)"
)
_SERVER_VALUE = (
    "an encrypted column cannot take a value the database computes (server_default, "
    "server_onupdate, Computed, Identity, a Sequence or a SQL expression such as func.now() "
    "as default or onupdate): the database would store it as plaintext; use a Python "
    "default= (a value or a function) instead"
)
_PRIMARY_KEY = f"an encrypted column cannot be a primary key: {PRIMARY_KEY_REASON}"


def _refusal(column: Column[Any], table: Table, reason: str) -> ConfigurationError:
    return ConfigurationError(reason, table=table_scope(table), column=column.name)


def _is_server_value(default: Any) -> bool:
    """Whether a column default is computed by the database (a SQL expression, a
    sequence, a server-side default) rather than given by Python."""
    if default is None:
        return False
    return bool(
        getattr(default, "is_clause_element", False)
        or getattr(default, "is_sequence", False)
        or getattr(default, "is_server_default", False)
    )


def _check_column(column: Column[Any], table: Table) -> None:
    column_type: Any = column.type
    if not is_encrypted_type(column_type):
        return
    if column.primary_key:
        raise _refusal(column, table, _PRIMARY_KEY)
    if column.foreign_keys:
        raise _foreign_key_refusal(column)
    if not column_type.deterministic and (column.unique or column.index):
        raise _refusal(column, table, _RANDOMIZED_INDEX)
    server_values = (column.server_default, column.server_onupdate, column.default)
    if any(map(_is_server_value, (*server_values, column.onupdate))):
        raise _refusal(column, table, _SERVER_VALUE)
    if column.computed is not None or column.identity is not None:
        raise _refusal(column, table, _SERVER_VALUE)


def _check_index(index: Index | UniqueConstraint, table: Any) -> None:
    """An index or unique constraint attached to ``table``: no randomized column, and
    no expression over an encrypted column."""
    if not isinstance(table, Table):
        return
    for column in index.columns:
        column_type: Any = column.type
        if is_encrypted_type(column_type) and not column_type.deterministic:
            raise _refusal(column, table, _RANDOMIZED_INDEX)
    for expression in getattr(index, "expressions", ()):
        if isinstance(expression, Column) or not isinstance(expression, ClauseElement):
            continue
        for element in iterate(expression):
            if isinstance(element, Column) and is_encrypted_type(element.type):
                raise _refusal(element, table, _EXPRESSION_INDEX)


def _foreign_keys_over_encrypted(table: Table) -> Iterable[tuple[ForeignKey, Column[Any]]]:
    """Each foreign key from or to an encrypted column of ``table`` (the ones from other
    tables of its metadata included), with that encrypted column."""
    others = table.metadata.tables.values() if table.metadata is not None else ()
    for source in (table, *(other for other in others if other is not table)):
        for key in source.foreign_keys:
            if is_encrypted_type(key.parent.type):
                yield key, key.parent
                continue
            try:
                target = key.column
            except sa_exc.NoReferenceError:  # not defined yet: checked again at create
                continue
            if is_encrypted_type(target.type) and (source is table or target.table is table):
                yield key, target


def refuse_unworkable(table: Table) -> None:
    """Raise if ``table`` defines something its encrypted columns cannot honour: an
    encrypted primary key, foreign key, server-side or SQL default, or a unique
    constraint or index on a randomized column."""
    for column in table.columns:
        _check_column(column, table)
    for constraint in table.constraints:
        if isinstance(constraint, UniqueConstraint):
            _check_index(constraint, table)
    for index in table.indexes:
        _check_index(index, table)
    for _key, column in _foreign_keys_over_encrypted(table):
        raise _foreign_key_refusal(column)


def _foreign_key_refusal(column: Column[Any]) -> UnsupportedQueryError:
    return UnsupportedQueryError(
        RELATIONSHIP_HINT,
        operator="foreign key",
        table=table_scope(column.table) if isinstance(column.table, Table) else None,
        column=column.name,
    )


def _check_foreign_key(constraint: ForeignKeyConstraint, table: Any) -> None:
    """A foreign key attached to ``table``: neither its columns nor (when already
    defined) the columns it references may be encrypted."""
    for key in constraint.elements:
        if is_encrypted_type(key.parent.type):
            raise _foreign_key_refusal(key.parent)
        try:
            target = key.column
        except sa_exc.NoReferenceError:  # not defined yet: checked when it is, and at create
            continue
        if is_encrypted_type(target.type):
            raise _foreign_key_refusal(target)


def refuse_unworkable_column(column: Column[Any], table: Any) -> None:
    """``after_parent_attach`` of an encrypted column: check it now, its table once
    complete and before it is created."""
    if not isinstance(table, Table) or not is_encrypted_type(column.type):
        return
    _check_column(column, table)
    if not event.contains(table, "after_parent_attach", _refuse_unworkable_table):
        event.listen(table, "after_parent_attach", _refuse_unworkable_table)
        event.listen(table, "before_create", _refuse_unworkable_table)


def _refuse_unworkable_table(table: Table, *args: Any, **kw: Any) -> None:
    """``after_parent_attach`` (the table is complete) and ``before_create``."""
    refuse_unworkable(table)


event.listen(Index, "after_parent_attach", _check_index)
event.listen(UniqueConstraint, "after_parent_attach", _check_index)
event.listen(ForeignKeyConstraint, "after_parent_attach", _check_foreign_key)
