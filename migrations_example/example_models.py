"""The example application's tables as they are at the head revision.

The application reads and writes these through an engine with a
:class:`~sqlalchemy_kms.KeyVault`; ``env.py`` gives them to autogenerate as
``target_metadata``.

``Base.metadata`` holds the key table ``kms_data_keys`` too (revision 0001): it
joins the metadata with the first ``KMSEncrypted`` column, so autogenerate
neither proposes dropping it nor forgets it in a first revision. A vault with
another ``table_name`` or ``schema`` needs it declared here, e.g.
``key_table(Base.metadata, "app_keys")``.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_kms import KMSEncrypted


class Base(DeclarativeBase):
    pass


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
