"""Helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from sqlalchemy_kms import KeyVault


def key_rows(vault: KeyVault, scope: str | None = None) -> list[Any]:
    """The key table's rows as stored (all, or one table's), ordered."""
    keys = vault.table
    query = select(keys).order_by(keys.c.scope, keys.c.purpose, keys.c.key_version)
    if scope is not None:
        query = query.where(keys.c.scope == scope)
    with vault.connections.reading() as conn:  # inside vault.using(): that connection
        return list(conn.execute(query))
