"""What the operations do: each ``op.<name>(...)`` carried out through the migration's vault.

Every function here is registered with Alembic's
``Operations.implementation_for(<operation class>)``. The key table's DDL
needs no vault; the operations that rewrite rows or keys find the
:class:`~sqlalchemy_kms.KeyVault` of the migration's engine and run its
public methods inside ``vault.using(<the migration's connection>)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from alembic.operations import Operations
from alembic.operations.ops import CreateTableOp, DropTableOp
from sqlalchemy import Column, LargeBinary, MetaData, Table, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.schema import DDL

from .._keytable import scope_for
from ..errors import ConfigurationError, KeyLifecycleError
from ..lifecycle.ddl import binary_to_plaintext_ddl, plaintext_to_binary_ddl
from ..providers import KeyProvider
from ..providers.uri import provider_from_uri
from ..types import KMSEncrypted
from ..vault import KeyVault, key_table, vault_for
from .ops import (
    ColumnOp,
    CreateKmsKeyTableOp,
    DecryptColumnOp,
    DropKmsKeyTableOp,
    EncryptColumnOp,
    KMSOperation,
    ReencryptTableOp,
    RewrapKmsKeysOp,
    RotateKmsKeyOp,
)

log = logging.getLogger(__name__)

_REFLECTED = "sqlalchemy_kms.reflected_types"


# -- finding the vault and the table ---------------------------------------------------


def _online(operations: Operations, operation: KMSOperation) -> tuple[Connection, KeyVault]:
    """The migration's connection and the vault of its engine, for work on rows or keys."""
    name = operation.op_name
    if operations.migration_context.as_sql:
        raise ConfigurationError(
            f"op.{name}() reads and rewrites rows, so it cannot run in offline (--sql) mode; "
            "run the migration against the database"
        )
    bind = operations.get_bind()
    if bind is None:  # pragma: no cover - alembic always has one online
        raise ConfigurationError(f"op.{name}() needs a database connection")
    vault = vault_for(bind.dialect)
    if vault is None:
        raise ConfigurationError(
            f"op.{name}() found no KeyVault for the migration's engine: create one in env.py, "
            "on the engine whose connection is given to context.configure(), before running "
            "the migrations, e.g. KeyVault(engine, provider_from_uri('aws-kms://alias/myapp'))"
        )
    return bind, vault


@contextmanager
def _using(vault: KeyVault, bind: Connection, operation: KMSOperation) -> Iterator[None]:
    """Key-table work of the block goes through the migration's connection (the vault
    refuses one it cannot share)."""
    with vault.using(bind):
        yield


def _describe_table(
    bind: Connection,
    table_name: str,
    schema: str | None,
    columns: Mapping[str, KMSEncrypted],
) -> Table:
    """The reflected primary key columns of the table, plus ``columns`` as encrypted."""
    inspector = inspect(bind)
    qualified = f"{schema}.{table_name}" if schema else table_name
    if not inspector.has_table(table_name, schema=schema):
        raise ConfigurationError(f"table {qualified} does not exist")
    reflected = {c["name"]: c for c in inspector.get_columns(table_name, schema=schema)}
    primary_key = inspector.get_pk_constraint(table_name, schema=schema)["constrained_columns"]
    if not primary_key:
        raise KeyLifecycleError(
            "a table needs a primary key for its rows to be rewritten", table=qualified
        )
    missing = sorted(set(columns) - set(reflected))
    if missing:
        raise ConfigurationError(f"table {qualified} has no column {', '.join(missing)}")
    in_key = sorted(set(columns) & set(primary_key))
    if in_key:
        raise KeyLifecycleError(
            f"primary key columns cannot be encrypted in place: {', '.join(in_key)}",
            table=qualified,
        )
    parts: list[Column[Any]] = [
        Column(name, reflected[name]["type"], primary_key=True, autoincrement=False)
        for name in primary_key
    ]
    for name, kms_type in columns.items():
        # a copy: a KMSEncrypted object serves one column, and the caller's may serve another
        parts.append(Column(name, kms_type.copy(), nullable=bool(reflected[name]["nullable"])))
    table = Table(table_name, MetaData(), *parts, schema=schema)
    table.info[_REFLECTED] = {name: reflected[name]["type"] for name in columns}
    return table


def _progress(label: str) -> Callable[[object], None]:
    def report(progress: object) -> None:
        log.info("%s: %s", label, progress)

    return report


# -- the key table ---------------------------------------------------------------------------


def _check_key_table(operations: Operations, table_name: str, schema: str | None) -> None:
    vault = vault_for(operations.migration_context.dialect)
    if vault is None:
        return
    if (vault.table.name, vault.table.schema) != (table_name, schema):
        raise ConfigurationError(
            f"the KeyVault uses the key table {vault.table.fullname}, but this migration "
            f"creates or drops {f'{schema}.' if schema else ''}{table_name}: give the "
            "migration the vault's table_name and schema (or the vault the migration's)"
        )


@Operations.implementation_for(CreateKmsKeyTableOp)
def _create_kms_key_table(operations: Operations, operation: CreateKmsKeyTableOp) -> None:
    _check_key_table(operations, operation.table_name, operation.schema)
    table = key_table(MetaData(), operation.table_name, operation.schema)
    operations.invoke(CreateTableOp.from_table(table))


@Operations.implementation_for(DropKmsKeyTableOp)
def _drop_kms_key_table(operations: Operations, operation: DropKmsKeyTableOp) -> None:
    _check_key_table(operations, operation.table_name, operation.schema)
    table = key_table(MetaData(), operation.table_name, operation.schema)
    operations.invoke(DropTableOp.from_table(table))
    vault = vault_for(operations.migration_context.dialect)
    if vault is not None:
        vault.clear_cache()


# -- encrypting and decrypting a column in place -------------------------------------------


def _is_binary(type_: Any) -> bool:
    try:
        return bool(type_.python_type is bytes)
    except NotImplementedError:  # NullType and other types without a Python type
        return False


def _run_ddl(operations: Operations, statements: list[str]) -> None:
    for statement in statements:
        # DDL() treats % as a format character: escape it
        operations.execute(DDL(statement.replace("%", "%%")))  # type: ignore[no-untyped-call]


def _retype(
    operations: Operations,
    operation: ColumnOp,
    table: Table,
    dialect: Any,
    *,
    to_binary: bool,
) -> None:
    """Make the column binary (``to_binary``) or give it back its inner type.

    PostgreSQL and MySQL/MariaDB run ``plaintext_to_binary_ddl`` /
    ``binary_to_plaintext_ddl``. On PostgreSQL and SQLite a column that
    already is of the target kind is left alone: the DDL would read a binary
    column's bytes as text (a column being encrypted again after an
    interrupted run, or an inner type that is itself binary). MySQL/MariaDB
    always run their ``MODIFY``, which keeps the bytes and also resizes a
    ``VARBINARY``.

    SQLite stores any value in any column; its declared type is changed only
    for the schema to say what the column holds (and for autogenerate to find
    it as the model says), with Alembic's batch mode: the table is recreated
    and its rows copied with ``CAST`` (a plaintext value becomes the bytes of
    its text, which :meth:`~sqlalchemy_kms.KeyVault.encrypt_column` reads as
    plaintext).
    """
    name = operation.column_name
    current = table.info[_REFLECTED][name]
    if dialect.name not in ("mysql", "mariadb"):
        if _is_binary(current) == to_binary:
            return  # already binary, or already plaintext
        if not to_binary and _is_binary(operation.kms_type.inner_type):
            return  # the plaintext type is binary too: the column stays as it is
    if dialect.name != "sqlite":
        ddl = plaintext_to_binary_ddl if to_binary else binary_to_plaintext_ddl
        _run_ddl(operations, ddl(table, name, dialect))
        return
    target = LargeBinary() if to_binary else operation.kms_type.inner_type
    with operations.batch_alter_table(operation.table_name, schema=operation.schema) as batch:
        batch.alter_column(
            name, type_=target, existing_type=current, existing_nullable=table.c[name].nullable
        )


@Operations.implementation_for(EncryptColumnOp)
def _encrypt_column(operations: Operations, operation: EncryptColumnOp) -> None:
    bind, vault = _online(operations, operation)
    table = _describe_table(
        bind, operation.table_name, operation.schema, {operation.column_name: operation.kms_type}
    )
    with _using(vault, bind, operation):
        _retype(operations, operation, table, bind.dialect, to_binary=True)
        vault.encrypt_column(
            table,
            operation.column_name,
            batch_size=operation.batch_size,
            progress=_progress(f"{operation.op_name}({operation.column_name})"),
            connection=bind,
        )


@Operations.implementation_for(DecryptColumnOp)
def _decrypt_column(operations: Operations, operation: DecryptColumnOp) -> None:
    bind, vault = _online(operations, operation)
    table = _describe_table(
        bind, operation.table_name, operation.schema, {operation.column_name: operation.kms_type}
    )
    with _using(vault, bind, operation):
        vault.decrypt_column(
            table,
            operation.column_name,
            batch_size=operation.batch_size,
            progress=_progress(f"{operation.op_name}({operation.column_name})"),
            connection=bind,
        )
        _retype(operations, operation, table, bind.dialect, to_binary=False)


# -- rotation, re-encryption, rewrap --------------------------------------------------------


def _reencrypt(
    vault: KeyVault,
    bind: Connection,
    table_name: str,
    schema: str | None,
    columns: Mapping[str, KMSEncrypted],
    batch_size: int,
) -> None:
    table = _describe_table(bind, table_name, schema, columns)
    vault.reencrypt(
        table,
        batch_size=batch_size,
        progress=_progress(f"reencrypt({table.fullname})"),
        connection=bind,
    )


@Operations.implementation_for(RotateKmsKeyOp)
def _rotate_kms_key(operations: Operations, operation: RotateKmsKeyOp) -> None:
    bind, vault = _online(operations, operation)
    scope = scope_for(operation.table_name, operation.schema)
    with _using(vault, bind, operation):
        version = vault.rotate_key(scope, search=operation.search)
        log.info(
            "%s %s: %s key version %d is active",
            operation.op_name,
            scope,
            "search" if operation.search else "data",
            version,
        )
        if operation.reencrypt:
            assert operation.columns is not None
            _reencrypt(
                vault,
                bind,
                operation.table_name,
                operation.schema,
                operation.columns,
                operation.batch_size,
            )


@Operations.implementation_for(ReencryptTableOp)
def _reencrypt_table(operations: Operations, operation: ReencryptTableOp) -> None:
    bind, vault = _online(operations, operation)
    with _using(vault, bind, operation):
        _reencrypt(
            vault,
            bind,
            operation.table_name,
            operation.schema,
            operation.columns,
            operation.batch_size,
        )


@Operations.implementation_for(RewrapKmsKeysOp)
def _rewrap_kms_keys(operations: Operations, operation: RewrapKmsKeysOp) -> None:
    bind, vault = _online(operations, operation)
    provider = operation.provider
    if not isinstance(provider, KeyProvider):
        provider = provider_from_uri(provider)
    table = None
    if operation.table_name is not None:
        table = scope_for(operation.table_name, operation.schema)
    with _using(vault, bind, operation):
        count = vault.rewrap(provider, table=table)
    log.info("%s: %d keys rewrapped under %s", operation.op_name, count, provider.master_key_id)
