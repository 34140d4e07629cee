"""The end of a key's life: retire it, then destroy it; each rule written once.

The API (``vault.retire_key``/``vault.destroy_key``), the command line
(``retire``/``destroy``) and Alembic all go through these two functions, so
the guards live here only:

* the active key is never retired (rotate first);
* a key is retired, or destroyed, only once the *grace period* has passed
  since the newer version was made: every process reads the key table again
  within its ``refresh_interval`` (at most :data:`MAX_REFRESH_INTERVAL`), so
  after the grace period no process still writes under the old version;
* a key is retired only when no stored value uses it (re-encrypt first);
* only a retired key is destroyed, only with ``confirm=True``, and only when
  a count of its values, made in the same transaction that deletes it with
  the key row locked, finds none.

Destroying a key is crypto-shredding: every value still under it, in this
database, its backups or exports, can never be decrypted again.
"""

from __future__ import annotations

import datetime as dt
from typing import Final

from sqlalchemy import Table
from sqlalchemy.engine import Connection

from .._connections import Connections
from .._format import MAX_KEY_VERSION
from .._keytable import RETIRED, STATES, KeyRow, KeySeries, KeyTable, table_scope
from ..audit import key_event
from ..errors import KeyLifecycleError
from .status import rows_using, rows_using_any_binary

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "MAX_REFRESH_INTERVAL",
    "check_destroyable",
    "check_destroyable_version",
    "check_grace",
    "destroy_key",
    "retire_key",
]

#: The longest ``refresh_interval`` a vault accepts: every process learns of a new
#: active key within this many seconds.
MAX_REFRESH_INTERVAL: Final = 60.0
#: Seconds after a rotation before the older version may be retired or destroyed:
#: the longest refresh interval, plus a margin for clocks and statements in flight.
DEFAULT_GRACE_PERIOD: Final = MAX_REFRESH_INTERVAL + 30.0


def check_grace(
    keys: KeyTable,
    conn: Connection,
    series: KeySeries,
    version: int,
    grace: float,
    *,
    operation: str,
) -> None:
    """Refuse ``operation`` on key ``version`` until ``grace`` seconds have passed
    since the version after it was made (processes may still write under it before)."""
    newer = [row for row in keys.versions(conn, series) if row.version > version]
    if not newer:
        return  # the active key: the caller refuses it for its own reason
    made = min((row.created_at for row in newer if row.created_at is not None), default=None)
    if made is None:
        return
    if made.tzinfo is None:  # SQLite and MySQL give naive datetimes back: they are UTC
        made = made.replace(tzinfo=dt.timezone.utc)
    allowed = made + dt.timedelta(seconds=grace)
    if dt.datetime.now(dt.timezone.utc) < allowed:
        raise KeyLifecycleError(
            f"{operation} allowed after {allowed:%H:%M:%S} UTC: processes may still write "
            f"under this key until every one has read the key table again (grace period "
            f"{grace:.0f} s after version {version + 1} was made)",
            table=series.scope,
            key_version=version,
        )


def _row(keys: KeyTable, connections: Connections, series: KeySeries, version: int) -> KeyRow:
    with connections.reading() as conn:
        row = keys.version(conn, series, version)
    if row is None:
        raise KeyLifecycleError("no such key version", table=series.scope, key_version=version)
    if row.state not in STATES or not 1 <= version <= MAX_KEY_VERSION:
        # only a key table made before its CHECK constraints holds such a row
        raise KeyLifecycleError(
            f"the key table's row is invalid (state {row.state!r}): a key is 'enabled' or "
            f"'retired', its version in 1..{MAX_KEY_VERSION}; correct or delete the row",
            table=series.scope,
            key_version=version,
        )
    return row


def retire_key(
    keys: KeyTable,
    connections: Connections,
    table: Table,
    series: KeySeries,
    version: int,
    *,
    grace: float = DEFAULT_GRACE_PERIOD,
) -> KeyRow | None:
    """Mark key ``version`` retired; refused while it is active, within the grace
    period after the rotation, or while any row uses it. Returns the row retired
    (``None`` if it already was)."""
    scope = table_scope(table)
    row = _row(keys, connections, series, version)
    if row.state == RETIRED:
        return None
    with connections.reading() as conn:
        enabled = [r.version for r in keys.enabled(conn, series)]
        if not enabled or version == enabled[0]:
            raise KeyLifecycleError(
                "the active key cannot be retired; rotate first", table=scope, key_version=version
            )
        check_grace(keys, conn, series, version, grace, operation="retire")
        in_use = rows_using(conn, table, series, version)
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
    keys: KeyTable,
    connections: Connections,
    series: KeySeries,
    version: int,
    *,
    grace: float = DEFAULT_GRACE_PERIOD,
) -> KeyRow:
    """The row of key ``version`` if it may be destroyed now, else
    :class:`~sqlalchemy_kms.errors.KeyLifecycleError` saying why."""
    row = _row(keys, connections, series, version)
    check_destroyable(row, confirm=True)
    with connections.reading() as conn:
        check_grace(keys, conn, series, version, grace, operation="destroy")
    return row


def destroy_key(
    keys: KeyTable,
    connections: Connections,
    table: Table | str,
    series: KeySeries,
    version: int,
    *,
    confirm: bool,
    grace: float = DEFAULT_GRACE_PERIOD,
) -> KeyRow:
    """Delete retired key ``version`` for good (crypto-shredding); needs ``confirm=True``.

    In one transaction: the key row is locked, the grace period checked, and the
    values under the key counted again (in ``table``'s encrypted columns, or, for a
    table given by name, in every binary column the database reports); any value
    found refuses the destruction.
    """
    _require_confirm(series, version, confirm)  # before the key table is even read
    row = check_destroyable_version(keys, connections, series, version, grace=grace)
    with connections.writing() as conn:
        locked = keys.lock_version(conn, series, version)
        if locked is None or locked.state != RETIRED:
            raise KeyLifecycleError(
                "only a retired key can be destroyed; retire it first",
                table=series.scope,
                key_version=version,
            )
        check_grace(keys, conn, series, version, grace, operation="destroy")
        if isinstance(table, Table):
            in_use = rows_using(conn, table, series, version)
        else:
            in_use = rows_using_any_binary(conn, table, series, version)
        if in_use:
            raise KeyLifecycleError(
                f"{in_use} stored values still use this key; re-encrypt the table, "
                "then destroy",
                table=series.scope,
                key_version=version,
            )
        keys.delete_retired(conn, series, version)
    key_event("destroy", series.scope, series.purpose, version, row.master_key_id)
    return row

