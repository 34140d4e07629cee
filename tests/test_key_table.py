"""The key table's own rules: named CHECK constraints on ``purpose``, ``state`` and
``key_version``; ``scope``, ``purpose`` and ``state`` compared exactly (a binary
collation on MySQL and MariaDB); one scope per table; and the refusals that a
key table made before those rules still needs (retire and destroy of a row it
should never have held).

Each database test runs on SQLite, PostgreSQL and MariaDB (the ``engine``
fixture); the tables start with ``kt_`` so that they never meet other modules'.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    exc,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine

from sqlalchemy_kms import KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms._keytable import KeySeries, KeyTable, key_table, table_scope
from sqlalchemy_kms.errors import ConfigurationError, KeyLifecycleError

LONG_AGO = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)


def key_row(**changes: Any) -> dict[str, Any]:
    row = {
        "scope": "kt_patients",
        "purpose": "data",
        "key_version": 1,
        "state": "enabled",
        "provider": "local",
        "master_key_id": "local:0000000000000000",
        "wrapped_key": os.urandom(60),
        "created_at": LONG_AGO,
    }
    return {**row, **changes}


def older_key_table(metadata: MetaData, name: str) -> Table:
    """The key table as the first release defined it: no CHECK constraint, the
    database's default collation."""
    return Table(
        name,
        metadata,
        Column("scope", String(255), primary_key=True),
        Column("purpose", String(16), primary_key=True),
        Column("key_version", Integer, primary_key=True, autoincrement=False),
        Column("state", String(16), nullable=False),
        Column("provider", String(32), nullable=False),
        Column("master_key_id", String(2048), nullable=False),
        Column("wrapped_key", LargeBinary, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )


# -- CHECK constraints -----------------------------------------------------------------------------


def test_the_key_table_has_named_check_constraints(engine: Engine) -> None:
    keys = KeyTable(MetaData(), "kt_keys")
    keys.create(engine)
    names = {check["name"] for check in inspect(engine).get_check_constraints("kt_keys")}
    assert {"ck_kt_keys_purpose", "ck_kt_keys_state", "ck_kt_keys_key_version"} <= names


def test_the_names_of_the_constraints_ignore_the_metadatas_naming_convention() -> None:
    metadata = MetaData(naming_convention={"ck": "ck_%(table_name)s_%(constraint_name)s"})
    table = key_table(metadata, "kt_keys")
    from sqlalchemy.schema import CreateTable

    ddl = str(CreateTable(table).compile())
    assert "CONSTRAINT ck_kt_keys_state CHECK" in ddl


@pytest.mark.parametrize(
    "invalid",
    [
        {"state": "ENABLED"},
        {"state": "enabled "},
        {"state": "Retired"},
        {"state": "active"},
        {"purpose": "DATA"},
        {"purpose": "search "},
        {"purpose": "other"},
        {"key_version": 0},
        {"key_version": -1},
        {"key_version": 2**31},
    ],
    ids=repr,
)
def test_the_key_table_refuses_a_row_it_must_never_hold(
    engine: Engine, invalid: dict[str, Any]
) -> None:
    keys = KeyTable(MetaData(), "kt_keys")
    keys.create(engine)
    with engine.begin() as conn:
        conn.execute(insert(keys.table), key_row())
    with pytest.raises(exc.DBAPIError), engine.begin() as conn:
        conn.execute(insert(keys.table), key_row(**{"key_version": 2, **invalid}))
    with engine.connect() as conn:
        held = conn.execute(select(keys.table.c.key_version, keys.table.c.state)).all()
    assert [tuple(row) for row in held] == [(1, "enabled")]


# -- exact comparison -----------------------------------------------------------------------------


def test_tables_whose_names_differ_in_case_get_keys_of_their_own(
    engine: Engine, db_name: str
) -> None:
    if db_name == "sqlite":
        pytest.skip("SQLite's table names ignore case: People and people are one table")
    if db_name == "mariadb":
        with engine.connect() as conn:
            if conn.execute(text("SELECT @@lower_case_table_names")).scalar() != 0:
                pytest.skip("this server folds table names to lower case")
    vault = KeyVault(engine, LocalKms(os.urandom(32)))
    vault.create_table()
    metadata = MetaData()
    tables = [
        Table(
            name,
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=False),
            Column("name", KMSEncrypted(String(50))),
            Column("email", KMSEncrypted(String(50), deterministic=True)),
        )
        for name in ("Kt_People", "kt_people")
    ]
    metadata.create_all(engine)  # the second one's key used to be the first one's row
    for number, table in enumerate(tables):
        with engine.begin() as conn:
            conn.execute(insert(table), {"id": 1, "name": f"n{number}", "email": f"e{number}"})
    with engine.connect() as conn:
        rows = conn.execute(select(vault.table.c.scope, vault.table.c.purpose)).all()
    assert sorted(tuple(row) for row in rows) == [
        ("Kt_People", "data"),
        ("Kt_People", "search"),
        ("kt_people", "data"),
        ("kt_people", "search"),
    ]
    vault.close()
    reader = KeyVault(engine, vault.provider)  # a fresh process: every key from the table
    for number, table in enumerate(tables):
        with engine.connect() as conn:
            found = conn.execute(select(table.c.name).where(table.c.email == f"e{number}"))
            assert found.scalars().all() == [f"n{number}"]
    reader.close()


def test_only_a_row_spelled_exactly_enabled_is_an_enabled_key(engine: Engine) -> None:
    # a key table made before the binary collation: MariaDB's default collation takes
    # ENABLED, "enabled " and another table's Kt_Legacy rows for this table's enabled keys
    legacy = older_key_table(MetaData(), "kt_legacy_keys")
    legacy.create(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(legacy),
            [
                key_row(scope="kt_legacy", key_version=1),
                key_row(scope="kt_legacy", key_version=2, state="ENABLED"),
                key_row(scope="kt_legacy", key_version=3, state="enabled "),
                key_row(scope="Kt_Legacy", key_version=4),
                key_row(scope="kt_legacy", purpose="DATA", key_version=5),
            ],
        )
    keys = KeyTable(MetaData(), "kt_legacy_keys")
    with engine.connect() as conn:
        enabled = keys.enabled(conn, KeySeries("kt_legacy", deterministic=False))
    assert [row.version for row in enabled] == [1]


# -- a row only an older key table can hold --------------------------------------------------------


def test_retire_and_destroy_refuse_an_invalid_row_with_a_lifecycle_error(engine: Engine) -> None:
    legacy = older_key_table(MetaData(), "kt_legacy_keys")
    legacy.create(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(legacy),
            [
                key_row(scope="kt_legacy", key_version=0),  # no value can name version 0
                key_row(scope="kt_legacy", key_version=1),
                key_row(scope="kt_legacy", key_version=2, state="ENABLED"),
                key_row(scope="kt_legacy", key_version=3, state="retired"),
                key_row(scope="kt_legacy", key_version=-1, state="retired"),
            ],
        )
    table = Table(
        "kt_legacy",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("name", KMSEncrypted(String(50))),
    )
    vault = KeyVault(engine, LocalKms(os.urandom(32)), table_name="kt_legacy_keys")
    try:
        for version, state in [(0, "'enabled'"), (2, "'ENABLED'")]:
            with pytest.raises(KeyLifecycleError, match="row is invalid") as info:
                vault.retire_key(table, version)
            assert state in str(info.value) and info.value.key_version == version
        with pytest.raises(KeyLifecycleError, match="row is invalid"):
            vault.destroy_key(table, -1, confirm=True)
    finally:
        vault.close()
    with engine.connect() as conn:
        assert conn.execute(
            select(legacy.c.key_version).order_by(legacy.c.key_version)
        ).scalars().all() == [-1, 0, 1, 2, 3]


# -- one scope per table ---------------------------------------------------------------------------


def test_a_dot_in_an_encrypted_tables_name_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="cannot contain a dot") as info:
        Table(
            "clinic.patients",
            MetaData(),
            Column("id", Integer, primary_key=True),
            Column("name", KMSEncrypted(String(50))),
        )
    assert info.value.table == "clinic.patients"
    in_schema = Table("patients", MetaData(), Column("id", Integer), schema="clinic")
    assert table_scope(in_schema) == "clinic.patients"
    # a schema may hold dots (SQL Server's database.owner): the name after the last dot
    # is the table's, so each scope still names one table
    assert table_scope(Table("patients", MetaData(), schema="db.clinic")) == "db.clinic.patients"
    Table("plain.name", MetaData(), Column("id", Integer))  # no encrypted column: not ours
