"""Alembic operations for encrypted columns and their keys: ``op.encrypt_column(...)`` and friends.

Importing this package registers these operations on Alembic's ``op``:

=====================================================  =========================================
operation                                              reverse (autogenerate, ``op.reverse()``)
=====================================================  =========================================
``op.create_kms_key_table(table_name, *, schema)``     ``op.drop_kms_key_table(...)``
``op.drop_kms_key_table(table_name, *, schema)``       ``op.create_kms_key_table(...)``
``op.encrypt_column(table, column, kms_type, ...)``    ``op.decrypt_column(...)``
``op.decrypt_column(table, column, kms_type, ...)``    ``op.encrypt_column(...)``
``op.rotate_kms_key(table, *, columns, ...)``          not reversible
``op.reencrypt_table(table, columns, ...)``            not reversible
``op.rewrap_kms_keys(provider, *, table_name, ...)``   not reversible
=====================================================  =========================================

Import it in ``env.py`` (revision files may import it too; importing twice is
harmless) and create the :class:`~sqlalchemy_kms.KeyVault` of the engine the
migrations run on. Every operation except the key table's DDL finds that vault
through the migration connection (:func:`sqlalchemy_kms.vault.vault_for`) and
raises :class:`~sqlalchemy_kms.errors.ConfigurationError` when there is none.
A complete ``env.py``::

    import os
    from logging.config import fileConfig

    from alembic import context
    from sqlalchemy import create_engine

    import sqlalchemy_kms.alembic  # registers op.encrypt_column, op.rotate_kms_key, ...
    from sqlalchemy_kms import KeyVault
    from sqlalchemy_kms.alembic import provider_from_uri, render_item

    from myapp.models import Base

    config = context.config
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    target_metadata = Base.metadata


    def run_migrations_offline() -> None:
        # --sql renders DDL only (op.create_kms_key_table, op.create_table, ...): the
        # operations that rewrite rows raise ConfigurationError in offline mode.
        context.configure(url=config.get_main_option("sqlalchemy.url"),
                          target_metadata=target_metadata, literal_binds=True,
                          render_item=render_item)
        with context.begin_transaction():
            context.run_migrations()


    def run_migrations_online() -> None:
        engine = create_engine(config.get_main_option("sqlalchemy.url"))
        # e.g. MYAPP_KMS=aws-kms://alias/myapp (production) or local://dev-master.key
        vault = KeyVault(engine, provider_from_uri(os.environ["MYAPP_KMS"]))
        try:
            with engine.connect() as connection:
                context.configure(connection=connection, target_metadata=target_metadata,
                                  render_item=render_item)
                # Key-table work (the key op.create_table() makes for a new encrypted
                # table, keys made by op.bulk_insert()) must use the migration's own
                # connection: its transaction may hold the key table or locks that a
                # second connection could not see or would wait for.
                with vault.using(connection), context.begin_transaction():
                    context.run_migrations()
        finally:
            vault.close()
            engine.dispose()


    if context.is_offline_mode():
        run_migrations_offline()
    else:
        run_migrations_online()

A revision::

    import sqlalchemy as sa
    from alembic import op
    from sqlalchemy_kms import KMSEncrypted


    def upgrade() -> None:
        op.encrypt_column("patients", "phone", KMSEncrypted(sa.String(30)))


    def downgrade() -> None:
        op.decrypt_column("patients", "phone", KMSEncrypted(sa.String(30)))

How the operations see a table
-------------------------------
The row-rewriting operations (``encrypt_column``, ``decrypt_column``,
``rotate_kms_key``, ``reencrypt_table``) build a :class:`sqlalchemy.Table`
from the **reflected primary key columns** plus the columns they are given,
each with (a copy of) the given ``KMSEncrypted`` type and its reflected
nullability; other columns are not needed and not touched. The table must
have a primary key, and no encrypted column may be part of it. The key scope
is the table name, ``schema.table`` when ``schema`` is given: pass the same
schema the application's model uses.

They run inside the migration's transaction (``connection=op.get_bind()``
and ``vault.using(op.get_bind())``): on PostgreSQL an error rolls back the
column's DDL, its rewritten rows and any key made, together. MySQL/MariaDB
commit DDL implicitly.

The DDL of ``encrypt_column``/``decrypt_column`` is
``plaintext_to_binary_ddl`` / ``binary_to_plaintext_ddl`` on PostgreSQL and
MySQL/MariaDB. SQLite stores any value in any column, so it needs none to hold
the ciphertext; the operations still change the column's declared type (to
``BLOB``, and back to the inner type) with Alembic's batch mode, which
recreates the table, so that the schema says what the column holds and
autogenerate finds it as the model declares it. Batch mode's caveats apply
(see Alembic's "Running batch migrations for SQLite"): triggers and views on
the table are not recreated, and with ``PRAGMA foreign_keys=ON`` tables
referencing it get in the way.

Autogenerate
------------
Pass :func:`render_item` to ``context.configure(render_item=...)`` so that
``alembic revision --autogenerate`` renders encrypted columns as
``KMSEncrypted(sa.String(length=200), deterministic=True)`` and adds
``from sqlalchemy_kms import KMSEncrypted`` to the revision's imports.
The key table is part of the models' ``MetaData`` (see
:func:`sqlalchemy_kms.vault.key_table`): autogenerate leaves it alone once it
exists, and writes it as ``op.create_table('kms_data_keys', ...)`` into a
project's first revision. When the models hold another key table than the
vault of the migration's engine, autogenerate raises
:class:`~sqlalchemy_kms.errors.ConfigurationError` naming both
(:mod:`~sqlalchemy_kms.alembic.compare`) instead of proposing to drop the vault's.
Autogenerate compares schemas, not data: a plaintext column changed to
``KMSEncrypted`` in the model comes out as ``op.alter_column(...,
type_=KMSEncrypted(...))``, which encrypts nothing; write
``op.encrypt_column(...)`` instead. These operations also render (for
rewriters and ``render_python_code``).

Type checkers only know Alembic's built-in ``op`` functions: in type-checked
revision scripts, calls of these operations need
``# type: ignore[attr-defined]``.

The package
-----------
* :mod:`~sqlalchemy_kms.alembic.ops`: the operation classes (``EncryptColumnOp``,
  ...), each registered under its name with :func:`~sqlalchemy_kms.alembic.ops.operation`,
  and their reverses;
* :mod:`~sqlalchemy_kms.alembic.implementations`: what each operation does,
  through the vault;
* :mod:`~sqlalchemy_kms.alembic.render`: :func:`render_item` and how
  autogenerate writes the operations;
* :mod:`~sqlalchemy_kms.alembic.compare`: what autogenerate checks of the key
  table (that the models declare the vault's).
"""

from __future__ import annotations

from ..providers.uri import provider_from_uri
from . import compare as compare  # registers the key table's check in autogenerate
from . import implementations as implementations  # registers what each operation does
from .ops import (
    CreateKmsKeyTableOp,
    DecryptColumnOp,
    DropKmsKeyTableOp,
    EncryptColumnOp,
    ReencryptTableOp,
    RewrapKmsKeysOp,
    RotateKmsKeyOp,
)
from .render import render_item

__all__ = [
    "CreateKmsKeyTableOp",
    "DecryptColumnOp",
    "DropKmsKeyTableOp",
    "EncryptColumnOp",
    "ReencryptTableOp",
    "RewrapKmsKeysOp",
    "RotateKmsKeyOp",
    "provider_from_uri",
    "render_item",
]
