"""Exact types: an encrypted column keeps the values its plain column would keep.

``Numeric(p, s)`` refuses what the plain column would round or reject, every
form of ``Enum`` stores and returns what the plain ``Enum`` column does, and
the column types (with the tables and metadata holding them) pickle.
"""

from __future__ import annotations

import enum
import pickle
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Enum,
    Float,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_kms import KeyVault, KMSEncrypted
from sqlalchemy_kms.errors import EncryptionError, ValueTooLongError


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Size(str, enum.Enum):
    SMALL = "small"
    LARGE = "large"


def member_values(enum_class: type[enum.Enum]) -> list[str]:
    """A module-level ``values_callable`` (a lambda works as well, but does not pickle)."""
    return [member.value for member in enum_class]


def _table(name: str, *columns: Column[Any]) -> Table:
    return Table(
        name, MetaData(), Column("id", Integer, primary_key=True, autoincrement=False), *columns
    )


def _type(table: Any, name: str) -> KMSEncrypted:
    column_type = table.c[name].type
    assert isinstance(column_type, KMSEncrypted)
    return column_type


def _read(engine: Engine, table: Table, column: str = "value") -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(table.c[column]).order_by(table.c.id)).scalars())


def _count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT COUNT(*) FROM {table.name}")).scalar_one())


# -- Numeric(p, s) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (Decimal("123.456"), EncryptionError),  # a plain NUMERIC(12, 2) rounds it
        (Decimal("1234567890123.45"), ValueTooLongError),  # and rejects this one
        (Decimal("1E+5000"), ValueTooLongError),
        (Decimal("10000000000"), ValueTooLongError),  # 11 digits before the point
        (0.125, EncryptionError),
        (10**12, ValueTooLongError),
        (Decimal("NaN"), EncryptionError),
        (Decimal("Infinity"), EncryptionError),
        (float("inf"), EncryptionError),
    ],
)
def test_numeric_refuses_what_the_plain_column_would_change(
    engine: Engine, vault: KeyVault, value: Any, error: type[Exception]
) -> None:
    table = _table("xt_numeric_refused", Column("value", KMSEncrypted(Numeric(12, 2))))
    table.metadata.create_all(engine)
    with pytest.raises(error) as info, engine.begin() as conn:
        conn.execute(insert(table), {"id": 1, "value": value})
    assert info.value.column == "value"  # type: ignore[attr-defined]
    assert str(value) not in str(info.value)
    assert _count(engine, table) == 0


# what NUMERIC(12, 2) returns for what it is given: the value at the column's scale
NUMERIC_KEPT = [
    (Decimal("123.45"), "123.45"),
    (Decimal("1.5"), "1.50"),
    (Decimal("1.500"), "1.50"),
    (Decimal("1E+2"), "100.00"),
    (Decimal("9999999999.99"), "9999999999.99"),
    (Decimal("-9999999999.99"), "-9999999999.99"),
    (Decimal("0.01"), "0.01"),
    (Decimal("-0.00"), "0.00"),
    (7, "7.00"),
    (0.5, "0.50"),
]


def test_numeric_returns_what_the_plain_column_returns(engine: Engine, vault: KeyVault) -> None:
    table = _table(
        "xt_numeric_kept",
        Column("value", KMSEncrypted(Numeric(12, 2))),
        Column("plain", Numeric(12, 2)),
    )
    table.metadata.create_all(engine)
    rows = [{"id": i, "value": v, "plain": v} for i, (v, _) in enumerate(NUMERIC_KEPT)]
    with engine.begin() as conn:
        conn.execute(insert(table), [{**row, "plain": None} for row in rows])
    got = _read(engine, table)
    assert [str(v) for v in got] == [want for _, want in NUMERIC_KEPT]
    assert all(type(v) is Decimal for v in got)
    if engine.dialect.name != "sqlite":  # SQLite's NUMERIC is a float: not a reference
        with engine.begin() as conn:
            conn.execute(table.delete())
            conn.execute(insert(table), rows)
        assert [str(v) for v in _read(engine, table, "plain")] == [str(v) for v in got]


def test_numeric_precision_without_scale_holds_integers(engine: Engine, vault: KeyVault) -> None:
    table = _table("xt_numeric_p", Column("value", KMSEncrypted(Numeric(5))))
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), [{"id": 1, "value": 99999}, {"id": 2, "value": Decimal("7")}])
    assert _read(engine, table) == [Decimal("99999"), Decimal("7")]
    for value in (Decimal("1.5"), 100000):
        with pytest.raises(EncryptionError), engine.begin() as conn:
            conn.execute(insert(table), {"id": 3, "value": value})


def test_numeric_without_precision_keeps_any_value(engine: Engine, vault: KeyVault) -> None:
    table = _table("xt_numeric_free", Column("value", KMSEncrypted(Numeric())))
    table.metadata.create_all(engine)
    values = [Decimal("123.456"), Decimal("1E+5000"), Decimal("1.5"), Decimal("-0.000001")]
    with engine.begin() as conn:
        conn.execute(insert(table), [{"id": i, "value": v} for i, v in enumerate(values)])
    assert [str(v) for v in _read(engine, table)] == [str(v) for v in values]


def test_numeric_as_float_has_the_same_limits(engine: Engine, vault: KeyVault) -> None:
    table = _table(
        "xt_numeric_float", Column("value", KMSEncrypted(Numeric(6, 2, asdecimal=False)))
    )
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), [{"id": 1, "value": 1.25}, {"id": 2, "value": 9999.99}])
    got = _read(engine, table)
    assert got == [1.25, 9999.99] and all(type(v) is float for v in got)
    for value in (1.255, 10000.0):
        with pytest.raises(EncryptionError), engine.begin() as conn:
            conn.execute(insert(table), {"id": 3, "value": value})


def test_deterministic_numeric_equality_ignores_trailing_zeros(
    engine: Engine, vault: KeyVault
) -> None:
    table = _table(
        "xt_numeric_search", Column("value", KMSEncrypted(Numeric(12, 2), deterministic=True))
    )
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), {"id": 1, "value": Decimal("1.5")})
    with engine.connect() as conn:
        for operand in (Decimal("1.50"), Decimal("1.5"), Decimal("1.500")):
            query = select(table.c.id).where(table.c.value == operand)
            assert conn.execute(query).scalars().all() == [1]


@pytest.mark.parametrize(
    "value", [pytest.param(10**400, id="10**400"), Decimal("1E+400"), Decimal("-1E+400")]
)
def test_float_refuses_numbers_beyond_its_range(
    engine: Engine, vault: KeyVault, value: Any
) -> None:
    table = _table("xt_float", Column("value", KMSEncrypted(Float())))
    table.metadata.create_all(engine)
    with pytest.raises(EncryptionError) as info, engine.begin() as conn:
        conn.execute(insert(table), {"id": 1, "value": value})
    assert info.value.reason == "number out of the range of a float"
    assert _count(engine, table) == 0


# -- Enum ------------------------------------------------------------------------------

# (label, inner type, inputs the plain column accepts, inputs it refuses or cannot read)
ENUM_FORMS: list[tuple[str, Any, list[Any], list[Any]]] = [
    ("class", Enum(Color), [Color.RED, "GREEN"], ["red", "BLUE", 1]),
    (
        "values_callable",
        Enum(Color, values_callable=member_values),
        [Color.RED, "green"],
        ["RED", "blue", 1],
    ),
    (
        "values_lambda",
        Enum(Color, values_callable=lambda e: [m.value for m in e]),
        [Color.GREEN, "red"],
        ["GREEN"],
    ),
    ("str_enum", Enum(Size, values_callable=member_values), [Size.SMALL, "large"], ["SMALL"]),
    ("strings", Enum("small", "large"), ["small", "large"], ["medium", "SMALL", 1]),
    ("not_native", Enum(Color, native_enum=False, length=30), [Color.GREEN, "RED"], ["red"]),
    (
        "validated",
        Enum("small", "large", validate_strings=True, native_enum=False),
        ["large"],
        ["medium"],
    ),
    (
        "callable_not_native",
        Enum(Color, values_callable=member_values, native_enum=False, validate_strings=True),
        ["red", Color.GREEN],
        ["RED"],
    ),
]


@pytest.mark.parametrize(
    ("label", "inner", "accepted", "refused"), ENUM_FORMS, ids=[f[0] for f in ENUM_FORMS]
)
def test_every_enum_form_behaves_like_the_plain_column(
    engine: Engine, vault: KeyVault, label: str, inner: Any, accepted: list[Any], refused: Any
) -> None:
    plain = inner.copy()
    plain.name = f"xt_{label}_plain"
    table = _table(
        f"xt_enum_{label}",
        Column("value", KMSEncrypted(inner)),
        Column("search", KMSEncrypted(inner.copy(), deterministic=True)),
        Column("plain", plain),
    )
    table.metadata.create_all(engine)
    try:
        rows = [{"id": i, "value": v, "search": v, "plain": v} for i, v in enumerate(accepted)]
        with engine.begin() as conn:
            conn.execute(insert(table), rows)
        want = _read(engine, table, "plain")
        for column in ("value", "search"):
            got = _read(engine, table, column)
            assert got == want and [type(v) for v in got] == [type(v) for v in want]
        with engine.connect() as conn:
            for i, value in enumerate(accepted):
                query = select(table.c.id).where(table.c.search == value)
                assert conn.execute(query).scalars().all() == [i]
        for value in refused:
            with pytest.raises(EncryptionError), engine.begin() as conn:
                conn.execute(insert(table), {"id": 99, "value": value})
        assert _count(engine, table) == len(accepted)
    finally:
        table.metadata.drop_all(engine)


def test_values_callable_stores_the_values(engine: Engine, vault: KeyVault) -> None:
    """What earlier versions stored for a ``values_callable`` enum (the value, given as a
    string) reads back as its member."""
    table = _table(
        "xt_enum_stored", Column("value", KMSEncrypted(Enum(Color, values_callable=member_values)))
    )
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), [{"id": 1, "value": "red"}, {"id": 2, "value": Color.GREEN}])
    assert _read(engine, table) == [Color.RED, Color.GREEN]
    codec = _type(table, "value")._codec
    assert codec.encode(Color.GREEN) == b"green" and codec.encode("red") == b"red"


# -- pickling ----------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "xt_people"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(KMSEncrypted(String(100), deterministic=True))
    salary: Mapped[Decimal | None] = mapped_column(KMSEncrypted(Numeric(12, 2)), nullable=True)
    color: Mapped[Color | None] = mapped_column(
        KMSEncrypted(Enum(Color, values_callable=member_values)), nullable=True
    )
    nickname: Mapped[str | None] = mapped_column(
        KMSEncrypted(String(40), normalize=str.lower), nullable=True
    )


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_types_tables_and_metadata_pickle(protocol: int) -> None:
    column_type = Person.__table__.c.email.type
    for thing in (column_type, Person.__table__, Base.metadata):
        clone = pickle.loads(pickle.dumps(thing, protocol=protocol))
        assert type(clone) is type(thing)
    clone_type = pickle.loads(pickle.dumps(column_type, protocol=protocol))
    want = "KMSEncrypted(String(length=100), deterministic=True)"
    assert repr(clone_type) == repr(column_type) == want
    assert clone_type._codec.encode("kim") == b"kim"
    table = pickle.loads(pickle.dumps(Person.__table__, protocol=protocol))
    for name in ("email", "salary", "color", "nickname"):
        original, copied = _type(Person.__table__, name), _type(table, name)
        assert copied._column is table.c[name]
        assert copied._binding is not None and original._binding is not None
        assert copied._binding.aad == original._binding.aad
        assert repr(copied._codec) == repr(original._codec)
    assert _type(table, "color")._codec.decode(b"red") is Color.RED


def test_mapped_instances_still_pickle() -> None:
    person = Person(id=1, email="kim@example.com", salary=Decimal("1.50"), color=Color.RED)
    clone = pickle.loads(pickle.dumps(person))
    assert (clone.id, clone.email, clone.salary, clone.color) == (
        1,
        "kim@example.com",
        Decimal("1.50"),
        Color.RED,
    )


def test_an_unpickled_table_encrypts_and_decrypts(engine: Engine, vault: KeyVault) -> None:
    metadata = pickle.loads(pickle.dumps(Base.metadata))
    people = metadata.tables["xt_people"]
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(people),
            [
                {
                    "id": 1,
                    "email": "kim@example.com",
                    "salary": Decimal("1.5"),
                    "color": Color.RED,
                    "nickname": "MINJI",
                },
                {
                    "id": 2,
                    "email": "lee@example.com",
                    "salary": None,
                    "color": "green",
                    "nickname": None,
                },
            ],
        )
        stored = conn.execute(text("SELECT email FROM xt_people WHERE id = 1")).scalar_one()
    assert b"kim" not in bytes(stored)
    want = [
        (1, "kim@example.com", Decimal("1.50"), Color.RED, "minji"),
        (2, "lee@example.com", None, Color.GREEN, None),
    ]
    with engine.connect() as conn:
        assert [tuple(r) for r in conn.execute(select(people).order_by(people.c.id))] == want
        query = select(people.c.id).where(people.c.email == "lee@example.com")
        assert conn.execute(query).scalars().all() == [2]
    # the original table reads what the unpickled one wrote: the same column binding
    with Session(engine) as session:
        person = session.get(Person, 1)
        assert person is not None and (person.email, person.color) == ("kim@example.com", Color.RED)
