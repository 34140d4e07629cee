"""Nothing secret in the logs: with every logger at DEBUG, no data key in any form and no
plaintext of an encrypted value (SQLAlchemy's engine logger at INFO: at DEBUG it logs the
decrypted rows, by its design, as the README says).

The data keys are learned by asking KMS directly (boto3's Decrypt of the key table's rows,
with nothing capturing), after the run whose logs were captured.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, select
from sqlalchemy.engine import Engine

from sqlalchemy_kms import AwsKms, KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms.providers import _redact
from sqlalchemy_kms.providers._redact import KmsPlaintextFilter
from sqlalchemy_kms.providers.base import encryption_context

from .helpers import key_rows, kms_client


@dataclass
class Captured:
    """The records every logger produced while capturing."""

    records: list[logging.LogRecord] = field(default_factory=list)

    def names(self) -> set[str]:
        return {record.name for record in self.records}


class _Keep(logging.Handler):
    def __init__(self, captured: Captured) -> None:
        super().__init__(logging.NOTSET)
        self.captured = captured

    def emit(self, record: logging.LogRecord) -> None:
        self.captured.records.append(record)


@pytest.fixture
def every_logger_at_debug() -> Iterator[Captured]:
    """Root and every existing logger at DEBUG and enabled, SQLAlchemy's engine loggers at
    INFO; a handler on the root keeps every record. All of it is undone at the end."""
    root = logging.getLogger()
    engine_loggers = [
        logging.getLogger(name) for name in ("sqlalchemy.engine", "sqlalchemy.engine.Engine")
    ]
    loggers = [
        logger
        for logger in logging.root.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    saved = [(logger, logger.level, logger.disabled) for logger in [root, *loggers]]
    captured = Captured()
    handler = _Keep(captured)
    try:
        root.setLevel(logging.DEBUG)
        for logger in loggers:
            logger.disabled = False
            logger.setLevel(logging.DEBUG)
        for logger in engine_loggers:
            logger.setLevel(logging.INFO)  # at DEBUG, SQLAlchemy logs the rows it returns
        root.addHandler(handler)
        yield captured
    finally:
        root.removeHandler(handler)
        for logger, level, disabled in saved:
            logger.setLevel(level)
            logger.disabled = disabled


def key_forms(key: bytes) -> list[str]:
    """Ways a data key's bytes could read in a log's text."""
    b64 = base64.b64encode(key).decode()
    urlsafe = base64.urlsafe_b64encode(key).decode()
    return [
        key.hex(),
        key.hex().upper(),
        b64,
        b64.rstrip("="),
        urlsafe,
        urlsafe.rstrip("="),
        repr(key)[2:-1],
        key.decode("latin-1"),
    ]


def _leaves(value: Any, depth: int = 0) -> Iterator[Any]:
    if depth > 20:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(key, depth + 1)
            yield from _leaves(item, depth + 1)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from _leaves(item, depth + 1)
    else:
        yield value


def leaks(captured: Captured, keys: list[bytes], texts: list[str]) -> list[str]:
    """Each record that shows a key (in any form) or one of ``texts``, in its message or args."""
    found = []
    for record in captured.records:
        message = record.getMessage()
        haystack = [message, str(record.msg), repr(record.args), str(record.args)]
        raw: list[bytes] = []
        for leaf in _leaves(record.args):
            if isinstance(leaf, (bytes, bytearray)):
                raw.append(bytes(leaf))
                haystack.append(bytes(leaf).decode("latin-1"))
            else:
                haystack.append(str(leaf))
        for key in keys:
            if any(form in text for form in key_forms(key) for text in haystack) or any(
                key in data for data in raw
            ):
                found.append(f"data key in {record.name}: {message[:300]}")
        for plain in texts:
            if any(plain in text for text in haystack) or any(
                plain.encode() in data for data in raw
            ):
                found.append(f"{plain!r} in {record.name}: {message[:300]}")
    return found


def data_keys(vault: KeyVault, endpoint: str) -> list[bytes]:
    """Every data key of the vault's key table, unwrapped by asking KMS directly."""
    client = kms_client(endpoint)
    keys = []
    for row in key_rows(vault):
        context = encryption_context(row.scope, row.purpose, row.key_version)
        answer = client.decrypt(
            CiphertextBlob=bytes(row.wrapped_key),
            KeyId=row.master_key_id,
            EncryptionContext=context,
        )
        keys.append(bytes(answer["Plaintext"]))
    assert keys
    return keys


def body_records(captured: Captured) -> list[str]:
    """The captured messages that show a KMS request or response body."""
    return [
        record.getMessage()
        for record in captured.records
        if record.name in _redact.LOGGERS and "Plaintext" in record.getMessage()
    ]


# -- item: data keys in botocore's DEBUG logs ---------------------------------------------


def test_no_data_key_in_botocore_debug_logs(
    every_logger_at_debug: Captured, kms_endpoint: str, cmk: dict[str, str], tmp_path: Path
) -> None:
    """GenerateDataKey and Decrypt responses, and the Encrypt request of a rewrap from a
    local master key, are logged at DEBUG with their Plaintext redacted."""
    engine = create_engine(f"sqlite:///{tmp_path / 'logs.db'}")
    metadata = MetaData()
    table = Table("secrets", metadata, Column("id", Integer, primary_key=True))
    vault = KeyVault(engine, LocalKms(os.urandom(32)))
    try:
        vault.create_table()
        vault.create_key(table)  # a data key made locally: KMS sees it in Encrypt
        aws = AwsKms(cmk["alias"], client=kms_client(kms_endpoint))
        assert vault.rewrap(aws) == 1
        vault.clear_cache()
        vault.rotate_key(table)  # GenerateDataKey
        vault.clear_cache()
        assert sorted(vault.key_versions(table)) == [1, 2]
        vault.active_key_version(table)
        for row in key_rows(vault):  # Decrypt, through the provider
            aws.unwrap(
                bytes(row.wrapped_key),
                encryption_context(row.scope, row.purpose, row.key_version),
                row.master_key_id,
            )
        captured = list(every_logger_at_debug.records)
        every_logger_at_debug.records.clear()
        keys = data_keys(vault, kms_endpoint)
    finally:
        vault.close()
        engine.dispose()
    assert len(keys) == 2
    every_logger_at_debug.records[:] = captured
    assert not leaks(every_logger_at_debug, keys, [])
    # botocore did log the bodies: with the data keys' values redacted
    bodies = body_records(every_logger_at_debug)
    assert any("TrentService.Encrypt" in body for body in bodies)
    assert sum('"Plaintext": "<redacted>"' in body for body in bodies) >= 4
    assert {"botocore.endpoint", "botocore.parsers"} <= every_logger_at_debug.names()


def test_the_filter_is_installed_once(kms_endpoint: str, cmk: dict[str, str]) -> None:
    AwsKms(cmk["alias"], client=kms_client(kms_endpoint))
    AwsKms(cmk["key_id"], client=kms_client(kms_endpoint))
    for name in _redact.LOGGERS:
        filters = logging.getLogger(name).filters
        assert sum(isinstance(f, KmsPlaintextFilter) for f in filters) == 1


def _record(msg: Any, *args: Any) -> logging.LogRecord:
    return logging.LogRecord("botocore.endpoint", logging.DEBUG, __file__, 1, msg, args, None)


def test_the_filter_redacts_plaintext_members_and_only_them() -> None:
    body = b'{"KeyId": "alias/x", "Plaintext": "c2VjcmV0LWtleQ==", "EncryptionContext": {"t": "1"}}'
    request = {"method": "POST", "body": body, "headers": {"X-Amz-Target": "TrentService.Encrypt"}}
    record = _record("Making request for %s with params: %s", "Encrypt", request)
    assert KmsPlaintextFilter().filter(record)
    assert request["body"] is body  # botocore's own request is left as it is
    assert record.args[0] == "Encrypt"  # type: ignore[index]
    assert record.args[1] == {  # type: ignore[index]
        "method": "POST",
        "body": body.replace(b"c2VjcmV0LWtleQ==", b"<redacted>"),
        "headers": {"X-Amz-Target": "TrentService.Encrypt"},
    }
    cases: list[tuple[Any, Any]] = [
        # a JSON response body, as bytes and as text
        (
            b'{"CiphertextBlob":"AQID","Plaintext":"c2VjcmV0","KeyId":"arn"}',
            b'{"CiphertextBlob":"AQID","Plaintext":"<redacted>","KeyId":"arn"}',
        ),
        ('{"Plaintext": "c2VjcmV0"}', '{"Plaintext": "<redacted>"}'),
        # a parsed answer and form fields: the member's value, whatever its type
        ({"Plaintext": b"\x01\x02", "KeyId": "k"}, {"Plaintext": b"<redacted>", "KeyId": "k"}),
        (
            {"PrivateKeyPlaintext": "x", "PublicKey": "p"},
            {"PrivateKeyPlaintext": "<redacted>", "PublicKey": "p"},
        ),
        # a Python repr in a string
        (
            "{'Plaintext': b'\\x01\\x02', 'KeyId': 'k'}",
            "{'Plaintext': \"<redacted>\", 'KeyId': 'k'}",
        ),
        # no Plaintext member: unchanged, even with the word as a value
        (b'{"KeyId": "k", "CiphertextBlob": "AQID"}', b'{"KeyId": "k", "CiphertextBlob": "AQID"}'),
        ('{"Note": "Plaintext"}', '{"Note": "Plaintext"}'),
        # a value that cannot be read (cut short, escaped): everything after the name goes
        ('{"Plaintext": "c2VjcmV0', '{"Plaintext": "<redacted>"'),
        ('{\\"Plaintext\\": \\"c2VjcmV0\\", \\"x\\": 1}', '{\\"Plaintext\\": "<redacted>"'),
    ]
    for given, expected in cases:
        record = _record("body: %r", given)
        assert KmsPlaintextFilter().filter(record)
        assert record.msg == "body: %r", given  # the arguments were enough
        assert record.getMessage() == f"body: {expected!r}", given
    # the message itself, with no arguments
    record = _record('Response body: {"Plaintext": "c2VjcmV0"}')
    assert KmsPlaintextFilter().filter(record)
    assert record.getMessage() == 'Response body: {"Plaintext": "<redacted>"}'
    # a mapping as the arguments
    record = _record("%(body)s", {"body": b'{"Plaintext": "c2VjcmV0"}'})
    assert KmsPlaintextFilter().filter(record)
    assert record.getMessage() == 'b\'{"Plaintext": "<redacted>"}\''


def test_the_filter_checks_objects_by_their_text_and_withholds_what_it_cannot_check() -> None:
    class Request:
        def __str__(self) -> str:
            return '<Request body={"Plaintext": "c2VjcmV0", "KeyId": "k"}>'

    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("c2VjcmV0")

    record = _record("Sending %s", Request())
    assert KmsPlaintextFilter().filter(record)
    assert record.getMessage() == 'Sending <Request body={"Plaintext": "<redacted>", "KeyId": "k"}>'
    record = _record("Sending %s", Broken())
    assert KmsPlaintextFilter().filter(record)
    assert "c2VjcmV0" not in record.getMessage() and not record.args
    assert "withheld" in record.getMessage()
    record = _record("nothing to hide: %s %d", "x", 3)
    assert KmsPlaintextFilter().filter(record)
    assert record.msg == "nothing to hide: %s %d" and record.args == ("x", 3)
    nested: Any = "Plaintext"
    for _ in range(100):
        nested = [nested]
    record = _record("%s", nested)
    assert KmsPlaintextFilter().filter(record)
    assert "withheld" in record.getMessage()


# -- Done when: a whole run at DEBUG --------------------------------------------------------


def _people(metadata: MetaData) -> Table:
    return Table(
        "log_people",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", KMSEncrypted(String(100))),
        Column("email", KMSEncrypted(String(100), deterministic=True)),
    )


def _write(engine: Engine, table: Table, first: int, count: int) -> list[str]:
    rows: list[dict[str, Any]] = [
        {"id": i, "name": f"Plain Name {i:04d} qz", "email": f"plain{i:04d}@example.org"}
        for i in range(first, first + count)
    ]
    with engine.begin() as conn:
        conn.execute(insert(table), rows)
    return [text for row in rows for text in (row["name"], row["email"])]


def _read_all(engine: Engine, table: Table, count: int) -> None:
    with engine.connect() as conn:
        rows = conn.execute(select(table).order_by(table.c.id)).all()
        assert len(rows) == count and all(row.name.startswith("Plain Name") for row in rows)
        first = rows[0]
        found = conn.execute(select(table.c.id).where(table.c.email == first.email)).scalar_one()
        assert found == first.id


def test_a_whole_run_at_debug_logs_no_plaintext_and_no_data_key(
    every_logger_at_debug: Captured, kms_endpoint: str, cmk: dict[str, str], tmp_path: Path
) -> None:
    """Create keys, write, read, rotate, re-encrypt, rewrap local -> AWS and AWS -> AWS, at
    DEBUG everywhere (SQLAlchemy's engine at INFO: statements, and ciphertext parameters)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'run.db'}")
    metadata = MetaData()
    people = _people(metadata)
    second = kms_client(kms_endpoint).create_key(Description="sqlalchemy-kms log test")
    vault = KeyVault(engine, LocalKms(os.urandom(32)), grace_period=0)
    texts: list[str] = []
    try:
        vault.create_table()
        metadata.create_all(engine)
        vault.create_keys(metadata)
        texts += _write(engine, people, 1, 20)
        _read_all(engine, people, 20)
        vault.rotate_key(people)
        vault.rotate_key(people, search=True)
        vault.reencrypt(people)
        _read_all(engine, people, 20)
        # local -> AWS: each data key goes to KMS in an Encrypt request
        vault.rewrap(AwsKms(cmk["alias"], client=kms_client(kms_endpoint)))
        vault.clear_cache()
        _read_all(engine, people, 20)  # Decrypt
        vault.rotate_key(people)  # GenerateDataKey
        texts += _write(engine, people, 21, 10)
        vault.reencrypt(people)
        _read_all(engine, people, 30)
        # AWS -> AWS: ReEncrypt
        target = second["KeyMetadata"]["Arn"]
        vault.rewrap(AwsKms(target, client=kms_client(kms_endpoint)))
        vault.clear_cache()
        _read_all(engine, people, 30)
        run = list(every_logger_at_debug.records)
        every_logger_at_debug.records.clear()
        keys = data_keys(vault, kms_endpoint)
    finally:
        vault.close()
        engine.dispose()
    assert len(keys) == 5  # data keys 1 to 3, search keys 1 and 2
    every_logger_at_debug.records[:] = run
    assert not leaks(every_logger_at_debug, keys, texts)
    names = every_logger_at_debug.names()
    assert {"botocore.endpoint", "botocore.parsers", "sqlalchemy.engine.Engine"} <= names
    assert any(name.startswith("sqlalchemy_kms.audit") for name in names)
