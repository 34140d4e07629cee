"""Paths to lost rows or wrong answers found by probing, each pinned by a test."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text
from sqlalchemy.engine import Engine

from sqlalchemy_kms import KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms.errors import KeyTableMissingError


def _patients(metadata: MetaData) -> Table:
    return Table(
        "hard_patients",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", KMSEncrypted(String(50))),
    )


def test_missing_key_table_leaves_a_shared_transaction_usable(engine: Engine) -> None:
    """A migration creating an encrypted table before the key table exists: the
    transaction goes on (PostgreSQL would abort it on a failed query), and the first
    use of a key says what is missing."""
    vault = KeyVault(engine, LocalKms(bytes(32)))
    metadata = MetaData()
    patients = _patients(metadata)
    with engine.connect() as conn, vault.using(conn):
        metadata.create_all(conn)  # after_create would make the table's keys
        assert conn.execute(text("SELECT 1")).scalar() == 1  # the transaction is fine
        with pytest.raises(KeyTableMissingError, match="create_table"):
            conn.execute(patients.insert().values(id=1, name="Kim"))
        conn.rollback()
    vault.create_table()
    with engine.begin() as conn:
        metadata.create_all(conn)
        conn.execute(patients.insert().values(id=1, name="Kim"))
    with engine.connect() as conn:
        assert conn.execute(select(patients.c.name)).scalar_one() == "Kim"
    vault.close()
