"""Rotate the patients table's data key and re-encrypt every row under it.

Revision ID: 0005
Revises: 0004
Create Date: 2024-11-28 09:40:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import sqlalchemy_kms.alembic  # noqa: F401  (op.rotate_kms_key)
from sqlalchemy_kms import KMSEncrypted

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Data key version 2 becomes active; name, notes and phone are re-encrypted
    # under it. email is deterministic: it uses the table's search key, which an
    # ordinary rotation leaves alone (so the unique index and lookups are unaffected);
    # rotate_kms_key("patients", search=True, columns=...) would rotate that one.
    op.rotate_kms_key(
        "patients",
        columns={
            "name": KMSEncrypted(sa.String(200)),
            "email": KMSEncrypted(sa.String(320), deterministic=True, normalize=str.lower),
            "notes": KMSEncrypted(sa.Text()),
            "phone": KMSEncrypted(sa.String(30)),
        },
    )


def downgrade() -> None:
    # Nothing to undo: key version 1 stays enabled, and values under version 2
    # decrypt as well as under version 1 did. (Retiring or destroying version 1
    # would be a separate, deliberate step: vault.retire_key / vault.destroy_key.)
    pass
