"""Shared fixtures: a real KMS over HTTP (moto_server), and the database matrix.

Database URLs come from the environment, with the defaults of the project's
development machines:

* ``SQLALCHEMY_KMS_TEST_POSTGRES_URL`` (``postgresql+psycopg://postgres@127.0.0.1:5432/test``)
* ``SQLALCHEMY_KMS_TEST_MARIADB_URL`` (``mysql+pymysql://root@127.0.0.1:3306/test``)

A server that cannot be reached makes its tests skip, unless
``SQLALCHEMY_KMS_REQUIRE_SERVERS=1`` (set by ``.ci/run``), which makes it a
failure. ``SQLALCHEMY_KMS_TEST_DATABASES`` (comma-separated, default
``sqlite,postgresql,mariadb``) narrows the matrix.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from sqlalchemy import MetaData, create_engine, inspect
from sqlalchemy.engine import Engine

from sqlalchemy_kms import AwsKms, KeyVault, LocalKms

SERVER_URLS = {
    "postgresql": os.environ.get(
        "SQLALCHEMY_KMS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    ),
    "mariadb": os.environ.get(
        "SQLALCHEMY_KMS_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test"
    ),
}
DATABASES = [
    name.strip()
    for name in os.environ.get("SQLALCHEMY_KMS_TEST_DATABASES", "sqlite,postgresql,mariadb").split(
        ","
    )
    if name.strip()
]
REQUIRE_SERVERS = os.environ.get("SQLALCHEMY_KMS_REQUIRE_SERVERS") == "1"
REGION = "us-east-1"
CMK_ALIAS = "alias/sqlalchemy-kms-test"

_reachable: dict[str, str | None] = {}


def _server_problem(name: str) -> str | None:
    """``None`` when the server answers, else why not (checked once per session)."""
    if name not in _reachable:
        engine = create_engine(SERVER_URLS[name])
        try:
            with engine.connect():
                pass
            _reachable[name] = None
            # the test database belongs to the suite: start from an empty one
            drop_new_tables(engine, set())
        except Exception as exc:  # any failure to connect means "not reachable"
            _reachable[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        finally:
            engine.dispose()
    return _reachable[name]


def database_url(name: str, tmp_path: Path) -> str:
    """The URL of database ``name`` for one test, skipping or failing if unreachable."""
    if name == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    problem = _server_problem(name)
    if problem is not None:
        message = f"{name} at {SERVER_URLS[name]} is not reachable ({problem})"
        if REQUIRE_SERVERS:
            pytest.fail(message)
        pytest.skip(message)
    return SERVER_URLS[name]


def drop_new_tables(engine: Engine, before: set[str]) -> None:
    """Drop every table the test created, so tests never see each other's data."""
    metadata = MetaData()
    names = set(inspect(engine).get_table_names()) - before
    if names:
        metadata.reflect(engine, only=lambda name, _: name in names)
        metadata.drop_all(engine, checkfirst=True)


@pytest.fixture(params=DATABASES)
def db_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(db_name: str, tmp_path: Path) -> str:
    return database_url(db_name, tmp_path)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    before = set(inspect(engine).get_table_names())
    yield engine
    drop_new_tables(engine, before)
    engine.dispose()


# -- KMS -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def kms_endpoint() -> Iterator[str]:
    """A moto KMS server on a free loopback port, stopped by PID at the end."""
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from moto.server import main; main()",
            "-H",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL_KMS",
        )
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=REGION
    )
    try:
        yield url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def kms_client(endpoint: str) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture(scope="session")
def cmk(kms_endpoint: str) -> dict[str, str]:
    """A symmetric master key in the moto KMS, with an alias."""
    client = kms_client(kms_endpoint)
    metadata = client.create_key(Description="sqlalchemy-kms tests")["KeyMetadata"]
    client.create_alias(AliasName=CMK_ALIAS, TargetKeyId=metadata["KeyId"])
    return {"key_id": metadata["KeyId"], "arn": metadata["Arn"], "alias": CMK_ALIAS}


class CallCounter:
    """Counts KMS API calls made through one boto3 client (botocore event hook)."""

    def __init__(self, client: Any) -> None:
        self.calls: Counter[str] = Counter()
        client.meta.events.register("before-call.kms", self._count)

    def _count(self, model: Any, **kwargs: Any) -> None:
        self.calls[model.name] += 1


@pytest.fixture
def kms(kms_endpoint: str, cmk: dict[str, str]) -> AwsKms:
    """A fresh AwsKms provider on the moto server; ``kms.counter.calls`` counts API calls."""
    client = kms_client(kms_endpoint)
    provider = AwsKms(cmk["alias"], client=client)
    provider.counter = CallCounter(client)  # type: ignore[attr-defined]
    return provider


@pytest.fixture
def local_kms() -> LocalKms:
    return LocalKms(os.urandom(32))


@pytest.fixture
def vault(engine: Engine, kms: AwsKms) -> Iterator[KeyVault]:
    vault = KeyVault(engine, kms)
    vault.create_table()
    yield vault
    vault.close()
