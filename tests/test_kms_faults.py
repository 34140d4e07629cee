"""KMS faults seen through the vault: outages, refusals and revoked access.

moto does not enforce key states or policies, so faults are injected into the
boto3 client with a ``before-call`` event hook, which answers for KMS as a
denial or an outage would; a provider pointed at a closed loopback port is a
real outage. Every error must reach the application from
``session.execute(...)`` as the documented class, naming the table, the key
version and the master key.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import EndpointConnectionError
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlalchemy_kms import AwsKms, KeyVault, KMSEncrypted
from sqlalchemy_kms.errors import (
    KMSAccessDeniedError,
    KMSError,
    KMSInvalidCiphertextError,
    KMSKeyDisabledError,
    KMSKeyNotFoundError,
    KMSUnavailableError,
    SQLAlchemyKMSError,
)

from .helpers import REGION

ERRORS = [
    ("AccessDeniedException", KMSAccessDeniedError),
    ("DisabledException", KMSKeyDisabledError),
    ("KMSInvalidStateException", KMSKeyDisabledError),
    ("NotFoundException", KMSKeyNotFoundError),
    ("InvalidCiphertextException", KMSInvalidCiphertextError),
]


def fault_table(metadata: MetaData, name: str = "kf_patients") -> Table:
    return Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", KMSEncrypted(String(100))),
        Column("email", KMSEncrypted(String(100), deterministic=True)),
    )


class _Body:
    def stream(self, **kwargs: Any) -> Iterator[bytes]:
        yield b""


class KmsFault:
    """A ``before-call`` hook on one boto3 KMS client.

    ``code=None`` lets calls through; an error code answers every call with that
    error; ``"unreachable"`` raises ``EndpointConnectionError``. ``seen`` counts the
    calls the hook saw, by operation, whatever it did with them.
    """

    def __init__(self, client: Any) -> None:
        self.code: str | None = None
        self.seen: dict[str, int] = {}
        client.meta.events.register_first("before-call.kms", self)

    def __call__(self, model: Any, **kwargs: Any) -> Any:
        self.seen[model.name] = self.seen.get(model.name, 0) + 1
        if self.code is None:
            return None
        if self.code == "unreachable":
            raise EndpointConnectionError(endpoint_url="https://kms.us-east-1.amazonaws.com")
        response = {
            "Error": {"Code": self.code, "Message": "injected"},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        }
        return AWSResponse("https://kms.invalid/", 400, {}, _Body()), response


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def write_rows(engine: Engine, table: Table, ids: range) -> None:
    with Session(engine) as session:
        session.execute(
            table.insert(),
            [{"id": i, "name": f"name {i}", "email": f"p{i}@example.com"} for i in ids],
        )
        session.commit()


def read_all(engine: Engine, table: Table) -> list[tuple[int, str, str]]:
    with Session(engine) as session:
        rows = session.execute(
            select(table.c.id, table.c.name, table.c.email).order_by(table.c.id)
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def find_by_email(engine: Engine, table: Table, email: str) -> list[int]:
    with Session(engine) as session:
        return list(session.scalars(select(table.c.id).where(table.c.email == email)))


def expected_rows(ids: range) -> list[tuple[int, str, str]]:
    return [(i, f"name {i}", f"p{i}@example.com") for i in ids]


def check_names(error: KMSError, table: str, version: int, master_key_id: str) -> None:
    assert isinstance(error, SQLAlchemyKMSError)
    assert error.table == table
    assert error.key_version == version
    assert error.master_key_id == master_key_id
    message = str(error)
    for part in (table, f"key version {version}", master_key_id):
        assert part in message, (part, message)


@pytest.mark.parametrize("outage", ["hook", "closed-port"])
def test_warm_cache_keeps_reads_and_writes_going_while_kms_is_unreachable(
    engine: Engine, kms: AwsKms, cmk: dict[str, str], closed_port: int, outage: str
) -> None:
    max_age = 1.2
    vault = KeyVault(engine, kms, cache_max_age=max_age)
    vault.create_table()
    metadata = MetaData()
    table = fault_table(metadata)
    metadata.create_all(engine)  # data key and search key made (and cached) here
    warmed = time.monotonic()
    write_rows(engine, table, range(0, 5))
    assert read_all(engine, table) == expected_rows(range(0, 5))

    fault = KmsFault(kms.client)
    if outage == "hook":
        fault.code = "unreachable"
    else:
        fault.code = "unreachable"  # the old client must not be used either
        vault.provider = AwsKms(
            cmk["alias"],
            endpoint_url=f"http://127.0.0.1:{closed_port}",
            region_name=REGION,
            connect_timeout=0.5,
            max_attempts=1,
        )
    # KMS is gone: everything cached goes on, without trying KMS at all
    write_rows(engine, table, range(5, 10))
    assert read_all(engine, table) == expected_rows(range(0, 10))
    assert find_by_email(engine, table, "p7@example.com") == [7]
    assert fault.seen == {}
    assert time.monotonic() - warmed < max_age, "too slow to test within the cache max age"

    # past the max age the keys must be unwrapped again, and that fails, bounded
    time.sleep(max(0.0, warmed + max_age - time.monotonic()) + 0.1)
    started = time.monotonic()
    with pytest.raises(KMSUnavailableError) as info:
        read_all(engine, table)
    assert time.monotonic() - started < 10
    check_names(info.value, "kf_patients", 1, cmk["arn"])
    assert info.value.operation == "Decrypt"
    with pytest.raises(KMSUnavailableError):
        write_rows(engine, table, range(10, 11))
    with pytest.raises(KMSUnavailableError):
        find_by_email(engine, table, "p7@example.com")

    # and once KMS is back, so is everything
    fault.code = None
    vault.provider = kms
    write_rows(engine, table, range(10, 11))
    assert read_all(engine, table) == expected_rows(range(0, 11))
    vault.close()


def test_cold_start_with_kms_unreachable_fails_within_bounded_time(
    engine: Engine, kms: AwsKms, cmk: dict[str, str], closed_port: int
) -> None:
    other = fault_table(MetaData(), "kf_new")
    other.create(engine)  # before any vault: this table has no key
    vault = KeyVault(engine, kms)
    vault.create_table()
    metadata = MetaData()
    table = fault_table(metadata)
    metadata.create_all(engine)
    write_rows(engine, table, range(3))
    vault.close()

    unreachable = AwsKms(
        cmk["alias"],
        endpoint_url=f"http://127.0.0.1:{closed_port}",
        region_name=REGION,
        connect_timeout=0.5,
        max_attempts=1,
    )
    cold = KeyVault(engine, unreachable)
    started = time.monotonic()
    with Session(engine) as session, pytest.raises(KMSUnavailableError) as info:
        session.execute(select(table.c.name)).all()
    assert time.monotonic() - started < 10
    check_names(info.value, "kf_patients", 1, cmk["arn"])
    assert info.value.column == "name"
    assert info.value.operation == "Decrypt"

    # a table that has no key yet: nothing is written, no key row is left behind
    started = time.monotonic()
    with Session(engine) as session, pytest.raises(KMSUnavailableError) as info:
        session.execute(other.insert().values(id=1, name="n", email="e"))
        session.commit()
    assert time.monotonic() - started < 10
    assert info.value.table == "kf_new" and info.value.operation == "GenerateDataKey"
    assert info.value.master_key_id == cmk["alias"]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM kf_new")).scalar() == 0
        scopes = conn.execute(text("SELECT DISTINCT scope FROM kms_data_keys")).scalars().all()
    assert scopes == ["kf_patients"]
    cold.close()


@pytest.mark.parametrize(("code", "cls"), ERRORS)
def test_kms_refusals_surface_from_session_execute(
    engine: Engine, kms: AwsKms, cmk: dict[str, str], code: str, cls: type[KMSError]
) -> None:
    other = fault_table(MetaData(), "kf_other")
    other.create(engine)  # before any vault: this table has no key
    vault = KeyVault(engine, kms)
    vault.create_table()
    metadata = MetaData()
    table = fault_table(metadata)
    metadata.create_all(engine)
    write_rows(engine, table, range(3))
    vault.clear_cache()
    fault = KmsFault(kms.client)
    fault.code = code

    # reading a randomized column: the data key's Decrypt is refused
    with Session(engine) as session, pytest.raises(KMSError) as info:
        session.execute(select(table.c.id, table.c.name)).all()
    assert type(info.value) is cls
    check_names(info.value, "kf_patients", 1, cmk["arn"])
    assert (info.value.operation, info.value.column) == ("Decrypt", "name")

    # an equality query: the search key's Decrypt is refused when the statement runs
    with Session(engine) as session, pytest.raises(KMSError) as info:
        session.execute(select(table.c.id).where(table.c.email == "p1@example.com"))
    assert type(info.value) is cls
    check_names(info.value, "kf_patients", 1, cmk["arn"])

    # a write to a table without a key: GenerateDataKey is refused, nothing is written
    with Session(engine) as session, pytest.raises(KMSError) as info:
        session.execute(other.insert().values(id=1, name="n", email=None))
        session.commit()
    assert type(info.value) is cls
    assert info.value.table == "kf_other" and info.value.operation == "GenerateDataKey"
    assert info.value.master_key_id == cmk["alias"] and cmk["alias"] in str(info.value)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM kf_other")).scalar() == 0

    # the refusal is not cached: once KMS agrees again, the same session code works
    fault.code = None
    assert read_all(engine, table) == expected_rows(range(3))
    vault.close()


def test_revoked_access_stops_reads_and_writes_within_the_cache_max_age(
    engine: Engine, kms: AwsKms, cmk: dict[str, str]
) -> None:
    max_age = 0.5
    vault = KeyVault(engine, kms, cache_max_age=max_age)
    vault.create_table()
    metadata = MetaData()
    table = fault_table(metadata)
    metadata.create_all(engine)
    write_rows(engine, table, range(3))
    assert read_all(engine, table) == expected_rows(range(3))

    fault = KmsFault(kms.client)
    fault.code = "AccessDeniedException"  # the key policy no longer allows this role
    revoked = time.monotonic()
    denied_at = None
    while time.monotonic() - revoked < max_age + 2:
        try:
            assert read_all(engine, table) == expected_rows(range(3))
        except KMSAccessDeniedError as error:
            denied_at = time.monotonic()
            check_names(error, "kf_patients", 1, cmk["arn"])
            break
        time.sleep(0.02)
    assert denied_at is not None, "reads went on after access was revoked"
    assert denied_at - revoked <= max_age + 0.2
    # once the max age has passed for every cached key, writes and lookups stop too,
    # and everything stays stopped
    time.sleep(max(0.0, revoked + max_age + 0.1 - time.monotonic()))
    with pytest.raises(KMSAccessDeniedError):
        write_rows(engine, table, range(3, 4))
    with pytest.raises(KMSAccessDeniedError):
        find_by_email(engine, table, "p1@example.com")
    time.sleep(max_age)
    with pytest.raises(KMSAccessDeniedError):
        read_all(engine, table)
    assert fault.seen.get("Decrypt", 0) >= 3
    vault.close()
