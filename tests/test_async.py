"""AsyncEngine and AsyncSession: aiosqlite, asyncpg and psycopg's async mode.

``KeyVault(async_engine, provider)`` binds the vault to ``async_engine.sync_engine``.
Encrypting happens while SQLAlchemy binds parameters and decrypting while it
processes rows; whatever the vault does there (read the key table, call the
KMS) runs inside SQLAlchemy's greenlet when the statement runs, but *outside*
it when a buffered ``Result`` is consumed after ``await session.execute()``.
These tests pin what works and what must work.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import queue
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_kms import AwsKms, KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms.errors import ConfigurationError

from .helpers import DATABASES, database_url, drop_new_tables

T = TypeVar("T")

# (database of the matrix, async driver)
ASYNC_DRIVERS = [
    ("sqlite", "sqlite+aiosqlite"),
    ("postgresql", "postgresql+asyncpg"),
    ("postgresql", "postgresql+psycopg_async"),
]
BUSY_TIMEOUT = 2.0


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "as_members"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(KMSEncrypted(String(100), deterministic=True), unique=True)
    name: Mapped[str] = mapped_column(KMSEncrypted(String(100)))


class AuditLog(Base):
    """A plain table: writing it first makes the session hold SQLite's write lock."""

    __tablename__ = "as_audit"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    what: Mapped[str] = mapped_column(String(100))


members: Table = Member.__table__  # type: ignore[assignment]


def core_table(metadata: MetaData) -> Table:
    return Table(
        "as_notes",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("body", KMSEncrypted(String(200))),
    )


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def run_contained(make_scenario: Callable[[], Callable[[], Awaitable[T]]]) -> T:
    """:func:`run` on ``make_scenario()``, failing with the error's text only.

    An error raised where the driver cannot do I/O leaves half-made connections
    and coroutines behind; their finalizers would warn in whichever test runs
    later. Dropping the scenario and the traceback and collecting them here
    keeps that noise in this test, which fails with the first error alone.
    """
    scenario = make_scenario()
    failure = None
    logging.disable(logging.CRITICAL)  # the pool logs such errors with their traceback
    try:
        with warnings.catch_warnings():
            # what SQLAlchemy closes after MissingGreenlet: the driver's connect() or cursor()
            warnings.filterwarnings(
                "ignore", "coroutine .* was never awaited", category=RuntimeWarning
            )
            return run(scenario)
    except Exception as exc:
        failure = "".join(traceback.format_exception(exc))
    finally:
        logging.disable(logging.NOTSET)
        del scenario
        previous, sys.unraisablehook = sys.unraisablehook, lambda _: None
        try:
            gc.collect()
        finally:
            sys.unraisablehook = previous
    pytest.fail(failure, pytrace=False)


@pytest.fixture(
    params=[pytest.param(p, id=p[1].split("+")[1]) for p in ASYNC_DRIVERS if p[0] in DATABASES]
)
def async_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The async URL of one database of the matrix; drops what the test created."""
    db_name, driver = request.param
    url = database_url(db_name, tmp_path)
    sync_engine = create_engine(url)
    before = set(inspect(sync_engine).get_table_names())
    yield make_url(url).set(drivername=driver).render_as_string(hide_password=False)
    drop_new_tables(sync_engine, before)
    sync_engine.dispose()


def new_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        return create_async_engine(url, connect_args={"timeout": BUSY_TIMEOUT})
    return create_async_engine(url)


async def create_schema(engine: AsyncEngine, vault: KeyVault, metadata: MetaData) -> None:
    """The documented way: the vault's synchronous setup runs through ``run_sync``."""
    async with engine.begin() as conn:
        await conn.run_sync(lambda _: vault.create_table())
        await conn.run_sync(metadata.create_all)


def test_vault_accepts_an_async_engine(async_url: str) -> None:
    engine = new_engine(async_url)
    vault = KeyVault(engine, LocalKms(os.urandom(32)))
    assert vault.engine is engine.sync_engine
    vault.close()
    run(engine.dispose)


def test_create_table_needs_run_sync(async_url: str) -> None:
    """Outside run_sync the vault cannot reach an async driver: it says so with a
    ConfigurationError naming the run_sync form (no MissingGreenlet, no coroutine left
    un-awaited, on every driver), and creates nothing; through
    ``await conn.run_sync(...)`` it works, and ``create_all`` through ``run_sync``
    makes the keys of new tables."""
    engine = new_engine(async_url)
    vault = KeyVault(engine, LocalKms(os.urandom(32)))
    for call in (vault.create_table, vault.export_keys, lambda: vault.create_key("x")):
        with pytest.raises(ConfigurationError, match=r"run_sync\(lambda _: vault\."):
            call()

    async def scenario() -> list[Any]:
        await create_schema(engine, vault, Base.metadata)
        async with engine.connect() as conn:
            await conn.run_sync(lambda _: vault.create_table())  # idempotent
            rows = await conn.execute(
                text("SELECT scope, purpose, key_version FROM kms_data_keys ORDER BY 1, 2")
            )
            keys = [tuple(row) for row in rows]
        await engine.dispose()
        return keys

    assert run(scenario) == [("as_members", "data", 1), ("as_members", "search", 1)]
    vault.close()


def test_async_session_reads_writes_and_deterministic_queries(async_url: str) -> None:
    engine = new_engine(async_url)
    vault = KeyVault(engine, LocalKms(os.urandom(32)))
    metadata = MetaData()
    notes = core_table(metadata)

    async def scenario() -> None:
        await create_schema(engine, vault, Base.metadata)
        await create_schema(engine, vault, metadata)
        async with AsyncSession(engine) as session:
            session.add_all(
                [
                    Member(id=1, email="kim@example.com", name="Kim Minji"),
                    Member(id=2, email="lee@example.com", name="Lee"),
                    Member(id=3, email="park@example.com", name="박"),
                ]
            )
            await session.commit()
        async with AsyncSession(engine) as session:
            await session.execute(
                insert(Member), [{"id": 4, "email": "choi@example.com", "name": "Choi"}]
            )
            await session.execute(
                notes.insert(), [{"id": i, "body": f"note {i}"} for i in range(3)]
            )
            await session.commit()

        async with AsyncSession(engine) as session:
            found = await session.scalars(select(Member).where(Member.email == "lee@example.com"))
            assert [m.name for m in found] == ["Lee"]
            found = await session.scalars(
                select(Member.id).where(Member.email.in_(["kim@example.com", "choi@example.com"]))
            )
            assert sorted(found) == [1, 4]
            found = await session.scalars(
                select(Member.id).where(Member.email.not_in(["kim@example.com"]))
            )
            assert sorted(found) == [2, 3, 4]
            assert (await session.get(Member, 3)).name == "박"  # type: ignore[union-attr]
            result = await session.execute(
                select(members.c.id, members.c.name).order_by(members.c.id)
            )
            assert result.all() == [(1, "Kim Minji"), (2, "Lee"), (3, "박"), (4, "Choi")]
            result = await session.execute(select(notes.c.body).order_by(notes.c.id))
            assert result.scalars().all() == ["note 0", "note 1", "note 2"]
            streamed = await session.stream(select(notes.c.body).order_by(notes.c.id))
            assert await streamed.scalars().all() == ["note 0", "note 1", "note 2"]

            await session.execute(
                update(Member).where(Member.email == "kim@example.com").values(name="Kim")
            )
            await session.execute(delete(Member).where(Member.email == "park@example.com"))
            await session.commit()
        async with engine.connect() as conn:
            rows = (
                await conn.execute(select(members.c.email, members.c.name).order_by(members.c.id))
            ).all()
            assert rows == [
                ("kim@example.com", "Kim"),
                ("lee@example.com", "Lee"),
                ("choi@example.com", "Choi"),
            ]
            stored = (await conn.execute(text("SELECT email, name FROM as_members"))).all()
            for email, name in stored:
                assert bytes(email)[:2] == b"\x01\x02" and bytes(name)[:2] == b"\x01\x01"
                assert b"example" not in bytes(email)
        await engine.dispose()

    run(scenario)
    vault.close()


@pytest.mark.parametrize("audit_first", [False, True], ids=["no-lock-held", "write-lock-held"])
def test_lazy_key_creation_inside_async_session(async_url: str, audit_first: bool) -> None:
    """Tables made before any vault: the first write makes the keys, inside the
    ``AsyncSession``'s transaction. With ``write-lock-held`` the session has
    already written (on SQLite it holds the write lock), as in the synchronous
    case that ``tests/test_vault.py`` covers."""
    engine = new_engine(async_url)
    kms = LocalKms(os.urandom(32))

    async def scenario() -> tuple[float, list[Any]]:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)  # no vault yet: no keys
        vault = KeyVault(engine, kms)
        async with engine.begin() as conn:
            await conn.run_sync(lambda _: vault.create_table())
        started = time.monotonic()
        async with AsyncSession(engine) as session:
            if audit_first:
                session.add(AuditLog(id=1, what="first"))
                await session.flush()
            session.add(Member(id=1, email="kim@example.com", name="Kim"))
            await session.flush()
            found = await session.scalars(
                select(Member.name).where(Member.email == "kim@example.com")
            )
            assert found.all() == ["Kim"]
            await session.commit()
        elapsed = time.monotonic() - started
        async with AsyncSession(engine) as session:
            names = (await session.scalars(select(Member.name))).all()
        async with engine.connect() as conn:
            keys = (
                await conn.execute(
                    text("SELECT scope, purpose, key_version FROM kms_data_keys ORDER BY 1, 2")
                )
            ).all()
        await engine.dispose()
        vault.close()
        assert names == ["Kim"]
        return elapsed, [tuple(k) for k in keys]

    elapsed, keys = run_contained(lambda: scenario)
    assert keys == [("as_members", "data", 1), ("as_members", "search", 1)]
    assert elapsed < BUSY_TIMEOUT, f"waited {elapsed:.1f} s for SQLite's write lock"


def _cold_vault_scenario(url: str, read: str) -> Callable[[], Awaitable[Any]]:
    """Rows written by one vault, read by a new vault (a fresh process, in effect)."""
    engine = new_engine(url)
    metadata = MetaData()
    notes = core_table(metadata)
    kms = LocalKms(os.urandom(32))

    async def scenario() -> Any:
        writer = KeyVault(engine, kms)
        await create_schema(engine, writer, metadata)
        await create_schema(engine, writer, Base.metadata)
        async with AsyncSession(engine) as session:
            await session.execute(
                notes.insert(), [{"id": i, "body": f"note {i}"} for i in range(3)]
            )
            session.add(Member(id=1, email="kim@example.com", name="Kim"))
            await session.commit()
        writer.close()
        reader = KeyVault(engine, kms)
        try:
            async with AsyncSession(engine) as session:
                if read == "orm-entities":
                    return [m.name for m in (await session.scalars(select(Member))).all()]
                if read == "orm-get":
                    return [(await session.get(Member, 1)).name]  # type: ignore[union-attr]
                if read == "stream":
                    result = await session.stream(select(notes.c.body).order_by(notes.c.id))
                    return await result.scalars().all()
                if read == "session-execute":
                    result = await session.execute(select(notes.c.body).order_by(notes.c.id))
                    return result.scalars().all()
            async with engine.connect() as conn:  # "connection-execute"
                result = await conn.execute(select(notes.c.body).order_by(notes.c.id))
                return result.scalars().all()
        finally:
            reader.close()
            await engine.dispose()

    return scenario


@pytest.mark.parametrize("read", ["orm-entities", "orm-get", "stream"])
def test_cold_cache_reads_that_run_inside_the_greenlet(async_url: str, read: str) -> None:
    expected = {
        "orm-entities": ["Kim"],
        "orm-get": ["Kim"],
        "stream": ["note 0", "note 1", "note 2"],
    }
    assert run(_cold_vault_scenario(async_url, read)) == expected[read]


@pytest.mark.parametrize("read", ["session-execute", "connection-execute"])
def test_cold_cache_core_reads_after_await(async_url: str, read: str) -> None:
    """``(await session.execute(select(table.c.col))).scalars().all()`` processes
    rows after the ``await``, outside SQLAlchemy's greenlet: a key that is not
    cached yet must still be loaded (today the vault's key table query raises
    ``MissingGreenlet`` there)."""
    assert run_contained(lambda: _cold_vault_scenario(async_url, read)) == [
        "note 0",
        "note 1",
        "note 2",
    ]


def test_warm_cache_means_no_kms_call_during_async_reads(async_url: str, kms: AwsKms) -> None:
    engine = new_engine(async_url)
    vault = KeyVault(engine, kms)
    metadata = MetaData()
    notes = core_table(metadata)
    calls = kms.counter.calls  # type: ignore[attr-defined]

    async def scenario() -> None:
        await create_schema(engine, vault, Base.metadata)
        await create_schema(engine, vault, metadata)
        async with AsyncSession(engine) as session:
            session.add_all(
                [Member(id=i, email=f"m{i}@example.com", name=f"member {i}") for i in range(50)]
            )
            await session.execute(notes.insert(), [{"id": i, "body": f"n{i}"} for i in range(50)])
            await session.commit()
        assert dict(calls) == {"GenerateDataKey": 3}  # members data + search, notes data
        before = dict(calls)
        for _ in range(5):
            async with AsyncSession(engine) as session:
                assert len((await session.scalars(select(Member))).all()) == 50
                found = await session.scalars(
                    select(Member.id).where(Member.email.in_(["m3@example.com", "m7@example.com"]))
                )
                assert sorted(found) == [3, 7]
                one = await session.scalars(
                    select(Member.name).where(Member.email == "m9@example.com")
                )
                assert one.one() == "member 9"
                result = await session.execute(select(notes.c.body))
                assert len(result.scalars().all()) == 50
                streamed = await session.stream(select(notes.c.body))
                assert len(await streamed.all()) == 50
        assert dict(calls) == before
        assert vault.stats()["cache_misses"] == 0
        await engine.dispose()

    run(scenario)
    vault.close()


# -- concurrency within one event loop ---------------------------------------------------------
#
# Run in a separate process with a watchdog thread: if the event loop stops turning, the
# process reports where it is stuck and exits; nothing hangs in the test run.

CONCURRENT_TASKS = 8
LOOP_STALL = 3.0  # seconds without a turn of the event loop that count as a deadlock
PROCESS_TIMEOUT = 60


def _watch_loop(loop: asyncio.AbstractEventLoop, results: Any, done: threading.Event) -> None:
    main_thread = threading.main_thread().ident
    while not done.wait(0.2):
        turned = threading.Event()
        loop.call_soon_threadsafe(turned.set)
        if not turned.wait(LOOP_STALL) and not done.is_set():
            frame = sys._current_frames().get(main_thread or 0)
            where = "".join(traceback.format_stack(frame)[-8:]) if frame else "?"
            results.put(("hang", f"the event loop did not turn for {LOOP_STALL} s; at:\n{where}"))
            results.close()
            results.join_thread()
            os._exit(3)


def _concurrent_first_use(url: str, results: Any) -> None:
    done = threading.Event()
    try:
        engine = new_engine(url)
        vault = KeyVault(engine, LocalKms(os.urandom(32)))
        metadata = MetaData()
        notes = core_table(metadata)

        async def task(i: int) -> list[str]:
            async with AsyncSession(engine) as session:
                await session.execute(notes.insert().values(id=i, body=f"note {i}"))
                await session.commit()
            async with AsyncSession(engine) as session:
                return list(await session.scalars(select(Member.name)))

        async def scenario() -> float:
            threading.Thread(
                target=_watch_loop, args=(asyncio.get_running_loop(), results, done), daemon=True
            ).start()
            await create_schema(engine, vault, metadata)
            await create_schema(engine, vault, Base.metadata)
            async with AsyncSession(engine) as session:
                session.add(Member(id=1, email="kim@example.com", name="Kim"))
                await session.commit()
            vault.clear_cache()  # as after a restart, or once cached keys have aged
            started = time.monotonic()
            names = await asyncio.gather(*(task(i) for i in range(CONCURRENT_TASKS)))
            elapsed = time.monotonic() - started
            assert names == [["Kim"]] * CONCURRENT_TASKS
            async with engine.connect() as conn:
                bodies = (await conn.execute(select(notes.c.body))).scalars().all()
            assert sorted(bodies) == sorted(f"note {i}" for i in range(CONCURRENT_TASKS))
            await engine.dispose()
            return elapsed

        elapsed = asyncio.run(scenario())
        done.set()
        results.put(("ok", elapsed))
    except BaseException as exc:
        done.set()
        results.put(("error", "".join(traceback.format_exception(exc))))
        raise


def test_concurrent_tasks_missing_the_same_key_do_not_deadlock_the_event_loop(
    async_url: str,
) -> None:
    """Eight tasks of one event loop write and read while no key is cached (after a
    restart, or each time a cached key ages out). The vault must not block the
    event loop's thread on a lock that another task of the same loop holds across
    an ``await`` of the database driver."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_concurrent_first_use, args=(async_url, results), daemon=True)
    process.start()
    try:
        status, detail = results.get(timeout=PROCESS_TIMEOUT)
    except queue.Empty:
        status, detail = "timeout", f"no answer in {PROCESS_TIMEOUT} s"
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
    assert status == "ok", detail
    assert detail < 10
