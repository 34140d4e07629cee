"""Create the key table that holds every table's wrapped data keys.

Revision ID: 0001
Revises:
Create Date: 2024-11-28 09:00:00

"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

import sqlalchemy_kms.alembic  # noqa: F401  (op.create_kms_key_table, ...)

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # kms_data_keys: (scope, purpose, key_version) -> wrapped data key. Created
    # first: the revisions after this one make keys as they create tables.
    # Autogenerate writes the same table as op.create_table("kms_data_keys", ...)
    # in a project's first revision (the models' metadata holds it); either works.
    op.create_kms_key_table()


def downgrade() -> None:
    # Dropping the key table crypto-shreds whatever is still encrypted under its
    # keys: the encrypted tables are gone by now (revision 0002's downgrade).
    op.drop_kms_key_table()
