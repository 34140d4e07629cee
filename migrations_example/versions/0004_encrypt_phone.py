"""Encrypt the legacy phone column in place.

Revision ID: 0004
Revises: 0003
Create Date: 2024-11-28 09:30:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import sqlalchemy_kms.alembic  # noqa: F401  (op.encrypt_column, op.decrypt_column)
from sqlalchemy_kms import KMSEncrypted

# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # PostgreSQL: phone becomes BYTEA (USING convert_to(phone::text, 'UTF8'));
    # MySQL/MariaDB: VARBINARY(162); SQLite: declared BLOB (batch mode recreates
    # the table). Then every row's phone is encrypted, batch by batch, inside this
    # migration's transaction. An application that reads patients while this runs
    # (MySQL/MariaDB commit the DDL at once) should declare the column
    # KMSEncrypted(sa.String(30), accept_plaintext=True) until it has finished.
    op.encrypt_column("patients", "phone", KMSEncrypted(sa.String(30)))


def downgrade() -> None:
    # every phone decrypted back to plaintext, then the column is VARCHAR(30) again
    op.decrypt_column("patients", "phone", KMSEncrypted(sa.String(30)))
