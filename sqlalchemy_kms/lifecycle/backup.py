"""Backing up the key table and restoring it: wrapped keys only, as JSON-ready data.

An export holds the wrapped keys and their metadata, never a data key in
plaintext: it is as safe to keep as the key table itself (and as useless
without the master key). Importing restores missing rows and refuses, as a
whole, any row that conflicts with one the key table holds.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Mapping
from typing import Any, Final

from .._connections import Connections
from .._keytable import KeySeries, KeyTable
from ..audit import key_event
from ..errors import KeyLifecycleError

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "export_keys", "import_keys"]

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


def _imported_row(item: Mapping[str, Any]) -> dict[str, Any]:
    created = item.get("created_at")
    purpose = str(item["purpose"])
    KeySeries.of("", purpose)  # KeyError for an unknown purpose
    return {
        "scope": str(item["scope"]),
        "purpose": purpose,
        "key_version": int(item["key_version"]),
        "state": str(item["state"]),
        "provider": str(item["provider"]),
        "master_key_id": str(item["master_key_id"]),
        "wrapped_key": base64.b64decode(item["wrapped_key"], validate=True),
        "created_at": dt.datetime.fromisoformat(created)
        if created
        else dt.datetime.now(dt.timezone.utc),
    }


def import_keys(keys: KeyTable, connections: Connections, data: Mapping[str, Any]) -> int:
    """Restore keys from :func:`export_keys` data; refuses conflicting ids.

    A key whose (table, purpose, version) already exists with the same wrapped
    key is skipped; one with a different wrapped key is a conflict, and then
    nothing is imported. Returns the number of keys added.
    """
    if data.get("format") != EXPORT_FORMAT or data.get("version") != EXPORT_VERSION:
        raise KeyLifecycleError("not a sqlalchemy-kms key export (format version 1)")
    with connections.reading() as conn:
        existing = {
            (row.series.scope, row.series.purpose, row.version): row.wrapped
            for row in keys.rows(conn)
        }
    try:
        incoming = [_imported_row(item) for item in data["keys"]]
    except (KeyError, TypeError, ValueError) as error:
        raise KeyLifecycleError(
            f"the key export is damaged ({type(error).__name__}); nothing imported"
        ) from None
    new_rows = []
    for row in incoming:
        ident = (row["scope"], row["purpose"], row["key_version"])
        if ident in existing:
            if existing[ident] != row["wrapped_key"]:
                raise KeyLifecycleError(
                    "the key table holds a different key with the same id; nothing imported",
                    table=ident[0],
                    key_version=ident[2],
                )
            continue
        new_rows.append(row)
    if new_rows:
        with connections.writing() as conn:
            keys.insert_rows(conn, new_rows)
        for row in new_rows:
            key_event(
                "import", row["scope"], row["purpose"], row["key_version"], row["master_key_id"]
            )
    return len(new_rows)
