"""Tables shared by several test modules (and by the processes some tests start)."""

from __future__ import annotations

from sqlalchemy import Column, Integer, MetaData, String, Table

from sqlalchemy_kms import KMSEncrypted


def people_tables(metadata: MetaData) -> tuple[Table, Table]:
    patients = Table(
        "patients",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", KMSEncrypted(String(100))),
        Column("phone", KMSEncrypted(String(20))),
    )
    visits = Table(
        "visits",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("note", KMSEncrypted(String(200))),
    )
    return patients, visits
