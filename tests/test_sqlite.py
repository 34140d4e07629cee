"""SQLite in real use: one writer at a time, keys made lazily, WAL, threads, in-memory.

The key table lives in the same SQLite file as the application's tables, so
making a key is a write that competes with the application's own writes.
None of this may deadlock or end in ``database is locked``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from sqlalchemy_kms import KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms.providers.base import GeneratedDataKey

BUSY_TIMEOUT = 3.0  # seconds SQLite waits for the write lock ("timeout" of sqlite3.connect)


def app_tables(metadata: MetaData) -> dict[str, Table]:
    """Two encrypted tables and one plain table per thread."""
    tables = {}
    for name in ("alpha", "beta"):
        tables[name] = Table(
            f"sq_{name}",
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=False),
            Column("secret", KMSEncrypted(String(100))),
            Column("email", KMSEncrypted(String(100), deterministic=True)),
        )
        tables[f"{name}_log"] = Table(
            f"sq_{name}_log",
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=False),
            Column("what", String(100)),
        )
    return tables


def sqlite_engine(path: Path, journal_mode: str, timeout: float = BUSY_TIMEOUT) -> Engine:
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": timeout})
    if journal_mode == "wal":

        @event.listens_for(engine, "connect")
        def _wal(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")

    return engine


def key_scopes(engine: Engine) -> list[tuple[str, str, int]]:
    with engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                text("SELECT scope, purpose, key_version FROM kms_data_keys ORDER BY 1, 2, 3")
            )
        ]


@pytest.fixture(params=["delete", "wal"], ids=["rollback-journal", "wal"])
def journal_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def app(tmp_path: Path, journal_mode: str) -> Iterator[tuple[Engine, dict[str, Table]]]:
    """A SQLite file whose encrypted tables were made before any vault: keys come lazily."""
    engine = sqlite_engine(tmp_path / "app.db", journal_mode)
    metadata = MetaData()
    tables = app_tables(metadata)
    metadata.create_all(engine)
    with engine.connect() as conn:
        mode = conn.execute(text("PRAGMA journal_mode")).scalar()
    assert mode == journal_mode
    yield engine, tables
    engine.dispose()


class SignallingKms(LocalKms):
    """LocalKms that tells when a thread is about to make a data key."""

    def __init__(self) -> None:
        super().__init__(os.urandom(32))
        self.generating: dict[str, threading.Event] = {}

    def _generate_data_key(self, context: Mapping[str, str]) -> GeneratedDataKey:
        event_ = self.generating.get(threading.current_thread().name)
        if event_ is not None:
            event_.set()
        return super()._generate_data_key(context)


def run_threads(targets: dict[str, Callable[[], None]], timeout: float = 60) -> dict[str, str]:
    """Run each target in a thread named by its key; return the errors by thread name."""
    errors: dict[str, str] = {}

    def wrap(name: str, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"

        return run

    threads = [
        threading.Thread(target=wrap(name, target), name=name, daemon=True)
        for name, target in targets.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), f"thread {thread.name} is stuck"
    return errors


@pytest.mark.parametrize("log_first", [True, False], ids=["lock-held", "lock-free"])
def test_two_threads_writing_two_new_tables_at_once(
    app: tuple[Engine, dict[str, Table]], log_first: bool
) -> None:
    """Each thread writes its own new table, many short transactions, started together.

    ``lock-held``: each transaction first writes a plain table, so the key is
    needed while the session already holds SQLite's write lock.
    ``lock-free``: the encrypted insert comes first, so the vault makes the
    key on its own connection, waiting for the other thread's write lock.
    """
    engine, tables = app
    vault = KeyVault(engine, LocalKms(os.urandom(32)))
    vault.create_table()
    barrier = threading.Barrier(2)
    rounds = 25
    longest: list[float] = []

    def writer(name: str) -> Callable[[], None]:
        encrypted, log = tables[name], tables[f"{name}_log"]

        def run() -> None:
            barrier.wait(10)
            for n in range(rounds):
                started = time.monotonic()
                with Session(engine) as session:
                    if log_first:
                        session.execute(log.insert().values(id=n, what=f"{name} {n}"))
                    session.execute(
                        encrypted.insert().values(
                            id=n, secret=f"{name} secret {n}", email=f"{name}{n}@example.com"
                        )
                    )
                    if not log_first:
                        session.execute(log.insert().values(id=n, what=f"{name} {n}"))
                    # read back inside the transaction, by the deterministic column
                    found = session.execute(
                        select(encrypted.c.secret).where(
                            encrypted.c.email == f"{name}{n}@example.com"
                        )
                    ).scalar_one()
                    assert found == f"{name} secret {n}"
                    session.commit()
                longest.append(time.monotonic() - started)

        return run

    errors = run_threads({"alpha": writer("alpha"), "beta": writer("beta")})
    assert errors == {}
    assert max(longest) < BUSY_TIMEOUT / 2  # no transaction waited anywhere near a timeout
    assert key_scopes(engine) == [
        ("sq_alpha", "data", 1),
        ("sq_alpha", "search", 1),
        ("sq_beta", "data", 1),
        ("sq_beta", "search", 1),
    ]
    with engine.connect() as conn:
        for name in ("alpha", "beta"):
            secrets = conn.execute(
                select(tables[name].c.secret).order_by(tables[name].c.id)
            ).scalars()
            assert list(secrets) == [f"{name} secret {n}" for n in range(rounds)]
    vault.close()


def _hold_lock_then_write(
    engine: Engine,
    tables: dict[str, Table],
    mine: str,
    target: str,
    locked: threading.Event,
    other_generating: threading.Event,
) -> Callable[[], None]:
    def run() -> None:
        with Session(engine) as session:
            session.execute(tables[f"{mine}_log"].insert().values(id=1, what="holds the lock"))
            locked.set()
            assert other_generating.wait(10), "the other thread never started making its key"
            time.sleep(0.3)  # let it reach the key table insert, waiting for our lock
            session.execute(
                tables[target].insert().values(id=1, secret="from holder", email="h@example.com")
            )
            session.commit()

    return run


def _write_without_lock(
    engine: Engine, tables: dict[str, Table], target: str, locked: threading.Event
) -> Callable[[], None]:
    def run() -> None:
        assert locked.wait(10)
        with Session(engine) as session:
            session.execute(
                tables[target].insert().values(id=2, secret="from waiter", email="w@example.com")
            )
            session.commit()

    return run


@pytest.mark.parametrize("same_table", [False, True], ids=["different-tables", "same-table"])
def test_key_made_under_the_write_lock_while_another_thread_waits_for_it(
    app: tuple[Engine, dict[str, Table]], same_table: bool
) -> None:
    """The exact interleaving of first use in a threaded application.

    The *holder* thread's session holds the write lock. The *waiter* thread
    needs a new table's key, holds no lock, so the vault makes the key on its
    own connection and waits for the write lock. Then the holder needs a key
    too: of another new table, or of the same one. The holder must not wait
    for the waiter (which waits for the holder): both must finish well within
    the busy timeout, with one key per table.
    """
    engine, tables = app
    kms = SignallingKms()
    vault = KeyVault(engine, kms)
    vault.create_table()
    locked, waiter_generating = threading.Event(), threading.Event()
    kms.generating["waiter"] = waiter_generating
    holder_target = "alpha" if same_table else "beta"

    started = time.monotonic()
    errors = run_threads(
        {
            "holder": _hold_lock_then_write(
                engine, tables, "beta", holder_target, locked, waiter_generating
            ),
            "waiter": _write_without_lock(engine, tables, "alpha", locked),
        }
    )
    elapsed = time.monotonic() - started
    assert errors == {}, errors
    assert elapsed < BUSY_TIMEOUT, f"a thread waited {elapsed:.1f} s for the write lock"
    expected = {("sq_alpha", "data", 1), ("sq_alpha", "search", 1)}
    if not same_table:
        expected |= {("sq_beta", "data", 1), ("sq_beta", "search", 1)}
    assert set(key_scopes(engine)) == expected
    with engine.connect() as conn:
        rows = conn.execute(select(tables["alpha"].c.id, tables["alpha"].c.secret)).all()
    assert sorted(rows) == ([(1, "from holder")] if same_table else []) + [(2, "from waiter")]
    vault.close()


def test_busy_timeout_is_the_applications_own_setting(tmp_path: Path) -> None:
    """A transaction that keeps the write lock longer than the other connection's
    timeout makes that connection fail with SQLite's own error, as without
    encryption: the vault neither hangs nor hides it, and the key is not half made."""
    from sqlalchemy.exc import OperationalError

    engine = sqlite_engine(tmp_path / "app.db", "delete", timeout=0.5)
    metadata = MetaData()
    tables = app_tables(metadata)
    metadata.create_all(engine)
    vault = KeyVault(engine, LocalKms(os.urandom(32)))
    vault.create_table()
    with Session(engine) as holder:
        holder.execute(tables["beta_log"].insert().values(id=1, what="long transaction"))
        started = time.monotonic()
        with Session(engine) as waiter, pytest.raises(OperationalError, match="locked"):
            waiter.execute(tables["alpha"].insert().values(id=1, secret="s", email="e"))
        assert time.monotonic() - started < 5
        holder.commit()
    assert key_scopes(engine) == []
    with Session(engine) as session:  # and once the lock is free, first use works
        session.execute(tables["alpha"].insert().values(id=1, secret="s", email="e"))
        session.commit()
    assert [scope for scope, _, _ in key_scopes(engine)] == ["sq_alpha", "sq_alpha"]
    vault.close()
    engine.dispose()


# -- in memory ---------------------------------------------------------------------------------


@pytest.fixture
def memory_engine() -> Iterator[Engine]:
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    yield engine
    engine.dispose()


def test_in_memory_static_pool_keys_made_inside_the_session(memory_engine: Engine) -> None:
    """One shared connection: keys made lazily inside a write transaction commit and
    roll back with it."""
    metadata = MetaData()
    tables = app_tables(metadata)
    metadata.create_all(memory_engine)  # before the vault: no keys
    vault = KeyVault(memory_engine, LocalKms(os.urandom(32)))
    vault.create_table()
    alpha, beta = tables["alpha"], tables["beta"]

    with Session(memory_engine) as session:
        session.execute(tables["alpha_log"].insert().values(id=1, what="x"))
        session.execute(alpha.insert().values(id=1, secret="kept", email="k@example.com"))
        session.commit()
    with Session(memory_engine) as session:
        session.execute(tables["beta_log"].insert().values(id=1, what="x"))
        session.execute(beta.insert().values(id=1, secret="lost", email="l@example.com"))
        session.rollback()
    assert key_scopes(memory_engine) == [("sq_alpha", "data", 1), ("sq_alpha", "search", 1)]
    with Session(memory_engine) as session:
        session.execute(beta.insert().values(id=2, secret="second try", email="s@example.com"))
        session.commit()
    assert len(key_scopes(memory_engine)) == 4

    assert vault.rotate_key(alpha) == 2
    with Session(memory_engine) as session:
        session.execute(alpha.insert().values(id=2, secret="after rotation", email="a@example.com"))
        session.commit()
    vault.clear_cache()  # cold cache: keys are read back on the one shared connection
    with Session(memory_engine) as session:
        session.execute(tables["alpha_log"].insert().values(id=2, what="in a transaction"))
        assert session.execute(select(alpha.c.secret).order_by(alpha.c.id)).scalars().all() == [
            "kept",
            "after rotation",
        ]
        assert session.execute(
            select(alpha.c.id).where(alpha.c.email.in_(["k@example.com", "a@example.com"]))
        ).scalars().all() == [1, 2]
        session.commit()
    with memory_engine.connect() as conn:
        assert conn.execute(select(beta.c.id, beta.c.secret)).all() == [(2, "second try")]
        versions = conn.execute(text("SELECT secret FROM sq_alpha ORDER BY id")).scalars()
        assert [bytes(v)[2:6] for v in versions] == [b"\0\0\0\1", b"\0\0\0\2"]
    vault.close()


def test_in_memory_static_pool_cold_cache_read_while_streaming(memory_engine: Engine) -> None:
    """A cold key is loaded while the application's cursor on the one shared
    connection is still being fetched, outside any transaction."""
    metadata = MetaData()
    alpha = app_tables(metadata)["alpha"]
    vault = KeyVault(memory_engine, LocalKms(os.urandom(32)))
    vault.create_table()
    metadata.create_all(memory_engine)
    rows = [{"id": i, "secret": f"s{i}", "email": f"e{i}@example.com"} for i in range(300)]
    with memory_engine.begin() as conn:
        conn.execute(alpha.insert(), rows[:150])
    vault.rotate_key(alpha)
    with memory_engine.begin() as conn:
        conn.execute(alpha.insert(), rows[150:])
    vault.clear_cache()
    with Session(memory_engine) as session:
        result = session.execute(
            select(alpha.c.id, alpha.c.secret).order_by(alpha.c.id).execution_options(yield_per=10)
        )
        assert [tuple(r) for r in result] == [(r["id"], r["secret"]) for r in rows]
    vault.close()
