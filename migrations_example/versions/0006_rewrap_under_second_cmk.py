"""Re-wrap every data key under a second master key (CMK rotation by migration).

No row is touched: only the wrapped keys in kms_data_keys change. With AWS KMS
on both sides this is KMS ReEncrypt, and the data keys never leave KMS.

Revision ID: 0006
Revises: 0005
Create Date: 2024-11-28 09:50:00

"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from alembic import op

import sqlalchemy_kms.alembic  # noqa: F401  (op.rewrap_kms_keys)
from sqlalchemy_kms import LocalKms

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The example's second local master key (unless SQLALCHEMY_KMS_EXAMPLE_REWRAP_KMS is set).
REWRAP_KEY_FILE = Path(__file__).resolve().parent.parent / "example-master-2.key"


def target_master_key() -> str:
    """aws-kms://KEY or local://PATH: from SQLALCHEMY_KMS_EXAMPLE_REWRAP_KMS, else the
    local key file example-master-2.key next to alembic.ini (made if missing)."""
    uri = os.environ.get("SQLALCHEMY_KMS_EXAMPLE_REWRAP_KMS")
    if uri:
        return uri
    if not REWRAP_KEY_FILE.exists():
        LocalKms.generate_key_file(REWRAP_KEY_FILE)
    return f"local://{REWRAP_KEY_FILE}"


def upgrade() -> None:
    op.rewrap_kms_keys(target_master_key())


def downgrade() -> None:
    # Not reversed: the keys stay wrapped under the second master key, which keeps
    # decrypting them (env.py keeps both local keys; AWS KMS Decrypt names the
    # key's own master key). To go back, rewrap again in a new revision.
    pass
