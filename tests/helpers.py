"""Helpers shared by several test modules: the database matrix, the KMS client and
call counter, key-table rows. Fixtures live in conftest.py and use these.

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
from collections import Counter
from pathlib import Path
from typing import Any

import boto3
import pytest
from sqlalchemy import MetaData, create_engine, inspect, select
from sqlalchemy.engine import Engine

from sqlalchemy_kms import KeyVault


def key_rows(vault: KeyVault, scope: str | None = None) -> list[Any]:
    """The key table's rows as stored (all, or one table's), ordered."""
    keys = vault.table
    query = select(keys).order_by(keys.c.scope, keys.c.purpose, keys.c.key_version)
    if scope is not None:
        query = query.where(keys.c.scope == scope)
    with vault.connections.reading() as conn:  # inside vault.using(): that connection
        return list(conn.execute(query))


# -- databases -------------------------------------------------------------------

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


# -- KMS ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kms_client(endpoint: str) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


class CallCounter:
    """Counts KMS API calls made through one boto3 client (botocore event hook)."""

    def __init__(self, client: Any) -> None:
        self.calls: Counter[str] = Counter()
        client.meta.events.register("before-call.kms", self._count)

    def _count(self, model: Any, **kwargs: Any) -> None:
        self.calls[model.name] += 1
