"""sqlalchemy_kms.alembic: the migration operations, render_item, and migrations_example/.

The example is copied to the test's tmp_path for every run (its key files and
SQLite database land there) and driven through Alembic's Python API against
each database of the matrix.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata, render_python_code
from alembic.autogenerate.api import AutogenContext
from alembic.autogenerate.render import _repr_type
from alembic.config import Config
from alembic.operations import Operations, ops
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine

import sqlalchemy_kms.alembic as kms_alembic
from sqlalchemy_kms import AwsKms, KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms._format import ALG_DETERMINISTIC, ALG_RANDOMIZED, parse_header
from sqlalchemy_kms.alembic import (
    DecryptColumnOp,
    EncryptColumnOp,
    ReencryptTableOp,
    RewrapKmsKeysOp,
    RotateKmsKeyOp,
    provider_from_uri,
    render_item,
)
from sqlalchemy_kms.errors import (
    ConfigurationError,
    KeyLifecycleError,
    KMSInvalidCiphertextError,
)
from sqlalchemy_kms.lifecycle import plaintext_to_binary_ddl

from .helpers import key_rows, kms_client

EXAMPLE = Path(__file__).resolve().parent.parent / "migrations_example"
EXAMPLE_ENV = (
    "SQLALCHEMY_KMS_EXAMPLE_DB",
    "SQLALCHEMY_KMS_EXAMPLE_KMS",
    "SQLALCHEMY_KMS_EXAMPLE_REWRAP_KMS",
)


# -- running the example ------------------------------------------------------------------


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private copy of migrations_example/, with the process state it touches restored."""
    folder = tmp_path / "migrations_example"
    shutil.copytree(
        EXAMPLE, folder, ignore=shutil.ignore_patterns("__pycache__", "*.key", "*.sqlite3")
    )
    for name in EXAMPLE_ENV:
        monkeypatch.delenv(name, raising=False)
    # alembic.ini's prepend_sys_path puts the copy on sys.path; env.py imports example_models
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("example_models", None)
    yield folder
    sys.modules.pop("example_models", None)


def alembic_config(folder: Path, url: str) -> Config:
    config = Config(str(folder / "alembic.ini"))
    config.set_main_option("script_location", str(folder))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False  # leave the test run's logging alone
    return config


def drop_alembic_version(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))


@pytest.fixture
def clean_versions(engine: Engine) -> Iterator[None]:
    drop_alembic_version(engine)
    yield
    drop_alembic_version(engine)


def legacy_patients(config: Config) -> list[dict[str, Any]]:
    """The rows revision 0003 imports, as the application reads them back."""
    module = ScriptDirectory.from_config(config).get_revision("0003").module
    rows = [dict(row) for row in module.LEGACY_PATIENTS]
    for row in rows:
        row["email"] = row["email"].lower()  # the column's normalize=str.lower
    return rows


def patients_table(*, phone_encrypted: bool = True) -> Table:
    """The patients table as the application declares it."""
    return Table(
        "patients",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("name", KMSEncrypted(String(200))),
        Column("email", KMSEncrypted(String(320), deterministic=True, normalize=str.lower)),
        Column("notes", KMSEncrypted(Text())),
        Column("phone", KMSEncrypted(String(30)) if phone_encrypted else String(30)),
    )


def read_patients(engine: Engine, provider: LocalKms | AwsKms) -> list[dict[str, Any]]:
    vault = KeyVault(engine, provider)
    try:
        patients = patients_table()
        with engine.connect() as conn:
            rows = conn.execute(select(patients).order_by(patients.c.id)).mappings().all()
            # equality on the deterministic column, normalized like the stored values
            found = conn.execute(
                select(patients.c.id).where(patients.c.email == "JANE.DOE@example.ORG")
            ).scalar_one()
        assert found == 2
        return [dict(row) for row in rows]
    finally:
        vault.close()


def raw_column(engine: Engine, column: str) -> dict[int, Any]:
    with engine.connect() as conn:
        result = conn.execute(text(f"SELECT id, {column} FROM patients"))
        return {
            row[0]: bytes(row[1]) if isinstance(row[1], memoryview) else row[1] for row in result
        }


def column_type(engine: Engine, table: str, column: str) -> Any:
    with engine.connect() as conn:
        return column_type_of(conn, table, column)


def column_type_of(conn: Any, table: str, column: str) -> Any:
    columns = {c["name"]: c["type"] for c in inspect(conn).get_columns(table)}
    return columns[column]


def stored_versions(engine: Engine, column: str) -> dict[int, tuple[int, int] | None]:
    """Per row: (algorithm, key version) of the stored value, None for NULL."""
    return {
        id_: None if value is None else parse_header(value)
        for id_, value in raw_column(engine, column).items()
    }


def test_example_upgrade_and_downgrade(
    engine: Engine, db_url: str, example: Path, clean_versions: None
) -> None:
    config = alembic_config(example, db_url)
    expected = legacy_patients(config)
    first_key = example / "example-master.key"
    second_key = example / "example-master-2.key"

    # 0004: the legacy phone column is encrypted in place
    command.upgrade(config, "0004")
    assert first_key.exists() and not second_key.exists()
    phones = raw_column(engine, "phone")
    for row in expected:
        stored = phones[row["id"]]
        if row["phone"] is None:
            assert stored is None
            continue
        assert isinstance(stored, bytes)
        assert parse_header(stored) == (ALG_RANDOMIZED, 1)
        assert row["phone"].encode() not in stored or row["phone"] == ""
    assert column_type(engine, "patients", "phone").python_type is bytes
    assert read_patients(engine, LocalKms(key_file=first_key)) == expected

    # one step down: the phone numbers are plaintext again, in a text column
    command.downgrade(config, "-1")
    assert raw_column(engine, "phone") == {row["id"]: row["phone"] for row in expected}
    assert isinstance(column_type(engine, "patients", "phone"), String)
    plain = patients_table(phone_encrypted=False)  # read as a String(30) column, no vault
    with engine.connect() as conn:
        phones_read = dict(conn.execute(select(plain.c.id, plain.c.phone)).all())
    assert phones_read == {row["id"]: row["phone"] for row in expected}

    # 0005: encrypted again, then the data key rotated and every row re-encrypted
    command.upgrade(config, "0005")
    for column in ("name", "notes", "phone"):
        versions = stored_versions(engine, column)
        assert {v for v in versions.values() if v is not None} == {(ALG_RANDOMIZED, 2)}, column
    # the deterministic column stays under its search key, which was not rotated
    assert set(stored_versions(engine, "email").values()) == {(ALG_DETERMINISTIC, 1)}
    vault = KeyVault(engine, LocalKms(key_file=first_key))
    try:
        status = {c.column: c for c in vault.status([patients_table()])[0].columns}
    finally:
        vault.close()
    assert status["name"].rows_by_version == {2: len(expected)}
    assert status["phone"].rows_by_version == {2: 3} and status["phone"].null_rows == 1

    # head: every data key rewrapped under the second master key
    command.upgrade(config, "head")
    assert second_key.exists()
    new_master = LocalKms(key_file=second_key)
    vault = KeyVault(engine, new_master)
    try:
        keys = key_rows(vault)
    finally:
        vault.close()
    assert sorted((k.purpose, k.key_version) for k in keys) == [
        ("data", 1),
        ("data", 2),
        ("search", 1),
    ]
    assert {k.master_key_id for k in keys} == {new_master.master_key_id}
    assert read_patients(engine, new_master) == expected
    # the legacy column holds ciphertext, under key version 2
    for row in expected:
        stored = raw_column(engine, "phone")[row["id"]]
        if row["phone"] is not None:
            assert isinstance(stored, bytes) and parse_header(stored) == (ALG_RANDOMIZED, 2)
            assert row["phone"] == "" or row["phone"].encode() not in stored
    # the first master key alone can no longer unwrap anything
    with pytest.raises(KMSInvalidCiphertextError, match="another local master key"):
        read_patients(engine, LocalKms(key_file=first_key))

    # base: everything the migrations made is gone (rewrap and rotation stay done
    # on the way down, and the phone numbers are decrypted under the rewrapped keys)
    command.downgrade(config, "base")
    tables = set(inspect(engine).get_table_names())
    assert "patients" not in tables and "kms_data_keys" not in tables
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 0


def test_example_autogenerate_finds_the_schema_as_the_models_declare_it(
    engine: Engine, db_url: str, example: Path, clean_versions: None
) -> None:
    """At head, ``alembic check`` sees no difference between the models and the database:
    KMSEncrypted columns compare equal to their binary columns on every database,
    and the key table is part of the models."""
    config = alembic_config(example, db_url)
    command.upgrade(config, "head")
    command.check(config)  # raises AutogenerateDiffsDetected on any difference
    command.downgrade(config, "base")


def test_example_models_hold_the_key_table(
    engine: Engine, db_url: str, example: Path, clean_versions: None
) -> None:
    """Autogenerate against the example's models: on an empty database the key table
    comes first; after revision 0001 (op.create_kms_key_table) it is left alone."""
    config = alembic_config(example, db_url)
    sys.path.insert(0, str(example))
    from example_models import Base

    def changes() -> list[tuple[str, str]]:
        with engine.connect() as conn:
            found = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        return [(d[0], d[1].name) for d in found if d[0] in ("add_table", "remove_table")]

    assert changes() == [("add_table", "kms_data_keys"), ("add_table", "patients")]
    command.upgrade(config, "0001")
    assert changes() == [("add_table", "patients")]
    command.downgrade(config, "base")


def test_example_with_aws_kms(
    tmp_path: Path,
    example: Path,
    kms_endpoint: str,
    cmk: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aws-kms:// URIs: data keys from one CMK, rewrapped under another, and the downgrade
    decrypts under the second CMK while env.py is configured with the first one."""
    client = kms_client(kms_endpoint)
    second = client.create_key(Description="sqlalchemy-kms alembic example")["KeyMetadata"]
    alias = f"alias/sqlalchemy-kms-example-{uuid.uuid4().hex[:8]}"
    client.create_alias(AliasName=alias, TargetKeyId=second["KeyId"])
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms_endpoint)
    monkeypatch.setenv("SQLALCHEMY_KMS_EXAMPLE_KMS", f"aws-kms://{cmk['alias']}")
    monkeypatch.setenv("SQLALCHEMY_KMS_EXAMPLE_REWRAP_KMS", f"aws-kms://{alias}")
    url = f"sqlite:///{tmp_path / 'aws.sqlite3'}"
    config = alembic_config(example, url)
    expected = legacy_patients(config)

    command.upgrade(config, "head")
    assert not (example / "example-master.key").exists()
    engine = create_engine(url)
    try:
        vault = KeyVault(engine, AwsKms(alias, client=kms_client(kms_endpoint)))
        try:
            assert {k.master_key_id for k in key_rows(vault)} == {second["Arn"]}
        finally:
            vault.close()
        assert read_patients(engine, AwsKms(alias, client=kms_client(kms_endpoint))) == expected
        command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()


# -- the operations, one by one -----------------------------------------------------------


PEOPLE = "alembic_ops_people"


@pytest.fixture
def migration(engine: Engine) -> Iterator[tuple[Any, Any, KeyVault]]:
    """``op`` on a connection of ``engine`` inside a transaction, with a local-key vault."""
    vault = KeyVault(engine, LocalKms(os.urandom(32)))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn)
            with vault.using(conn), conn.begin():
                yield Operations(context), conn, vault
    finally:
        vault.close()


def people(metadata: MetaData | None = None) -> Table:
    return Table(
        PEOPLE,
        metadata or MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", KMSEncrypted(String(100))),
        Column("email", KMSEncrypted(String(100), deterministic=True)),
    )


def people_columns() -> dict[str, KMSEncrypted]:
    return {
        "name": KMSEncrypted(String(100)),
        "email": KMSEncrypted(String(100), deterministic=True),
    }


def test_rotate_without_reencrypt_then_reencrypt_table_and_search_key(
    migration: tuple[Any, Any, KeyVault],
) -> None:
    op, conn, _ = migration
    op.create_kms_key_table()
    table = people()
    op.create_table(PEOPLE, *(c._copy() for c in table.columns))
    op.bulk_insert(table, [{"id": i, "name": f"n{i}", "email": f"e{i}@x.io"} for i in range(5)])

    op.rotate_kms_key(PEOPLE, reencrypt=False)
    headers = {parse_header(bytes(v)) for (v,) in conn.execute(text(f"SELECT name FROM {PEOPLE}"))}
    assert headers == {(ALG_RANDOMIZED, 1)}

    op.reencrypt_table(PEOPLE, people_columns(), batch_size=2)
    headers = {parse_header(bytes(v)) for (v,) in conn.execute(text(f"SELECT name FROM {PEOPLE}"))}
    assert headers == {(ALG_RANDOMIZED, 2)}

    op.rotate_kms_key(PEOPLE, search=True, columns=people_columns())
    emails = {parse_header(bytes(v)) for (v,) in conn.execute(text(f"SELECT email FROM {PEOPLE}"))}
    assert emails == {(ALG_DETERMINISTIC, 2)}
    reader = people()
    assert conn.execute(select(reader.c.id).where(reader.c.email == "e3@x.io")).scalar_one() == 3
    assert sorted(conn.execute(select(reader.c.name)).scalars()) == [f"n{i}" for i in range(5)]


def test_rewrap_one_table_by_uri(migration: tuple[Any, Any, KeyVault], tmp_path: Path) -> None:
    op, _, vault = migration
    op.create_kms_key_table()
    vault.create_key(PEOPLE)
    vault.create_key("other")
    key_file = tmp_path / "second.key"
    second = LocalKms.generate_key_file(key_file)
    original = vault.provider.master_key_id

    op.rewrap_kms_keys(f"local://{key_file}", table_name=PEOPLE)
    masters = {row.scope: row.master_key_id for row in key_rows(vault)}
    assert masters == {PEOPLE: second.master_key_id, "other": original}


def test_encrypt_and_decrypt_column_run_twice_and_on_binary_plaintext(
    migration: tuple[Any, Any, KeyVault],
) -> None:
    """Running encrypt_column again (an interrupted job resumed) changes nothing, and a
    plaintext column that already is binary (inner LargeBinary) keeps its bytes."""
    op, conn, _ = migration
    op.create_kms_key_table()
    plain = Table(
        PEOPLE,
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("phone", String(30)),
        Column("photo", LargeBinary(20)),
    )
    op.create_table(PEOPLE, *(c._copy() for c in plain.columns))
    rows = [
        {"id": 1, "phone": "+82 10-1234-5678", "photo": b"\x00\xffpng"},
        {"id": 2, "phone": None, "photo": None},
        {"id": 3, "phone": "", "photo": b""},
    ]
    op.bulk_insert(plain, rows)
    phone, photo = KMSEncrypted(String(30)), KMSEncrypted(LargeBinary(20))

    op.encrypt_column(PEOPLE, "phone", phone)
    op.encrypt_column(PEOPLE, "photo", photo)
    first = conn.execute(text(f"SELECT id, phone, photo FROM {PEOPLE} ORDER BY id")).all()
    op.encrypt_column(PEOPLE, "phone", phone)
    op.encrypt_column(PEOPLE, "photo", photo)
    again = conn.execute(text(f"SELECT id, phone, photo FROM {PEOPLE} ORDER BY id")).all()
    assert [tuple(r) for r in again] == [tuple(r) for r in first]
    encrypted = Table(
        PEOPLE,
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("phone", KMSEncrypted(String(30))),
        Column("photo", KMSEncrypted(LargeBinary(20))),
    )
    assert [
        dict(r) for r in conn.execute(select(encrypted).order_by(encrypted.c.id)).mappings()
    ] == rows

    for _ in range(2):
        op.decrypt_column(PEOPLE, "phone", phone)
        op.decrypt_column(PEOPLE, "photo", photo)
    back = [dict(r) for r in conn.execute(select(plain).order_by(plain.c.id)).mappings()]
    assert [
        {k: bytes(v) if isinstance(v, memoryview) else v for k, v in r.items()} for r in back
    ] == rows
    assert isinstance(column_type_of(conn, PEOPLE, "phone"), String)


def test_row_operations_check_the_table_first(
    migration: tuple[Any, Any, KeyVault],
) -> None:
    op = migration[0]
    op.create_kms_key_table()
    op.create_table("alembic_ops_nopk", Column("phone", String(30)))
    with pytest.raises(KeyLifecycleError, match="primary key"):
        op.encrypt_column("alembic_ops_nopk", "phone", KMSEncrypted(String(30)))
    op.create_table(PEOPLE, Column("id", Integer, primary_key=True), Column("phone", String(30)))
    with pytest.raises(ConfigurationError, match="has no column nope"):
        op.reencrypt_table(PEOPLE, {"nope": KMSEncrypted(String(30))})
    with pytest.raises(KeyLifecycleError, match="primary key columns cannot be encrypted"):
        op.encrypt_column(PEOPLE, "id", KMSEncrypted(Integer()))
    with pytest.raises(ConfigurationError, match="alembic_ops_missing does not exist"):
        op.encrypt_column("alembic_ops_missing", "phone", KMSEncrypted(String(30)))


def test_operations_need_a_vault(engine: Engine) -> None:
    with engine.connect() as conn:
        op: Any = Operations(MigrationContext.configure(conn))
        with pytest.raises(ConfigurationError, match=r"found no KeyVault.*env\.py"):
            op.encrypt_column("patients", "phone", KMSEncrypted(String(30)))
        with pytest.raises(ConfigurationError, match="found no KeyVault"):
            op.reencrypt_table("patients", {"phone": KMSEncrypted(String(30))})
        with pytest.raises(ConfigurationError, match="found no KeyVault"):
            op.rewrap_kms_keys(LocalKms(os.urandom(32)))


def test_rotation_needs_the_encrypted_columns() -> None:
    with pytest.raises(ConfigurationError, match="columns="):
        RotateKmsKeyOp("patients")
    RotateKmsKeyOp("patients", reencrypt=False)  # only the rotation: fine
    with pytest.raises(TypeError, match="KMSEncrypted"):
        RotateKmsKeyOp("patients", columns={"name": String(200)})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="KMSEncrypted"):
        EncryptColumnOp("patients", "phone", String(30))  # type: ignore[arg-type]


def test_key_table_name_must_match_the_vault(engine: Engine) -> None:
    vault = KeyVault(engine, LocalKms(os.urandom(32)), table_name="alembic_ops_keys")
    try:
        with engine.connect() as conn:
            op: Any = Operations(MigrationContext.configure(conn))
            with pytest.raises(ConfigurationError, match="alembic_ops_keys"):
                op.create_kms_key_table()
            op.create_kms_key_table("alembic_ops_keys")
            conn.commit()
        assert inspect(engine).has_table("alembic_ops_keys")
    finally:
        vault.close()


def test_offline_mode_renders_the_key_table_and_refuses_row_work() -> None:
    buffer = io.StringIO()
    context = MigrationContext.configure(
        dialect_name="postgresql", opts={"as_sql": True, "output_buffer": buffer}
    )
    op: Any = Operations(context)
    op.create_kms_key_table()
    op.drop_kms_key_table()
    sql = buffer.getvalue()
    assert "CREATE TABLE kms_data_keys" in sql and "wrapped_key BYTEA NOT NULL" in sql
    assert "DROP TABLE kms_data_keys" in sql
    with pytest.raises(ConfigurationError, match="offline"):
        op.encrypt_column("patients", "phone", KMSEncrypted(String(30)))


def test_reverse_operations() -> None:
    kms_type = KMSEncrypted(String(30))
    encrypt = EncryptColumnOp("patients", "phone", kms_type, schema="clinic", batch_size=10)
    decrypt = encrypt.reverse()
    assert isinstance(decrypt, DecryptColumnOp)
    assert (decrypt.table_name, decrypt.column_name, decrypt.schema, decrypt.batch_size) == (
        "patients",
        "phone",
        "clinic",
        10,
    )
    assert isinstance(decrypt.reverse(), EncryptColumnOp)
    create = kms_alembic.CreateKmsKeyTableOp("keys", schema="vault")
    drop = create.reverse()
    assert isinstance(drop, kms_alembic.DropKmsKeyTableOp)
    assert (drop.table_name, drop.schema) == ("keys", "vault")
    assert isinstance(drop.reverse(), kms_alembic.CreateKmsKeyTableOp)
    for irreversible in (
        RotateKmsKeyOp("patients", reencrypt=False),
        ReencryptTableOp("patients", {"phone": KMSEncrypted(String(30))}),
        RewrapKmsKeysOp("aws-kms://alias/next"),
    ):
        with pytest.raises(NotImplementedError):
            irreversible.reverse()


def test_provider_from_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "master.key"
    local = LocalKms.generate_key_file(key_file)
    provider = provider_from_uri(f"local://{key_file}")
    assert isinstance(provider, LocalKms) and provider.master_key_id == local.master_key_id
    aws = provider_from_uri("aws-kms://arn:aws:kms:ap-northeast-2:111122223333:key/abcd")
    assert isinstance(aws, AwsKms) and aws.client.meta.region_name == "ap-northeast-2"
    with pytest.raises(ConfigurationError, match="cannot read"):
        provider_from_uri(f"local://{tmp_path / 'missing.key'}")
    with pytest.raises(ConfigurationError, match="needs a key"):
        provider_from_uri("aws-kms://")
    with pytest.raises(ConfigurationError, match="unknown KMS URI scheme 'vault'"):
        provider_from_uri("vault://secret/key")
    # no region anywhere: a ConfigurationError, not botocore's NoRegionError
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    with pytest.raises(ConfigurationError, match="region"):
        provider_from_uri("aws-kms://alias/myapp")


# -- autogenerate rendering ------------------------------------------------------------------


def fold_case(value: str) -> str:
    return value.casefold()


def autogen_context(dialect: str = "postgresql") -> AutogenContext:
    context = MigrationContext.configure(
        dialect_name=dialect,
        opts={
            "render_item": render_item,
            "sqlalchemy_module_prefix": "sa.",
            "alembic_module_prefix": "op.",
            "user_module_prefix": None,
        },
    )
    return AutogenContext(context)


def test_render_item_renders_encrypted_types_and_their_import() -> None:
    context = autogen_context()
    rendered = _repr_type(KMSEncrypted(String(200), deterministic=True), context)
    assert rendered == "KMSEncrypted(sa.String(length=200), deterministic=True)"
    assert "from sqlalchemy_kms import KMSEncrypted" in context.imports
    assert _repr_type(KMSEncrypted(Text()), context) == "KMSEncrypted(sa.Text())"
    assert (
        _repr_type(KMSEncrypted(String(320), deterministic=True, normalize=str.lower), context)
        == "KMSEncrypted(sa.String(length=320), deterministic=True, normalize=str.lower)"
    )
    assert (
        _repr_type(KMSEncrypted(String(20), normalize=fold_case), context)
        == f"KMSEncrypted(sa.String(length=20), normalize={__name__}.fold_case)"
    )
    assert f"import {__name__}" in context.imports
    # not other types, nor other kinds of items
    assert render_item("type", String(10), context) is False
    assert render_item("column", Column("x", KMSEncrypted(String(10))), context) is False
    assert _repr_type(String(10), context) == "sa.String(length=10)"


def test_render_item_leaves_out_a_normalize_it_cannot_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    context = autogen_context()
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_kms.alembic"):
        rendered = _repr_type(KMSEncrypted(String(20), normalize=lambda v: v.strip()), context)
    assert rendered == "KMSEncrypted(sa.String(length=20))"
    assert "cannot render normalize" in caplog.text


def test_autogenerated_script_renders_encrypted_columns_and_operations() -> None:
    table = Table(
        "patients",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("email", KMSEncrypted(String(320), deterministic=True)),
    )
    upgrade = ops.UpgradeOps(
        ops=[
            ops.CreateTableOp.from_table(table),
            ops.AddColumnOp("patients", Column("notes", KMSEncrypted(Text()))),
            EncryptColumnOp("patients", "phone", KMSEncrypted(String(30))),
            RotateKmsKeyOp("patients", columns={"phone": KMSEncrypted(String(30))}),
            ReencryptTableOp("patients", {"phone": KMSEncrypted(String(30))}, batch_size=50),
            RewrapKmsKeysOp("aws-kms://alias/next", table_name="patients"),
            kms_alembic.CreateKmsKeyTableOp(),
        ]
    )
    context = MigrationContext.configure(dialect_name="sqlite")
    code = render_python_code(upgrade, render_item=render_item, migration_context=context)
    assert (
        "sa.Column('email', KMSEncrypted(sa.String(length=320), deterministic=True), "
        "nullable=True)" in code
    )
    assert "op.add_column('patients', sa.Column('notes', KMSEncrypted(sa.Text())" in code
    assert "op.encrypt_column('patients', 'phone', KMSEncrypted(sa.String(length=30)))" in code
    assert (
        "op.rotate_kms_key('patients', columns={'phone': KMSEncrypted(sa.String(length=30))})"
        in code
    )
    assert (
        "op.reencrypt_table('patients', {'phone': KMSEncrypted(sa.String(length=30))}, "
        "batch_size=50)" in code
    )
    assert "op.rewrap_kms_keys('aws-kms://alias/next', table_name='patients')" in code
    assert "op.create_kms_key_table('kms_data_keys')" in code
    # the reverse of the upgrade renders too
    downgrade = render_python_code(
        ops.UpgradeOps(
            ops=[EncryptColumnOp("patients", "phone", KMSEncrypted(String(30)))]
        ).reverse(),
        render_item=render_item,
        migration_context=context,
    )
    assert "op.decrypt_column('patients', 'phone', KMSEncrypted(sa.String(length=30)))" in downgrade


# -- table markers, shared connections and binary plaintext -----------------------------------


def test_autogenerate_does_not_render_the_internal_table_marker() -> None:
    metadata = MetaData()
    people(metadata)
    code = render_python_code(
        ops.UpgradeOps(ops=[ops.CreateTableOp.from_table(metadata.tables[PEOPLE])]),
        render_item=render_item,
    )
    assert "sqlalchemy_kms.encrypted" not in code


def test_create_table_with_rendered_info_makes_keys() -> None:
    engine = create_engine("sqlite://")
    vault = KeyVault(engine, LocalKms(os.urandom(32)))
    try:
        vault.create_table()
        metadata = MetaData()
        Table(
            "rendered",
            metadata,
            Column("id", Integer, primary_key=True),
            Column("name", KMSEncrypted(String(10))),
            info={"sqlalchemy_kms.encrypted": True},
        )
        metadata.create_all(engine)
        assert [(row.scope, row.purpose) for row in key_rows(vault)] == [("rendered", "data")]
    finally:
        vault.close()
        engine.dispose()


def test_using_a_connection_of_an_options_engine(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'options.sqlite3'}")
    vault = KeyVault(engine, LocalKms(os.urandom(32)))
    try:
        vault.create_table()
        with engine.execution_options(logging_token="x").connect() as conn, vault.using(conn):
            transaction = conn.begin()
            vault.create_key("rolled_back")  # made in conn's transaction...
            transaction.rollback()  # ...so gone with it
        assert vault.key_versions("rolled_back") == []
    finally:
        vault.close()
        engine.dispose()


def test_plaintext_to_binary_ddl_keeps_the_bytes_of_a_binary_plaintext_column(
    engine: Engine,
) -> None:
    """rotation.plaintext_to_binary_ddl + vault.encrypt_column on a LargeBinary column."""
    vault = KeyVault(engine, LocalKms(os.urandom(32)))
    try:
        vault.create_table()
        plain = Table(
            "alembic_ddl_photos",
            MetaData(),
            Column("id", Integer, primary_key=True, autoincrement=False),
            Column("photo", LargeBinary(20)),
        )
        plain.create(engine)
        with engine.begin() as conn:
            conn.execute(plain.insert(), [{"id": 1, "photo": b"\x00\xffpng"}])
        encrypted = Table(
            "alembic_ddl_photos",
            MetaData(),
            Column("id", Integer, primary_key=True, autoincrement=False),
            Column("photo", KMSEncrypted(LargeBinary(20))),
        )
        with engine.begin() as conn:
            for statement in plaintext_to_binary_ddl(encrypted, "photo", engine.dialect):
                conn.exec_driver_sql(statement)
        vault.encrypt_column(encrypted, "photo")
        with engine.connect() as conn:
            assert conn.execute(select(encrypted.c.photo)).scalar_one() == b"\x00\xffpng"
    finally:
        vault.close()
