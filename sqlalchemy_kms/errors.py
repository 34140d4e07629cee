"""Every exception sqlalchemy-kms raises on purpose.

All of them derive from :class:`SQLAlchemyKMSError`, so one ``except`` clause
catches everything the library refuses or fails at::

    SQLAlchemyKMSError
    ├── ConfigurationError            the library is set up wrongly
    │   ├── VaultNotFoundError        an engine without a KeyVault touched an encrypted column
    │   └── KeyTableMissingError      the key table does not exist yet
    ├── KeyLifecycleError             a key operation is refused (retire a key in use, ...)
    ├── EncryptionError               a value could not be encrypted
    │   └── ValueTooLongError         longer than the declared String(n) / LargeBinary(n)
    ├── UnsupportedQueryError         an operator encryption cannot answer
    ├── DecryptionError               "this stored value is invalid"
    │   ├── InvalidCiphertextError    tampered, truncated, moved to another column, not ours
    │   └── UnknownKeyVersionError    the key id in the value is not in the key table
    └── KMSError                      "the KMS failed or denied access"
        ├── KMSAccessDeniedError      AccessDeniedException
        ├── KMSKeyDisabledError       DisabledException, KMSInvalidStateException
        ├── KMSKeyNotFoundError       NotFoundException
        ├── KMSInvalidCiphertextError the master key refused the wrapped data key
        │   └── ForeignMasterKeyError a key row of a master key the provider was not given
        └── KMSUnavailableError       the KMS could not be reached or kept throttling

Errors carry what they are about as attributes (``table``, ``column``,
``key_version``, ``master_key_id``, ``operation``) and name those in their
message. They never carry plaintext, data keys or stored values.

Example::

    >>> from sqlalchemy_kms.errors import DecryptionError, SQLAlchemyKMSError
    >>> err = DecryptionError("authentication tag does not match", table="patients",
    ...                       column="name", key_version=1)
    >>> str(err)
    'cannot decrypt patients.name (key version 1): authentication tag does not match'
    >>> isinstance(err, SQLAlchemyKMSError)
    True
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigurationError",
    "DecryptionError",
    "EncryptionError",
    "ForeignMasterKeyError",
    "InvalidCiphertextError",
    "KMSAccessDeniedError",
    "KMSError",
    "KMSInvalidCiphertextError",
    "KMSKeyDisabledError",
    "KMSKeyNotFoundError",
    "KMSUnavailableError",
    "KeyLifecycleError",
    "KeyTableMissingError",
    "SQLAlchemyKMSError",
    "UnknownKeyVersionError",
    "UnsupportedQueryError",
    "ValueTooLongError",
    "VaultNotFoundError",
]


def _where(table: str | None, column: str | None) -> str:
    if table and column:
        return f"{table}.{column}"
    return table or column or "an encrypted column"


class SQLAlchemyKMSError(Exception):
    """Base class of every error raised by sqlalchemy-kms.

    Attributes name what the error is about; any of them may be ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        table: str | None = None,
        column: str | None = None,
        key_version: int | None = None,
        master_key_id: str | None = None,
        operation: str | None = None,
    ) -> None:
        self.reason = message
        self.table = table
        self.column = column
        self.key_version = key_version
        self.master_key_id = master_key_id
        self.operation = operation
        super().__init__(self._render())

    def _render(self) -> str:
        if self.table or self.column:
            return f"{self.reason} ({_where(self.table, self.column)})"
        return self.reason

    def __reduce__(self) -> tuple[object, ...]:  # keep attributes across pickling
        return (_rebuild, (type(self), self.reason, self.__dict__.copy()))


def _rebuild(
    cls: type[SQLAlchemyKMSError], message: str, state: dict[str, object]
) -> SQLAlchemyKMSError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    Exception.__init__(err, err._render())
    return err


class ConfigurationError(SQLAlchemyKMSError):
    """The library is used in a way it cannot work: fix the code, not the data."""


class VaultNotFoundError(ConfigurationError):
    """An engine that has no :class:`~sqlalchemy_kms.KeyVault` touched an encrypted column."""

    def _render(self) -> str:
        return (
            f"no KeyVault is bound to this engine, so column {_where(self.table, self.column)} "
            "cannot be encrypted or decrypted; create one with KeyVault(engine, provider) "
            f"before using the engine ({self.reason})"
        )


class KeyTableMissingError(ConfigurationError):
    """The key table does not exist: call ``vault.create_table()`` or run the migration."""


class KeyLifecycleError(SQLAlchemyKMSError):
    """A key lifecycle operation is refused: retiring a key that rows still use,
    destroying a key that is not retired or without confirmation, importing a
    conflicting key."""

    def _render(self) -> str:
        version = f" key version {self.key_version}" if self.key_version is not None else ""
        where = f"{self.table}{version}: " if self.table else ""
        return f"{where}{self.reason}"


class EncryptionError(SQLAlchemyKMSError):
    """A value could not be encrypted (wrong type, too long, out of range)."""

    def _render(self) -> str:
        return f"cannot encrypt a value for {_where(self.table, self.column)}: {self.reason}"


class ValueTooLongError(EncryptionError, ValueError):
    """The value is longer than the length declared on the inner type."""


class UnsupportedQueryError(SQLAlchemyKMSError):
    """A query asks the database for something it cannot compute on ciphertext.

    Raised when the expression is built (``User.name.like("%kim%")``), never
    by returning wrong or empty results. ``operator`` names the operator.
    """

    def __init__(self, message: str, *, operator: str | None = None, **kwargs: Any) -> None:
        self.operator = operator
        super().__init__(message, **kwargs)

    def _render(self) -> str:
        operator = f"operator {self.operator!r}" if self.operator else "this operator"
        return f"{_where(self.table, self.column)} is encrypted: {operator} cannot work on it. " + (
            self.reason
        )


class DecryptionError(SQLAlchemyKMSError):
    """A stored value is not a valid ciphertext for this column.

    Raised, never a guessed value, when a stored value was tampered with,
    truncated, copied from another column or table, or is not in our format.
    """

    def _render(self) -> str:
        where = _where(self.table, self.column)
        version = f" (key version {self.key_version})" if self.key_version is not None else ""
        return f"cannot decrypt {where}{version}: {self.reason}"


class InvalidCiphertextError(DecryptionError):
    """The stored value fails authentication or is malformed."""


class UnknownKeyVersionError(DecryptionError):
    """The stored value names a data key version that the key table does not hold."""


class KMSError(SQLAlchemyKMSError):
    """The key management service failed or refused: the stored data may be fine."""

    def _render(self) -> str:
        parts = []
        if self.operation:
            parts.append(f"KMS {self.operation} failed")
        else:
            parts.append("KMS call failed")
        if self.table and self.column:
            parts.append(f"for column {self.table}.{self.column}")
        elif self.table:
            parts.append(f"for table {self.table}")
        if self.key_version is not None:
            parts.append(f"key version {self.key_version}")
        if self.master_key_id:
            parts.append(f"master key {self.master_key_id}")
        return " ".join(parts) + f": {self.reason}"


class KMSAccessDeniedError(KMSError):
    """The caller may not use the master key (``AccessDeniedException``)."""


class KMSKeyDisabledError(KMSError):
    """The master key is disabled or pending deletion (``DisabledException``,
    ``KMSInvalidStateException``)."""


class KMSKeyNotFoundError(KMSError):
    """The master key does not exist (``NotFoundException``)."""


class KMSInvalidCiphertextError(KMSError):
    """The master key could not unwrap the stored data key: a wrong master key,
    a wrong encryption context, or a damaged wrapped key."""


class ForeignMasterKeyError(KMSInvalidCiphertextError):
    """A key row is wrapped under a master key the provider was not given: refused
    before it is unwrapped or used.

    A provider uses only keys wrapped by its own master key (AWS KMS: the
    configured key and the key ARN behind it) and by the master keys named
    with it in a :class:`~sqlalchemy_kms.providers.multi.MultiKms` (the old
    key of a rewrap). Any other row is either a master key to name (the
    vault was opened with the wrong key, or a rewrap's old key is missing)
    or a row that someone with write access to the key table inserted to
    have new values encrypted under a data key of their own.
    ``master_key_id`` is the master key the row records (or, when the KMS
    answered with another key than the row names, the one it answered with).
    """

    def _render(self) -> str:
        parts = [f"{self.operation or 'unwrap'} refused"]
        if self.table and self.column:
            parts.append(f"for column {self.table}.{self.column}")
        elif self.table:
            parts.append(f"for table {self.table}")
        if self.key_version is not None:
            parts.append(f"key version {self.key_version}")
        if self.master_key_id:
            parts.append(f"master key {self.master_key_id}")
        return " ".join(parts) + f": {self.reason}"


class KMSUnavailableError(KMSError):
    """The KMS could not be reached in time, or kept throttling after retries."""
