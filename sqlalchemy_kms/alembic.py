"""Alembic operations for encrypted columns and their keys: ``op.encrypt_column(...)`` and friends.

Importing this module registers these operations on Alembic's ``op``:

=====================================================  =========================================
operation                                              reverse (autogenerate, ``op.reverse()``)
=====================================================  =========================================
``op.create_kms_key_table(table_name, *, schema)``     ``op.drop_kms_key_table(...)``
``op.drop_kms_key_table(table_name, *, schema)``       ``op.create_kms_key_table(...)``
``op.encrypt_column(table, column, kms_type, ...)``    ``op.decrypt_column(...)``
``op.decrypt_column(table, column, kms_type, ...)``    ``op.encrypt_column(...)``
``op.rotate_kms_key(table, *, columns, ...)``          not reversible
``op.reencrypt_table(table, columns, ...)``            not reversible
``op.rewrap_kms_keys(provider, *, table_name, ...)``   not reversible
=====================================================  =========================================

Import it in ``env.py`` (revision files may import it too; importing twice is
harmless) and create the :class:`~sqlalchemy_kms.KeyVault` of the engine the
migrations run on. Every operation except the key table's DDL finds that vault
through the migration connection (:func:`sqlalchemy_kms.vault.vault_for`) and
raises :class:`~sqlalchemy_kms.errors.ConfigurationError` when there is none.
A complete ``env.py``::

    import os
    from logging.config import fileConfig

    from alembic import context
    from sqlalchemy import create_engine

    import sqlalchemy_kms.alembic  # registers op.encrypt_column, op.rotate_kms_key, ...
    from sqlalchemy_kms import KeyVault
    from sqlalchemy_kms.alembic import provider_from_uri, render_item

    from myapp.models import Base

    config = context.config
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    target_metadata = Base.metadata


    def run_migrations_offline() -> None:
        # --sql renders DDL only (op.create_kms_key_table, op.create_table, ...): the
        # operations that rewrite rows raise ConfigurationError in offline mode.
        context.configure(url=config.get_main_option("sqlalchemy.url"),
                          target_metadata=target_metadata, literal_binds=True,
                          render_item=render_item)
        with context.begin_transaction():
            context.run_migrations()


    def run_migrations_online() -> None:
        engine = create_engine(config.get_main_option("sqlalchemy.url"))
        # e.g. MYAPP_KMS=aws-kms://alias/myapp (production) or local://dev-master.key
        vault = KeyVault(engine, provider_from_uri(os.environ["MYAPP_KMS"]))
        try:
            with engine.connect() as connection:
                context.configure(connection=connection, target_metadata=target_metadata,
                                  render_item=render_item)
                # Key-table work (the key op.create_table() makes for a new encrypted
                # table, keys made by op.bulk_insert()) must use the migration's own
                # connection: its transaction may hold the key table or locks that a
                # second connection could not see or would wait for.
                with vault.using(connection), context.begin_transaction():
                    context.run_migrations()
        finally:
            vault.close()
            engine.dispose()


    if context.is_offline_mode():
        run_migrations_offline()
    else:
        run_migrations_online()

A revision::

    import sqlalchemy as sa
    from alembic import op
    from sqlalchemy_kms import KMSEncrypted


    def upgrade() -> None:
        op.encrypt_column("patients", "phone", KMSEncrypted(sa.String(30)))


    def downgrade() -> None:
        op.decrypt_column("patients", "phone", KMSEncrypted(sa.String(30)))

How the operations see a table
-------------------------------
The row-rewriting operations (``encrypt_column``, ``decrypt_column``,
``rotate_kms_key``, ``reencrypt_table``) build a :class:`sqlalchemy.Table`
from the **reflected primary key columns** plus the columns they are given,
each with (a copy of) the given ``KMSEncrypted`` type and its reflected
nullability; other columns are not needed and not touched. The table must
have a primary key, and no encrypted column may be part of it. The key scope
is the table name, ``schema.table`` when ``schema`` is given: pass the same
schema the application's model uses.

They run inside the migration's transaction (``connection=op.get_bind()``
and ``vault.using(op.get_bind())``): on PostgreSQL an error rolls back the
column's DDL, its rewritten rows and any key made, together. MySQL/MariaDB
commit DDL implicitly.

The DDL of ``encrypt_column``/``decrypt_column`` is
:func:`~sqlalchemy_kms.rotation.plaintext_to_binary_ddl` /
:func:`~sqlalchemy_kms.rotation.binary_to_plaintext_ddl` on PostgreSQL and
MySQL/MariaDB. SQLite stores any value in any column, so it needs none to hold
the ciphertext; the operations still change the column's declared type (to
``BLOB``, and back to the inner type) with Alembic's batch mode, which
recreates the table, so that the schema says what the column holds and
autogenerate finds it as the model declares it. Batch mode's caveats apply
(see Alembic's "Running batch migrations for SQLite"): triggers and views on
the table are not recreated, and with ``PRAGMA foreign_keys=ON`` tables
referencing it get in the way.

Autogenerate
------------
Pass :func:`render_item` to ``context.configure(render_item=...)`` so that
``alembic revision --autogenerate`` renders encrypted columns as
``KMSEncrypted(sa.String(length=200), deterministic=True)`` and adds
``from sqlalchemy_kms import KMSEncrypted`` to the revision's imports.
Autogenerate compares schemas, not data: a plaintext column changed to
``KMSEncrypted`` in the model comes out as ``op.alter_column(...,
type_=KMSEncrypted(...))``, which encrypts nothing; write
``op.encrypt_column(...)`` instead. These operations also render (for
rewriters and ``render_python_code``).

Type checkers only know Alembic's built-in ``op`` functions: in type-checked
revision scripts, calls of these operations need
``# type: ignore[attr-defined]``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

from alembic.autogenerate import renderers
from alembic.autogenerate.api import AutogenContext
from alembic.operations import MigrateOperation, Operations
from alembic.operations.ops import CreateTableOp, DropTableOp
from sqlalchemy import Column, LargeBinary, MetaData, Table, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.schema import DDL

from . import rotation
from .errors import ConfigurationError, KeyLifecycleError
from .providers import KeyProvider
from .providers.uri import provider_from_uri, provider_uri
from .types import KMSEncrypted
from .vault import DEFAULT_KEY_TABLE, KeyVault, key_table, vault_for

__all__ = [
    "CreateKmsKeyTableOp",
    "DecryptColumnOp",
    "DropKmsKeyTableOp",
    "EncryptColumnOp",
    "ReencryptTableOp",
    "RewrapKmsKeysOp",
    "RotateKmsKeyOp",
    "provider_from_uri",
    "render_item",
]

log = logging.getLogger(__name__)

_REFLECTED = "sqlalchemy_kms.reflected_types"


# -- providers from URIs -----------------------------------------------------------------


def _provider(provider: KeyProvider | str) -> KeyProvider:
    if isinstance(provider, KeyProvider):
        return provider
    if isinstance(provider, str):
        return provider_from_uri(provider)
    raise TypeError("provider must be a KeyProvider or a URI (aws-kms://KEY, local://PATH)")


# -- finding the vault and the table ---------------------------------------------------


def _online_bind(operations: Operations, name: str) -> Connection:
    if operations.migration_context.as_sql:
        raise ConfigurationError(
            f"op.{name}() reads and rewrites rows, so it cannot run in offline (--sql) mode; "
            "run the migration against the database"
        )
    bind = operations.get_bind()
    if bind is None:  # pragma: no cover - alembic always has one online
        raise ConfigurationError(f"op.{name}() needs a database connection")
    return bind


def _vault(bind: Connection, name: str) -> KeyVault:
    vault = vault_for(bind.dialect)
    if vault is None:
        raise ConfigurationError(
            f"op.{name}() found no KeyVault for the migration's engine: create one in env.py, "
            "on the engine whose connection is given to context.configure(), before running "
            "the migrations, e.g. KeyVault(engine, provider_from_uri('aws-kms://alias/myapp'))"
        )
    return vault


@contextmanager
def _using(vault: KeyVault, bind: Connection, name: str) -> Iterator[None]:
    """Key-table work of the block goes through the migration's connection."""
    with vault.using(bind):
        if vault._shared_connection() is not bind:
            raise ConfigurationError(
                f"op.{name}(): the KeyVault cannot share the migration's connection (it is "
                "closed, or belongs to another engine); create the KeyVault on the engine "
                "the migration connects with"
            )
        yield


def _check_type(kms_type: Any, what: str) -> KMSEncrypted:
    if not isinstance(kms_type, KMSEncrypted):
        raise TypeError(
            f"{what} must be a KMSEncrypted(...) instance, e.g. KMSEncrypted(sa.String(200)); "
            f"got {kms_type!r}"
        )
    return kms_type


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
        column_type = _check_type(kms_type, f"the type of column {name!r}").copy()
        parts.append(Column(name, column_type, nullable=bool(reflected[name]["nullable"])))
    table = Table(table_name, MetaData(), *parts, schema=schema)
    table.info[_REFLECTED] = {name: reflected[name]["type"] for name in columns}
    return table


def _columns(
    columns: Mapping[str, KMSEncrypted] | None, table_name: str, name: str
) -> dict[str, KMSEncrypted]:
    if not columns:
        raise ConfigurationError(
            f"op.{name}({table_name!r}, ...) needs columns={{'column': KMSEncrypted(...), ...}}: "
            "the encrypted columns of the table and their types"
        )
    return {key: _check_type(value, f"columns[{key!r}]") for key, value in columns.items()}


def _progress(name: str) -> Callable[[rotation.Progress], None]:
    def report(progress: rotation.Progress) -> None:
        log.info("%s: %s", name, progress)

    return report


def _run_ddl(operations: Operations, statements: list[str]) -> None:
    for statement in statements:
        # DDL() treats % as a format character: escape it
        operations.execute(DDL(statement.replace("%", "%%")))  # type: ignore[no-untyped-call]


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


@Operations.register_operation("create_kms_key_table")
class CreateKmsKeyTableOp(MigrateOperation):
    """Create the key table (``kms_data_keys``) that holds the wrapped data keys."""

    def __init__(self, table_name: str = DEFAULT_KEY_TABLE, *, schema: str | None = None) -> None:
        self.table_name = table_name
        self.schema = schema

    @classmethod
    def create_kms_key_table(
        cls,
        operations: Operations,
        table_name: str = DEFAULT_KEY_TABLE,
        *,
        schema: str | None = None,
    ) -> None:
        """Create the key table of :func:`sqlalchemy_kms.vault.key_table`.

        Pure DDL: it also works in offline (``--sql``) mode and needs no vault;
        when a vault is bound to the migration's engine, ``table_name`` and
        ``schema`` must be the vault's.
        """
        operations.invoke(cls(table_name, schema=schema))

    def reverse(self) -> DropKmsKeyTableOp:
        return DropKmsKeyTableOp(self.table_name, schema=self.schema)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("create_kms_key_table", self.table_name, self.schema)


@Operations.register_operation("drop_kms_key_table")
class DropKmsKeyTableOp(MigrateOperation):
    """Drop the key table: every value encrypted under its keys becomes unreadable."""

    def __init__(self, table_name: str = DEFAULT_KEY_TABLE, *, schema: str | None = None) -> None:
        self.table_name = table_name
        self.schema = schema

    @classmethod
    def drop_kms_key_table(
        cls,
        operations: Operations,
        table_name: str = DEFAULT_KEY_TABLE,
        *,
        schema: str | None = None,
    ) -> None:
        """Drop the key table (crypto-shredding every value encrypted under its keys).

        Meant for the downgrade of :meth:`create_kms_key_table`, after the
        encrypted tables are gone. Forgets the keys the vault has cached.
        """
        operations.invoke(cls(table_name, schema=schema))

    def reverse(self) -> CreateKmsKeyTableOp:
        return CreateKmsKeyTableOp(self.table_name, schema=self.schema)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("drop_kms_key_table", self.table_name, self.schema)


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


class _ColumnOp(MigrateOperation):
    def __init__(
        self,
        table_name: str,
        column_name: str,
        kms_type: KMSEncrypted,
        *,
        schema: str | None = None,
        batch_size: int = 1000,
    ) -> None:
        self.table_name = table_name
        self.column_name = column_name
        self.kms_type = _check_type(kms_type, "kms_type")
        self.schema = schema
        self.batch_size = batch_size

    def _arguments(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "batch_size": self.batch_size,
        }


@Operations.register_operation("encrypt_column")
class EncryptColumnOp(_ColumnOp):
    """Encrypt the existing plaintext of a column in place."""

    @classmethod
    def encrypt_column(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        kms_type: KMSEncrypted,
        *,
        schema: str | None = None,
        batch_size: int = 1000,
    ) -> None:
        """Encrypt the plaintext values of ``table_name.column_name`` in place.

        First the column becomes binary (PostgreSQL: ``BYTEA`` keeping each
        value's text; MySQL/MariaDB: ``VARBINARY(n)`` or a ``BLOB`` type;
        SQLite: declared ``BLOB``, by batch mode), then every row is
        rewritten as ``kms_type`` encrypts it, ``batch_size`` rows at a time,
        inside the migration's transaction.
        Values already encrypted are left as they are, so running it on a
        partly encrypted column finishes the job. See
        :func:`sqlalchemy_kms.rotation.encrypt_column`.
        """
        operations.invoke(
            cls(table_name, column_name, kms_type, schema=schema, batch_size=batch_size)
        )

    def reverse(self) -> DecryptColumnOp:
        return DecryptColumnOp(
            self.table_name, self.column_name, self.kms_type, **self._arguments()
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("encrypt_column", self.schema, self.table_name, self.column_name)


@Operations.register_operation("decrypt_column")
class DecryptColumnOp(_ColumnOp):
    """Write a column's plaintext back in place: the reverse of ``encrypt_column``."""

    @classmethod
    def decrypt_column(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        kms_type: KMSEncrypted,
        *,
        schema: str | None = None,
        batch_size: int = 1000,
    ) -> None:
        """Decrypt ``table_name.column_name`` in place and give it back its plaintext type.

        Every encrypted value is replaced by its plaintext (values that are
        plaintext already are left alone), then the column gets
        ``kms_type.inner_type`` again (on SQLite by batch mode). See
        :func:`sqlalchemy_kms.rotation.decrypt_column`.
        """
        operations.invoke(
            cls(table_name, column_name, kms_type, schema=schema, batch_size=batch_size)
        )

    def reverse(self) -> EncryptColumnOp:
        return EncryptColumnOp(
            self.table_name, self.column_name, self.kms_type, **self._arguments()
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("decrypt_column", self.schema, self.table_name, self.column_name)


def _is_binary(type_: Any) -> bool:
    try:
        return bool(type_.python_type is bytes)
    except NotImplementedError:  # NullType and other types without a Python type
        return False


def _retype(
    operations: Operations,
    operation: _ColumnOp,
    table: Table,
    dialect: Any,
    *,
    to_binary: bool,
) -> None:
    """Make the column binary (``to_binary``) or give it back its inner type.

    PostgreSQL and MySQL/MariaDB run :mod:`~sqlalchemy_kms.rotation`'s DDL.
    On PostgreSQL and SQLite a column that already is of the target kind is
    left alone: the DDL would read a binary column's bytes as text (a column
    being encrypted again after an interrupted run, or an inner type that is
    itself binary). MySQL/MariaDB always run their ``MODIFY``, which keeps the
    bytes and also resizes a ``VARBINARY``.

    SQLite stores any value in any column; its declared type is changed only
    for the schema to say what the column holds (and for autogenerate to find
    it as the model says), with Alembic's batch mode: the table is recreated
    and its rows copied with ``CAST`` (a plaintext value becomes the bytes of
    its text, which :func:`~sqlalchemy_kms.rotation.encrypt_column` reads as
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
        ddl = rotation.plaintext_to_binary_ddl if to_binary else rotation.binary_to_plaintext_ddl
        _run_ddl(operations, ddl(table, name, dialect))
        return
    target = LargeBinary() if to_binary else operation.kms_type.inner_type
    with operations.batch_alter_table(operation.table_name, schema=operation.schema) as batch:
        batch.alter_column(
            name, type_=target, existing_type=current, existing_nullable=table.c[name].nullable
        )


@Operations.implementation_for(EncryptColumnOp)
def _encrypt_column(operations: Operations, operation: EncryptColumnOp) -> None:
    bind = _online_bind(operations, "encrypt_column")
    vault = _vault(bind, "encrypt_column")
    table = _describe_table(
        bind, operation.table_name, operation.schema, {operation.column_name: operation.kms_type}
    )
    with _using(vault, bind, "encrypt_column"):
        _retype(operations, operation, table, bind.dialect, to_binary=True)
        vault.encrypt_column(
            table,
            operation.column_name,
            batch_size=operation.batch_size,
            progress=_progress(f"encrypt_column({operation.column_name})"),
            connection=bind,
        )


@Operations.implementation_for(DecryptColumnOp)
def _decrypt_column(operations: Operations, operation: DecryptColumnOp) -> None:
    bind = _online_bind(operations, "decrypt_column")
    vault = _vault(bind, "decrypt_column")
    table = _describe_table(
        bind, operation.table_name, operation.schema, {operation.column_name: operation.kms_type}
    )
    with _using(vault, bind, "decrypt_column"):
        vault.decrypt_column(
            table,
            operation.column_name,
            batch_size=operation.batch_size,
            progress=_progress(f"decrypt_column({operation.column_name})"),
            connection=bind,
        )
        _retype(operations, operation, table, bind.dialect, to_binary=False)


# -- rotation, re-encryption, rewrap --------------------------------------------------------


@Operations.register_operation("rotate_kms_key")
class RotateKmsKeyOp(MigrateOperation):
    """Make a new active data key (or search key) for a table and re-encrypt its rows."""

    def __init__(
        self,
        table_name: str,
        *,
        search: bool = False,
        reencrypt: bool = True,
        columns: Mapping[str, KMSEncrypted] | None = None,
        schema: str | None = None,
        batch_size: int = 1000,
    ) -> None:
        self.table_name = table_name
        self.search = search
        self.reencrypt = reencrypt
        self.columns: dict[str, KMSEncrypted] | None = None
        if reencrypt or columns:
            self.columns = _columns(columns, table_name, "rotate_kms_key")
        self.schema = schema
        self.batch_size = batch_size

    @classmethod
    def rotate_kms_key(
        cls,
        operations: Operations,
        table_name: str,
        *,
        search: bool = False,
        reencrypt: bool = True,
        columns: Mapping[str, KMSEncrypted] | None = None,
        schema: str | None = None,
        batch_size: int = 1000,
    ) -> None:
        """Rotate the table's data key (``search=True``: its search key), then re-encrypt.

        New values use the new key version at once; with ``reencrypt`` (the
        default) every stored value of ``columns`` (``{"name":
        KMSEncrypted(sa.String(200)), ...}``: the table's encrypted columns
        and their types, required then) is moved to it inside the migration's
        transaction. Old key versions stay enabled, so rows written meanwhile
        by a running application stay readable. Not reversible: a downgrade
        has nothing to undo (the old key versions still decrypt).
        """
        operations.invoke(
            cls(
                table_name,
                search=search,
                reencrypt=reencrypt,
                columns=columns,
                schema=schema,
                batch_size=batch_size,
            )
        )

    def reverse(self) -> MigrateOperation:
        raise NotImplementedError("a key rotation cannot be reversed (nor needs to be)")

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("rotate_kms_key", self.schema, self.table_name, self.search)


@Operations.register_operation("reencrypt_table")
class ReencryptTableOp(MigrateOperation):
    """Move every encrypted value of a table to its active keys."""

    def __init__(
        self,
        table_name: str,
        columns: Mapping[str, KMSEncrypted],
        *,
        schema: str | None = None,
        batch_size: int = 1000,
    ) -> None:
        self.table_name = table_name
        self.columns = _columns(columns, table_name, "reencrypt_table")
        self.schema = schema
        self.batch_size = batch_size

    @classmethod
    def reencrypt_table(
        cls,
        operations: Operations,
        table_name: str,
        columns: Mapping[str, KMSEncrypted],
        *,
        schema: str | None = None,
        batch_size: int = 1000,
    ) -> None:
        """Re-encrypt ``columns`` (``{"name": KMSEncrypted(...), ...}``) under the active keys.

        For example after ``vault.rotate_key()`` ran outside a migration, or to
        finish a rotation whose re-encryption was skipped. Values already
        under the active key are left alone. Not reversible.
        """
        operations.invoke(cls(table_name, columns, schema=schema, batch_size=batch_size))

    def reverse(self) -> MigrateOperation:
        raise NotImplementedError("a re-encryption cannot be reversed (nor needs to be)")

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("reencrypt_table", self.schema, self.table_name)


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
    bind = _online_bind(operations, "rotate_kms_key")
    vault = _vault(bind, "rotate_kms_key")
    scope = (
        f"{operation.schema}.{operation.table_name}" if operation.schema else (operation.table_name)
    )
    with _using(vault, bind, "rotate_kms_key"):
        version = vault.rotate_key(scope, search=operation.search)
        log.info(
            "rotate_kms_key %s: %s key version %d is active",
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
    bind = _online_bind(operations, "reencrypt_table")
    vault = _vault(bind, "reencrypt_table")
    with _using(vault, bind, "reencrypt_table"):
        _reencrypt(
            vault,
            bind,
            operation.table_name,
            operation.schema,
            operation.columns,
            operation.batch_size,
        )


@Operations.register_operation("rewrap_kms_keys")
class RewrapKmsKeysOp(MigrateOperation):
    """Re-wrap data keys under another master key; no row is touched."""

    def __init__(
        self,
        provider: KeyProvider | str,
        *,
        table_name: str | None = None,
        schema: str | None = None,
    ) -> None:
        if not isinstance(provider, (KeyProvider, str)):
            raise TypeError("provider must be a KeyProvider or a URI (aws-kms://KEY, local://PATH)")
        self.provider = provider
        self.table_name = table_name
        self.schema = schema

    @classmethod
    def rewrap_kms_keys(
        cls,
        operations: Operations,
        provider: KeyProvider | str,
        *,
        table_name: str | None = None,
        schema: str | None = None,
    ) -> None:
        """Wrap every data key (or only ``table_name``'s) under ``provider``'s master key.

        ``provider`` is a :class:`~sqlalchemy_kms.KeyProvider` or a URI,
        ``aws-kms://KEY`` or ``local://PATH`` (see :func:`provider_from_uri`).
        With AWS KMS on both sides this is KMS ``ReEncrypt``. Keys already
        under that master key are skipped. The vault uses ``provider`` for
        the rest of the run; configure the application (and env.py) with the
        new master key afterwards, while the old one stays able to decrypt
        until nothing needs it. Not reversible: rewrap again to go back.
        """
        operations.invoke(cls(provider, table_name=table_name, schema=schema))

    def reverse(self) -> MigrateOperation:
        raise NotImplementedError("rewrap again under the previous master key to go back")

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("rewrap_kms_keys", self.schema, self.table_name)


@Operations.implementation_for(RewrapKmsKeysOp)
def _rewrap_kms_keys(operations: Operations, operation: RewrapKmsKeysOp) -> None:
    bind = _online_bind(operations, "rewrap_kms_keys")
    vault = _vault(bind, "rewrap_kms_keys")
    provider = _provider(operation.provider)
    table: str | None = None
    if operation.table_name is not None:
        table = (
            f"{operation.schema}.{operation.table_name}"
            if operation.schema
            else operation.table_name
        )
    with _using(vault, bind, "rewrap_kms_keys"):
        count = vault.rewrap(provider, table=table)
    log.info("rewrap_kms_keys: %d keys rewrapped under %s", count, provider.master_key_id)


# -- autogenerate ------------------------------------------------------------------------


def _render_callable(fn: Callable[..., Any], autogen_context: AutogenContext) -> str | None:
    """``module.qualname`` for an importable function (adding its import), else ``None``."""
    qualname = getattr(fn, "__qualname__", None)
    if not qualname or "<" in qualname:  # lambdas, local functions
        return None
    module_name = getattr(fn, "__module__", None) or "builtins"
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    if found is not fn:
        return None
    if module_name == "builtins":
        return str(qualname)
    autogen_context.imports.add(f"import {module_name}")
    return f"{module_name}.{qualname}"


def _render_kms_type(type_: KMSEncrypted, autogen_context: AutogenContext) -> str:
    from alembic.autogenerate.render import _repr_type

    autogen_context.imports.add("from sqlalchemy_kms import KMSEncrypted")
    arguments = [_repr_type(type_.inner_type, autogen_context)]
    if type_.deterministic:
        arguments.append("deterministic=True")
    if type_.normalize is not None:
        rendered = _render_callable(type_.normalize, autogen_context)
        if rendered is None:
            log.warning(
                "cannot render normalize=%r of an encrypted column: left out of the "
                "migration script (it does not change the DDL); add it by hand where a "
                "migration rewrites values",
                type_.normalize,
            )
        else:
            arguments.append(f"normalize={rendered}")
    if type_.accept_plaintext:
        arguments.append("accept_plaintext=True")
    return f"KMSEncrypted({', '.join(arguments)})"


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """``render_item`` hook for ``context.configure()``: renders ``KMSEncrypted`` columns.

    ``KMSEncrypted(String(200), deterministic=True)`` becomes
    ``KMSEncrypted(sa.String(length=200), deterministic=True)`` (the inner
    type rendered the way Alembic renders any type) and
    ``from sqlalchemy_kms import KMSEncrypted`` is added to the script's
    imports. ``normalize=`` is rendered when it is an importable function
    (``str.lower``, ``myapp.text.fold_case``). Everything else returns
    ``False``: Alembic's default rendering. To combine with a hook of your own::

        def my_render_item(type_, obj, autogen_context):
            rendered = sqlalchemy_kms.alembic.render_item(type_, obj, autogen_context)
            if rendered is not False:
                return rendered
            ...
    """
    if type_ == "type" and isinstance(obj, KMSEncrypted):
        return _render_kms_type(obj, autogen_context)
    return False


def _options(*pairs: tuple[str, Any, Any]) -> str:
    """``, name=value`` for each option that differs from its default."""
    return "".join(f", {name}={value!r}" for name, value, default in pairs if value != default)


@renderers.dispatch_for(CreateKmsKeyTableOp)
def _render_create_kms_key_table(autogen_context: AutogenContext, op: CreateKmsKeyTableOp) -> str:
    return f"op.create_kms_key_table({op.table_name!r}{_options(('schema', op.schema, None))})"


@renderers.dispatch_for(DropKmsKeyTableOp)
def _render_drop_kms_key_table(autogen_context: AutogenContext, op: DropKmsKeyTableOp) -> str:
    return f"op.drop_kms_key_table({op.table_name!r}{_options(('schema', op.schema, None))})"


def _render_column_op(name: str, autogen_context: AutogenContext, op: _ColumnOp) -> str:
    return (
        f"op.{name}({op.table_name!r}, {op.column_name!r}, "
        f"{_render_kms_type(op.kms_type, autogen_context)}"
        f"{_options(('schema', op.schema, None), ('batch_size', op.batch_size, 1000))})"
    )


@renderers.dispatch_for(EncryptColumnOp)
def _render_encrypt_column(autogen_context: AutogenContext, op: EncryptColumnOp) -> str:
    return _render_column_op("encrypt_column", autogen_context, op)


@renderers.dispatch_for(DecryptColumnOp)
def _render_decrypt_column(autogen_context: AutogenContext, op: DecryptColumnOp) -> str:
    return _render_column_op("decrypt_column", autogen_context, op)


def _render_columns(columns: Mapping[str, KMSEncrypted], autogen_context: AutogenContext) -> str:
    items = ", ".join(
        f"{name!r}: {_render_kms_type(kms_type, autogen_context)}"
        for name, kms_type in columns.items()
    )
    return f"{{{items}}}"


@renderers.dispatch_for(RotateKmsKeyOp)
def _render_rotate_kms_key(autogen_context: AutogenContext, op: RotateKmsKeyOp) -> str:
    columns = f", columns={_render_columns(op.columns, autogen_context)}" if op.columns else ""
    options = _options(
        ("search", op.search, False),
        ("reencrypt", op.reencrypt, True),
        ("schema", op.schema, None),
        ("batch_size", op.batch_size, 1000),
    )
    return f"op.rotate_kms_key({op.table_name!r}{options}{columns})"


@renderers.dispatch_for(ReencryptTableOp)
def _render_reencrypt_table(autogen_context: AutogenContext, op: ReencryptTableOp) -> str:
    options = _options(("schema", op.schema, None), ("batch_size", op.batch_size, 1000))
    return (
        f"op.reencrypt_table({op.table_name!r}, "
        f"{_render_columns(op.columns, autogen_context)}{options})"
    )


@renderers.dispatch_for(RewrapKmsKeysOp)
def _render_rewrap_kms_keys(autogen_context: AutogenContext, op: RewrapKmsKeysOp) -> str:
    options = _options(("table_name", op.table_name, None), ("schema", op.schema, None))
    return f"op.rewrap_kms_keys({provider_uri(op.provider)!r}{options})"
