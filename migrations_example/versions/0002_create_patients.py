"""Create the patients table with encrypted columns.

Revision ID: 0002
Revises: 0001
Create Date: 2024-11-28 09:10:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sqlalchemy_kms import KMSEncrypted

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Each KMSEncrypted column is stored as binary (BLOB / BYTEA / VARBINARY(n)).
    # Creating the table through the vault's engine makes its keys right away:
    # a data key (name, notes) and a search key (email, deterministic).
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", KMSEncrypted(sa.String(200)), nullable=False),
        sa.Column(
            "email",
            KMSEncrypted(sa.String(320), deterministic=True, normalize=str.lower),
            nullable=False,
        ),
        sa.Column("notes", KMSEncrypted(sa.Text())),
    )
    # equal e-mail addresses are stored equal, so a unique index works
    op.create_index("ix_patients_email", "patients", ["email"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_patients_email", table_name="patients")
    op.drop_table("patients")
