"""The example application's tables as they are at the head revision.

The application reads and writes these through an engine with a
:class:`~sqlalchemy_kms.KeyVault`; ``env.py`` gives them to autogenerate as
``target_metadata``.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_kms import KMSEncrypted
from sqlalchemy_kms.vault import key_table


class Base(DeclarativeBase):
    pass


# The key table (revision 0001): part of the metadata, so that autogenerate
# does not offer to drop it.
key_table(Base.metadata)


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(KMSEncrypted(sa.String(200)))
    # deterministic: equality lookups and the unique index work; lower-cased first
    email: Mapped[str] = mapped_column(
        KMSEncrypted(sa.String(320), deterministic=True, normalize=str.lower)
    )
    notes: Mapped[str | None] = mapped_column(KMSEncrypted(sa.Text()))
    # plaintext until revision 0004 encrypted it in place
    phone: Mapped[str | None] = mapped_column(KMSEncrypted(sa.String(30)))

    __table_args__ = (sa.Index("ix_patients_email", "email", unique=True),)
