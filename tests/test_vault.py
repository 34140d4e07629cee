"""KeyVault: envelope encryption end to end, KMS call counts, races, SQLite writers."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import (
    MetaData,
    create_engine,
    func,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from sqlalchemy_kms import AwsKms, KeyVault, LocalKms
from sqlalchemy_kms.errors import (
    DecryptionError,
    KeyTableMissingError,
    KMSError,
    KMSInvalidCiphertextError,
    UnknownKeyVersionError,
)

from .helpers import kms_client
from .models import people_tables


def key_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT scope, key_version, state, provider, master_key_id, wrapped_key "
                    "FROM kms_data_keys ORDER BY scope, key_version"
                )
            )
        )


@pytest.mark.aws_kms
def test_wrapped_key_unwraps_with_plain_boto3_and_decrypts_the_column(
    engine: Engine, vault: KeyVault, kms_endpoint: str, cmk: dict[str, str]
) -> None:
    metadata = MetaData()
    patients, _ = people_tables(metadata)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(patients.insert().values(id=1, name="Kim Minji", phone="010-1234-5678"))
    [row] = [r for r in key_rows(engine) if r.scope == "patients"]
    assert row.key_version == 1 and row.state == "enabled" and row.provider == "aws-kms"
    assert row.master_key_id == cmk["arn"]

    client = kms_client(kms_endpoint)
    data_key = client.decrypt(
        CiphertextBlob=bytes(row.wrapped_key),
        KeyId=row.master_key_id,
        EncryptionContext={"table": "patients", "key_version": "1"},
    )["Plaintext"]
    with pytest.raises(client.exceptions.InvalidCiphertextException):
        client.decrypt(
            CiphertextBlob=bytes(row.wrapped_key),
            KeyId=row.master_key_id,
            EncryptionContext={"table": "visits", "key_version": "1"},
        )

    # decrypt the stored value from the specification alone (docs/format.md)
    with engine.connect() as conn:
        stored = bytes(conn.execute(text("SELECT name FROM patients")).scalar_one())
    header, salt, nonce, body = stored[:6], stored[6:14], stored[14:26], stored[26:]
    assert header == bytes([1, 1, 0, 0, 0, 1])
    subkey = HKDF(SHA256(), 32, salt, b"sqlalchemy-kms/v1/aes-256-gcm-subkey").derive(data_key)
    aad = (
        header
        + len(b"patients").to_bytes(2, "big")
        + b"patients"
        + (4).to_bytes(2, "big")
        + b"name"
    )
    assert AESGCM(subkey).decrypt(nonce, body, aad) == b"Kim Minji"


FRESH_READER = textwrap.dedent("""
    import json, os, sys
    from collections import Counter
    import boto3
    from sqlalchemy import create_engine, select
    from sqlalchemy_kms import AwsKms, KeyVault
    from sqlalchemy import MetaData
    sys.path.insert(0, os.environ["PROJECT_DIR"])
    from tests.models import people_tables

    client = boto3.client("kms", endpoint_url=os.environ["KMS_ENDPOINT"], region_name="us-east-1")
    calls = Counter()
    client.meta.events.register("before-call.kms", lambda model, **kw: calls.update([model.name]))
    engine = create_engine(os.environ["DB_URL"])
    KeyVault(engine, AwsKms(os.environ["CMK"], client=client))
    patients, visits = people_tables(MetaData())
    with engine.connect() as conn:
        query = select(patients.c.name, patients.c.phone).order_by(patients.c.id)
        names = conn.execute(query).all()
        notes = conn.execute(select(visits.c.note).order_by(visits.c.id)).scalars().all()
    print(json.dumps({"calls": calls, "names": [list(r) for r in names], "notes": notes}))
""")


def test_1000_rows_cost_one_generate_and_one_decrypt_per_table(
    engine: Engine, db_url: str, kms: AwsKms, kms_endpoint: str, cmk: dict[str, str]
) -> None:
    vault = KeyVault(engine, kms)
    vault.create_table()
    metadata = MetaData()
    patients, visits = people_tables(metadata)
    metadata.create_all(engine)
    rows = [{"id": i, "name": f"patient {i}", "phone": f"010-{i:04d}"} for i in range(1000)]
    with engine.begin() as conn:
        conn.execute(patients.insert(), rows)
        conn.execute(visits.insert(), [{"id": i, "note": f"note {i}"} for i in range(1000)])
    with engine.connect() as conn:
        assert len(conn.execute(select(patients.c.name)).all()) == 1000
    written = dict(kms.counter.calls)  # type: ignore[attr-defined]
    assert written == {"GenerateDataKey": 2}

    env = dict(
        os.environ,
        KMS_ENDPOINT=kms_endpoint,
        DB_URL=db_url,
        CMK=cmk["alias"],
        PROJECT_DIR=str(Path(__file__).parent.parent),
    )
    result = subprocess.run(
        [sys.executable, "-c", FRESH_READER],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["calls"] == {"Decrypt": 2}
    assert report["names"] == [[r["name"], r["phone"]] for r in rows]
    assert report["notes"] == [f"note {i}" for i in range(1000)]
    # in total: one GenerateDataKey and one Decrypt per table
    assert written["GenerateDataKey"] + report["calls"].get("GenerateDataKey", 0) == 2
    assert written.get("Decrypt", 0) + report["calls"]["Decrypt"] == 2


def _race_for_first_key(url: str, endpoint: str, alias: str, barrier: Any, out: Any) -> None:
    engine = create_engine(url)
    vault = KeyVault(engine, AwsKms(alias, endpoint_url=endpoint, region_name="us-east-1"))
    metadata = MetaData()
    patients, _ = people_tables(metadata)
    barrier.wait()
    version = vault.create_key("patients")
    with engine.begin() as conn:
        conn.execute(patients.insert().values(id=os.getpid(), name=f"from {os.getpid()}"))
    out.put(version)


@pytest.mark.aws_kms
def test_two_processes_racing_for_the_first_key_both_succeed_with_one_key(
    engine: Engine, db_url: str, vault: KeyVault, kms_endpoint: str, cmk: dict[str, str]
) -> None:
    metadata = MetaData()
    patients, _ = people_tables(metadata)
    metadata.create_all(engine)
    with engine.begin() as conn:  # no key yet: both processes must race for it
        conn.execute(text("DELETE FROM kms_data_keys"))
    vault.clear_cache()
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(2), context.Queue()
    workers = [
        context.Process(
            target=_race_for_first_key, args=(db_url, kms_endpoint, cmk["alias"], barrier, out)
        )
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    assert sorted([out.get(timeout=5), out.get(timeout=5)]) == [1, 1]
    assert [(r.scope, r.key_version) for r in key_rows(engine)] == [("patients", 1)]
    with engine.connect() as conn:
        names = conn.execute(select(patients.c.name)).scalars().all()
    assert sorted(names) == sorted(f"from {w.pid}" for w in workers)


@pytest.mark.parametrize("keys_ahead", [True, False], ids=["keys-ahead", "keys-lazy"])
def test_sqlite_session_writes_two_new_tables_in_one_transaction(
    tmp_path: Path, local_kms: LocalKms, keys_ahead: bool
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    metadata = MetaData()
    patients, visits = people_tables(metadata)
    if not keys_ahead:
        metadata.create_all(engine)  # tables made before any vault: keys come lazily
    vault = KeyVault(engine, local_kms)
    vault.create_table()
    metadata.create_all(engine)
    started = time.monotonic()
    with Session(engine) as session:
        session.execute(patients.insert().values(id=1, name="Kim", phone="010"))
        session.execute(visits.insert().values(id=1, note="checkup"))  # holds the write lock
        session.commit()
    assert time.monotonic() - started < 4  # no wait for "database is locked"
    with engine.connect() as conn:
        assert conn.execute(select(visits.c.note)).scalar_one() == "checkup"
        assert conn.execute(select(patients.c.name)).scalar_one() == "Kim"
    assert [(r.scope, r.key_version) for r in key_rows(engine)] == [("patients", 1), ("visits", 1)]
    vault.close()
    engine.dispose()


def test_sqlite_key_made_inside_a_rolled_back_transaction_is_never_used(
    tmp_path: Path, local_kms: LocalKms
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    metadata = MetaData()
    patients, visits = people_tables(metadata)
    metadata.create_all(engine)
    vault = KeyVault(engine, local_kms)
    vault.create_table()
    with Session(engine) as session:
        session.execute(patients.insert().values(id=1, name="Kim", phone="010"))
        session.execute(visits.insert().values(id=1, note="lost"))  # key made in this transaction
        session.rollback()
    # the first key was committed on its own before the write lock; the second went
    # with the rolled-back rows
    assert [r.scope for r in key_rows(engine)] == ["patients"]
    with Session(engine) as session:
        session.execute(visits.insert().values(id=2, note="kept"))
        session.commit()
    assert [(r.scope, r.key_version) for r in key_rows(engine)] == [("patients", 1), ("visits", 1)]
    fresh = KeyVault(create_engine(f"sqlite:///{tmp_path / 'app.db'}"), local_kms)
    with fresh.engine.connect() as conn:
        assert conn.execute(select(visits.c.note)).scalars().all() == ["kept"]
    vault.close()
    fresh.close()


def test_in_memory_sqlite_with_static_pool(local_kms: LocalKms) -> None:
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    vault = KeyVault(engine, local_kms)
    vault.create_table()
    metadata = MetaData()
    patients, visits = people_tables(metadata)
    metadata.create_all(engine)
    with Session(engine) as session:
        session.execute(patients.insert().values(id=1, name="Kim", phone="010"))
        session.execute(visits.insert().values(id=1, note="memo"))
        session.commit()
    with engine.connect() as conn:
        assert conn.execute(select(visits.c.note)).scalar_one() == "memo"
    vault.close()


def test_keys_are_made_ahead_when_tables_are_created(engine: Engine, vault: KeyVault) -> None:
    metadata = MetaData()
    people_tables(metadata)
    metadata.create_all(engine)
    assert [(r.scope, r.key_version) for r in key_rows(engine)] == [("patients", 1), ("visits", 1)]
    assert vault.create_keys(metadata) == {"patients": {"data": 1}, "visits": {"data": 1}}
    assert vault.create_key("other_table") == 1
    vault.create_table()  # idempotent
    assert len(key_rows(engine)) == 3


def test_wrong_master_key_is_a_kms_error_not_a_decryption_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    metadata = MetaData()
    patients, _ = people_tables(metadata)
    engine = create_engine(url)
    vault = KeyVault(engine, LocalKms(os.urandom(32)))
    vault.create_table()
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(patients.insert().values(id=1, name="Kim", phone="010"))
    vault.close()
    other = KeyVault(engine, LocalKms(os.urandom(32)))
    with engine.connect() as conn, pytest.raises(KMSInvalidCiphertextError) as info:
        conn.execute(select(patients.c.name)).all()
    assert isinstance(info.value, KMSError) and not isinstance(info.value, DecryptionError)
    assert info.value.table == "patients" and info.value.key_version == 1
    assert info.value.column == "name"
    other.close()


def test_unknown_key_version(engine: Engine, vault: KeyVault) -> None:
    metadata = MetaData()
    patients, _ = people_tables(metadata)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(patients.insert().values(id=1, name="Kim", phone="010"))
        conn.execute(text("DELETE FROM kms_data_keys"))
    vault.clear_cache()
    with engine.connect() as conn, pytest.raises(UnknownKeyVersionError) as info:
        conn.execute(select(patients.c.name)).all()
    assert (info.value.table, info.value.column, info.value.key_version) == ("patients", "name", 1)


def test_missing_key_table_is_a_clear_error(engine: Engine, kms: AwsKms) -> None:
    vault = KeyVault(engine, kms)
    with pytest.raises(KeyTableMissingError, match="create_table"):
        vault.create_key("patients")
    metadata = MetaData()
    patients, _ = people_tables(metadata)
    metadata.create_all(engine)  # creating tables still works without the key table
    vault.create_table()
    with engine.begin() as conn:
        conn.execute(patients.insert().values(id=1, name="Kim", phone="010"))
    vault.close()


def test_cache_max_age_unwraps_again(engine: Engine, kms: AwsKms) -> None:
    metadata = MetaData()
    patients, _ = people_tables(metadata)
    writer = KeyVault(engine, kms)
    writer.create_table()
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(patients.insert().values(id=1, name="Kim", phone="010"))
    reader = KeyVault(engine, kms, cache_max_age=0.5, replace=True)
    calls = kms.counter.calls  # type: ignore[attr-defined]
    before = calls["Decrypt"]
    for _ in range(3):
        with engine.connect() as conn:
            assert conn.execute(select(patients.c.name)).scalar_one() == "Kim"
    assert calls["Decrypt"] == before + 1
    time.sleep(0.6)
    with engine.connect() as conn:
        assert conn.execute(select(patients.c.name)).scalar_one() == "Kim"
    assert calls["Decrypt"] == before + 2
    reader.close()


def test_many_threads_missing_one_key_make_one_kms_call(engine: Engine, kms: AwsKms) -> None:
    metadata = MetaData()
    patients, _ = people_tables(metadata)
    vault = KeyVault(engine, kms)
    vault.create_table()
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            patients.insert(), [{"id": i, "name": f"n{i}", "phone": "p"} for i in range(20)]
        )
    vault.clear_cache()
    calls = kms.counter.calls  # type: ignore[attr-defined]
    before = calls["Decrypt"]
    barrier = threading.Barrier(8)
    results: list[Any] = []

    def read() -> None:
        barrier.wait()
        with engine.connect() as conn:
            results.append(conn.execute(select(func.count()).select_from(patients)).scalar())
            results.append(len(conn.execute(select(patients.c.name)).all()))

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(20) == 16
    assert calls["Decrypt"] == before + 1
    vault.close()


def test_reprs_and_errors_hold_no_secrets(engine: Engine, vault: KeyVault) -> None:
    metadata = MetaData()
    patients, _ = people_tables(metadata)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(patients.insert().values(id=1, name="Kim Minji", phone="010"))
    cipher = vault.cache.get(("patients", "data", 1))
    assert cipher is not None
    secret = cipher._data_key
    shown = " ".join(
        [repr(vault), repr(vault.cache), repr(cipher), repr(vault.provider), str(vault.stats())]
    )
    assert secret.hex() not in shown and "Kim" not in shown
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(cipher)


def test_warm_up_loads_every_key_so_reads_make_no_kms_call(engine: Engine, kms: AwsKms) -> None:
    metadata = MetaData()
    patients, _ = people_tables(metadata)
    writer = KeyVault(engine, kms)
    writer.create_table()
    metadata.create_all(engine)
    writer.rotate_key("patients")
    with engine.begin() as conn:
        conn.execute(patients.insert().values(id=1, name="on key 2", phone="p"))
    writer.close()
    reader = KeyVault(engine, kms)
    calls = kms.counter.calls  # type: ignore[attr-defined]
    assert reader.warm_up(metadata) == 3  # patients data keys 1 and 2, visits data key 1
    before = dict(calls)
    with engine.connect() as conn:
        assert conn.execute(select(patients.c.name)).scalars().all() == ["on key 2"]
    assert dict(calls) == before
    reader.close()


def test_stats_count_decrypt_failures(engine: Engine, vault: KeyVault) -> None:
    metadata = MetaData()
    patients, _ = people_tables(metadata)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(patients.insert().values(id=1, name="Kim", phone="010"))
        conn.execute(text("UPDATE patients SET phone = :v"), {"v": b"\x01\x01garbage" * 5})
    assert vault.stats()["decrypt_failures"] == 0
    for _ in range(2):
        with engine.connect() as conn, pytest.raises(DecryptionError):
            conn.execute(select(patients.c.phone)).all()
    stats = vault.stats()
    assert stats["decrypt_failures"] == 2
    assert stats["kms_GenerateDataKey"] == 2 and stats["cache_entries"] == 2  # two tables
