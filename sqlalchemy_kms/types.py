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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy import Column, MetaData, Table, event
from sqlalchemy import exc as sa_exc
from sqlalchemy import types as sqltypes
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect, Engine, ExceptionContext

from ._codecs import Codec, codec_for
from ._definitions import refuse_unworkable, refuse_unworkable_column
from ._format import (
    DETERMINISTIC_OVERHEAD,
    MAX_OVERHEAD,
    RANDOMIZED_OVERHEAD,
    parse_header,
)
from ._keytable import KeySeries, depend_on_key_table, table_scope
from ._query import (
    SEARCH_SLOTS,
    VAULT_ATTR,
    Binding,
    EncryptedComparator,
    SearchTerm,
    concealed,
    converted,
    with_context,
)
from .errors import (
    ConfigurationError,
    DecryptionError,
    InvalidCiphertextError,
    KeyTableMissingError,
    SQLAlchemyKMSError,
    VaultNotFoundError,
)

__all__ = [
    "HIDDEN",
    "SEARCH_SLOTS",
    "UNKNOWN",
    "VAULT_ATTR",
    "KMSEncrypted",
    "encrypted_columns",
    "encrypted_series",
    "refuse_unworkable",
    "result_series",
    "statement_series",
    "tables_of",
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
            refuse_unworkable_column(parent, parent.table)
        else:
            event.listen(parent, "after_parent_attach", self._attach_table)
            event.listen(parent, "after_parent_attach", refuse_unworkable_column)

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
                    except Exception:  # the complete path raises it as EncryptionError
                        pass
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
                    except Exception:  # the complete path raises it as EncryptionError
                        pass
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
            plaintext = self._encode(value)
            cipher = vault.loader.active(binding.series)
            with converted():
                if self.deterministic:
                    return cipher.seal_deterministic(  # type: ignore[no-any-return]
                        plaintext, binding.scope, binding.column, binding.aad
                    )
                return cipher.encrypt(plaintext, binding.aad)  # type: ignore[no-any-return]
        except SQLAlchemyKMSError as error:
            failure = with_context(error, binding)
        raise concealed(failure) from None

    def _encode(self, value: Any) -> bytes:
        """The bytes ``value`` is encrypted as: normalized, then encoded by the inner
        type's codec. Whatever goes wrong raises ``EncryptionError``, never showing
        the value."""
        if self.normalize is not None:
            with converted("normalize="):
                value = self.normalize(value)
        with converted():
            return self._codec.encode(value)

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


@event.listens_for(Engine, "handle_error")
def _raise_own_errors(context: ExceptionContext) -> BaseException | None:
    """Raise our errors as themselves, and keep plaintext out of SQLAlchemy's.

    SQLAlchemy wraps exceptions raised while binding parameters in a
    ``StatementError`` whose message lists the parameters: for an encrypted
    column those are plaintext. Our errors carry table and column instead.
    Another error of a statement on an engine with a vault (a bad value for a
    plain column, a constraint the database enforces) keeps its type, and its
    parameters show :data:`HIDDEN` for the values of encrypted columns, or
    :data:`UNKNOWN` for every value when the statement failed before
    SQLAlchemy could say which parameter is which column.
    """
    original = context.original_exception
    if isinstance(original, SQLAlchemyKMSError):
        return original.with_traceback(None)
    if _vault_of(context.dialect) is not None:
        for error in (context.sqlalchemy_exception, original):
            if isinstance(error, sa_exc.StatementError) and error.params:
                error.params = _scrubbed(error.params, _parameter_names(context), error.ismulti)
    return None


#: What an error's parameters show in place of a value of an encrypted column.
HIDDEN = "<encrypted>"
#: ... in place of every value of a statement whose parameters are not known by column.
UNKNOWN = "<hidden>"


class _Names:
    """Which parameters of a failed statement are values of encrypted columns."""

    __slots__ = ("plain", "positions", "secret")

    def __init__(self, compiled: Any) -> None:
        binds = getattr(compiled, "binds", None) or {}
        encrypted = {
            name
            for name, bind in binds.items()
            if isinstance(bind.type, (KMSEncrypted, SearchTerm))
        }
        self.secret = bool(encrypted)
        self.plain = frozenset(binds) - encrypted
        positions = getattr(compiled, "positiontup", None)
        if getattr(compiled, "post_compile_params", None):
            positions = None  # expanded when run: the positions are no longer these
        self.positions: list[str] | None = list(positions) if positions else None

    def hides(self, name: Any) -> bool:
        # a name the statement does not know (an expanded IN list, a batch of
        # insertmanyvalues) is hidden when the statement has encrypted values at all
        return self.secret and name not in self.plain


def _parameter_names(context: ExceptionContext) -> _Names | None:
    """The names of the failed statement's parameters; ``None`` if not known (the
    statement failed while its parameters were being processed)."""
    compiled = getattr(context.execution_context, "compiled", None)
    return None if compiled is None else _Names(compiled)


def _scrubbed(params: Any, names: _Names | None, multi: bool | None) -> Any:
    """``params`` (one row or several, by name or by position) with the values of
    encrypted columns replaced by :data:`HIDDEN`, or every value by :data:`UNKNOWN`
    when ``names`` is ``None``."""
    if isinstance(params, Mapping):
        return {
            key: UNKNOWN if names is None else HIDDEN if names.hides(key) else value
            for key, value in params.items()
        }
    if not isinstance(params, (list, tuple)):
        return params
    rows = multi or (bool(params) and all(isinstance(row, Mapping) for row in params))
    if rows:
        return [_scrubbed(row, names, False) for row in params]
    if names is not None and not names.secret:
        return params
    positions = names.positions if names is not None else None
    if positions is None or len(positions) != len(params):
        return type(params)(UNKNOWN if names is None else HIDDEN for _ in params)
    return type(params)(
        HIDDEN if names is not None and names.hides(name) else value
        for name, value in zip(positions, params, strict=True)
    )


def tables_of(tables: MetaData | Table | Iterable[Table]) -> list[Table]:
    """The tables a vault method was given: a ``Table``, a list of them or a ``MetaData``."""
    if isinstance(tables, MetaData):
        return list(tables.sorted_tables)
    if isinstance(tables, Table):
        return [tables]
    return list(tables)


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
