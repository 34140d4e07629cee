"""Common mistakes get a clear error, and the vault's methods take tables in every form."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Column, Integer, MetaData, String, Table, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlalchemy_kms import AwsKms, KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms.cli import cli
from sqlalchemy_kms.errors import ConfigurationError


def _tables() -> tuple[MetaData, Table, Table]:
    metadata = MetaData()
    first = Table(
        "mk_first",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", KMSEncrypted(String(40))),
    )
    second = Table(
        "mk_second",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("email", KMSEncrypted(String(40), deterministic=True)),
    )
    return metadata, first, second


MODELS = _tables()[0]


def test_a_second_vault_on_an_engine_is_refused_unless_asked_for(engine: Engine) -> None:
    first = KeyVault(engine, LocalKms(bytes(32)))
    with pytest.raises(ConfigurationError, match=r"already has a vault.*replace=True"):
        KeyVault(engine, LocalKms(bytes(range(32))))
    assert first.stats()["cache_entries"] == 0  # the first one is still bound and whole
    second = KeyVault(engine, LocalKms(bytes(range(32))), replace=True)
    second.close()
    third = KeyVault(engine, LocalKms(bytes(32)))  # after close(): allowed
    third.close()


def test_methods_that_take_tables_take_a_table_a_list_or_metadata(engine: Engine) -> None:
    vault = KeyVault(engine, LocalKms(bytes(32)))
    vault.create_table()
    metadata, first, second = _tables()
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(first.insert(), [{"id": i, "name": f"n{i}"} for i in range(1, 4)])
        conn.execute(second.insert(), [{"id": i, "email": f"e{i}"} for i in range(1, 3)])
    for tables in (first, [first], metadata):
        [report] = [t for t in vault.status(tables) if t.table == "mk_first"]
        assert report.columns[0].rows_by_version == {1: 3}
        assert vault.verify(tables).ok
        assert "mk_first" in vault.create_keys(tables)
        assert vault.warm_up(tables) >= 1
    vault.rotate_key(first)
    vault.rotate_key(second, search=True)
    done = vault.reencrypt(metadata)
    assert (done.total, done.rewritten) == (5, 5)
    assert vault.reencrypt([first, second]).rewritten == 0
    assert vault.reencrypt(first).rewritten == 0
    vault.close()


def test_cache_hits_count_statements_served_from_memory(engine: Engine) -> None:
    vault = KeyVault(engine, LocalKms(bytes(32)))
    vault.create_table()
    metadata, first, _ = _tables()
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(first.insert(), [{"id": i, "name": f"n{i}"} for i in range(1, 101)])
    before = vault.stats()
    for _ in range(10):
        with Session(engine) as session:
            assert len(session.execute(select(first.c.name)).all()) == 100
    after = vault.stats()
    assert after["encrypted_statements"] - before["encrypted_statements"] == 10
    assert after["cache_hits"] - before["cache_hits"] == 10
    assert after["cache_misses"] == before["cache_misses"]
    vault.clear_cache()  # the next statement needs the KMS again: not a hit
    with engine.connect() as conn:
        conn.execute(select(first.c.name)).all()
        conn.execute(select(first.c.name)).all()
    final = vault.stats()
    assert final["encrypted_statements"] - after["encrypted_statements"] == 2
    assert final["cache_hits"] - after["cache_hits"] == 1
    vault.close()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the block ends


@pytest.mark.aws_kms
def test_verify_with_kms_down_says_so_once_and_counts_apart(
    engine: Engine, vault: KeyVault, cmk: dict[str, str], tmp_path: Any
) -> None:
    metadata, first, second = _tables()
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(first.insert(), [{"id": i, "name": f"n{i}"} for i in range(1, 41)])
        conn.execute(second.insert(), [{"id": i, "email": f"e{i}"} for i in range(1, 41)])
    vault.close()
    down = AwsKms(
        cmk["arn"],
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        region_name="us-east-1",
        connect_timeout=0.5,
        max_attempts=1,
    )
    reader = KeyVault(engine, down)
    try:
        report = reader.verify(metadata)
    finally:
        reader.close()
    assert report.failures == 0
    assert report.unchecked == report.values == 80
    assert len(report.kms_problems) == 2  # one line per key, not one per value
    assert all(line.startswith("cannot reach KMS: mk_") for line in report.kms_problems)
    assert not report.ok
    # the command line: the problem once per key, its own exit status
    url = engine.url.render_as_string(hide_password=False)
    if url.startswith("sqlite:///"):
        result = CliRunner().invoke(
            cli,
            [
                "verify",
                "--db",
                url,
                "--kms",
                f"aws-kms://{cmk['arn']}",
                "--models",
                "tests.test_mistakes:MODELS",
            ],
            env={
                "AWS_ENDPOINT_URL_KMS": down.client.meta.endpoint_url,
                "AWS_MAX_ATTEMPTS": "1",
                "AWS_DEFAULT_REGION": "us-east-1",
            },
        )
        assert result.exit_code == 3, result.output
        assert result.output.count("cannot reach KMS") == 2
        assert "NOT CHECKED: 80 of 80" in result.output
        assert "FAILED" not in result.output


def test_export_files_are_written_for_their_owner_only(tmp_path: Any) -> None:
    import os
    import stat

    from sqlalchemy import create_engine

    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = create_engine(url)
    vault = KeyVault(engine, LocalKms(bytes(32)))
    vault.create_table()
    vault.create_key("patients")
    vault.close()
    fresh, existing = tmp_path / "fresh.json", tmp_path / "existing.json"
    existing.write_text("old")
    existing.chmod(0o644)
    for path in (fresh, existing):
        result = CliRunner().invoke(cli, ["export-keys", "--db", url, "--output", str(path)])
        assert result.exit_code == 0, result.output
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert '"scope": "patients"' in path.read_text()


def test_reencrypt_of_several_tables_refuses_an_unknown_column(engine: Engine) -> None:
    from sqlalchemy_kms.errors import KeyLifecycleError

    vault = KeyVault(engine, LocalKms(bytes(32)))
    vault.create_table()
    metadata, first, second = _tables()
    metadata.create_all(engine)
    with pytest.raises(KeyLifecycleError, match="not encrypted columns of the tables: typo"):
        vault.reencrypt(metadata, columns=["name", "typo"])
    assert vault.reencrypt([first, second], columns=["email"]).table == "mk_second"
    vault.close()


def test_using_refuses_a_connection_the_vault_cannot_share(tmp_path: Any) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    other = create_engine(f"sqlite:///{tmp_path / 'b.db'}")
    vault = KeyVault(engine, LocalKms(bytes(32)))
    with (
        other.connect() as conn,
        pytest.raises(ConfigurationError, match="cannot share"),
        vault.using(conn),
    ):
        pass
    conn = engine.connect()
    conn.close()
    with pytest.raises(ConfigurationError, match="cannot share"), vault.using(conn):
        pass
    vault.close()


def test_a_rewrap_counts_only_rows_it_changed(engine: Engine, monkeypatch: Any) -> None:
    vault = KeyVault(engine, LocalKms(bytes(32)))
    vault.create_table()
    vault.create_key("mk_first")
    vault.create_key("mk_second")
    # another process rewraps (or removes) every row between our read and our write
    monkeypatch.setattr(vault.key_table, "replace_wrapped", lambda *args, **kwargs: 0)
    assert vault.rewrap(LocalKms(bytes(range(32)))) == 0
    vault.close()
