"""An application's models, as the ``--models`` option of the command line imports them.

``tests.cli_models:Base`` (a declarative base), ``tests.cli_models:metadata``
(its ``MetaData``) and ``tests.cli_models:Base.registry`` all name the same
tables; ``tests.cli_models:log_metadata`` holds a table without a primary
key. The names start with ``cli_`` so that they never meet the tables of
other test modules on a shared database server. Both metadatas declare the
key table the tests' vaults use, ``cli_kms_keys``.
"""

from __future__ import annotations

from sqlalchemy import Column, Integer, MetaData, String, Table, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_kms import KMSEncrypted
from sqlalchemy_kms.vault import key_table

#: The key table of the command-line tests (``--key-table``).
KEY_TABLE = "cli_kms_keys"


class Base(DeclarativeBase):
    pass


class Patient(Base):
    """Randomized columns and one deterministic (searchable) column."""

    __tablename__ = "cli_patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(KMSEncrypted(String(100)))
    phone: Mapped[str | None] = mapped_column(KMSEncrypted(String(32)))
    email: Mapped[str] = mapped_column(KMSEncrypted(String(100), deterministic=True))


class Visit(Base):
    __tablename__ = "cli_visits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    note: Mapped[str | None] = mapped_column(KMSEncrypted(Text))


class Ward(Base):
    """No encrypted column: the commands leave it alone."""

    __tablename__ = "cli_wards"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    label: Mapped[str] = mapped_column(String(20))


metadata = Base.metadata
key_table(metadata, KEY_TABLE)


log_metadata = MetaData()
key_table(log_metadata, KEY_TABLE)

#: No primary key: ``verify`` reads it in one streamed query.
audit_log = Table(
    "cli_audit_log",
    log_metadata,
    Column("entry", KMSEncrypted(String(100))),
    Column("actor", String(50)),
)
