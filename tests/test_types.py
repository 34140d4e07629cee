"""KMSEncrypted: round trips, write paths, DDL sizes and stored-value integrity."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Enum,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    Time,
    Unicode,
    Uuid,
    create_engine,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, declared_attr, mapped_column

from sqlalchemy_kms import KeyVault, KMSEncrypted
from sqlalchemy_kms.errors import (
    ConfigurationError,
    DecryptionError,
    EncryptionError,
    InvalidCiphertextError,
    SQLAlchemyKMSError,
    ValueTooLongError,
    VaultNotFoundError,
)


class Color(enum.Enum):
    RED = "r"
    GREEN = "g"


KST = dt.timezone(dt.timedelta(hours=9))

# (inner type, values that must come back equal and of the same type)
ROUND_TRIPS: list[tuple[str, Any, list[Any]]] = [
    ("string", String(50), ["Kim Minji", "김민지", "", "trailing***", " padded "]),
    ("text", Text, ["a" * 5000, "line\nbreak\x00nul"]),
    ("unicode", Unicode(20), ["😀" * 20, "é"]),
    ("integer", Integer, [0, -(2**31), 2**31 - 1, 42]),
    ("biginteger", BigInteger, [-(2**63), 2**63 - 1]),
    ("float", Float, [1.5, -0.0, 1e308, 0.1 + 0.2, float("inf")]),
    ("numeric", Numeric(10, 2), [Decimal("1.50"), Decimal("-12345678.90"), Decimal("0.00")]),
    ("boolean", Boolean, [True, False]),
    ("date", Date, [dt.date(2024, 2, 29), dt.date(1, 1, 1)]),
    ("datetime", DateTime, [dt.datetime(2024, 1, 31, 23, 59, 59, 999999)]),
    (
        "datetime_tz",
        DateTime(timezone=True),
        [
            dt.datetime(2024, 1, 31, 9, 0, tzinfo=KST),
            dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
        ],
    ),
    ("time", Time, [dt.time(23, 59, 59, 123456), dt.time(0, 0)]),
    ("uuid", Uuid, [uuid.UUID("12345678-1234-5678-1234-567812345678")]),
    ("json", JSON, [{"a": [1, 2, {"b": None}], "k": "값"}, [1, "two", 3.5], "scalar"]),
    ("binary", LargeBinary, [b"\x00\xff" * 100, b""]),
    ("enum_class", Enum(Color), [Color.RED, Color.GREEN]),
    ("enum_strings", Enum("small", "large", name="size"), ["small", "large"]),
]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and a == 0.0 == b:
        return str(a) == str(b)  # keeps the sign of zero
    return bool(a == b) and type(a) is type(b)


@pytest.mark.parametrize(("label", "inner", "values"), ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS])
def test_every_inner_type_round_trips(
    engine: Engine, vault: KeyVault, label: str, inner: Any, values: list[Any]
) -> None:
    metadata = MetaData()
    table = Table(
        f"rt_{label}",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("value", KMSEncrypted(inner)),
    )
    metadata.create_all(engine)
    rows = [{"id": i, "value": v} for i, v in enumerate([*values, None])]
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)
    with engine.connect() as conn:
        got = conn.execute(select(table.c.value).order_by(table.c.id)).scalars().all()
        raw = conn.execute(text(f"SELECT value FROM rt_{label} ORDER BY id")).scalars().all()
    for want, have in zip([*values, None], got, strict=True):
        assert _same(want, have), (want, have)
    assert raw[-1] is None  # None stays NULL
    for value, stored in zip(values, raw, strict=False):
        stored = bytes(stored)
        assert stored[0] == 1
        if isinstance(value, str) and len(value) >= 3:
            assert value.encode() not in stored


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(KMSEncrypted(String(200)))
    phone: Mapped[str | None] = mapped_column(KMSEncrypted(String(20)), nullable=True)
    notes = Column(KMSEncrypted(Text))


class AuditMixin:
    @declared_attr
    def secret(cls) -> Mapped[str]:
        return mapped_column(KMSEncrypted(String(40)))

    comment: Mapped[str] = mapped_column(KMSEncrypted(String(40)))


class Doctor(AuditMixin, Base):
    __tablename__ = "doctors"
    id: Mapped[int] = mapped_column(primary_key=True)


class Nurse(AuditMixin, Base):
    __tablename__ = "nurses"
    id: Mapped[int] = mapped_column(primary_key=True)


@pytest.fixture
def orm(engine: Engine, vault: KeyVault) -> Engine:
    Base.metadata.create_all(engine)
    return engine


def _raw(engine: Engine, sql: str) -> list[Any]:
    with engine.connect() as conn:
        return [bytes(v) if v is not None else None for v in conn.execute(text(sql)).scalars()]


def _names(engine: Engine) -> dict[int, Any]:
    with Session(engine) as session:
        return {p.id: (p.name, p.phone, p.notes) for p in session.scalars(select(Patient))}


def test_orm_unit_of_work_get_and_select(orm: Engine) -> None:
    with Session(orm) as session:
        session.add_all(
            [
                Patient(
                    id=1, name="Kim Minji", phone="010-1234-5678", notes="allergic to penicillin"
                ),
                Patient(id=2, name="", phone=None, notes=None),
            ]
        )
        session.commit()
    with Session(orm) as session:
        first = session.get(Patient, 1)
        assert first is not None
        assert (first.name, first.phone, first.notes) == (
            "Kim Minji",
            "010-1234-5678",
            "allergic to penicillin",
        )
        second = session.get(Patient, 2)
        assert second is not None and second.name == "" and second.phone is None
    raw = _raw(orm, "SELECT name FROM patients ORDER BY id")
    assert b"Kim" not in raw[0] and raw[1] is not None  # "" is stored encrypted, not NULL
    assert _raw(orm, "SELECT phone FROM patients WHERE id = 2") == [None]


def test_bulk_insert_bulk_update_core_executemany_and_merge(orm: Engine) -> None:
    with Session(orm) as session:
        session.execute(
            insert(Patient),
            [
                {"id": i, "name": f"name-{i}", "phone": f"phone-{i}", "notes": f"n{i}"}
                for i in range(1, 6)
            ],
        )
        session.execute(update(Patient), [{"id": 1, "name": "bulk-updated"}])
        session.commit()
    with orm.begin() as conn:
        conn.execute(
            Patient.__table__.insert(),
            [
                {"id": 10, "name": "core-10", "phone": None, "notes": "x"},
                {"id": 11, "name": "core-11", "phone": "p", "notes": "y"},
            ],
        )
        conn.execute(
            Patient.__table__.update().where(Patient.__table__.c.id == 11).values(notes="core-up")
        )
    with Session(orm) as session:
        session.merge(Patient(id=2, name="merged", phone="m", notes="mm"))
        session.merge(Patient(id=20, name="merged-new", phone=None, notes=None))
        session.commit()
    got = _names(orm)
    assert got[1] == ("bulk-updated", "phone-1", "n1")
    assert got[2] == ("merged", "m", "mm")
    assert got[3] == ("name-3", "phone-3", "n3")
    assert got[10] == ("core-10", None, "x")
    assert got[11] == ("core-11", "p", "core-up")
    assert got[20] == ("merged-new", None, None)
    for stored in _raw(orm, "SELECT name FROM patients"):
        assert b"name-" not in stored and b"merged" not in stored and b"core" not in stored


def test_mixin_columns_are_bound_to_their_own_tables(orm: Engine) -> None:
    with Session(orm) as session:
        session.add_all(
            [Doctor(id=1, secret="doc", comment="c1"), Nurse(id=1, secret="nurse", comment="c2")]
        )
        session.commit()
    assert Doctor.__table__.c.secret.type is not Nurse.__table__.c.secret.type
    with Session(orm) as session:
        assert session.get(Doctor, 1).secret == "doc"  # type: ignore[union-attr]
        assert session.get(Nurse, 1).secret == "nurse"  # type: ignore[union-attr]


def test_ciphertext_copied_to_another_column_or_table_fails(orm: Engine) -> None:
    with Session(orm) as session:
        session.add_all(
            [
                Patient(id=1, name="Kim", phone="010", notes="n"),
                Doctor(id=1, secret="doc", comment="c"),
            ]
        )
        session.commit()
    with orm.begin() as conn:
        stored_name = conn.execute(text("SELECT name FROM patients")).scalar_one()
        conn.execute(text("UPDATE patients SET phone = :v"), {"v": stored_name})
        stored_secret = conn.execute(text("SELECT secret FROM doctors")).scalar_one()
        conn.execute(text("UPDATE nurses SET secret = :v"), {"v": stored_secret})
        conn.execute(insert(Nurse.__table__).values(id=5, secret="x", comment="y"))
        conn.execute(text("UPDATE nurses SET secret = :v WHERE id = 5"), {"v": stored_secret})
        conn.execute(text("UPDATE doctors SET comment = :v"), {"v": stored_secret})
    with Session(orm) as session, pytest.raises(InvalidCiphertextError) as info:
        session.scalars(select(Patient.phone)).all()
    assert (info.value.table, info.value.column) == ("patients", "phone")
    with Session(orm) as session, pytest.raises(InvalidCiphertextError):
        session.scalars(select(Nurse.secret).where(Nurse.id == 5)).all()
    with Session(orm) as session, pytest.raises(InvalidCiphertextError):
        session.scalars(select(Doctor.comment)).all()


def test_a_flip_of_any_byte_fails(orm: Engine) -> None:
    with Session(orm) as session:
        session.add(Patient(id=1, name="Kim Minji", phone=None, notes=None))
        session.commit()
    stored = _raw(orm, "SELECT name FROM patients")[0]
    for position in range(len(stored)):
        for mask in (0x01, 0x80):
            tampered = bytearray(stored)
            tampered[position] ^= mask
            with orm.begin() as conn:
                conn.execute(text("UPDATE patients SET name = :v"), {"v": bytes(tampered)})
            with Session(orm) as session, pytest.raises(SQLAlchemyKMSError) as info:
                session.scalars(select(Patient.name)).all()
            assert isinstance(info.value, DecryptionError), (position, mask, info.value)
            assert "Kim" not in str(info.value)


def test_truncated_and_plaintext_values_are_never_returned(orm: Engine) -> None:
    with Session(orm) as session:
        session.add(Patient(id=1, name="Kim Minji", phone=None, notes=None))
        session.commit()
    stored = _raw(orm, "SELECT name FROM patients")[0]
    for bad in (stored[:-1], stored[:10], b"", b"Kim Minji", b"\x01\x01\x00\x00\x00\x01"):
        with orm.begin() as conn:
            conn.execute(text("UPDATE patients SET name = :v"), {"v": bad})
        with Session(orm) as session, pytest.raises(DecryptionError):
            session.scalars(select(Patient.name)).all()


def test_too_long_value_is_refused_before_it_is_written(orm: Engine) -> None:
    with Session(orm) as session:
        session.add(Patient(id=1, name="x" * 201, phone=None, notes=None))
        with pytest.raises(ValueTooLongError) as info:
            session.commit()
    assert (info.value.table, info.value.column) == ("patients", "name")
    assert "xxx" not in str(info.value)
    assert _raw(orm, "SELECT name FROM patients") == []
    with Session(orm) as session:  # the longest value that fits, in 4-byte characters
        session.add(Patient(id=2, name="😀" * 200, phone=None, notes=None))
        session.commit()
        assert session.get(Patient, 2).name == "😀" * 200  # type: ignore[union-attr]


def test_wrong_python_type_is_an_encryption_error(orm: Engine) -> None:
    with Session(orm) as session:
        session.add(Patient(id=1, name=12345, phone=None, notes=None))  # type: ignore[arg-type]
        with pytest.raises(EncryptionError, match="expected str"):
            session.commit()


def test_engine_without_vault_names_the_column(tmp_path: Any) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'novault.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Patient(id=1, name="Kim", phone=None, notes=None))
        with pytest.raises(VaultNotFoundError, match=r"patients\.name"):
            session.commit()
    engine.dispose()


def test_one_type_object_cannot_serve_two_columns() -> None:
    shared = KMSEncrypted(String(10))
    Table("one", MetaData(), Column("a", shared))
    with pytest.raises(ConfigurationError, match="two columns"):
        Table("two", MetaData(), Column("b", shared))


def test_unsupported_inner_type_is_refused() -> None:
    from sqlalchemy import Interval

    with pytest.raises(ConfigurationError, match="Interval"):
        KMSEncrypted(Interval)


def test_cache_key_follows_the_options() -> None:
    def key(t: KMSEncrypted) -> Any:
        return t._static_cache_key

    assert key(KMSEncrypted(String(10))) == key(KMSEncrypted(String(10)))
    assert key(KMSEncrypted(String(10))) != key(KMSEncrypted(String(20)))
    assert key(KMSEncrypted(String(10))) != key(KMSEncrypted(String(10), deterministic=True))
    assert KMSEncrypted.__dict__["cache_ok"] is True


@pytest.mark.parametrize(
    ("inner", "mysql_ddl", "pg_ddl", "sqlite_ddl"),
    [
        (String(200), "VARBINARY(842)", "BYTEA", "BLOB"),
        (Integer, "VARBINARY(53)", "BYTEA", "BLOB"),
        (String(5000), "BLOB", "BYTEA", "BLOB"),
        (Text, "LONGBLOB", "BYTEA", "BLOB"),
    ],
)
def test_column_ddl_holds_the_largest_ciphertext(
    inner: Any, mysql_ddl: str, pg_ddl: str, sqlite_ddl: str
) -> None:
    column_type = KMSEncrypted(inner)
    for dialect, want in (
        (mysql.dialect(), mysql_ddl),
        (postgresql.dialect(), pg_ddl),
        (sqlite.dialect(), sqlite_ddl),
    ):
        assert column_type.dialect_impl(dialect).compile(dialect=dialect) == want
    if isinstance(inner, String) and inner.length:
        assert column_type.max_stored_size == 4 * inner.length + 42


def test_stored_column_is_binary_in_the_database(orm: Engine) -> None:
    columns = {c["name"]: c for c in inspect(orm).get_columns("patients")}
    assert (
        "BLOB" in str(columns["name"]["type"]).upper()
        or "BYTEA" in str(columns["name"]["type"]).upper()
        or "VARBINARY" in str(columns["name"]["type"]).upper()
    )
