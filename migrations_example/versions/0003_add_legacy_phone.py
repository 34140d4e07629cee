"""Add a plaintext phone column and import patients from the legacy system.

The phone numbers arrive as plaintext, as they were in the old system; the
next revision encrypts them in place.

Revision ID: 0003
Revises: 0002
Create Date: 2024-11-28 09:20:00

"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from sqlalchemy_kms import KMSEncrypted

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The patients imported from the legacy system (the tests check these).
LEGACY_PATIENTS: list[dict[str, Any]] = [
    {
        "id": 1,
        "name": "김민지",
        "email": "minji.kim@example.com",
        "notes": "allergic to penicillin",
        "phone": "+82 10-1234-5678",
    },
    {
        "id": 2,
        "name": "Jane Doe",
        "email": "Jane.Doe@Example.org",  # stored (and read back) lower-cased
        "notes": "follow-up in 3 months",
        "phone": "+1 555 0100",
    },
    {
        "id": 3,
        "name": "Ana Núñez",
        "email": "ana@example.net",
        "notes": None,
        "phone": None,
    },
    {
        "id": 4,
        "name": "O'Brien 50% off",  # quotes, a percent sign, empty strings
        "email": "obrien@example.com",
        "notes": "",
        "phone": "",
    },
]


def upgrade() -> None:
    op.add_column("patients", sa.Column("phone", sa.String(30)))
    # A full sa.Table (not sa.table()): KMSEncrypted binds each value to its table
    # and column. name, email and notes are encrypted as they are inserted; phone
    # is plaintext.
    patients = sa.Table(
        "patients",
        sa.MetaData(),
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", KMSEncrypted(sa.String(200))),
        sa.Column("email", KMSEncrypted(sa.String(320), deterministic=True, normalize=str.lower)),
        sa.Column("notes", KMSEncrypted(sa.Text())),
        sa.Column("phone", sa.String(30)),
    )
    op.bulk_insert(patients, LEGACY_PATIENTS)


def downgrade() -> None:
    patients = sa.table("patients", sa.column("id", sa.Integer()))
    op.execute(patients.delete().where(patients.c.id.in_([p["id"] for p in LEGACY_PATIENTS])))
    op.drop_column("patients", "phone")
