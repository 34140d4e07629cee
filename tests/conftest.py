"""Shared fixtures: a real KMS over HTTP (moto_server), the database matrix, vaults.

The helpers they use (database URLs, the KMS client, the call counter) are in
``tests/helpers.py``; test modules import them from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Engine

from sqlalchemy_kms import AwsKms, KeyVault, LocalKms

from .helpers import (
    CMK_ALIAS,
    DATABASES,
    REGION,
    CallCounter,
    database_url,
    drop_new_tables,
    free_port,
    kms_client,
)

# re-exported for test modules that still import them from here
__all__ = ["DATABASES", "REGION", "CallCounter", "database_url", "kms_client"]


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


@pytest.fixture(scope="session")
def kms_endpoint() -> Iterator[str]:
    """A moto KMS server on a free loopback port, stopped by PID at the end."""
    port = free_port()
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


@pytest.fixture(scope="session")
def cmk(kms_endpoint: str) -> dict[str, str]:
    """A symmetric master key in the moto KMS, with an alias."""
    client = kms_client(kms_endpoint)
    metadata = client.create_key(Description="sqlalchemy-kms tests")["KeyMetadata"]
    client.create_alias(AliasName=CMK_ALIAS, TargetKeyId=metadata["KeyId"])
    return {"key_id": metadata["KeyId"], "arn": metadata["Arn"], "alias": CMK_ALIAS}


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
def vault(engine: Engine, request: pytest.FixtureRequest) -> Iterator[KeyVault]:
    """A vault with a local master key; with the ``aws_kms`` marker, one whose master
    key is in the KMS server (for tests about KMS)."""
    provider: AwsKms | LocalKms
    if request.node.get_closest_marker("aws_kms") is not None:
        provider = request.getfixturevalue("kms")
    else:
        provider = LocalKms(os.urandom(32))
    # no grace period: tests retire right after rotating (the grace period has tests of
    # its own)
    vault = KeyVault(engine, provider, grace_period=0)
    vault.create_table()
    yield vault
    vault.close()
