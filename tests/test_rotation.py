"""Key lifecycle: rotate, re-encrypt online, retire, destroy, rewrap, export/import,
encrypt and decrypt columns in place, and the audit trail."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Date,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine

from sqlalchemy_kms import AwsKms, KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms.errors import (
    DecryptionError,
    KeyLifecycleError,
    UnknownKeyVersionError,
)
from sqlalchemy_kms.lifecycle import binary_to_plaintext_ddl, plaintext_to_binary_ddl

from .helpers import kms_client


def people(metadata: MetaData, name: str = "people") -> Table:
    return Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", KMSEncrypted(String(100))),
        Column("email", KMSEncrypted(String(100), deterministic=True), unique=True),
        Column("note", KMSEncrypted(String(100)), nullable=True),
    )


def expected(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "name": f"name {i}",
        "email": f"user{i}@example.com",
        "note": None if i % 7 == 0 else f"note {i}",
    }


def fill(engine: Engine, table: Table, count: int, start: int = 0) -> None:
    with engine.begin() as conn:
        conn.execute(insert(table), [expected(i) for i in range(start, start + count)])


def read_all(engine: Engine, table: Table) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(table).order_by(table.c.id)).mappings().all()
    return [dict(row) for row in rows]


def versions_in_use(engine: Engine, table: Table, column: str = "name") -> set[bytes]:
    with engine.connect() as conn:
        return {
            bytes(v)[:6]
            for v in conn.execute(text(f"SELECT {column} FROM {table.name}")).scalars()
            if v is not None
        }


@pytest.fixture
def table(engine: Engine, vault: KeyVault) -> Table:
    metadata = MetaData()
    people_table = people(metadata)
    metadata.create_all(engine)
    fill(engine, people_table, 250)
    return people_table


def test_rotate_and_reencrypt_moves_every_value(
    engine: Engine, vault: KeyVault, table: Table
) -> None:
    assert vault.rotate_key(table) == 2
    assert vault.rotate_key(table, search=True) == 2
    fill(engine, table, 10, start=1000)  # new writes use version 2 at once
    [before] = vault.status([table])
    spread = {c.column: c.rows_by_version for c in before.columns}
    assert spread["name"] == {1: 250, 2: 10}
    assert spread["email"] == {1: 250, 2: 10}
    assert spread["note"] == {1: 214, 2: 8}
    with engine.connect() as conn:  # equality spans both search key versions meanwhile
        assert conn.execute(
            select(table.c.id).where(
                table.c.email.in_(["user3@example.com", "user1003@example.com"])
            )
        ).scalars().all() == [3, 1003]
    seen: list[int] = []
    done = vault.reencrypt(table, batch_size=64, progress=lambda p: seen.append(p.scanned))
    assert done.scanned == done.total == 260
    assert done.rewritten == 250 and done.conflicts == 0
    assert seen == sorted(seen) and seen[-1] == 260 and len(seen) == 5
    [after] = vault.status([table])
    assert {c.column: c.rows_by_version for c in after.columns} == {
        "name": {2: 260},
        "email": {2: 260},
        "note": {2: 222},
    }
    assert {c.column: c.null_rows for c in after.columns}["note"] == 38
    assert [k.active for k in after.keys if k.purpose == "data"] == [False, True]
    assert read_all(engine, table) == [expected(i) for i in range(250)] + [
        expected(i) for i in range(1000, 1010)
    ]
    again = vault.reencrypt(table)
    assert again.rewritten == 0  # a finished job does nothing
    with engine.connect() as conn:
        assert (
            conn.execute(
                select(table.c.id).where(table.c.email == "user3@example.com")
            ).scalar_one()
            == 3
        )


def test_retire_and_destroy_rules(engine: Engine, vault: KeyVault, table: Table) -> None:
    with pytest.raises(KeyLifecycleError, match="active"):
        vault.retire_key(table, 1)
    vault.rotate_key(table)
    with pytest.raises(KeyLifecycleError, match="464 stored values"):  # name and note
        vault.retire_key(table, 1)
    with pytest.raises(KeyLifecycleError, match="retired"):
        vault.destroy_key(table, 1, confirm=True)
    with engine.connect() as conn:
        old_value = bytes(conn.execute(text("SELECT name FROM people WHERE id = 5")).scalar_one())
    vault.reencrypt(table)
    vault.retire_key(table, 1)
    with pytest.raises(KeyLifecycleError, match="confirm"):
        vault.destroy_key(table, 1)
    vault.destroy_key(table, 1, confirm=True)
    with pytest.raises(KeyLifecycleError, match="no such key"):
        vault.destroy_key(table, 1, confirm=True)
    # a value from before (a restored backup) is gone for good; nothing else is
    with engine.begin() as conn:
        conn.execute(text("UPDATE people SET name = :v WHERE id = 5"), {"v": old_value})
    vault.clear_cache()
    with engine.connect() as conn, pytest.raises(UnknownKeyVersionError) as info:
        conn.execute(select(table.c.name).where(table.c.id == 5)).all()
    assert (info.value.table, info.value.column, info.value.key_version) == ("people", "name", 1)
    with engine.connect() as conn:
        others = conn.execute(select(table).where(table.c.id != 5).order_by(table.c.id)).all()
    assert [dict(row._mapping) for row in others] == [expected(i) for i in range(250) if i != 5]


def test_export_and_import_keys(engine: Engine, vault: KeyVault, table: Table) -> None:
    vault.rotate_key(table)
    exported = vault.export_keys()
    assert {(k["scope"], k["purpose"], k["key_version"]) for k in exported["keys"]} == {
        ("people", "data", 1),
        ("people", "data", 2),
        ("people", "search", 1),
    }
    assert all("wrapped_key" in k and "plaintext" not in str(k).lower() for k in exported["keys"])
    assert vault.import_keys(exported) == 0  # all present already
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM kms_data_keys"))
    vault.clear_cache()
    assert vault.import_keys(exported) == 3
    assert read_all(engine, table)[:3] == [expected(i) for i in range(3)]
    conflicting = dict(exported)
    conflicting["keys"] = [dict(exported["keys"][0], wrapped_key="AAAA")] + [
        dict(k, key_version=k["key_version"] + 10) for k in exported["keys"][1:]
    ]
    with pytest.raises(KeyLifecycleError, match="nothing imported"):
        vault.import_keys(conflicting)
    assert len(vault.export_keys()["keys"]) == 3


def export_with(exported: dict[str, Any], *keys: dict[str, Any]) -> dict[str, Any]:
    return dict(exported, keys=list(keys))


def test_import_checks_every_key_and_imports_nothing_on_an_invalid_one(
    engine: Engine, vault: KeyVault, table: Table
) -> None:
    exported = vault.export_keys()
    before = exported["keys"]
    valid = dict(before[0], scope="people_restored")
    for damage, message in [
        ({"state": "ENABLED"}, "state must be 'enabled' or 'retired', not 'ENABLED'"),
        ({"state": "enabled "}, "state must be 'enabled' or 'retired', not 'enabled '"),
        ({"state": "active"}, "state must be 'enabled' or 'retired', not 'active'"),
        ({"purpose": "DATA"}, "purpose must be 'data' or 'search', not 'DATA'"),
        ({"purpose": "search "}, "purpose must be 'data' or 'search'"),
        ({"key_version": 0}, "key_version must be in 1..2147483647, not 0"),
        ({"key_version": -1}, "key_version must be in 1..2147483647, not -1"),
        ({"key_version": 2**31}, "key_version must be in 1..2147483647, not 2147483648"),
        ({"key_version": "3"}, "key_version must be an integer, not '3'"),
        ({"key_version": True}, "key_version must be an integer, not True"),
        ({"key_version": 1.5}, "key_version must be an integer, not 1.5"),
        ({"scope": ""}, "scope must be a text of 1 to 255 characters"),
        ({"scope": "p" * 256}, "scope must be a text of 1 to 255 characters"),
        ({"provider": "x" * 33}, "provider must be a text of 1 to 32 characters"),
        ({"wrapped_key": ""}, "wrapped_key is empty"),
        ({"created_at": "yesterday"}, "created_at is not an ISO 8601 time"),
    ]:
        invalid = {**valid, "key_version": 7, **damage}
        with pytest.raises(KeyLifecycleError) as info:
            vault.import_keys(export_with(exported, valid, invalid))
        assert f"the key export is damaged: key 2: {message}" in str(info.value)
        assert str(info.value).endswith("; nothing imported")
    with pytest.raises(KeyLifecycleError, match="key 2: the same table, purpose and version"):
        vault.import_keys(export_with(exported, valid, dict(valid)))
    assert vault.export_keys()["keys"] == before  # nothing imported, ever
    assert vault.import_keys(export_with(exported, valid)) == 1


def test_import_after_a_rewrap_restores_one_destroyed_version(
    engine: Engine, vault: KeyVault, table: Table
) -> None:
    vault.rotate_key(table)
    backup = vault.export_keys()  # data 1 and 2, search 1, under the first master key
    new = LocalKms(os.urandom(32))
    assert vault.rewrap(new) == 3
    # the same data keys, wrapped under another master key: nothing to add, no conflict
    assert vault.import_keys(backup) == 0
    assert vault.import_keys(backup, table=table, version=1) == 0

    with engine.begin() as conn:  # version 1 of both keys destroyed by mistake
        conn.execute(text("DELETE FROM kms_data_keys WHERE key_version = 1"))
    vault.clear_cache()
    with engine.connect() as conn, pytest.raises(UnknownKeyVersionError):
        conn.execute(select(table.c.name).where(table.c.id == 1)).all()

    assert vault.import_keys(backup, table=table, version=1) == 1  # the data key only
    assert [k["purpose"] for k in vault.export_keys()["keys"]] == ["data", "data"]
    assert vault.import_keys(backup, table="people", version=1, search=True) == 1
    assert read_all(engine, table) == [expected(i) for i in range(250)]
    # restored as backed up, under the first master key; rewrap moves them to the new one
    assert vault.rewrap(new) == 2
    assert {k["master_key_id"] for k in vault.export_keys()["keys"]} == {new.master_key_id}

    with pytest.raises(KeyLifecycleError, match="holds no data key version 7 of people"):
        vault.import_keys(backup, table=table, version=7)
    with pytest.raises(KeyLifecycleError, match="holds no keys of nobody"):
        vault.import_keys(backup, table="nobody")
    with pytest.raises(ValueError, match="give table= too"):
        vault.import_keys(backup, version=1)
    with pytest.raises(ValueError, match="give version= too"):
        vault.import_keys(backup, table=table, search=True)
    # under the same master key, other wrapped bytes are another key: refused
    current = vault.export_keys()
    forged = dict(current["keys"][0], wrapped_key=base64.b64encode(os.urandom(60)).decode())
    with pytest.raises(KeyLifecycleError, match="different key with the same id"):
        vault.import_keys(export_with(current, forged))


@pytest.mark.aws_kms
def test_rewrap_under_a_new_cmk_survives_the_old_one_being_disabled(
    engine: Engine, db_url: str, kms: AwsKms, kms_endpoint: str, table: Table
) -> None:
    client = kms_client(kms_endpoint)
    new_cmk = client.create_key(Description="second CMK")["KeyMetadata"]
    old_arn = client.describe_key(KeyId=kms.master_key_id)["KeyMetadata"]["Arn"]
    target_client = kms_client(kms_endpoint)
    calls: list[str] = []
    target_client.meta.events.register(
        "before-call.kms", lambda model, **kw: calls.append(model.name)
    )
    vault = KeyVault(engine, kms, replace=True)
    assert vault.rewrap(AwsKms(new_cmk["KeyId"], client=target_client)) == 2
    # KMS re-wraps each key itself: no Decrypt, so no data key in this process
    assert calls.count("ReEncrypt") == 2 and "Decrypt" not in calls
    exported = vault.export_keys()["keys"]
    assert {k["master_key_id"] for k in exported} == {new_cmk["Arn"]}

    reader_client = kms_client(kms_endpoint)

    def disabled(params: dict[str, Any], **kwargs: Any) -> None:
        if params.get("KeyId") == old_arn:
            from botocore.exceptions import ClientError

            raise ClientError(
                {"Error": {"Code": "DisabledException", "Message": "disabled"}}, "Decrypt"
            )

    reader_client.meta.events.register("before-parameter-build.kms.Decrypt", disabled)
    reader = KeyVault(create_engine(db_url), AwsKms(new_cmk["KeyId"], client=reader_client))
    assert read_all(reader.engine, table) == [expected(i) for i in range(250)]
    assert vault.rewrap(reader.provider) == 0  # already under the new CMK
    reader.close()
    reader.engine.dispose()


def test_application_writes_during_reencryption_are_never_lost(
    engine: Engine, vault: KeyVault, table: Table
) -> None:
    fill(engine, table, 1750, start=250)
    vault.rotate_key(table)
    last_written: dict[int, str] = {}
    stop = threading.Event()

    def application() -> None:
        rng = random.Random(7)
        n = 0
        while not stop.is_set() and n < 400:
            row_id = rng.randrange(2000)
            value = f"app write {n}"
            with engine.begin() as conn:
                conn.execute(update(table).where(table.c.id == row_id).values(name=value))
            last_written[row_id] = value
            n += 1

    writer = threading.Thread(target=application)
    writer.start()
    try:
        vault.reencrypt(table, batch_size=50)
    finally:
        stop.set()
        writer.join()
    vault.reencrypt(table)
    rows = {row["id"]: row for row in read_all(engine, table)}
    assert last_written  # the application really wrote meanwhile
    for row_id, row in rows.items():
        assert row["name"] == last_written.get(row_id, expected(row_id)["name"])
        assert row["email"] == expected(row_id)["email"]
    assert versions_in_use(engine, table) == {bytes([1, 1, 0, 0, 0, 2])}


KILLABLE_JOB = textwrap.dedent("""
    import os, sys
    from sqlalchemy import MetaData, create_engine
    sys.path.insert(0, os.environ["PROJECT_DIR"])
    from sqlalchemy_kms import KeyVault, LocalKms
    from tests.test_rotation import people
    engine = create_engine(os.environ["DB_URL"])
    vault = KeyVault(engine, LocalKms(bytes.fromhex(os.environ["MASTER_KEY"])))
    table = people(MetaData(), "big_people")
    print("started", flush=True)
    result = vault.reencrypt(table, batch_size=2000)
    print("done", result.rewritten, flush=True)
""")


@pytest.mark.slow
def test_reencryption_killed_at_random_points_resumes_without_loss(
    engine: Engine, db_url: str, db_name: str
) -> None:
    rows = 100_000
    master = os.urandom(32)
    vault = KeyVault(engine, LocalKms(master))
    vault.create_table()
    metadata = MetaData()
    big = people(metadata, "big_people")
    metadata.create_all(engine)
    for start in range(0, rows, 20_000):
        fill(engine, big, min(20_000, rows - start), start=start)
    vault.rotate_key(big)
    vault.rotate_key(big, search=True)
    env = dict(
        os.environ,
        DB_URL=db_url,
        MASTER_KEY=master.hex(),
        PROJECT_DIR=str(Path(__file__).parent.parent),
    )
    rng = random.Random(42)
    kills = 0
    for _ in range(3):
        with subprocess.Popen(
            [sys.executable, "-c", KILLABLE_JOB], env=env, stdout=subprocess.PIPE, text=True
        ) as job:
            assert job.stdout is not None and job.stdout.readline().strip() == "started"
            time.sleep(rng.uniform(0.3, 1.5))
            if job.poll() is None:
                os.kill(job.pid, signal.SIGKILL)
                kills += 1
            job.wait(60)
    assert kills >= 1
    [partial] = vault.status([big])
    finished = vault.reencrypt(big, batch_size=5000)
    assert finished.scanned == rows
    [after] = vault.status([big])
    assert {c.column: set(c.rows_by_version) for c in after.columns} == {
        "name": {2},
        "email": {2},
        "note": {2},
    }
    assert sum(after.columns[0].rows_by_version.values()) == rows
    assert partial.columns[0].rows_by_version != after.columns[0].rows_by_version or kills < 3
    got = read_all(engine, big)
    assert len(got) == rows
    for row in got:
        assert row == expected(row["id"])
    vault.close()


# -- encrypting an existing plaintext column ----------------------------------------


def legacy_tables(encrypted: bool, accept_plaintext: bool = False) -> Table:
    def kms(inner: Any, **kw: Any) -> Any:
        return KMSEncrypted(inner, accept_plaintext=accept_plaintext, **kw) if encrypted else inner

    return Table(
        "legacy",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("phone", kms(String(30)), nullable=True),
        Column("visits", kms(Integer), nullable=True),
        Column("born", kms(Date), nullable=True),
        Column("email", kms(String(100), deterministic=True), nullable=True),
    )


LEGACY = [
    {
        "id": i,
        "phone": f"010-{i:04d}-0000" if i % 5 else None,
        "visits": i * 3,
        "born": dt.date(1970, 1, 1) + dt.timedelta(days=i * 97),
        "email": f"legacy{i}@example.com",
    }
    for i in range(40)
]


def test_encrypt_an_existing_plaintext_column_in_place_and_back(
    engine: Engine, vault: KeyVault
) -> None:
    plain = legacy_tables(encrypted=False)
    plain.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(plain), LEGACY)
    transition = legacy_tables(encrypted=True, accept_plaintext=True)
    final = legacy_tables(encrypted=True)
    with engine.begin() as conn:
        for column in ("phone", "visits", "born", "email"):
            for statement in plaintext_to_binary_ddl(transition, column, engine.dialect):
                conn.execute(text(statement))
    # transition mode: the application reads plaintext and ciphertext alike
    assert read_all(engine, transition) == LEGACY
    with engine.connect() as conn:
        assert (
            conn.execute(
                select(transition.c.id).where(transition.c.email == "legacy7@example.com")
            ).scalar_one()
            == 7
        )
    with engine.connect() as conn, pytest.raises(DecryptionError):
        conn.execute(select(final.c.phone)).all()  # outside it, plaintext is an error
    for column in ("phone", "visits"):
        progress = vault.encrypt_column(transition, column, batch_size=7)
        assert progress.rewritten == sum(1 for r in LEGACY if r[column] is not None)
    assert read_all(engine, transition) == LEGACY  # half converted, all readable
    for column in ("born", "email"):
        vault.encrypt_column(transition, column, batch_size=7)
    assert vault.encrypt_column(transition, "phone").rewritten == 0  # resumable, idempotent
    assert read_all(engine, final) == LEGACY
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT phone, visits, email FROM legacy WHERE id = 1")).one()
        assert (
            conn.execute(
                select(final.c.id).where(final.c.email == "legacy7@example.com")
            ).scalar_one()
            == 7
        )
    assert all(bytes(v)[:2] in (b"\x01\x01", b"\x01\x02") for v in stored)
    assert b"010-0001" not in bytes(stored[0])

    # and the way out
    for column in ("phone", "visits", "born", "email"):
        vault.decrypt_column(transition, column, batch_size=9)
    assert read_all(engine, transition) == LEGACY
    with engine.begin() as conn:
        for column in ("phone", "visits", "born", "email"):
            for statement in binary_to_plaintext_ddl(transition, column, engine.dialect):
                conn.execute(text(statement))
    fresh = legacy_tables(encrypted=False)
    assert read_all(engine, fresh) == LEGACY


def test_job_inside_a_caller_transaction_uses_its_connection(
    engine: Engine, vault: KeyVault, table: Table
) -> None:
    with engine.begin() as conn, vault.using(conn):
        version = vault.rotate_key(table)
        result = vault.reencrypt(table, connection=conn)
        assert result.rewritten == 250
    assert version == 2
    assert versions_in_use(engine, table) == {bytes([1, 1, 0, 0, 0, 2])}
    assert read_all(engine, table)[:2] == [expected(0), expected(1)]


def test_audit_trail_records_kms_calls_and_key_changes(
    engine: Engine, vault: KeyVault, table: Table, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sqlalchemy_kms")
    vault.rotate_key(table)
    vault.clear_cache()
    read_all(engine, table)
    vault.reencrypt(table)
    vault.retire_key(table, 1)
    vault.destroy_key(table, 1, confirm=True)
    events = [
        record.sqlalchemy_kms
        for record in caplog.records  # type: ignore[attr-defined]
        if hasattr(record, "sqlalchemy_kms")
    ]
    operations = [(e["event"], e["operation"]) for e in events]
    for wanted in [
        ("kms_call", "GenerateDataKey"),
        ("key_change", "rotate"),
        ("kms_call", "Decrypt"),
        ("key_change", "retire"),
        ("key_change", "destroy"),
    ]:
        assert wanted in operations
    for event in events:
        assert event["table"] == "people" and event["outcome"] == "ok"
        assert event["master_key_id"] and event["key_version"] is not None
    cipher = vault.cache.get(("people", "data", 2))
    assert cipher is not None
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert cipher._data_key.hex() not in logged and "name 1" not in logged
    assert {r.name for r in caplog.records} <= {
        "sqlalchemy_kms.audit.kms",
        "sqlalchemy_kms.audit.keys",
    }


def test_partial_rewrap_keeps_every_table_readable(engine: Engine) -> None:
    old, new = LocalKms(os.urandom(32)), LocalKms(os.urandom(32))
    vault = KeyVault(engine, old)
    vault.create_table()
    metadata = MetaData()
    first, second = people(metadata, "first_people"), people(metadata, "second_people")
    metadata.create_all(engine)
    fill(engine, first, 5)
    fill(engine, second, 5)
    assert vault.rewrap(new, table=first) == 2  # data and search key of one table
    vault.clear_cache()
    assert read_all(engine, first) == read_all(engine, second) == [expected(i) for i in range(5)]
    assert vault.rewrap(new, table=second) == 2
    assert {k["master_key_id"] for k in vault.export_keys()["keys"]} == {new.master_key_id}
    only_new = KeyVault(engine, new, replace=True)
    assert read_all(engine, second) == [expected(i) for i in range(5)]
    only_new.close()


def test_damaged_export_is_refused(engine: Engine, vault: KeyVault, table: Table) -> None:
    exported = vault.export_keys()
    for damage in ({"wrapped_key": "not base64!"}, {"key_version": "x"}, {"purpose": "other"}):
        broken = dict(exported, keys=[dict(exported["keys"][0], **damage)])
        with pytest.raises(KeyLifecycleError, match="damaged"):
            vault.import_keys(broken)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE kms_data_keys"))
    from sqlalchemy_kms.errors import KeyTableMissingError

    with pytest.raises(KeyTableMissingError):
        vault.export_keys()
    with pytest.raises(KeyTableMissingError):
        vault.status([table])
