"""The migration operations: what each ``op.<name>(...)`` call records, and its reverse.

Each class is registered on Alembic's ``Operations`` with :func:`operation`,
the one place its name is written: ``op.<name>()`` calls the class's ``run``
classmethod, which builds the operation and hands it to ``operations.invoke()``.
What an operation does is in :mod:`sqlalchemy_kms.alembic.implementations`;
how autogenerate writes it is in :mod:`sqlalchemy_kms.alembic.render`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from alembic.operations import MigrateOperation, Operations

from ..errors import ConfigurationError
from ..providers import KeyProvider
from ..types import KMSEncrypted
from ..vault import DEFAULT_KEY_TABLE

__all__ = [
    "ColumnOp",
    "CreateKmsKeyTableOp",
    "DecryptColumnOp",
    "DropKmsKeyTableOp",
    "EncryptColumnOp",
    "KMSOperation",
    "ReencryptTableOp",
    "RewrapKmsKeysOp",
    "RotateKmsKeyOp",
    "operation",
]


class KMSOperation(MigrateOperation):
    """An operation of sqlalchemy-kms, called in a migration as ``op.<op_name>(...)``."""

    #: The operation's name on ``op``, set by :func:`operation`.
    op_name: ClassVar[str]


_OpClass = TypeVar("_OpClass", bound=type[KMSOperation])


def operation(name: str) -> Callable[[_OpClass], _OpClass]:
    """Register the decorated class as ``op.<name>(...)``: the one place its name is written.

    This is Alembic's ``Operations.register_operation(name, sourcename="run")``:
    the class's own ``run`` classmethod (``cls, operations, ...``) gives
    ``op.<name>`` its signature and docstring. The decorator also keeps the
    name as ``op_name``, which ``to_diff_tuple()``, the implementation's
    messages and the renderer read, and makes ``run`` reachable under the
    name too (``EncryptColumnOp.encrypt_column``), as Alembic's own
    operations are.
    """

    def register(op_cls: _OpClass) -> _OpClass:
        run = op_cls.__dict__.get("run")
        if not isinstance(run, classmethod):
            raise TypeError(f"{op_cls.__name__} needs its own run() classmethod")
        op_cls.op_name = name
        setattr(op_cls, name, run)
        Operations.register_operation(name, sourcename="run")(op_cls)
        return op_cls

    return register


def check_kms_type(kms_type: Any, what: str) -> KMSEncrypted:
    """``kms_type`` if it is a ``KMSEncrypted`` instance; else a ``TypeError`` naming ``what``."""
    if not isinstance(kms_type, KMSEncrypted):
        raise TypeError(
            f"{what} must be a KMSEncrypted(...) instance, e.g. KMSEncrypted(sa.String(200)); "
            f"got {kms_type!r}"
        )
    return kms_type


def _columns(
    columns: Mapping[str, KMSEncrypted] | None, table_name: str, name: str
) -> dict[str, KMSEncrypted]:
    if not columns:
        raise ConfigurationError(
            f"op.{name}({table_name!r}, ...) needs columns={{'column': KMSEncrypted(...), ...}}: "
            "the encrypted columns of the table and their types"
        )
    return {key: check_kms_type(value, f"columns[{key!r}]") for key, value in columns.items()}


# -- the key table ---------------------------------------------------------------------------


class _KeyTableOp(KMSOperation):
    def __init__(self, table_name: str = DEFAULT_KEY_TABLE, *, schema: str | None = None) -> None:
        self.table_name = table_name
        self.schema = schema

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (self.op_name, self.table_name, self.schema)


@operation("create_kms_key_table")
class CreateKmsKeyTableOp(_KeyTableOp):
    """Create the key table (``kms_data_keys``) that holds the wrapped data keys."""

    @classmethod
    def run(
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


@operation("drop_kms_key_table")
class DropKmsKeyTableOp(_KeyTableOp):
    """Drop the key table: every value encrypted under its keys becomes unreadable."""

    @classmethod
    def run(
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


# -- encrypting and decrypting a column in place -------------------------------------------


class ColumnOp(KMSOperation):
    """One column of a table, rewritten in place: the base of encrypt and decrypt."""

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
        self.kms_type = check_kms_type(kms_type, "kms_type")
        self.schema = schema
        self.batch_size = batch_size

    def _arguments(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "batch_size": self.batch_size,
        }

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (self.op_name, self.schema, self.table_name, self.column_name)


@operation("encrypt_column")
class EncryptColumnOp(ColumnOp):
    """Encrypt the existing plaintext of a column in place."""

    @classmethod
    def run(
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
        :meth:`sqlalchemy_kms.KeyVault.encrypt_column`.
        """
        operations.invoke(
            cls(table_name, column_name, kms_type, schema=schema, batch_size=batch_size)
        )

    def reverse(self) -> DecryptColumnOp:
        return DecryptColumnOp(
            self.table_name, self.column_name, self.kms_type, **self._arguments()
        )


@operation("decrypt_column")
class DecryptColumnOp(ColumnOp):
    """Write a column's plaintext back in place: the reverse of ``encrypt_column``."""

    @classmethod
    def run(
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
        :meth:`sqlalchemy_kms.KeyVault.decrypt_column`.
        """
        operations.invoke(
            cls(table_name, column_name, kms_type, schema=schema, batch_size=batch_size)
        )

    def reverse(self) -> EncryptColumnOp:
        return EncryptColumnOp(
            self.table_name, self.column_name, self.kms_type, **self._arguments()
        )


# -- rotation, re-encryption, rewrap --------------------------------------------------------


@operation("rotate_kms_key")
class RotateKmsKeyOp(KMSOperation):
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
            self.columns = _columns(columns, table_name, self.op_name)
        self.schema = schema
        self.batch_size = batch_size

    @classmethod
    def run(
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
        return (self.op_name, self.schema, self.table_name, self.search)


@operation("reencrypt_table")
class ReencryptTableOp(KMSOperation):
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
        self.columns = _columns(columns, table_name, self.op_name)
        self.schema = schema
        self.batch_size = batch_size

    @classmethod
    def run(
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
        return (self.op_name, self.schema, self.table_name)


@operation("rewrap_kms_keys")
class RewrapKmsKeysOp(KMSOperation):
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
    def run(
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
        return (self.op_name, self.schema, self.table_name)
