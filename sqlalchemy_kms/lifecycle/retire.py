"""The end of a key's life: retire it, then destroy it; each rule written once.

The API (``vault.retire_key``/``vault.destroy_key``), the command line
(``retire``/``destroy``) and Alembic all go through these two functions, so
the guards live here only:

* the active key is never retired (rotate first);
* a key is retired only when no stored value uses it (re-encrypt first);
* only a retired key is destroyed, and only with ``confirm=True``.

Destroying a key is crypto-shredding: every value still under it, in this
database, its backups or exports, can never be decrypted again.
"""

from __future__ import annotations

from sqlalchemy import Table

from .._connections import Connections
from .._keytable import RETIRED, KeyRow, KeySeries, KeyTable, table_scope
from ..audit import key_event
from ..errors import KeyLifecycleError
from .status import rows_using

__all__ = ["check_destroyable", "check_destroyable_version", "destroy_key", "retire_key"]


def _row(keys: KeyTable, connections: Connections, series: KeySeries, version: int) -> KeyRow:
    with connections.reading() as conn:
        row = keys.version(conn, series, version)
    if row is None:
        raise KeyLifecycleError("no such key version", table=series.scope, key_version=version)
    return row


def retire_key(
    keys: KeyTable, connections: Connections, table: Table, series: KeySeries, version: int
) -> KeyRow | None:
    """Mark key ``version`` retired; refused while any row uses it or while it is
    active. Returns the row retired (``None`` if it already was)."""
    scope = table_scope(table)
    row = _row(keys, connections, series, version)
    if row.state == RETIRED:
        return None
    with connections.reading() as conn:
        enabled = [r.version for r in keys.enabled(conn, series)]
        in_use = rows_using(conn, table, series, version)
    if not enabled or version == enabled[0]:
        raise KeyLifecycleError(
            "the active key cannot be retired; rotate first", table=scope, key_version=version
        )
    if in_use:
        raise KeyLifecycleError(
            f"{in_use} stored values still use this key; re-encrypt the table first",
            table=scope,
            key_version=version,
        )
    with connections.writing() as conn:
        keys.set_state(conn, series, version, RETIRED)
    key_event("retire", scope, series.purpose, version, row.master_key_id)
    return row


def _require_confirm(series: KeySeries, version: int, confirm: bool) -> None:
    if confirm is not True:
        raise KeyLifecycleError(
            "destroying a key makes every value under it unreadable for good; "
            "pass confirm=True to do it",
            table=series.scope,
            key_version=version,
        )


def check_destroyable(row: KeyRow, *, confirm: bool) -> None:
    """Refuse to destroy ``row`` unless it is retired and ``confirm`` is ``True``."""
    _require_confirm(row.series, row.version, confirm)
    if row.state != RETIRED:
        raise KeyLifecycleError(
            "only a retired key can be destroyed; retire it first",
            table=row.series.scope,
            key_version=row.version,
        )


def check_destroyable_version(
    keys: KeyTable, connections: Connections, series: KeySeries, version: int
) -> KeyRow:
    """The row of key ``version`` if it may be destroyed now, else
    :class:`~sqlalchemy_kms.errors.KeyLifecycleError` saying why."""
    row = _row(keys, connections, series, version)
    check_destroyable(row, confirm=True)
    return row


def destroy_key(
    keys: KeyTable, connections: Connections, series: KeySeries, version: int, *, confirm: bool
) -> KeyRow:
    """Delete retired key ``version`` for good (crypto-shredding); needs ``confirm=True``."""
    _require_confirm(series, version, confirm)  # before the key table is even read
    row = check_destroyable_version(keys, connections, series, version)
    with connections.writing() as conn:
        keys.delete_retired(conn, series, version)
    key_event("destroy", series.scope, series.purpose, version, row.master_key_id)
    return row

