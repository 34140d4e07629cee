"""What autogenerate checks of the key table: the models must declare the vault's.

A ``MetaData`` holds its key table from its first ``KMSEncrypted`` column on
(``kms_data_keys``, or the one :func:`sqlalchemy_kms.vault.key_table`
declares), so autogenerate compares it like any table: no operation while the
database has it, ``op.create_table(...)`` in a project's first revision. If the
models named another key table than the :class:`~sqlalchemy_kms.KeyVault` of
the migration's engine uses, autogenerate would propose creating the models'
one and dropping the vault's, with every key in it. The comparator registered
here refuses that with a :class:`~sqlalchemy_kms.errors.ConfigurationError`
naming both, before a revision is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from alembic.autogenerate import comparators
from alembic.autogenerate.api import AutogenContext
from alembic.operations.ops import UpgradeOps
from sqlalchemy import MetaData

from .._keytable import key_table_declaration
from ..vault import vault_for

__all__ = ["check_key_table"]


def _metadatas(target: Any) -> list[MetaData]:
    if target is None:
        return []
    if isinstance(target, MetaData):
        return [target]
    return [metadata for metadata in target if isinstance(metadata, MetaData)]


def check_key_table(target_metadata: MetaData | Iterable[MetaData] | None, dialect: Any) -> None:
    """Raise :class:`~sqlalchemy_kms.errors.ConfigurationError` when a metadata of
    ``target_metadata`` holds another key table than the vault bound to ``dialect``
    uses (nothing to check without a vault).

    >>> from sqlalchemy import Column, Integer, String, Table, create_engine
    >>> from sqlalchemy_kms import KeyVault, KMSEncrypted, LocalKms
    >>> engine = create_engine("sqlite://")
    >>> vault = KeyVault(engine, LocalKms(bytes(32)), table_name="app_keys")
    >>> models = MetaData()
    >>> _ = Table("patients", models, Column("id", Integer, primary_key=True),
    ...           Column("name", KMSEncrypted(String(50))))
    >>> check_key_table(models, engine.dialect)
    Traceback (most recent call last):
    ...
    sqlalchemy_kms.errors.ConfigurationError: the models use the key table kms_data_keys ...
    >>> from sqlalchemy_kms.vault import key_table
    >>> _ = key_table(models, "app_keys")
    >>> check_key_table(models, engine.dialect)
    >>> vault.close()
    """
    vault = vault_for(dialect)
    if vault is None:
        return
    for metadata in _metadatas(target_metadata):
        declared = key_table_declaration(metadata)
        if declared is not None:
            declared.refuse_other(
                vault.table,
                "the models",
                "the KeyVault of the migration's engine",
                "autogenerate would create the first and drop the second with every key in it",
            )


@comparators.dispatch_for("schema")
def _compare_key_table(
    autogen_context: AutogenContext, upgrade_ops: UpgradeOps, schemas: Any
) -> None:
    """Autogenerate's schema comparison, first step: the models' key table is the vault's."""
    if autogen_context.connection is not None:
        check_key_table(autogen_context.metadata, autogen_context.connection.dialect)
