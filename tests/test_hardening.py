"""Paths to lost rows or wrong answers found by probing, each pinned by a test."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import (
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    select,
    text,
    type_coerce,
)
from sqlalchemy.engine import Engine

from sqlalchemy_kms import KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms.errors import KeyLifecycleError, KeyTableMissingError


def _patients(metadata: MetaData) -> Table:
    return Table(
        "hard_patients",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", KMSEncrypted(String(50))),
    )


def test_missing_key_table_leaves_a_shared_transaction_usable(engine: Engine) -> None:
    """A migration creating an encrypted table before the key table exists: the
    transaction goes on (PostgreSQL would abort it on a failed query), and the first
    use of a key says what is missing."""
    vault = KeyVault(engine, LocalKms(bytes(32)))
    metadata = MetaData()
    patients = _patients(metadata)
    with engine.connect() as conn, vault.using(conn):
        patients.create(conn)  # after_create would make the table's keys
        assert conn.execute(text("SELECT 1")).scalar() == 1  # the transaction is fine
        with pytest.raises(KeyTableMissingError, match="create_table"):
            conn.execute(patients.insert().values(id=1, name="Kim"))
        conn.rollback()
    vault.create_table()
    with engine.begin() as conn:
        metadata.create_all(conn)
        conn.execute(patients.insert().values(id=1, name="Kim"))
    with engine.connect() as conn:
        assert conn.execute(select(patients.c.name)).scalar_one() == "Kim"
    vault.close()


# -- retiring a key while the application writes ---------------------------------------------

APP_WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine
    sys.path.insert(0, os.environ["PROJECT_DIR"])
    from sqlalchemy_kms import KeyVault, KMSEncrypted, LocalKms

    engine = create_engine(os.environ["DB_URL"])
    vault = KeyVault(engine, LocalKms(bytes.fromhex(os.environ["MASTER_KEY"])))  # defaults
    table = Table(
        "hard_patients", MetaData(),
        Column("id", Integer, primary_key=True),
        Column("name", KMSEncrypted(String(50))),
    )
    stop = Path(os.environ["STOP_FILE"])
    number = 1000
    print("writing", flush=True)
    while not stop.exists():
        number += 1
        with engine.begin() as conn:
            conn.execute(table.insert().values(id=number, name=f"patient {number}"))
        time.sleep(0.02)
    print("wrote", number - 1000, flush=True)
""")


def _operator_step(action: Callable[[], object], deadline: float) -> None:
    """Run one step of the documented procedure as an operator would: when refused,
    do what the message says (wait, or re-encrypt first) and try again."""
    while True:
        try:
            action()
            return
        except KeyLifecycleError as error:
            if time.monotonic() > deadline:
                raise
            if "allowed after" not in str(error) and "still use this key" not in str(error):
                raise
            time.sleep(1)


@pytest.mark.slow
def test_retirement_procedure_loses_no_row_while_the_app_writes(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    master = os.urandom(32)
    operator = KeyVault(engine, LocalKms(master))  # default grace period
    operator.create_table()
    metadata = MetaData()
    patients = _patients(metadata)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(patients.insert(), [{"id": i, "name": f"old {i}"} for i in range(1, 51)])
    stop = tmp_path / "stop"
    env = dict(
        os.environ,
        DB_URL=db_url,
        MASTER_KEY=master.hex(),
        STOP_FILE=str(stop),
        PROJECT_DIR=str(Path(__file__).parent.parent),
    )
    app = subprocess.Popen(
        [sys.executable, "-c", APP_WRITER], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert app.stdout is not None and app.stdout.readline().strip() == "writing"
        time.sleep(1)
        deadline = time.monotonic() + 240
        # the README's sequence: rotate, reencrypt, retire version 1, destroy version 1
        assert operator.rotate_key(patients) == 2
        operator.reencrypt(patients)

        def retire() -> None:
            operator.reencrypt(patients)  # rows the app wrote meanwhile
            operator.retire_key(patients, 1)

        _operator_step(retire, deadline)
        _operator_step(lambda: operator.destroy_key(patients, 1, confirm=True), deadline)
        time.sleep(1)  # the app goes on writing after the destruction
    finally:
        stop.touch()
        out, _ = app.communicate(timeout=60)
    assert app.returncode == 0, out
    written = int(out.split()[-1])
    assert written > 100
    # a fresh process reads every row
    fresh_engine = create_engine(db_url)
    fresh = KeyVault(fresh_engine, LocalKms(master))
    with fresh_engine.connect() as conn:
        rows = dict(conn.execute(select(patients.c.id, patients.c.name)).all())
    assert len(rows) == 50 + written
    assert all(name == (f"old {i}" if i <= 50 else f"patient {i}") for i, name in rows.items())
    assert operator.key_versions(patients) == [2]
    fresh.close()
    fresh_engine.dispose()
    operator.close()


def test_retire_and_destroy_wait_for_the_grace_period(engine: Engine) -> None:
    vault = KeyVault(engine, LocalKms(bytes(32)), grace_period=2)
    vault.create_table()
    metadata = MetaData()
    patients = _patients(metadata)
    metadata.create_all(engine)
    vault.rotate_key(patients)
    with pytest.raises(KeyLifecycleError, match=r"retire allowed after \d\d:\d\d:\d\d UTC"):
        vault.retire_key(patients, 1)
    time.sleep(2.1)
    vault.retire_key(patients, 1)
    vault.destroy_key(patients, 1, confirm=True)
    assert vault.key_versions(patients) == [2]
    vault.close()


def test_refresh_interval_is_capped_so_the_grace_period_covers_it(engine: Engine) -> None:
    with pytest.raises(ValueError, match="at most 60"):
        KeyVault(engine, LocalKms(bytes(32)), refresh_interval=61)


@pytest.mark.parametrize("by_name", [False, True])
def test_destroy_recounts_and_refuses_a_key_still_in_use(engine: Engine, by_name: bool) -> None:
    vault = KeyVault(engine, LocalKms(bytes(32)), grace_period=0)
    vault.create_table()
    metadata = MetaData()
    patients = _patients(metadata)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(patients.insert().values(id=1, name="under key 1"))
        stored = conn.execute(select(type_coerce(patients.c.name, LargeBinary))).scalar_one()
    vault.rotate_key(patients)
    vault.reencrypt(patients)
    vault.retire_key(patients, 1)
    # a value under key 1 reaches the table after the retirement (a slow transaction)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO hard_patients (id, name) VALUES (2, :stored)"),
            {"stored": bytes(stored)},
        )
    target: Table | str = "hard_patients" if by_name else patients
    with pytest.raises(KeyLifecycleError, match="1 stored values still use this key"):
        vault.destroy_key(target, 1, confirm=True)
    assert vault.key_versions(patients) == [2]
    with engine.begin() as conn:
        conn.execute(patients.delete().where(patients.c.id == 2))
    vault.destroy_key(target, 1, confirm=True)
    vault.close()


# -- a column switched to deterministic later ---------------------------------------------


def _users(deterministic: bool) -> tuple[MetaData, Table]:
    metadata = MetaData()
    users = Table(
        "hard_users",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("email", KMSEncrypted(String(50), deterministic=deterministic)),
    )
    return metadata, users


def test_switching_to_deterministic_is_reported_and_reencrypt_converts(engine: Engine) -> None:
    vault = KeyVault(engine, LocalKms(bytes(32)))
    vault.create_table()
    metadata, randomized = _users(False)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            randomized.insert(), [{"id": 1, "email": "kim@x.io"}, {"id": 2, "email": None}]
        )
    _, users = _users(True)  # the model changes: the column becomes deterministic
    with engine.begin() as conn:
        conn.execute(users.insert().values(id=3, email="lee@x.io"))
    [status] = vault.status([users])
    [email] = status.columns
    assert (email.other_mode_rows, email.other_rows, email.null_rows) == (1, 0, 1)
    assert email.other_mode == "1 randomized in a deterministic column: run reencrypt"
    report = vault.verify([users])
    assert report.ok and report.tables[0].columns[0].other_mode_rows == 1
    with engine.connect() as conn:  # equality cannot see the old row yet
        assert conn.execute(select(users.c.id).where(users.c.email == "kim@x.io")).all() == []
    vault.reencrypt(users)
    [email] = vault.status([users])[0].columns
    assert email.other_mode_rows == 0 and email.rows_by_version == {1: 2}
    with engine.connect() as conn:
        assert conn.execute(select(users.c.id).where(users.c.email == "kim@x.io")).all() == [(1,)]
        assert dict(conn.execute(select(users.c.id, users.c.email)).all()) == {
            1: "kim@x.io",
            2: None,
            3: "lee@x.io",
        }
    vault.close()


def test_rotation_past_the_last_version_is_refused_not_retried(engine: Engine) -> None:
    vault = KeyVault(engine, LocalKms(bytes(32)))
    vault.create_table()
    vault.create_key("last_people")
    with engine.begin() as conn:
        conn.execute(
            vault.table.update()
            .values(key_version=2**31 - 1)
            .where(vault.table.c.scope == "last_people")
        )
    calls_before = vault.provider.calls["GenerateDataKey"]
    with pytest.raises(KeyLifecycleError, match="last version"):
        vault.rotate_key("last_people")
    assert vault.provider.calls["GenerateDataKey"] == calls_before  # no KMS call spent
    vault.close()


def test_a_key_row_the_constraints_refuse_is_a_clear_error(tmp_path: Path) -> None:
    """A key table made before its CHECK constraints may hold such a row."""
    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    vault = KeyVault(engine, LocalKms(bytes(32)))
    vault.create_table()
    vault.create_key("old_people")
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
        conn.execute(text("UPDATE kms_data_keys SET purpose = 'DATA'"))
    assert vault.key_versions("another_table") == []  # rows of other tables are fine
    with pytest.raises(KeyLifecycleError, match="row is invalid"):
        vault.export_keys()  # was a bare KeyError
    vault.close()
