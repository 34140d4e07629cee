"""Rewrapping: every data key wrapped anew under another master key; no row touched.

With AWS KMS on both sides the key is re-wrapped by KMS ``ReEncrypt`` and
never leaves KMS in plaintext. Keys already wrapped under the target master
key are skipped, so a rewrap can be run again after an interruption.
"""

from __future__ import annotations

from functools import partial

from .._connections import Connections
from .._keytable import KeyTable
from ..audit import key_event, kms_call
from ..providers.base import KeyProvider, encryption_context

__all__ = ["rewrap"]


def rewrap(
    keys: KeyTable,
    connections: Connections,
    source: KeyProvider,
    target: KeyProvider,
    *,
    scope: str | None = None,
) -> int:
    """Wrap every key (or one table's) under ``target``; ``source`` unwraps the keys
    as they are. Returns the number of keys rewrapped."""
    target_id = target.resolved_master_key_id()
    with connections.reading() as conn:
        rows = keys.rows(conn, scope)
    done = 0
    for row in rows:
        if row.provider == target.name and row.master_key_id == target_id:
            continue
        context = encryption_context(row.series.scope, row.series.purpose, row.version)
        wrapped, master_key_id = kms_call(
            "ReEncrypt",
            context,
            row.master_key_id,
            partial(target.rewrap_from, source, row.wrapped, context, row.master_key_id),
        )
        with connections.writing() as conn:
            changed = keys.replace_wrapped(
                conn, row, provider=target.name, master_key_id=master_key_id, wrapped=wrapped
            )
        if not changed:  # another process changed (or removed) the row meanwhile
            continue
        key_event("rewrap", row.series.scope, row.series.purpose, row.version, master_key_id)
        done += 1
    return done
