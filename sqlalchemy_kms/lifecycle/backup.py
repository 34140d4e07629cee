"""Backing up the key table and restoring it: wrapped keys only, as JSON-ready data.

An export holds the wrapped keys and their metadata, never a data key in
plaintext: it is as safe to keep as the key table itself (and as useless
without the master key). Importing restores missing rows (all of them, one
table's, or one key version) and refuses, as a whole, an export with any
invalid row or any row that conflicts with one the key table holds.

Restoring one destroyed version from a backup::

    vault.import_keys(json.load(open("keys.json")), table=patients, version=1)
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Final

from sqlalchemy import Table

from .._connections import Connections
from .._format import MAX_KEY_VERSION
from .._keytable import PURPOSES, STATES, KeySeries, KeyTable, scope_of
from ..audit import key_event
from ..errors import KeyLifecycleError

__all__ = [
    "EXPORT_FILE_MODE",
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "export_keys",
    "import_keys",
    "read_export",
    "select_keys",
    "write_export",
]

#: The ``format`` field of an export.
EXPORT_FORMAT: Final = "sqlalchemy-kms-keys"
#: The ``version`` field of an export.
EXPORT_VERSION: Final = 1


def export_keys(keys: KeyTable, connections: Connections) -> dict[str, Any]:
    """The key table as JSON-ready data: wrapped keys only, safe to keep as a backup."""
    with connections.reading() as conn:
        rows = keys.rows(conn)
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "keys": [
            {
                "scope": row.series.scope,
                "purpose": row.series.purpose,
                "key_version": row.version,
                "state": row.state,
                "provider": row.provider,
                "master_key_id": row.master_key_id,
                "wrapped_key": base64.b64encode(row.wrapped).decode("ascii"),
                "created_at": row.created_at.isoformat() if row.created_at else None,
            }
            for row in rows
        ],
    }


# the longest text the key table's columns hold
_TEXT_LIMITS: Final = {"scope": 255, "provider": 32, "master_key_id": 2048}


class _Damaged(Exception):
    """Why one row of an export cannot be imported (becomes a KeyLifecycleError)."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _field(item: Mapping[str, Any], name: str) -> Any:
    if name not in item:
        raise _Damaged(f"it has no {name!r}")
    return item[name]


def _text(item: Mapping[str, Any], name: str) -> str:
    value = _field(item, name)
    limit = _TEXT_LIMITS[name]
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _Damaged(f"{name} must be a text of 1 to {limit} characters, not {_shown(value)}")
    return value


def _one_of(item: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    value = _field(item, name)
    if not isinstance(value, str) or value not in allowed:
        spelled = " or ".join(repr(a) for a in allowed)
        raise _Damaged(f"{name} must be {spelled}, not {_shown(value)}")
    return value


def _imported_row(item: Any) -> dict[str, Any]:
    """The key-table row of one exported key, checked field by field."""
    if not isinstance(item, Mapping):
        raise _Damaged(f"it is not an object but {_shown(item)}")
    version = _field(item, "key_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _Damaged(f"key_version must be an integer, not {_shown(version)}")
    if not 1 <= version <= MAX_KEY_VERSION:
        raise _Damaged(f"key_version must be in 1..{MAX_KEY_VERSION}, not {version}")
    wrapped = _field(item, "wrapped_key")
    try:
        if not isinstance(wrapped, str):
            raise TypeError
        wrapped_key = base64.b64decode(wrapped, validate=True)
    except (TypeError, binascii.Error):
        raise _Damaged(f"wrapped_key is not base64: {_shown(wrapped)}") from None
    if not wrapped_key:
        raise _Damaged("wrapped_key is empty")
    created = item.get("created_at")
    try:
        created_at = (
            dt.datetime.fromisoformat(created) if created else dt.datetime.now(dt.timezone.utc)
        )
    except (TypeError, ValueError):
        raise _Damaged(f"created_at is not an ISO 8601 time: {_shown(created)}") from None
    return {
        "scope": _text(item, "scope"),
        "purpose": _one_of(item, "purpose", PURPOSES),
        "key_version": version,
        "state": _one_of(item, "state", STATES),
        "provider": _text(item, "provider"),
        "master_key_id": _text(item, "master_key_id"),
        "wrapped_key": wrapped_key,
        "created_at": created_at,
    }


def _ident(row: Mapping[str, Any]) -> tuple[str, str, int]:
    return (row["scope"], row["purpose"], row["key_version"])


def read_export(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    r"""The key-table rows of :func:`export_keys` data, every one checked.

    Refuses the whole export (:class:`~sqlalchemy_kms.errors.KeyLifecycleError`)
    if any row is invalid: a state other than ``enabled`` or ``retired``, a
    purpose other than ``data`` or ``search``, a version outside 1 to
    2**31 - 1 (what a stored value's header can name), text too long for the
    key table, a wrapped key that is not base64, the same key twice.
    """
    if (
        not isinstance(data, Mapping)
        or data.get("format") != EXPORT_FORMAT
        or data.get("version") != EXPORT_VERSION
        or not isinstance(data.get("keys"), list)
    ):
        raise KeyLifecycleError("not a sqlalchemy-kms key export (format version 1)")
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str, int]] = set()
    for number, item in enumerate(data["keys"], start=1):
        try:
            row = _imported_row(item)
            if _ident(row) in seen:
                raise _Damaged("the same table, purpose and version came before")
        except _Damaged as error:
            raise KeyLifecycleError(
                f"the key export is damaged: key {number}: {error}; nothing imported"
            ) from None
        seen.add(_ident(row))
        rows.append(row)
    return rows


def select_keys(
    rows: Sequence[Mapping[str, Any]],
    *,
    table: Table | str | None = None,
    version: int | None = None,
    search: bool = False,
) -> list[Mapping[str, Any]]:
    """The rows of one table (``table``), or of one version of its data key
    (``version``) or search key (``version`` and ``search=True``); all rows when
    ``table`` is ``None``. ``KeyLifecycleError`` when ``table`` is given and no
    row matches."""
    if table is None:
        if version is not None or search:
            raise ValueError("version= and search= choose a key of one table: give table= too")
        return list(rows)
    if search and version is None:
        raise ValueError("search= chooses a search key version: give version= too")
    scope = scope_of(table)
    purpose = KeySeries(scope, search).purpose
    chosen = [
        row
        for row in rows
        if row["scope"] == scope
        and (version is None or (row["purpose"], row["key_version"]) == (purpose, version))
    ]
    if not chosen:
        what = f"no keys of {scope}"
        if version is not None:
            what = f"no {'search' if search else 'data'} key version {version} of {scope}"
        raise KeyLifecycleError(
            f"the key export holds {what}; nothing imported", table=scope, key_version=version
        )
    return chosen


def import_keys(
    keys: KeyTable,
    connections: Connections,
    data: Mapping[str, Any],
    *,
    table: Table | str | None = None,
    version: int | None = None,
    search: bool = False,
) -> int:
    """Restore keys from :func:`export_keys` data; returns the number of keys added.

    Every row of the export is checked first (:func:`read_export`); one
    invalid row and nothing is imported. ``table`` restores only that
    table's keys, ``version`` only that version of its data key (of its
    search key with ``search=True``): one destroyed version comes back
    without editing the export.

    A key whose (table, purpose, version) the key table already holds is
    skipped when it is the same key: the same wrapped bytes, or a wrapping
    under another master key. The data key itself cannot be compared
    without the master keys, so a row under another master key is taken
    for the same data key rewrapped (``rewrap`` changes the master key and
    the wrapped bytes, never the data key) and the key table's row is kept.
    Under the same master key, other wrapped bytes are a conflict: nothing
    is imported.
    """
    chosen = select_keys(read_export(data), table=table, version=version, search=search)
    with connections.writing() as conn:
        held = {(row.series.scope, row.series.purpose, row.version): row for row in keys.rows(conn)}
        new_rows = []
        for row in chosen:
            existing = held.get(_ident(row))
            if existing is None:
                new_rows.append(row)
            elif (
                existing.wrapped != row["wrapped_key"]
                and existing.master_key_id == row["master_key_id"]
            ):
                raise KeyLifecycleError(
                    "the key table holds a different key with the same id under the same "
                    "master key; nothing imported",
                    table=row["scope"],
                    key_version=row["key_version"],
                )
        keys.insert_rows(conn, new_rows)
    for row in new_rows:
        key_event("import", row["scope"], row["purpose"], row["key_version"], row["master_key_id"])
    return len(new_rows)


#: File mode of a written export: the owner only. Wrapped keys are useless without the
#: master key, but a backup of them is still a target.
EXPORT_FILE_MODE: Final = 0o600


def write_export(data: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write :func:`export_keys` data as JSON to ``path``, readable by its owner only
    (mode 0600, also when the file existed with a wider mode).

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> write_export({"format": EXPORT_FORMAT, "version": 1, "keys": []}, folder / "k.json")
    >>> oct((folder / "k.json").stat().st_mode & 0o777)
    '0o600'
    """
    text = json.dumps(data, indent=2) + "\n"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(path, flags, EXPORT_FILE_MODE)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        if hasattr(os, "fchmod"):
            os.fchmod(file.fileno(), EXPORT_FILE_MODE)  # an existing file keeps its mode
        file.write(text)
