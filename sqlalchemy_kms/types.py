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
from collections.abc import Callable, Iterable
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
from sqlalchemy import types as sqltypes
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect, Engine, ExceptionContext
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.visitors import iterate

from ._codecs import Codec, codec_for
from ._format import (
    DETERMINISTIC_OVERHEAD,
    MAX_OVERHEAD,
    RANDOMIZED_OVERHEAD,
    parse_header,
)
from ._keytable import KeySeries, depend_on_key_table, table_scope
from ._query import (
    PRIMARY_KEY_REASON,
    RELATIONSHIP_HINT,
    SEARCH_SLOTS,
    VAULT_ATTR,
    Binding,
    EncryptedComparator,
    SearchTerm,
    with_context,
)
from .errors import (
    ConfigurationError,
    DecryptionError,
    InvalidCiphertextError,
    KeyTableMissingError,
    SQLAlchemyKMSError,
    UnsupportedQueryError,
    VaultNotFoundError,
)

__all__ = [
    "SEARCH_SLOTS",
    "VAULT_ATTR",
    "KMSEncrypted",
    "encrypted_columns",
    "encrypted_series",
    "refuse_unworkable",
    "result_series",
    "statement_series",
]


def _vault_of(dialect: Dialect | None) -> Any:
    return getattr(dialect, VAULT_ATTR, None)


# no stored value is shorter: anything shorter goes to the complete path, which rejects it
_SHORTEST = min(RANDOMIZED_OVERHEAD, DETERMINISTIC_OVERHEAD)

# VARBINARY up to this size on MySQL/MariaDB (indexable, inside the row); BLOBs beyond.
_MYSQL_VARBINARY_MAX = 8192


class KMSEncrypted(sqltypes.TypeDecorator[Any]):
    """Encrypts the values of ``inner_type`` with the table's KMS-wrapped data key.

    :param inner_type: the type the column would have without encryption
        (``String(200)``, ``Integer``, ``JSON``, ...), class or instance.
    :param deterministic: ``False`` (default) encrypts each value with a
        fresh nonce under the table's data key; equal values look different
        and the column supports only ``IS NULL`` tests. ``True`` encrypts with
        AES-SIV under the table's search key, so equal values in this column
        are stored equal: ``==``, ``!=``, ``in_()``, ``not_in()``, unique
        constraints and indexes work, at the price of revealing which rows
        share a value.
    :param normalize: a function applied to every value before it is
        encrypted and to every value it is compared with (for example
        ``str.lower`` for case-insensitive e-mail addresses). What is read
        back is the normalized value.
    :param accept_plaintext: the transition mode of a column whose existing
        plaintext is being encrypted in place (see
        :meth:`~sqlalchemy_kms.KeyVault.encrypt_column`): reads return a
        stored plaintext value as it is, instead of raising, and equality on a
        deterministic column also matches not yet converted values. Writes
        are always encrypted. Turn it off once the conversion has finished:
        outside this mode a plaintext value is an error, never returned.

    Operators encryption cannot answer (``like``, ``<``, ``between``,
    ``asc()``, ``==`` on a randomized column, ...) raise
    :class:`~sqlalchemy_kms.errors.UnsupportedQueryError` when the
    expression is built (or compiled, when the column is not the left-hand
    operand). Definitions it cannot honour (a primary key, a foreign key, a
    value the database computes, a unique constraint or index on a
    randomized column) raise when the table is defined.

    Example::

        >>> from sqlalchemy import Column, Integer, MetaData, String, Table
        >>> patients = Table("patients", MetaData(),
        ...                  Column("id", Integer, primary_key=True),
        ...                  Column("name", KMSEncrypted(String(200))))
        >>> patients.c.name.type
        KMSEncrypted(String(length=200))
        >>> patients.c.name.like("%kim%")
        Traceback (most recent call last):
        ...
        sqlalchemy_kms.errors.UnsupportedQueryError: patients.name is encrypted: operator 'like' ...
    """

    impl = sqltypes.LargeBinary
    cache_ok = True
    comparator_factory = EncryptedComparator

    def __init__(
        self,
        inner_type: sqltypes.TypeEngine[Any] | type[sqltypes.TypeEngine[Any]],
        deterministic: bool = False,
        normalize: Callable[[Any], Any] | None = None,
        accept_plaintext: bool = False,
    ) -> None:
        inner = sqltypes.to_instance(inner_type)
        if isinstance(inner, KMSEncrypted):
            raise ConfigurationError("KMSEncrypted cannot wrap another KMSEncrypted")
        self.inner_type = inner
        self.deterministic = bool(deterministic)
        self.normalize = normalize
        self.accept_plaintext = bool(accept_plaintext)
        self._codec: Codec = codec_for(inner)
        self._binding: Binding | None = None
        self._column: Column[Any] | None = None
        super().__init__()

    @property
    def _search_term(self) -> SearchTerm:
        """The bind type of this column's equality operands (one per column)."""
        term = self.__dict__.get("_search_term_type")
        if term is None or term.column_type is not self:  # none yet, or copied from another
            term = self.__dict__["_search_term_type"] = SearchTerm(self)
        return term

    def __repr__(self) -> str:
        extra = ", deterministic=True" if self.deterministic else ""
        if self.normalize is not None:
            extra += f", normalize={getattr(self.normalize, '__qualname__', self.normalize)}"
        if self.accept_plaintext:
            extra += ", accept_plaintext=True"
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
            _refuse_unworkable_column(parent, parent.table)
        else:
            event.listen(parent, "after_parent_attach", self._attach_table)
            event.listen(parent, "after_parent_attach", _refuse_unworkable_column)

    def _attach_table(self, column: Column[Any], table: Any) -> None:
        if not isinstance(table, Table) or column.type is not self:
            return
        self._binding = Binding(table_scope(table), column.name, self.deterministic)
        if not event.contains(table, "after_create", _make_key_for_new_table):
            event.listen(table, "after_create", _make_key_for_new_table)
        # the key table joins the table's metadata (create_all, autogenerate) and is
        # created before it, so the table's keys can be made as it is created
        depend_on_key_table(table)
        if not event.contains(table.metadata, "before_create", _check_key_table_first):
            event.listen(table.metadata, "before_create", _check_key_table_first)

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

    def from_legacy(self, stored: Any) -> Any:
        """The value of a stored plaintext (a column not yet encrypted in place)."""
        return self._codec.from_legacy(stored)

    def legacy_text(self, value: Any) -> bytes:
        """``value`` as the plaintext column stored it (UTF-8 text)."""
        return self._codec.legacy_text(value)

    def _vault(self, dialect: Dialect) -> Any:
        vault = _vault_of(dialect)
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

    # The processors SQLAlchemy calls once per value. Their fast paths cover a
    # cached key; everything else (first use, errors, plaintext) goes to
    # process_bind_param / process_result_value, the complete definitions.

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any]:
        complete = self.process_bind_param
        binding = self._binding
        if binding is None or self.normalize is not None:
            return lambda value: complete(value, dialect)
        if self.deterministic:
            return self._deterministic_bind_processor(dialect, binding)
        series, aad = binding.series, binding.aad
        encode = self._codec.encode
        # SQLite's driver binds a bytearray faster than bytes
        as_bytearray = dialect.name == "sqlite"
        # (header, header || aad) of the last active key: bytes only, no key held here
        associated: tuple[bytes, bytes] = (b"", b"")

        def process(value: Any) -> Any:
            nonlocal associated
            vault = getattr(dialect, VAULT_ATTR, None)
            if value is not None and vault is not None:
                keys = vault.keys.fresh(series)
                cipher = keys.active if keys is not None else None
                if cipher is not None:
                    header, assoc = associated
                    if header != cipher.header:
                        header = cipher.header
                        assoc = header + aad
                        associated = (header, assoc)
                    try:
                        return cipher.seal(encode(value), assoc, mutable=as_bytearray)
                    except SQLAlchemyKMSError:
                        pass  # the complete path raises it with its context
            return complete(value, dialect)

        return process

    def _deterministic_bind_processor(
        self, dialect: Dialect, binding: Binding
    ) -> Callable[[Any], Any]:
        complete = self.process_bind_param
        series, scope, column, aad = binding.series, binding.scope, binding.column, binding.aad
        encode = self._codec.encode

        def process(value: Any) -> Any:
            vault = getattr(dialect, VAULT_ATTR, None)
            if value is not None and vault is not None:
                keys = vault.keys.fresh(series)
                cipher = keys.active if keys is not None else None
                if cipher is not None:
                    try:
                        return cipher.seal_deterministic(encode(value), scope, column, aad)
                    except SQLAlchemyKMSError:
                        pass  # the complete path raises it with its context
            return complete(value, dialect)

        return process

    def result_processor(self, dialect: Dialect, coltype: Any) -> Callable[[Any], Any]:
        complete = self.process_result_value
        binding = self._binding
        if binding is None or self.accept_plaintext:
            return lambda value: complete(value, dialect)
        series, column, aad = binding.series, binding.column, binding.aad
        decode = self._codec.decode

        def process(value: Any) -> Any:
            vault = getattr(dialect, VAULT_ATTR, None)
            if value.__class__ is bytes and len(value) >= _SHORTEST and vault is not None:
                keys = vault.keys.fresh(series)
                if keys is not None:
                    try:
                        plaintext = keys.open(value, aad, column)
                        if plaintext is not None:
                            return decode(plaintext)
                    except Exception:  # the complete path raises the documented error
                        pass
            return complete(value, dialect)

        return process

    def process_bind_param(self, value: Any, dialect: Dialect) -> bytes | None:
        if value is None:
            return None
        binding = self._binding
        try:
            vault = self._vault(dialect)
            assert binding is not None
            if self.normalize is not None:
                value = self.normalize(value)
            plaintext = self._codec.encode(value)
            cipher = vault.loader.active(binding.series)
            if self.deterministic:
                return cipher.seal_deterministic(  # type: ignore[no-any-return]
                    plaintext, binding.scope, binding.column, binding.aad
                )
            return cipher.encrypt(plaintext, binding.aad)  # type: ignore[no-any-return]
        except SQLAlchemyKMSError as error:
            raise with_context(error, binding) from None

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        binding = self._binding
        try:
            vault = self._vault(dialect)
            assert binding is not None
            if isinstance(value, (bytearray, memoryview)):
                value = bytes(value)
            if self.accept_plaintext and not _looks_encrypted(value):
                return self._from_plaintext(value, binding, dialect)
            if not isinstance(value, bytes):
                raise InvalidCiphertextError(
                    f"stored value is {type(value).__name__}, not an encrypted value"
                )
            plaintext = vault.decrypt(binding.scope, binding.column, binding.aad, value)
        except SQLAlchemyKMSError as error:
            _count_failure(dialect)
            raise with_context(error, binding) from None
        try:
            return self._codec.decode(plaintext)
        except (ValueError, KeyError, ArithmeticError, RecursionError):
            _count_failure(dialect)
            raise DecryptionError(
                f"decrypted value is not a valid {self._codec.name}",
                table=binding.scope,
                column=binding.column,
            ) from None

    def _from_plaintext(self, value: Any, binding: Binding, dialect: Dialect) -> Any:
        try:
            return self._codec.from_legacy(value)
        except (ValueError, KeyError, ArithmeticError, RecursionError, TypeError):
            _count_failure(dialect)
            raise DecryptionError(
                f"stored plaintext is not a valid {self._codec.name}",
                table=binding.scope,
                column=binding.column,
            ) from None


def _count_failure(dialect: Dialect | None) -> None:
    vault = _vault_of(dialect)
    if vault is not None:
        vault.count_decrypt_failure()


def _looks_encrypted(value: Any) -> bool:
    """Whether a stored value has the header of our format (and so must decrypt)."""
    if not isinstance(value, bytes):
        return False
    try:
        parse_header(value)
    except InvalidCiphertextError:
        return False
    return True


def _check_key_table_first(metadata: Any, connection: Any, **kw: Any) -> None:
    """``before_create`` of a metadata with encrypted tables: refuse, before any DDL, a
    key table other than the vault's (``create_all`` would create the wrong one)."""
    vault = _vault_of(connection.dialect)
    if vault is not None:
        vault.check_key_table(kw.get("tables") or metadata.sorted_tables)


def _make_key_for_new_table(table: Table, connection: Any, **kw: Any) -> None:
    """``after_create``: make the new table's keys ahead of its first write."""
    vault = _vault_of(connection.dialect)
    if vault is None:
        return
    shared = vault.connections.shared()
    if shared is not None and not vault.key_table.exists(shared):
        # asked first: a failed query would abort the shared transaction (PostgreSQL),
        # a migration's included; the keys are made on first use instead
        return
    with contextlib.suppress(KeyTableMissingError):  # else made on first use
        vault.create_keys([table])


# -- definitions encryption cannot honour -------------------------------------
#
# Checked when an encrypted column joins its table, when the table is complete
# (its constraints and indexes attached), when an index or unique constraint is
# added later, and again before the table is created (create_all, Alembic's
# create_table): each raises before anything runs.

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
    column_type = column.type
    if not isinstance(column_type, KMSEncrypted):
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
        column_type = column.type
        if isinstance(column_type, KMSEncrypted) and not column_type.deterministic:
            raise _refusal(column, table, _RANDOMIZED_INDEX)
    for expression in getattr(index, "expressions", ()):
        if isinstance(expression, Column) or not isinstance(expression, ClauseElement):
            continue
        for element in iterate(expression):
            if isinstance(element, Column) and isinstance(element.type, KMSEncrypted):
                raise _refusal(element, table, _EXPRESSION_INDEX)


def _foreign_keys_over_encrypted(table: Table) -> Iterable[tuple[ForeignKey, Column[Any]]]:
    """Each foreign key from or to an encrypted column of ``table`` (the ones from other
    tables of its metadata included), with that encrypted column."""
    others = table.metadata.tables.values() if table.metadata is not None else ()
    for source in (table, *(other for other in others if other is not table)):
        for key in source.foreign_keys:
            if isinstance(key.parent.type, KMSEncrypted):
                yield key, key.parent
                continue
            try:
                target = key.column
            except sa_exc.NoReferenceError:  # not defined yet: checked again at create
                continue
            if isinstance(target.type, KMSEncrypted) and (source is table or target.table is table):
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
        if isinstance(key.parent.type, KMSEncrypted):
            raise _foreign_key_refusal(key.parent)
        try:
            target = key.column
        except sa_exc.NoReferenceError:  # not defined yet: checked when it is, and at create
            continue
        if isinstance(target.type, KMSEncrypted):
            raise _foreign_key_refusal(target)


def _refuse_unworkable_column(column: Column[Any], table: Any) -> None:
    """``after_parent_attach`` of an encrypted column: check it now, its table once
    complete and before it is created."""
    if not isinstance(table, Table) or not isinstance(column.type, KMSEncrypted):
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


def encrypted_columns(table: Table) -> list[Column[Any]]:
    """The columns of ``table`` whose type is :class:`KMSEncrypted`."""
    return [column for column in table.columns if isinstance(column.type, KMSEncrypted)]


def encrypted_series(tables: Iterable[Table]) -> list[KeySeries]:
    """The key series the encrypted columns of ``tables`` use, in table order: the
    table's data key for randomized columns, its search key for deterministic ones."""
    found: list[KeySeries] = []
    for table in tables:
        modes = {
            column.type.deterministic  # type: ignore[attr-defined]
            for column in encrypted_columns(table)
        }
        found.extend(
            KeySeries(table_scope(table), deterministic)
            for deterministic in (False, True)
            if deterministic in modes
        )
    return found


def statement_series(compiled: Any) -> frozenset[KeySeries]:
    """The key series a compiled statement uses: its encrypted result columns, and
    the encrypted values and equality operands it binds."""
    found = set(result_series(compiled))
    for bind in (getattr(compiled, "binds", None) or {}).values():
        column_type = getattr(bind.type, "column_type", bind.type)  # SearchTerm's column
        if isinstance(column_type, KMSEncrypted) and column_type._binding is not None:
            found.add(column_type._binding.series)
    return frozenset(found)


def result_series(compiled: Any) -> frozenset[KeySeries]:
    """The key series the encrypted result columns of a compiled statement use."""
    found = set()
    for entry in getattr(compiled, "_result_columns", None) or ():
        column_type = entry[3]
        if isinstance(column_type, KMSEncrypted) and column_type._binding is not None:
            found.add(column_type._binding.series)
    return frozenset(found)
