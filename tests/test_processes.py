"""Many processes on one database: first use, concurrent writes and reads, a rotation.

Eight processes (``spawn``) start together against one database whose
encrypted tables exist but whose key table does not: each creates it (all at
once, idempotently), then writes its own rows to the same tables, reads every
row the others committed, looks rows up by a deterministic column, and one of
them rotates the data keys in the middle.
At the end the key table holds versions 1..n of every key ring without gaps
or duplicates, no process saw an error, and a fresh process reads every row
with one KMS ``Decrypt`` per key version in use.
"""

from __future__ import annotations

import multiprocessing
import queue
import traceback
from collections import Counter, defaultdict
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    create_engine,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlalchemy_kms import AwsKms, KeyVault, KMSEncrypted

from .helpers import DATABASES, REGION, CallCounter

PROCESSES = 8
ROUNDS = 6
ROWS_PER_ROUND = 4
ROTATING_WORKER = 0
ROTATE_AFTER_ROUND = ROUNDS // 2 - 1
WORKER_TIMEOUT = 90

# (database, isolation level): the servers under both levels, the SQLite file under its own
COMBINATIONS = [
    ("sqlite", None),
    ("postgresql", "READ COMMITTED"),
    ("postgresql", "REPEATABLE READ"),
    ("mariadb", "READ COMMITTED"),
    ("mariadb", "REPEATABLE READ"),
]


def shared_tables(metadata: MetaData) -> tuple[Table, Table]:
    accounts = Table(
        "mp_accounts",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("worker", Integer, nullable=False),
        Column("name", KMSEncrypted(String(100))),
        Column("email", KMSEncrypted(String(100), deterministic=True), unique=True),
        Column("balance", KMSEncrypted(Numeric(12, 2))),
    )
    notes = Table(
        "mp_notes",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("worker", Integer, nullable=False),
        Column("body", KMSEncrypted(Text)),
    )
    return accounts, notes


# Every stored value is a function of its row id, so any reader can check any row.
def expected_account(row_id: int) -> tuple[str, str, Decimal]:
    return f"name {row_id} 김", f"user{row_id}@example.com", Decimal(row_id) / 100


def account_row(row_id: int, worker: int) -> dict[str, Any]:
    name, email, balance = expected_account(row_id)
    return {"id": row_id, "worker": worker, "name": name, "email": email, "balance": balance}


def expected_note(row_id: int) -> str:
    return f"note {row_id} " * (row_id % 7 + 1)


def row_id(worker: int, round_: int, index: int) -> int:
    return worker * 10_000 + round_ * 100 + index


def check_rows(accounts_rows: list[Any], notes_rows: list[Any]) -> None:
    for row in accounts_rows:
        got = (row.name, row.email, row.balance)
        if got != expected_account(row.id):
            raise AssertionError(f"account {row.id} read back as {got!r}")
    for row in notes_rows:
        if row.body != expected_note(row.id):
            raise AssertionError(f"note {row.id} read back wrong")


def _provider(endpoint: str, alias: str) -> AwsKms:
    return AwsKms(alias, endpoint_url=endpoint, region_name=REGION)


def _engine(url: str, isolation: str | None) -> Engine:
    if url.startswith("sqlite"):
        # several processes share one file: wait for the writer rather than fail
        return create_engine(url, connect_args={"timeout": 30})
    return create_engine(url, isolation_level=isolation) if isolation else create_engine(url)


def _work(worker: int, url: str, isolation: str | None, endpoint: str, alias: str) -> int:
    engine = _engine(url, isolation)
    vault = KeyVault(engine, _provider(endpoint, alias), refresh_interval=0.2)
    vault.create_table()  # all at once: one creates it, the others find it
    accounts, notes = shared_tables(MetaData())
    written = 0
    for round_ in range(ROUNDS):
        ids = [row_id(worker, round_, index) for index in range(ROWS_PER_ROUND)]
        with Session(engine) as session:
            session.execute(
                accounts.insert(),
                [account_row(i, worker) for i in ids],
            )
            session.execute(
                notes.insert(), [{"id": i, "worker": worker, "body": expected_note(i)} for i in ids]
            )
            # read inside the writing transaction, then rewrite one earlier row of our own
            mine = session.execute(
                select(accounts.c.id, accounts.c.name, accounts.c.email, accounts.c.balance).where(
                    accounts.c.email.in_([expected_account(i)[1] for i in ids])
                )
            ).all()
            if sorted(row.id for row in mine) != ids:
                raise AssertionError(f"own uncommitted rows found by email: {mine!r}")
            check_rows(mine, [])
            if round_:
                earlier = row_id(worker, round_ - 1, 0)
                session.execute(
                    update(notes).where(notes.c.id == earlier).values(body=expected_note(earlier))
                )
            session.commit()
        written += len(ids)

        if (worker, round_) == (ROTATING_WORKER, ROTATE_AFTER_ROUND) and (
            vault.rotate_key("mp_accounts") < 2 or vault.rotate_key("mp_notes") < 2
        ):
            raise AssertionError("rotation did not make a new version")

        # everything committed so far, by every process, reads back right
        with engine.connect() as conn:
            every_account = conn.execute(
                select(accounts.c.id, accounts.c.name, accounts.c.email, accounts.c.balance)
            ).all()
            every_note = conn.execute(select(notes.c.id, notes.c.body)).all()
            check_rows(every_account, every_note)
            if len(every_account) < written:
                raise AssertionError("own committed rows are missing")
            # look others' rows up by the deterministic column
            sample = sorted(row.id for row in every_account)[:: max(1, len(every_account) // 5)]
            for wanted in sample:
                found = (
                    conn.execute(
                        select(accounts.c.id).where(accounts.c.email == expected_account(wanted)[1])
                    )
                    .scalars()
                    .all()
                )
                if found != [wanted]:
                    raise AssertionError(f"email of {wanted} found {found!r}")
            found = (
                conn.execute(
                    select(accounts.c.id).where(
                        accounts.c.email.in_([expected_account(i)[1] for i in sample])
                    )
                )
                .scalars()
                .all()
            )
            if sorted(found) != sample:
                raise AssertionError(f"in_() found {sorted(found)!r}, not {sample!r}")
    vault.close()
    engine.dispose()
    return written


def _worker(
    worker: int,
    url: str,
    isolation: str | None,
    endpoint: str,
    alias: str,
    barrier: Any,
    results: Any,
) -> None:
    try:
        barrier.wait(WORKER_TIMEOUT)
        results.put((worker, _work(worker, url, isolation, endpoint, alias), None))
    except BaseException as exc:
        results.put((worker, 0, "".join(traceback.format_exception(exc))))
        raise


def _fresh_reader(url: str, endpoint: str, alias: str, results: Any) -> None:
    try:
        engine = create_engine(url)
        provider = _provider(endpoint, alias)
        counter = CallCounter(provider.client)
        KeyVault(engine, provider)
        accounts, notes = shared_tables(MetaData())
        with engine.connect() as conn:
            every_account = conn.execute(
                select(accounts.c.id, accounts.c.name, accounts.c.email, accounts.c.balance)
            ).all()
            every_note = conn.execute(select(notes.c.id, notes.c.body)).all()
        check_rows(every_account, every_note)
        results.put(
            (
                "reader",
                sorted(r.id for r in every_account),
                sorted(r.id for r in every_note),
                dict(counter.calls),
                None,
            )
        )
    except BaseException as exc:
        results.put(("reader", [], [], {}, "".join(traceback.format_exception(exc))))
        raise


def key_rings(engine: Engine) -> dict[tuple[str, str], list[tuple[int, str]]]:
    rings: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    with engine.connect() as conn:
        for row in conn.execute(
            text("SELECT scope, purpose, key_version, state FROM kms_data_keys")
        ):
            rings[(row.scope, row.purpose)].append((row.key_version, row.state))
    return rings


def versions_in_use(engine: Engine) -> Counter[tuple[str, int, int]]:
    """(table, algorithm, key version) of every stored value, from the headers."""
    used: Counter[tuple[str, int, int]] = Counter()
    with engine.connect() as conn:
        for table, columns in (("mp_accounts", "name, email, balance"), ("mp_notes", "body")):
            for row in conn.execute(text(f"SELECT {columns} FROM {table}")):
                for stored in row:
                    stored = bytes(stored)
                    used[(table, stored[1], int.from_bytes(stored[2:6], "big"))] += 1
    return used


@pytest.mark.parametrize(
    ("db_name", "isolation"),
    [
        pytest.param(db, level, id=f"{db}-{(level or 'default').replace(' ', '-').lower()}")
        for db, level in COMBINATIONS
        if db in DATABASES
    ],
)
@pytest.mark.slow
def test_eight_processes_first_use_rotation_and_fresh_reader(
    engine: Engine, db_url: str, isolation: str | None, kms_endpoint: str, cmk: dict[str, str]
) -> None:
    metadata = MetaData()
    shared_tables(metadata)
    metadata.create_all(engine)  # no vault yet: the key table (part of the models), no key
    assert "kms_data_keys" in inspect(engine).get_table_names()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM kms_data_keys")).scalar() == 0

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(PROCESSES), context.Queue()
    workers = [
        context.Process(
            target=_worker,
            args=(i, db_url, isolation, kms_endpoint, cmk["alias"], barrier, results),
            daemon=True,
        )
        for i in range(PROCESSES)
    ]
    reports = _run(workers, results)
    errors = {w: error for w, (_, error) in reports.items() if error}
    assert not errors, "\n".join(f"worker {w}:\n{e}" for w, e in errors.items())
    assert sorted(reports) == list(range(PROCESSES)), f"no report from some workers: {reports}"
    assert [p.exitcode for p in workers] == [0] * PROCESSES
    assert sum(written for written, _ in reports.values()) == PROCESSES * ROUNDS * ROWS_PER_ROUND

    # one key ring per table and purpose, versions 1..n, each once, all enabled
    rings = key_rings(engine)
    for ring, versions in rings.items():
        numbers = sorted(v for v, _ in versions)
        assert numbers == list(range(1, len(numbers) + 1)), (ring, numbers)
        assert {state for _, state in versions} == {"enabled"}, ring
    # exactly one first key per ring although eight processes raced for it,
    # and exactly one more data key per rotated table
    assert {ring: len(v) for ring, v in rings.items()} == {
        ("mp_accounts", "data"): 2,
        ("mp_accounts", "search"): 1,
        ("mp_notes", "data"): 2,
    }
    # the active key (highest enabled version) is the rotated one
    checker = KeyVault(engine, _provider(kms_endpoint, cmk["alias"]))
    assert checker.active_key_version("mp_accounts") == 2
    assert checker.active_key_version("mp_notes") == 2
    assert checker.active_key_version("mp_accounts", search=True) == 1
    checker.close()

    used = versions_in_use(engine)
    assert set(used) >= {
        ("mp_accounts", 1, 1),
        ("mp_accounts", 1, 2),
        ("mp_accounts", 2, 1),
        ("mp_notes", 1, 1),
        ("mp_notes", 1, 2),
    }, used

    reader = context.Process(
        target=_fresh_reader, args=(db_url, kms_endpoint, cmk["alias"], results), daemon=True
    )
    [(account_ids, note_ids, calls, error)] = _run([reader], results).values()
    assert error is None, error
    expected_ids = sorted(
        row_id(w, r, i)
        for w in range(PROCESSES)
        for r in range(ROUNDS)
        for i in range(ROWS_PER_ROUND)
    )
    assert account_ids == expected_ids
    assert note_ids == expected_ids
    # one Decrypt per key version in use, none per value, and no new key
    assert calls == {"Decrypt": len(used)}


def _run(processes: list[Any], results: Any) -> dict[Any, Any]:
    """Start ``processes``, collect one ``(key, *report)`` each, and reap them."""
    for process in processes:
        process.start()
    reports: dict[Any, Any] = {}
    try:
        for _ in processes:
            key, *report = results.get(timeout=WORKER_TIMEOUT)
            reports[key] = tuple(report)
    except queue.Empty:
        pass
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
    return reports
