"""Moving a column's stored values online: re-encrypt under the active key, or encrypt
plaintext in place, or write the plaintext back.

Each is one :func:`~sqlalchemy_kms.lifecycle.rewrite.rewrite_rows` job with
its own transform. Values are decrypted and encrypted by the column types'
own processors (their fast paths, and their documented errors), through the
vault bound to the engine. Re-encryption first tries its own fast path: a
value that a held key opens is decoded, encoded and sealed under the held
active key in one step; anything else (a key not held, a value that does not
open or decode) takes the processors' complete path, which raises the
documented error.

Example::

    vault.rotate_key(patients)                  # new writes use key 2 at once
    vault.reencrypt(patients, progress=print)   # move old rows to key 2
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Column, LargeBinary, Table
from sqlalchemy.engine import Connection

from .._connections import Connections
from .._format import ALG_DETERMINISTIC, ALG_RANDOMIZED, HEADER_SIZE, pack_header, parse_header
from .._keytable import KeySeries, table_scope
from .._query import VAULT_ATTR
from ..errors import InvalidCiphertextError, KeyLifecycleError
from ..types import KMSEncrypted, encrypted_columns
from .rewrite import Progress, ProgressCallback, Transform, rewrite_rows, stored_bytes

__all__ = ["chosen_columns", "decrypt_column", "encrypt_column", "reencrypt", "reencrypt_tables"]

#: The active version of a key series (made if it has none).
ActiveVersion = Callable[[KeySeries], int]


def _parses(raw: bytes) -> bool:
    try:
        parse_header(raw)
    except InvalidCiphertextError:
        return False
    return True


def chosen_columns(table: Table, names: Sequence[str] | None) -> list[Column[Any]]:
    """The encrypted columns of ``table`` (or those named); refuses other names."""
    columns = encrypted_columns(table)
    if names is not None:
        columns = [column for column in columns if column.name in set(names)]
        unknown = set(names) - {column.name for column in columns}
        if unknown:
            raise KeyLifecycleError(
                f"not encrypted columns of the table: {', '.join(sorted(unknown))}",
                table=table_scope(table),
            )
    return columns


@contextmanager
def _using(connections: Connections, connection: Connection | None) -> Iterator[None]:
    if connection is None:
        yield
    else:
        with connections.using(connection):
            yield


def _encrypting_transform(
    connections: Connections, table: Table, active_version: ActiveVersion, *, legacy: bool
) -> Transform:
    """Re-encrypt every value not under the table's active key (and, with
    ``legacy``, encrypt plaintext values)."""
    scope = table_scope(table)
    targets: dict[bool, bytes] = {}

    def target_header(deterministic: bool) -> bytes:
        header = targets.get(deterministic)
        if header is None:  # asked once per mode, and only for a mode the table uses
            algorithm = ALG_DETERMINISTIC if deterministic else ALG_RANDOMIZED
            version = active_version(KeySeries(scope, deterministic))
            header = targets[deterministic] = pack_header(algorithm, version)
        return header

    dialect = connections.engine.dialect
    as_bytearray = dialect.name == "sqlite"  # as the column types bind values there

    def for_column(column: Column[Any]) -> Callable[[Sequence[Any]], list[Any]]:
        column_type: KMSEncrypted = column.type  # type: ignore[assignment]
        deterministic = column_type.deterministic
        # the column type's own processors: their fast paths, and their errors
        decrypt = column_type.result_processor(dialect, None)
        encrypt = column_type.bind_processor(dialect)
        binding = column_type._binding
        # the fast path: open with a held key, decode, encode, seal under the held
        # active key; not for columns whose writes normalize values (the bind
        # processor's complete path applies normalize)
        fast = binding is not None and column_type.normalize is None
        series = KeySeries(scope, deterministic)
        name, aad = column.name, binding.aad if binding is not None else b""
        decode, encode = column_type._codec.decode, column_type._codec.encode
        target = b""  # the active key's header, asked at the first value

        def complete(stored: Any, raw: bytes | None) -> Any:
            if raw is not None and _parses(raw):
                value = decrypt(raw)
            elif legacy:
                value = column_type.from_legacy(stored)
            else:
                raise InvalidCiphertextError(
                    "stored value is plaintext; encrypt the column with encrypt_column()",
                    table=scope,
                    column=name,
                )
            return encrypt(value)

        def transform(values: Sequence[Any]) -> list[Any]:
            nonlocal target
            vault = getattr(dialect, VAULT_ATTR, None) if fast else None
            store = vault.keys if vault is not None else None
            sealing: Any = None  # the active key of the last value, and header || aad
            associated = b""
            moved: list[Any] = []
            for stored in values:
                if stored is None:
                    moved.append(None)
                    continue
                raw = stored if stored.__class__ is bytes else stored_bytes(stored)
                if raw is None:
                    moved.append(complete(stored, raw))
                    continue
                if not target:
                    target = target_header(deterministic)
                if raw[:HEADER_SIZE] == target:
                    moved.append(None)  # already under the active key
                    continue
                sealed = None
                keys = store.fresh(series) if store is not None else None
                cipher = keys.active if keys is not None else None
                if cipher is not None:
                    try:
                        plaintext = keys.open(raw, aad, name)  # type: ignore[union-attr]
                        if plaintext is not None:
                            data = encode(decode(plaintext))
                            if deterministic:
                                sealed = cipher.seal_deterministic(data, scope, name, aad)
                            else:
                                if cipher is not sealing:
                                    sealing, associated = cipher, cipher.header + aad
                                sealed = cipher.seal(data, associated, mutable=as_bytearray)
                    except Exception:  # the complete path raises the documented error
                        sealed = None
                moved.append(complete(stored, raw) if sealed is None else sealed)
            return moved

        return transform

    return for_column


def reencrypt(
    connections: Connections,
    table: Table,
    active_version: ActiveVersion,
    *,
    columns: Sequence[str] | None = None,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    connection: Connection | None = None,
) -> Progress:
    """Move every encrypted value of ``table`` to the active data key (randomized
    columns) or search key (deterministic columns)."""
    chosen = chosen_columns(table, columns)
    with _using(connections, connection):
        transform = _encrypting_transform(connections, table, active_version, legacy=False)
        return rewrite_rows(
            connections.engine,
            table,
            chosen,
            transform,
            batch_size=batch_size,
            progress=progress,
            connection=connection,
        )


def encrypt_column(
    connections: Connections,
    table: Table,
    column: str,
    active_version: ActiveVersion,
    *,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    connection: Connection | None = None,
) -> Progress:
    """Encrypt the plaintext values of ``table.c[column]`` in place.

    ``table`` describes the column as it will be: ``KMSEncrypted(...)``. The
    database column must already hold binary values or, on SQLite, any value
    (see :func:`~sqlalchemy_kms.lifecycle.ddl.plaintext_to_binary_ddl`).
    """
    target = chosen_columns(table, [column])
    with _using(connections, connection):
        transform = _encrypting_transform(connections, table, active_version, legacy=True)
        return rewrite_rows(
            connections.engine,
            table,
            target,
            transform,
            batch_size=batch_size,
            progress=progress,
            connection=connection,
        )


def decrypt_column(
    connections: Connections,
    table: Table,
    column: str,
    *,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    connection: Connection | None = None,
) -> Progress:
    """Write the plaintext of ``table.c[column]`` back in place (the reverse step).

    On PostgreSQL and MySQL the binary column receives each value's text as
    UTF-8 bytes, ready for :func:`~sqlalchemy_kms.lifecycle.ddl.binary_to_plaintext_ddl`;
    on SQLite it receives the value as the plaintext type stores it.
    """
    [target] = chosen_columns(table, [column])
    column_type: KMSEncrypted = target.type  # type: ignore[assignment]
    dialect = connections.engine.dialect
    sqlite = dialect.name == "sqlite"
    decrypt = column_type.result_processor(dialect, None)

    def plaintext(stored: Any) -> Any:
        raw = stored_bytes(stored)
        if raw is None or not _parses(raw):
            return None  # NULL, or plaintext already
        value = decrypt(raw)
        return value if sqlite else column_type.legacy_text(value)

    def transform(col: Column[Any]) -> Callable[[Sequence[Any]], list[Any]]:
        return lambda values: [plaintext(stored) for stored in values]

    def value_type(col: Column[Any]) -> Any:
        return column_type.inner_type if sqlite else LargeBinary()

    with _using(connections, connection):
        return rewrite_rows(
            connections.engine,
            table,
            [target],
            transform,
            batch_size=batch_size,
            progress=progress,
            connection=connection,
            new_value_type=value_type,
        )


def reencrypt_tables(
    connections: Connections,
    tables: Sequence[Table],
    active_version: ActiveVersion,
    *,
    columns: Sequence[str] | None = None,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
    connection: Connection | None = None,
) -> Progress:
    """:func:`reencrypt` each table of ``tables`` that has encrypted columns, in turn;
    ``columns`` names columns of any of them. The returned progress adds them up."""
    if len(tables) == 1:  # one table: its own progress, and its own errors
        return reencrypt(
            connections,
            tables[0],
            active_version,
            columns=columns,
            batch_size=batch_size,
            progress=progress,
            connection=connection,
        )
    chosen = [table for table in tables if encrypted_columns(table)]
    if columns is not None:
        known = {column.name for table in chosen for column in encrypted_columns(table)}
        unknown = set(columns) - known
        if unknown:
            raise KeyLifecycleError(
                f"not encrypted columns of the tables: {', '.join(sorted(unknown))}"
            )
        chosen = [t for t in chosen if any(c.name in columns for c in encrypted_columns(t))]
    total = Progress(table=", ".join(table_scope(table) for table in chosen), total=0)
    for table in chosen:
        names = None if columns is None else [name for name in columns if name in table.c]
        done = reencrypt(
            connections,
            table,
            active_version,
            columns=names,
            batch_size=batch_size,
            progress=progress,
            connection=connection,
        )
        total.total += done.total
        total.scanned += done.scanned
        total.rewritten += done.rewritten
        total.conflicts += done.conflicts
    return total
