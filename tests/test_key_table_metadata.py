"""The key table belongs to the application's MetaData: create_all, drop_all, Alembic's
autogenerate (``compare_metadata``), and a KeyVault whose key table is another one.

Before, the key table was only the vault's: autogenerate proposed dropping it
from any database that had it and never created it, and ``create_all`` left
it out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata, produce_migrations, render_python_code
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, inspect, select
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_kms.alembic  # noqa: F401  (registers the autogenerate check)
from sqlalchemy_kms import KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms.alembic import render_item
from sqlalchemy_kms.errors import ConfigurationError
from sqlalchemy_kms.vault import DEFAULT_KEY_TABLE, key_table

from .helpers import key_rows

PATIENTS = "ktm_patients"
OWN_KEYS = "ktm_keys"


def models(metadata: MetaData | None = None) -> MetaData:
    """An application's models: one encrypted table, one plain table."""
    metadata = MetaData() if metadata is None else metadata
    Table(
        PATIENTS,
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", KMSEncrypted(String(50))),
        Column("email", KMSEncrypted(String(50), deterministic=True)),
    )
    Table("ktm_wards", metadata, Column("id", Integer, primary_key=True))
    return metadata


@pytest.fixture
def vault(engine: Engine) -> Iterator[KeyVault]:
    vault = KeyVault(engine, LocalKms(os.urandom(32)))
    yield vault
    vault.close()


def diffs(engine: Engine, metadata: MetaData) -> list[Any]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))


# -- the metadata ------------------------------------------------------------------------------


def test_the_first_encrypted_column_adds_the_key_table_to_its_metadata() -> None:
    plain = MetaData()
    Table("ktm_plain", plain, Column("id", Integer, primary_key=True))
    assert list(plain.tables) == ["ktm_plain"]

    metadata = models()
    assert metadata.sorted_tables[0].name == DEFAULT_KEY_TABLE
    keys = metadata.tables[DEFAULT_KEY_TABLE]
    patients = metadata.tables[PATIENTS]
    assert [c.name for c in keys.primary_key] == ["scope", "purpose", "key_version"]
    # the encrypted table depends on it; the plain one is left alone
    order = [t.name for t in metadata.sorted_tables]
    assert order.index(DEFAULT_KEY_TABLE) < order.index(PATIENTS)
    assert keys in patients._extra_dependencies
    assert keys not in metadata.tables["ktm_wards"]._extra_dependencies

    class Base(DeclarativeBase):
        pass

    class Patient(Base):
        __tablename__ = PATIENTS
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(KMSEncrypted(String(50)))

    assert set(Base.metadata.tables) == {DEFAULT_KEY_TABLE, PATIENTS}
    # to_metadata() copies the columns, and the key table with them
    copy = MetaData()
    patients.to_metadata(copy)
    assert set(copy.tables) == {DEFAULT_KEY_TABLE, PATIENTS}


@pytest.mark.parametrize("declared_first", [True, False])
def test_key_table_declares_another_before_or_after_the_models(declared_first: bool) -> None:
    metadata = MetaData()
    if declared_first:
        keys = key_table(metadata, OWN_KEYS, schema="vault")
        models(metadata)
    else:
        models(metadata)
        keys = key_table(metadata, OWN_KEYS, schema="vault")
    # the default one is gone, and the encrypted table depends on the declared one
    assert set(metadata.tables) == {f"vault.{OWN_KEYS}", PATIENTS, "ktm_wards"}
    order = [t.fullname for t in metadata.sorted_tables]
    assert order.index(f"vault.{OWN_KEYS}") < order.index(PATIENTS)
    assert keys in metadata.tables[PATIENTS]._extra_dependencies
    # declared again: the same table; a table added later depends on it too
    assert key_table(metadata, OWN_KEYS, schema="vault") is keys
    later = Table("ktm_later", metadata, Column("x", KMSEncrypted(String(5))))
    assert keys in later._extra_dependencies
    assert f"vault.{OWN_KEYS}" in metadata.tables and DEFAULT_KEY_TABLE not in metadata.tables
    # one metadata, one key table
    with pytest.raises(ConfigurationError, match=rf"declares the key table vault\.{OWN_KEYS}"):
        key_table(metadata, "ktm_other_keys")


# -- create_all and drop_all -------------------------------------------------------------------


def test_create_all_creates_the_key_table_first_and_drop_all_drops_it_last(
    engine: Engine, vault: KeyVault
) -> None:
    metadata = models()
    created: list[str] = []
    for table in metadata.tables.values():
        sa.event.listen(table, "before_create", lambda t, *a, **k: created.append(t.name))
    # inside vault.using() the keys are made in create_all's own transaction
    with engine.begin() as conn, vault.using(conn):
        metadata.create_all(conn)
    assert created.index(DEFAULT_KEY_TABLE) < created.index(PATIENTS)
    assert [(r.scope, r.purpose) for r in key_rows(vault)] == [
        (PATIENTS, "data"),
        (PATIENTS, "search"),
    ]
    patients = metadata.tables[PATIENTS]
    with engine.begin() as conn:
        conn.execute(patients.insert(), [{"id": 1, "name": "Kim", "email": "kim@x.io"}])
    with engine.connect() as conn:
        found = conn.execute(select(patients.c.name).where(patients.c.email == "kim@x.io"))
        assert found.scalar_one() == "Kim"

    dropped: list[str] = []
    for table in metadata.tables.values():
        sa.event.listen(table, "after_drop", lambda t, *a, **k: dropped.append(t.name))
    metadata.drop_all(engine)
    assert dropped[-1] == DEFAULT_KEY_TABLE
    assert DEFAULT_KEY_TABLE not in inspect(engine).get_table_names()


def test_create_all_without_a_key_table_makes_one_for_the_first_write(
    engine: Engine, vault: KeyVault
) -> None:
    """The documented start of an application, without vault.create_table()."""
    metadata = models()
    metadata.create_all(engine)
    assert DEFAULT_KEY_TABLE in inspect(engine).get_table_names()
    patients = metadata.tables[PATIENTS]
    with engine.begin() as conn:
        conn.execute(patients.insert(), [{"id": 1, "name": "Kim", "email": "kim@x.io"}])
    with engine.connect() as conn:
        assert conn.execute(select(patients.c.name)).scalar_one() == "Kim"
    assert {r.purpose for r in key_rows(vault)} == {"data", "search"}


# -- a vault whose key table is another one ------------------------------------------------------


def test_a_vault_with_another_key_table_says_so() -> None:
    engine = create_engine("sqlite://")
    vault = KeyVault(engine, LocalKms(os.urandom(32)), table_name=OWN_KEYS)
    try:
        vault.create_table()
        metadata = models()  # the default key table
        message = (
            rf"models of {PATIENTS} use the key table {DEFAULT_KEY_TABLE} \(the default\), "
            rf"but this KeyVault uses {OWN_KEYS}: .*key_table\(metadata, '{OWN_KEYS}'\)"
        )
        with pytest.raises(ConfigurationError, match=message):
            metadata.create_all(engine)
        assert inspect(engine).get_table_names() == [OWN_KEYS]  # refused before any DDL
        with pytest.raises(ConfigurationError, match=message):
            vault.create_keys(metadata)
        # a declared key table of another schema: named with its schema
        other = key_table(models(), OWN_KEYS, schema="elsewhere")
        with pytest.raises(ConfigurationError, match=rf"key table elsewhere\.{OWN_KEYS},"):
            vault.create_keys(other.metadata)
        # Alembic's op.create_table() builds each table in a MetaData of its own, with the
        # default key table: inside vault.using() (a migration) that one is let through
        with engine.begin() as conn, vault.using(conn):
            Operations(MigrationContext.configure(conn)).create_table(
                "ktm_migrated",
                Column("id", Integer, primary_key=True),
                Column("name", KMSEncrypted(String(20))),
            )
        assert [r.scope for r in key_rows(vault)] == ["ktm_migrated"]
        # declared as the vault's: accepted
        key_table(metadata, OWN_KEYS)
        metadata.create_all(engine)
        assert {r.scope for r in key_rows(vault)} == {"ktm_migrated", PATIENTS}
        assert DEFAULT_KEY_TABLE not in inspect(engine).get_table_names()
    finally:
        vault.close()
        engine.dispose()


# -- Alembic's autogenerate ----------------------------------------------------------------------


def test_autogenerate_leaves_an_existing_key_table_alone(engine: Engine, vault: KeyVault) -> None:
    """The key table made by vault.create_table() (or op.create_kms_key_table()), and
    the models' tables: nothing to do, so no drop_table of the key table."""
    vault.create_table()
    metadata = models()
    for table in metadata.sorted_tables:
        if table.name != DEFAULT_KEY_TABLE:
            table.create(engine)
    assert diffs(engine, metadata) == []
    # the models made by create_all: the same
    metadata.drop_all(engine)
    metadata.create_all(engine)
    assert diffs(engine, metadata) == []
    metadata.drop_all(engine)
    # a key table of another name, declared in the models after them
    vault.close()
    own = KeyVault(engine, LocalKms(os.urandom(32)), table_name=OWN_KEYS)
    try:
        key_table(metadata, OWN_KEYS)
        metadata.create_all(engine)
        assert diffs(engine, metadata) == []
        assert DEFAULT_KEY_TABLE not in inspect(engine).get_table_names()
    finally:
        own.close()


def test_autogenerate_creates_the_key_table_in_a_first_revision(
    engine: Engine, vault: KeyVault
) -> None:
    """Against an empty database the key table comes first; the rendered revision runs,
    makes the encrypted table's keys, and leaves nothing for the next autogenerate."""
    metadata = models()
    found = diffs(engine, metadata)
    assert (found[0][0], found[0][1].name) == ("add_table", DEFAULT_KEY_TABLE)
    assert {d[1].name for d in found} == {DEFAULT_KEY_TABLE, PATIENTS, "ktm_wards"}

    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"render_item": render_item, "target_metadata": metadata}
        )
        script = produce_migrations(context, metadata)
        code = render_python_code(script.upgrade_ops, render_item=render_item)
        conn.rollback()  # the comparison's reads
        with vault.using(conn), conn.begin():
            namespace = {
                "op": Operations(MigrationContext.configure(conn)),
                "sa": sa,
                "mysql": mysql,
                "KMSEncrypted": KMSEncrypted,
            }
            exec("def upgrade():\n" + code, namespace)  # the rendered revision
            namespace["upgrade"]()
    assert f"op.create_table('{DEFAULT_KEY_TABLE}'" in code and "drop_table" not in code
    assert {r.purpose for r in key_rows(vault, PATIENTS)} == {"data", "search"}
    assert diffs(engine, metadata) == []


def test_autogenerate_refuses_models_with_another_key_table_than_the_vault(
    engine: Engine,
) -> None:
    """Else it would propose creating the models' key table and dropping the vault's."""
    vault = KeyVault(engine, LocalKms(os.urandom(32)), table_name=OWN_KEYS)
    try:
        vault.create_table()
        metadata = models()
        with pytest.raises(
            ConfigurationError,
            match=rf"models use the key table {DEFAULT_KEY_TABLE} \(the default\), but the "
            rf"KeyVault of the migration's engine uses {OWN_KEYS}",
        ):
            diffs(engine, metadata)
    finally:
        vault.close()
