"""KMSEncrypted: the column type that encrypts on write and decrypts on load.

Wrap the type the column would have had::

    from sqlalchemy import Column, String, Text
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
    from sqlalchemy_kms import KMSEncrypted

    class Base(DeclarativeBase):
        pass

    class Patient(Base):
        __tablename__ = "patients"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(KMSEncrypted(String(200)))
        notes = Column(KMSEncrypted(Text))

Values are encrypted when SQLAlchemy binds them (ORM unit of work, bulk
``insert()``/``update()``, Core executemany, ``merge``) and decrypted when
rows are loaded. ``None`` stays SQL ``NULL``. Raw SQL through ``text()``
bypasses the type: it sees and writes the stored bytes.

The column is stored as binary (``BLOB``, ``BYTEA``, ``VARBINARY(n)``) sized
for the largest ciphertext of the declared inner type, so ``String(200)``
holds any 200-character value.

Each ``KMSEncrypted(...)`` object serves one column: the type learns its
table and column when it is attached, and binds every ciphertext to them.
"""

from __future__ import annotations

import contextlib
from typing import Any

from sqlalchemy import Column, Table, event
from sqlalchemy import types as sqltypes
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect, Engine, ExceptionContext

from ._codecs import Codec, codec_for
from ._format import MAX_OVERHEAD, column_aad
from .errors import (
    ConfigurationError,
    DecryptionError,
    InvalidCiphertextError,
    KeyTableMissingError,
    SQLAlchemyKMSError,
    VaultNotFoundError,
)
from .vault import table_scope, vault_for

__all__ = ["KMSEncrypted"]

# VARBINARY up to this size on MySQL/MariaDB (indexable, inside the row); BLOBs beyond.
_MYSQL_VARBINARY_MAX = 8192


class _Binding:
    """Where a column lives: its key scope, name and associated data."""

    __slots__ = ("aad", "column", "scope")

    def __init__(self, scope: str, column: str) -> None:
        self.scope = scope
        self.column = column
        self.aad = column_aad(scope, column)


def _with_context(error: SQLAlchemyKMSError, binding: _Binding | None) -> SQLAlchemyKMSError:
    if binding is not None:
        error.table = error.table or binding.scope
        error.column = error.column or binding.column
        error.args = (error._render(),)
    return error


class KMSEncrypted(sqltypes.TypeDecorator[Any]):
    """Encrypts the values of ``inner_type`` with the table's KMS-wrapped data key.

    :param inner_type: the type the column would have without encryption
        (``String(200)``, ``Integer``, ``JSON``, ...), class or instance.
    :param deterministic: ``False`` (default) encrypts each value with a
        fresh nonce; equal values look different. Deterministic encryption
        is for columns that must be searched by equality.

    Example::

        >>> from sqlalchemy import Column, Integer, MetaData, String, Table
        >>> patients = Table("patients", MetaData(),
        ...                  Column("id", Integer, primary_key=True),
        ...                  Column("name", KMSEncrypted(String(200))))
        >>> patients.c.name.type
        KMSEncrypted(String(length=200))
    """

    impl = sqltypes.LargeBinary
    cache_ok = True

    def __init__(
        self,
        inner_type: sqltypes.TypeEngine[Any] | type[sqltypes.TypeEngine[Any]],
        deterministic: bool = False,
    ) -> None:
        inner = sqltypes.to_instance(inner_type)
        if isinstance(inner, KMSEncrypted):
            raise ConfigurationError("KMSEncrypted cannot wrap another KMSEncrypted")
        self.inner_type = inner
        self.deterministic = bool(deterministic)
        self._codec: Codec = codec_for(inner)
        self._binding: _Binding | None = None
        self._column: Column[Any] | None = None
        super().__init__()

    def __repr__(self) -> str:
        extra = ", deterministic=True" if self.deterministic else ""
        return f"KMSEncrypted({self.inner_type!r}{extra})"

    @property
    def python_type(self) -> type[Any]:
        return self.inner_type.python_type

    @property
    def max_stored_size(self) -> int | None:
        """The most bytes a stored value of this column can take (``None``: unbounded)."""
        size = self._codec.max_size
        return None if size is None else size + MAX_OVERHEAD

    # -- attaching to a column and table -------------------------------------

    def _set_parent(self, parent: Any, outer: bool = False, **kw: Any) -> None:
        super()._set_parent(parent, outer=outer, **kw)
        if not isinstance(parent, Column):
            return
        previous = self._column
        if previous is not None and previous is not parent and previous.type is self:
            raise ConfigurationError(
                f"one KMSEncrypted object is used by two columns ({previous.name} and "
                f"{parent.name}); give each column its own KMSEncrypted(...)"
            )
        self._column = parent
        self._binding = None
        if isinstance(parent.table, Table):
            self._attach_table(parent, parent.table)
        else:
            event.listen(parent, "after_parent_attach", self._attach_table)

    def _attach_table(self, column: Column[Any], table: Any) -> None:
        if not isinstance(table, Table) or column.type is not self:
            return
        self._binding = _Binding(table_scope(table), column.name)
        if not table.info.get("sqlalchemy_kms.encrypted"):
            table.info["sqlalchemy_kms.encrypted"] = True
            event.listen(table, "after_create", _make_key_for_new_table)

    # -- DDL -----------------------------------------------------------------

    def load_dialect_impl(self, dialect: Dialect) -> sqltypes.TypeEngine[Any]:
        size = self.max_stored_size
        if dialect.name in ("mysql", "mariadb"):
            if size is not None and size <= _MYSQL_VARBINARY_MAX:
                return dialect.type_descriptor(mysql.VARBINARY(size))
            if size is not None and size <= 0xFFFF:
                return dialect.type_descriptor(mysql.BLOB())
            if size is not None and size <= 0xFFFFFF:
                return dialect.type_descriptor(mysql.MEDIUMBLOB())
            return dialect.type_descriptor(mysql.LONGBLOB())
        return dialect.type_descriptor(sqltypes.LargeBinary(size))

    # -- values --------------------------------------------------------------

    def _vault(self, dialect: Dialect) -> Any:
        vault = vault_for(dialect)
        binding = self._binding
        if vault is None:
            raise VaultNotFoundError(
                f"engine dialect {dialect.name}",
                table=binding.scope if binding else None,
                column=binding.column if binding else None,
            )
        if binding is None:
            raise ConfigurationError(
                "this KMSEncrypted type is not attached to a table column, so there is no "
                "table and column to bind its values to"
            )
        return vault

    def process_bind_param(self, value: Any, dialect: Dialect) -> bytes | None:
        if value is None:
            return None
        binding = self._binding
        try:
            vault = self._vault(dialect)
            assert binding is not None
            plaintext = self._codec.encode(value)
            if self.deterministic:
                return vault.encrypt_deterministic(  # type: ignore[no-any-return]
                    binding.scope, binding.column, binding.aad, plaintext
                )
            return vault.encrypt(binding.scope, binding.aad, plaintext)  # type: ignore[no-any-return]
        except SQLAlchemyKMSError as error:
            raise _with_context(error, binding) from None

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        binding = self._binding
        try:
            vault = self._vault(dialect)
            assert binding is not None
            if not isinstance(value, bytes):
                if isinstance(value, (bytearray, memoryview)):
                    value = bytes(value)
                else:
                    raise InvalidCiphertextError(
                        f"stored value is {type(value).__name__}, not an encrypted value"
                    )
            plaintext = vault.decrypt(binding.scope, binding.column, binding.aad, value)
        except SQLAlchemyKMSError as error:
            raise _with_context(error, binding) from None
        try:
            return self._codec.decode(plaintext)
        except (ValueError, KeyError, UnicodeDecodeError):
            raise DecryptionError(
                f"decrypted value is not a valid {self._codec.name}",
                table=binding.scope,
                column=binding.column,
            ) from None


def _make_key_for_new_table(table: Table, connection: Any, **kw: Any) -> None:
    """``after_create``: make the new table's data key ahead of its first write."""
    vault = vault_for(connection.dialect)
    if vault is None:
        return
    with contextlib.suppress(KeyTableMissingError):  # else made on first use
        vault.create_key(table)


@event.listens_for(Engine, "handle_error")
def _raise_own_errors(context: ExceptionContext) -> BaseException | None:
    """Raise our errors as themselves, not wrapped in ``StatementError``.

    SQLAlchemy wraps exceptions raised while binding parameters in a
    ``StatementError`` whose message lists the parameters: for an encrypted
    column those are plaintext. Our errors carry table and column instead.
    """
    original = context.original_exception
    if isinstance(original, SQLAlchemyKMSError):
        return original.with_traceback(None)
    return None
