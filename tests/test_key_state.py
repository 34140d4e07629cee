"""The key state of a process: bounded by count and age together, fork-safe, and the
documented life of a destroyed key in processes that still hold it."""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select
from sqlalchemy.engine import Engine

from sqlalchemy_kms import KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms._cipher import _LIVE_CIPHERS, DataKeyCipher
from sqlalchemy_kms._format import HEADER_SIZE, SALT_SIZE, column_aad
from sqlalchemy_kms._keytable import KeySeries
from sqlalchemy_kms.errors import UnknownKeyVersionError

MASTER = bytes(range(32))


def _tables(count: int) -> tuple[MetaData, list[Table]]:
    metadata = MetaData()
    tables = [
        Table(
            f"t{i:05d}",
            metadata,
            Column("id", Integer, primary_key=True),
            Column("secret", KMSEncrypted(String(40))),
        )
        for i in range(count)
    ]
    return metadata, tables


def _live_ciphers() -> int:
    gc.collect()
    return len(_LIVE_CIPHERS)


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Engine:
    return create_engine(f"sqlite:///{tmp_path / 'keys.db'}")


def test_unwrapped_keys_stay_within_the_cache_bound(sqlite_engine: Engine) -> None:
    bound = 20
    vault = KeyVault(sqlite_engine, LocalKms(MASTER), cache_max_entries=bound)
    vault.create_table()
    metadata, tables = _tables(10 * bound)
    metadata.create_all(sqlite_engine)
    before = _live_ciphers()
    with sqlite_engine.begin() as conn:
        for i, table in enumerate(tables):
            conn.execute(table.insert().values(id=1, secret=f"value {i}"))
    with sqlite_engine.connect() as conn:
        for i, table in enumerate(tables):
            assert conn.execute(select(table.c.secret)).scalar_one() == f"value {i}"
    # the bound holds for everything the vault keeps: at most N keys plus a few in flight
    assert _live_ciphers() - before <= bound + 2
    assert len(vault.cache) <= bound
    assert vault.keys.tables() <= bound
    # bookkeeping stays bounded too: no per-table locks left behind
    assert vault.keys.cache._loading == {}
    vault.close()
    assert _live_ciphers() <= before


def test_expired_keys_are_dropped_at_the_next_operation_on_any_table(
    sqlite_engine: Engine,
) -> None:
    vault = KeyVault(sqlite_engine, LocalKms(MASTER), cache_max_age=0.5, refresh_interval=30)
    vault.create_table()
    metadata, (first, second) = _tables(2)
    metadata.create_all(sqlite_engine)
    with sqlite_engine.begin() as conn:
        conn.execute(first.insert().values(id=1, secret="first"))
    held = vault.keys.get(KeySeries(first.name, False), 1)
    assert held is not None
    first_key = weakref.ref(held)
    del held
    time.sleep(0.6)
    # an operation on another table sweeps the expired key of the first
    with sqlite_engine.begin() as conn:
        conn.execute(second.insert().values(id=1, secret="second"))
    gc.collect()
    assert first_key() is None
    assert vault.keys.get(KeySeries(first.name, False), 1) is None
    with sqlite_engine.connect() as conn:  # and it is unwrapped again when needed
        assert conn.execute(select(first.c.secret)).scalar_one() == "first"
    vault.close()


def test_active_key_is_read_again_after_the_refresh_interval(sqlite_engine: Engine) -> None:
    writer = KeyVault(sqlite_engine, LocalKms(MASTER), refresh_interval=0.3)
    writer.create_table()
    metadata, (table,) = _tables(1)
    metadata.create_all(sqlite_engine)
    assert writer.active_key_version(table) == 1
    other_engine = create_engine(sqlite_engine.url)
    operator = KeyVault(other_engine, LocalKms(MASTER))
    assert operator.rotate_key(table) == 2
    assert writer.active_key_version(table) == 1  # this process has not looked yet
    time.sleep(0.35)
    assert writer.active_key_version(table) == 2
    operator.close()
    writer.close()


def _encrypt_salts(vault: KeyVault, scope: str, count: int) -> set[bytes]:
    aad = column_aad(scope, "secret")
    return {
        vault.encrypt(scope, aad, b"x")[HEADER_SIZE : HEADER_SIZE + SALT_SIZE] for _ in range(count)
    }


def _child(vault: KeyVault, scope: str, series: KeySeries, queue: Any) -> None:
    lock = vault.keys.lock(series)
    acquired = lock.acquire(timeout=2)  # held by the parent at the fork: reset here
    if acquired:
        lock.release()
    queue.put((acquired, _encrypt_salts(vault, scope, 50)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_forked_workers_draw_their_own_salts(sqlite_engine: Engine) -> None:
    vault = KeyVault(sqlite_engine, LocalKms(MASTER))
    vault.create_table()
    metadata, (table,) = _tables(1)
    metadata.create_all(sqlite_engine)
    vault.warm_up(metadata)
    parent_salts = _encrypt_salts(vault, table.name, 50)
    assert len(parent_salts) == 1  # one writer salt per process (for 2**16 values)
    series = KeySeries(table.name, False)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    held = vault.keys.lock(series)
    held.acquire()
    try:
        children = [
            context.Process(target=_child, args=(vault, table.name, series, queue))
            for _ in range(4)
        ]
        for child in children:
            child.start()
        results = [queue.get(timeout=30) for _ in children]
        for child in children:
            child.join(30)
            assert child.exitcode == 0
    finally:
        held.release()
    seen = set(parent_salts)
    for acquired, salts in results:
        assert acquired
        assert len(salts) == 1
        assert not salts & seen, "a salt is shared between two processes"
        seen |= salts
    assert len(seen) == 5
    vault.close()


def test_a_destroyed_key_lives_in_other_processes_until_their_max_age(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'destroy.db'}"
    app_engine, operator_engine = create_engine(url), create_engine(url)
    app = KeyVault(app_engine, LocalKms(MASTER), cache_max_age=0.5)
    operator = KeyVault(operator_engine, LocalKms(MASTER), grace_period=0)
    operator.create_table()
    metadata, (table,) = _tables(1)
    metadata.create_all(operator_engine)
    with operator_engine.begin() as conn:
        conn.execute(table.insert().values(id=1, secret="under key 1"))
    with app_engine.connect() as conn:  # the app holds key 1 now
        assert conn.execute(select(table.c.secret)).scalar_one() == "under key 1"
    operator.rotate_key(table)
    with operator_engine.begin() as conn:  # a row under key 1 that retire would refuse
        conn.execute(table.delete())
    operator.retire_key(table, 1)
    operator.destroy_key(table, 1, confirm=True)
    stored = bytearray(app.encrypt(table.name, column_aad(table.name, "secret"), b"x"))
    assert stored[2:HEADER_SIZE] == (2).to_bytes(4, "big")  # new writes use key 2
    aad = column_aad(table.name, "secret")
    held = app.keys.get(KeySeries(table.name, False), 1)
    assert isinstance(held, DataKeyCipher)
    old_value = held.encrypt(b"old", aad)
    del held
    # documented: the app still holds key 1 until its cache_max_age ends ...
    assert app.decrypt(table.name, "secret", aad, old_value) == b"old"
    time.sleep(0.6)
    # ... and then it is gone for good
    with pytest.raises(UnknownKeyVersionError):
        app.decrypt(table.name, "secret", aad, old_value)
    app.close()
    operator.close()


def test_store_lock_set_is_fixed_whatever_the_number_of_tables(sqlite_engine: Engine) -> None:
    vault = KeyVault(sqlite_engine, LocalKms(MASTER), cache_max_entries=5)
    locks = {id(vault.keys.lock(KeySeries(f"t{i}", False))) for i in range(1000)}
    assert len(locks) <= 64
    assert isinstance(vault.keys.lock(KeySeries("x", True)), type(threading.Lock()))
    vault.close()
