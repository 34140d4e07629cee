"""Master-key substitution: a key row made under another master key is never used.

The attack: someone who may write the database and holds a KMS key of their own
makes a data key under it (``GenerateDataKey`` with the right encryption context)
and inserts it as the newest enabled version of a table's data key and search
key. Unchecked, the application would then encrypt new values under data keys
the attacker knows. A provider uses only key rows of its own master key, and of
master keys named with it in a ``MultiKms``; any other row raises
``ForeignMasterKeyError`` before the key is used, for the active key and for
older versions alike.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select, text
from sqlalchemy.engine import Engine

from sqlalchemy_kms import AwsKms, KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms.errors import ConfigurationError, ForeignMasterKeyError, KMSError
from sqlalchemy_kms.providers import GeneratedDataKey, KeyProvider, MultiKms
from sqlalchemy_kms.providers.base import encryption_context

from .helpers import kms_client

TABLE = "ks_patients"
OTHER = "ks_visits"
ROWS = [(1, "Kim", "kim@x.io"), (2, "Lee", "lee@x.io")]


def patients(metadata: MetaData, name: str = TABLE) -> Table:
    return Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", KMSEncrypted(String(100))),
        Column("email", KMSEncrypted(String(100), deterministic=True)),
    )


def write(engine: Engine, table: Table, rows: list[tuple[int, str, str]]) -> None:
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "name": n, "email": e} for i, n, e in rows])


def read(engine: Engine, table: Table, ids: list[int] | None = None) -> list[tuple[Any, ...]]:
    query = select(table.c.id, table.c.name, table.c.email).order_by(table.c.id)
    if ids is not None:
        query = query.where(table.c.id.in_(ids))
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]


def find(engine: Engine, table: Table, email: str) -> list[int]:
    with engine.connect() as conn:
        return list(conn.scalars(select(table.c.id).where(table.c.email == email)))


def stored_ids(engine: Engine, table: Table) -> list[int]:
    """The ids in the table, read without decrypting anything."""
    with engine.connect() as conn:
        return list(conn.scalars(text(f"SELECT id FROM {table.name} ORDER BY id")))


def key_owners(engine: Engine, scope: str) -> dict[tuple[str, int], str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT purpose, key_version, master_key_id FROM kms_data_keys "
                "WHERE scope = :scope"
            ),
            {"scope": scope},
        )
        return {(purpose, version): master for purpose, version, master in rows}


def plant(
    engine: Engine, scope: str, purpose: str, version: int, provider: str, made: Mapping[str, Any]
) -> None:
    """Insert an enabled key row with plain SQL, as the attacker would."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO kms_data_keys (scope, purpose, key_version, state, provider, "
                "master_key_id, wrapped_key, created_at) VALUES (:scope, :purpose, :version, "
                "'enabled', :provider, :master_key_id, :wrapped, :created_at)"
            ),
            {
                "scope": scope,
                "purpose": purpose,
                "version": version,
                "provider": provider,
                "master_key_id": made["master_key_id"],
                "wrapped": made["wrapped"],
                "created_at": dt.datetime.now(dt.timezone.utc),
            },
        )


def plant_aws_keys(engine: Engine, endpoint: str, attacker_key: str, version: int = 2) -> None:
    """The attack with AWS KMS: version ``version`` of the data key and the search key,
    made under the attacker's own KMS key with the right encryption context."""
    client = kms_client(endpoint)
    for purpose in ("data", "search"):
        made = client.generate_data_key(
            KeyId=attacker_key,
            KeySpec="AES_256",
            EncryptionContext=encryption_context(TABLE, purpose, version),
        )
        wrapped = {"master_key_id": made["KeyId"], "wrapped": made["CiphertextBlob"]}
        plant(engine, TABLE, purpose, version, "aws-kms", wrapped)


@pytest.fixture
def attacker_cmk(kms_endpoint: str) -> dict[str, str]:
    """A KMS key of the attacker's own, in the same KMS."""
    metadata = kms_client(kms_endpoint).create_key(Description="not the application's")
    return {"key_id": metadata["KeyMetadata"]["KeyId"], "arn": metadata["KeyMetadata"]["Arn"]}


@pytest.fixture
def app(engine: Engine, kms: AwsKms) -> Iterator[tuple[KeyVault, Table]]:
    """The application: its vault under the test master key, two rows written."""
    vault = KeyVault(engine, kms)
    vault.create_table()
    table = patients(MetaData())
    table.create(engine)
    write(engine, table, ROWS)
    yield vault, table
    vault.close()


def fresh_vault(db_url: str, provider: KeyProvider) -> KeyVault:
    """A vault in a new engine, as another process of the application would open it."""
    return KeyVault(create_engine(db_url), provider)


def close(vault: KeyVault) -> None:
    vault.close()
    vault.engine.dispose()


def deny_describe_key(client: Any) -> None:
    """The client's role has no kms:DescribeKey (the application's documented policy)."""

    def deny(**kwargs: Any) -> tuple[AWSResponse, dict[str, Any]]:
        error = {
            "Error": {"Code": "AccessDeniedException", "Message": "not allowed"},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        }
        return AWSResponse("https://kms.invalid/", 400, {}, None), error  # type: ignore[arg-type]

    client.meta.events.register_first("before-call.kms.DescribeKey", deny)


# -- the attack, end to end --------------------------------------------------------------


def test_a_planted_key_is_never_used_and_own_rows_stay_readable(
    app: tuple[KeyVault, Table], engine: Engine, kms: AwsKms, kms_endpoint: str,
    attacker_cmk: dict[str, str],
) -> None:
    vault, table = app
    plant_aws_keys(engine, kms_endpoint, attacker_cmk["key_id"])
    vault.clear_cache()  # the application looks at the key table again (its next refresh)
    decrypts = kms.counter.calls["Decrypt"]  # type: ignore[attr-defined]

    with pytest.raises(ForeignMasterKeyError) as info:
        write(engine, table, [(3, "Park", "park@x.io")])
    error = info.value
    assert (error.table, error.key_version) == (TABLE, 2)
    assert error.master_key_id == attacker_cmk["arn"]
    assert attacker_cmk["arn"] in str(error)
    # refused from the key table's row alone: this vault knows its key ARN
    assert kms.counter.calls["Decrypt"] == decrypts  # type: ignore[attr-defined]
    assert stored_ids(engine, table) == [1, 2]

    # its own rows stay readable; equality would match the planted search key: refused
    assert read(engine, table) == ROWS
    with pytest.raises(ForeignMasterKeyError):
        find(engine, table, "kim@x.io")


def test_a_fresh_process_refuses_the_planted_key(
    app: tuple[KeyVault, Table], engine: Engine, db_url: str, kms_endpoint: str,
    cmk: dict[str, str], attacker_cmk: dict[str, str],
) -> None:
    """A process that has not learned its key ARN yet: KMS refuses to decrypt the planted
    key under the configured alias, and DescribeKey names the refusal."""
    _vault, table = app
    plant_aws_keys(engine, kms_endpoint, attacker_cmk["key_id"])
    fresh = fresh_vault(db_url, AwsKms(cmk["alias"], client=kms_client(kms_endpoint)))
    try:
        with pytest.raises(ForeignMasterKeyError) as info:
            write(fresh.engine, table, [(3, "Park", "park@x.io")])
        assert info.value.master_key_id == attacker_cmk["arn"]
        assert not fresh.provider.owns(attacker_cmk["arn"], resolve=True)
        assert read(fresh.engine, table) == ROWS
        assert stored_ids(fresh.engine, table) == [1, 2]
    finally:
        close(fresh)


def test_a_reader_without_describe_key_refuses_the_planted_key(
    app: tuple[KeyVault, Table], engine: Engine, db_url: str, kms_endpoint: str,
    cmk: dict[str, str], attacker_cmk: dict[str, str],
) -> None:
    """No kms:DescribeKey: the key ARN is learned from the first Decrypt under the alias.
    Before that, KMS's own refusal stands; after, the planted row is refused by name."""
    _vault, table = app
    plant_aws_keys(engine, kms_endpoint, attacker_cmk["key_id"])

    client = kms_client(kms_endpoint)
    deny_describe_key(client)
    first = fresh_vault(db_url, AwsKms(cmk["alias"], client=client))
    try:  # the planted key is the first one it meets: KMS refuses it (AWS: IncorrectKey)
        with pytest.raises(KMSError) as refused:
            write(first.engine, table, [(3, "Park", "park@x.io")])
        assert refused.value.master_key_id == attacker_cmk["arn"]
        assert not first.provider.owns(attacker_cmk["arn"])
        assert stored_ids(first.engine, table) == [1, 2]
    finally:
        close(first)

    client = kms_client(kms_endpoint)
    deny_describe_key(client)
    second = fresh_vault(db_url, AwsKms(cmk["alias"], client=client))
    try:  # its own version 1 first: that Decrypt names its key ARN
        assert read(second.engine, table) == ROWS
        assert second.provider.owns(cmk["arn"])
        with pytest.raises(ForeignMasterKeyError) as info:
            write(second.engine, table, [(3, "Park", "park@x.io")])
        assert info.value.master_key_id == attacker_cmk["arn"]
        assert stored_ids(second.engine, table) == [1, 2]
    finally:
        close(second)


def test_values_written_under_the_planted_key_are_refused(
    app: tuple[KeyVault, Table], engine: Engine, db_url: str, kms: AwsKms,
    kms_endpoint: str, attacker_cmk: dict[str, str],
) -> None:
    """Older versions are checked too: rows the attacker wrote under version 2 (with a
    process of their own) do not decrypt in the application, which reads its own."""
    vault, table = app
    plant_aws_keys(engine, kms_endpoint, attacker_cmk["key_id"])
    theirs = fresh_vault(db_url, AwsKms(attacker_cmk["arn"], client=kms_client(kms_endpoint)))
    try:
        write(theirs.engine, table, [(9, "planted", "planted@x.io")])
    finally:
        close(theirs)
    vault.clear_cache()
    assert read(engine, table, [1, 2]) == ROWS
    with pytest.raises(ForeignMasterKeyError) as info:
        read(engine, table, [9])
    assert (info.value.table, info.value.key_version) == (TABLE, 2)


def test_a_decrypt_answer_naming_another_key_is_refused(
    app: tuple[KeyVault, Table], engine: Engine, kms: AwsKms, attacker_cmk: dict[str, str]
) -> None:
    """The KeyId Decrypt answers with is the key that decrypted: it must be the row's."""
    vault, table = app

    def another_key(parsed: dict[str, Any], **kwargs: Any) -> None:
        if "KeyId" in parsed:
            parsed["KeyId"] = attacker_cmk["arn"]

    kms.client.meta.events.register("after-call.kms.Decrypt", another_key)
    vault.clear_cache()
    with pytest.raises(ForeignMasterKeyError) as info:
        read(engine, table)
    assert info.value.master_key_id == attacker_cmk["arn"]
    assert "as the key table records" in str(info.value)
    kms.client.meta.events.unregister("after-call.kms.Decrypt", another_key)
    assert read(engine, table) == ROWS


# -- master keys named explicitly: a rewrap ------------------------------------------------


def test_a_rewrap_reads_old_keys_only_where_the_old_key_is_named(
    engine: Engine, db_url: str, kms: AwsKms, kms_endpoint: str, cmk: dict[str, str]
) -> None:
    metadata = MetaData()
    moved, stayed = patients(metadata), patients(metadata, OTHER)
    vault = KeyVault(engine, kms)
    vault.create_table()
    metadata.create_all(engine)
    write(engine, moved, ROWS)
    write(engine, stayed, ROWS)
    new = kms_client(kms_endpoint).create_key(Description="the new master key")["KeyMetadata"]

    # a partial rewrap: the vault names the old key itself (MultiKms(new, old))
    assert vault.rewrap(AwsKms(new["KeyId"], client=kms_client(kms_endpoint)), table=moved) == 2
    assert set(key_owners(engine, TABLE).values()) == {new["Arn"]}
    assert set(key_owners(engine, OTHER).values()) == {cmk["arn"]}
    vault.clear_cache()
    assert read(engine, moved) == read(engine, stayed) == ROWS
    write(engine, stayed, [(3, "Park", "park@x.io")])
    vault.close()

    # the new key alone: the table not moved yet is refused, not read through the old key
    only_new = fresh_vault(db_url, AwsKms(new["Arn"], client=kms_client(kms_endpoint)))
    try:
        assert read(only_new.engine, moved) == ROWS
        with pytest.raises(ForeignMasterKeyError) as info:
            read(only_new.engine, stayed)
        assert info.value.master_key_id == cmk["arn"] and info.value.table == OTHER
    finally:
        close(only_new)

    # both keys named: everything reads, and the rest of the rewrap completes
    both = fresh_vault(
        db_url,
        MultiKms(
            AwsKms(new["KeyId"], client=kms_client(kms_endpoint)),
            AwsKms(cmk["alias"], client=kms_client(kms_endpoint)),
        ),
    )
    try:
        assert read(both.engine, moved) == ROWS
        assert read(both.engine, stayed) == [*ROWS, (3, "Park", "park@x.io")]
        assert both.rewrap(AwsKms(new["Arn"], client=kms_client(kms_endpoint))) == 2
    finally:
        close(both)
    only_new = fresh_vault(db_url, AwsKms(new["Arn"], client=kms_client(kms_endpoint)))
    try:
        assert read(only_new.engine, stayed) == [*ROWS, (3, "Park", "park@x.io")]
    finally:
        close(only_new)


def test_a_rewrap_never_adopts_a_planted_key(
    app: tuple[KeyVault, Table], engine: Engine, kms_endpoint: str,
    attacker_cmk: dict[str, str],
) -> None:
    """ReEncrypt would move the attacker's key under the new master key, making it look
    like the application's own: the source is checked as Decrypt checks it."""
    vault, _table = app
    plant_aws_keys(engine, kms_endpoint, attacker_cmk["key_id"])
    new = kms_client(kms_endpoint).create_key(Description="the new master key")["KeyMetadata"]
    with pytest.raises(ForeignMasterKeyError) as info:
        vault.rewrap(AwsKms(new["KeyId"], client=kms_client(kms_endpoint)))
    assert info.value.master_key_id == attacker_cmk["arn"]
    owners = key_owners(engine, TABLE)
    assert owners[("data", 2)] == owners[("search", 2)] == attacker_cmk["arn"]


# -- a local master key --------------------------------------------------------------------


def test_local_kms_refuses_key_rows_of_another_local_master_key(engine: Engine) -> None:
    ours, theirs = LocalKms(os.urandom(32)), LocalKms(os.urandom(32))
    vault = KeyVault(engine, ours)
    vault.create_table()
    table = patients(MetaData())
    table.create(engine)
    write(engine, table, ROWS)
    try:
        for purpose in ("data", "search"):
            made = theirs.generate_data_key(encryption_context(TABLE, purpose, 2))
            row = {"master_key_id": made.master_key_id, "wrapped": made.wrapped}
            plant(engine, TABLE, purpose, 2, "local", row)
        vault.clear_cache()
        with pytest.raises(ForeignMasterKeyError) as info:
            write(engine, table, [(3, "Park", "park@x.io")])
        assert info.value.master_key_id == theirs.master_key_id
        assert stored_ids(engine, table) == [1, 2]
        assert read(engine, table) == ROWS

        # a row that names our master key but holds a key wrapped under theirs
        made = theirs.generate_data_key(encryption_context(TABLE, "data", 3))
        plant(
            engine, TABLE, "data", 3, "local",
            {"master_key_id": ours.master_key_id, "wrapped": made.wrapped},
        )
        vault.clear_cache()
        with pytest.raises(ForeignMasterKeyError) as info:
            write(engine, table, [(3, "Park", "park@x.io")])
        assert info.value.master_key_id == theirs.master_key_id
        assert info.value.key_version == 3
    finally:
        vault.close()


# -- making keys ---------------------------------------------------------------------------


class MisnamingKms(LocalKms):
    """Reports another master key id for the keys it makes than the one it owns."""

    def _generate_data_key(self, context: Mapping[str, str]) -> GeneratedDataKey:
        made = super()._generate_data_key(context)
        return GeneratedDataKey(made.plaintext, made.wrapped, "local:" + "0" * 16)


def test_a_key_the_vault_could_not_read_back_is_never_inserted(engine: Engine) -> None:
    vault = KeyVault(engine, MisnamingKms(os.urandom(32)))
    vault.create_table()
    table = patients(MetaData())
    try:
        with pytest.raises(ConfigurationError, match="could not read it back"):
            table.create(engine)  # makes the table's keys ahead
        assert key_owners(engine, TABLE) == {}
    finally:
        vault.close()
