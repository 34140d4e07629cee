"""Errors never carry the plaintext of an encrypted column.

A value that cannot be encoded, normalized or encrypted raises
:class:`~sqlalchemy_kms.errors.EncryptionError` naming table and column and
nothing else: not in its message, its ``repr``, its ``args``, nor in the
exceptions it was raised from (a ``UnicodeEncodeError`` holds the whole
string). That holds on writes (Core, executemany, the ORM) and for equality
operands.

Another error of a statement that also binds encrypted values (a bad value
for a plain column, a constraint the database enforces) keeps the type a
user catches, and its parameters show no plaintext of the encrypted columns.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    Column,
    Date,
    Enum,
    Float,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    insert,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, registry

from sqlalchemy_kms import KeyVault, KMSEncrypted
from sqlalchemy_kms.errors import EncryptionError, SQLAlchemyKMSError
from sqlalchemy_kms.types import HIDDEN

SSN = "SSN-PLAIN-1"  # the plaintext of another encrypted column of the same statement
EMAIL = "kim@example.com"
HUGE = 10**4999  # 5,000 digits: str() of it raises


def _nested(depth: int) -> Any:
    value: Any = ["JSON-PLAIN-LEAF"]
    for _ in range(depth):
        value = [value]
    return value


# case -> (column, bad value, plaintexts that must not appear)
WRITES: dict[str, tuple[str, Any, tuple[Any, ...]]] = {
    "surrogate": ("s", EMAIL + "\udc80", (EMAIL,)),
    "surrogate_det": ("s_det", EMAIL + "\udc80", (EMAIL,)),
    "float_overflow": ("f", 10**400, (10**400,)),
    "normalize_raises": ("nm", 900101, (900101, "900101")),
    "json_too_deep": ("j", _nested(5000), ("JSON-PLAIN-LEAF",)),
    "json_too_deep_det": ("j_det", _nested(5000), ("JSON-PLAIN-LEAF",)),
    "numeric_5000_digits": ("n", HUGE, (HUGE, "1" + "0" * 40)),
    "numeric_5000_digits_det": ("n_det", HUGE, (HUGE, "1" + "0" * 40)),
}
OPERANDS = {name: case for name, case in WRITES.items() if case[0] in ("s_det", "nm", "j_det")}
OPERANDS["normalize_raises"] = WRITES["normalize_raises"]


def people_table(metadata: MetaData) -> Table:
    return Table(
        "leak_people",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("s", KMSEncrypted(String(100))),
        Column("s_det", KMSEncrypted(String(100), deterministic=True)),
        Column("f", KMSEncrypted(Float)),
        Column("nm", KMSEncrypted(String(100), deterministic=True, normalize=str.lower)),
        Column("j", KMSEncrypted(JSON)),
        Column("j_det", KMSEncrypted(JSON, deterministic=True)),
        Column("n", KMSEncrypted(Numeric(10, 2))),
        Column("n_det", KMSEncrypted(Numeric(10, 2), deterministic=True)),
        Column("ssn", KMSEncrypted(String(50))),
    )


class Person:
    def __init__(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self, name, value)


@pytest.fixture
def people(engine: Engine, vault: KeyVault) -> Iterator[Table]:
    metadata = MetaData()
    table = people_table(metadata)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), {"id": 1, "s": "x", "ssn": SSN})
    mapper_registry = registry()
    mapper_registry.map_imperatively(Person, table)
    yield table
    mapper_registry.dispose()


# -- what a leak is ----------------------------------------------------------------------


def _holds(obj: Any, secret: Any, depth: int = 0) -> bool:
    """Whether ``obj`` (a string, a container, an exception's attributes) holds ``secret``."""
    if depth > 6:
        return False
    if isinstance(secret, str) and isinstance(obj, str):
        return secret in obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return isinstance(secret, str) and secret.encode("utf-8") in bytes(obj)
    if obj is secret or (type(obj) is type(secret) and obj == secret):
        return True
    if isinstance(obj, dict):
        return any(_holds(item, secret, depth + 1) for item in (*obj.keys(), *obj.values()))
    if isinstance(obj, (list, tuple, set, frozenset)):
        return any(_holds(item, secret, depth + 1) for item in obj)
    return False


def _chain(error: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    pending = [error]
    while pending:
        current = pending.pop()
        if any(current is seen for seen in found):
            continue
        found.append(current)
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
    return found


def assert_no_plaintext(error: BaseException, secrets: tuple[Any, ...]) -> None:
    """No secret in the error's ``str``, ``repr``, ``args``, ``params`` or attributes, nor
    in any exception of its chain; ``str`` itself must not raise."""
    for current in _chain(error):
        text = str(current)  # raises if a 5,000-digit int is rendered
        shown = [text, repr(current), current.args, getattr(current, "params", None)]
        shown.append(getattr(current, "object", None))  # UnicodeError's whole string
        shown.append({k: v for k, v in vars(current).items() if k != "orig"})
        for secret in (*secrets, SSN):
            for item in shown:
                assert not _holds(item, secret), f"{type(current).__name__} shows {item!r:.200}"


def assert_clean_encryption_error(error: BaseException, column: str, secrets: Any) -> None:
    assert isinstance(error, EncryptionError), f"{type(error).__name__}: {error!s:.300}"
    assert error.table == "leak_people"
    assert error.column == column
    assert "leak_people." + column in str(error)
    # raised from None: nothing but the error itself in its chain
    assert error.__cause__ in (None, error)
    assert error.__context__ in (None, error)
    assert _chain(error) == [error]
    assert_no_plaintext(error, secrets)


# -- 1. values that cannot be encrypted --------------------------------------------------


def _core_insert(engine: Engine, table: Table, column: str, value: Any) -> None:
    with engine.begin() as conn:
        conn.execute(insert(table), {"id": 2, column: value, "ssn": SSN})


def _core_executemany(engine: Engine, table: Table, column: str, value: Any) -> None:
    rows = [
        {"id": 2, column: None, "ssn": SSN},
        {"id": 3, column: value, "ssn": SSN},
    ]
    with engine.begin() as conn:
        conn.execute(insert(table), rows)


def _core_update(engine: Engine, table: Table, column: str, value: Any) -> None:
    with engine.begin() as conn:
        conn.execute(update(table).where(table.c.id == 1), {column: value, "ssn": SSN})


def _orm_add(engine: Engine, table: Table, column: str, value: Any) -> None:
    with Session(engine) as session:
        session.add(Person(id=2, ssn=SSN, **{column: value}))
        session.commit()


def _orm_update(engine: Engine, table: Table, column: str, value: Any) -> None:
    with Session(engine) as session:
        person = session.get(Person, 1)
        assert person is not None
        setattr(person, "ssn", SSN)  # noqa: B010 (mapped imperatively: no declared attribute)
        setattr(person, column, value)
        session.commit()


WRITE_MODES: dict[str, Callable[[Engine, Table, str, Any], None]] = {
    "core_insert": _core_insert,
    "core_executemany": _core_executemany,
    "core_update": _core_update,
    "orm_add": _orm_add,
    "orm_update": _orm_update,
}


@pytest.mark.parametrize("mode", list(WRITE_MODES))
@pytest.mark.parametrize("case", list(WRITES))
def test_a_value_that_cannot_be_written_raises_a_clean_encryption_error(
    engine: Engine, people: Table, case: str, mode: str
) -> None:
    column, value, secrets = WRITES[case]
    with pytest.raises(SQLAlchemyKMSError) as caught:
        WRITE_MODES[mode](engine, people, column, value)
    assert_clean_encryption_error(caught.value, column, secrets)


@pytest.mark.parametrize("form", ["eq", "ne", "in", "orm"])
@pytest.mark.parametrize("case", list(OPERANDS))
def test_an_equality_operand_that_cannot_be_encrypted_raises_a_clean_encryption_error(
    engine: Engine, people: Table, case: str, form: str
) -> None:
    column, value, secrets = OPERANDS[case]
    target = people.c[column]
    conditions: dict[str, Callable[[], Any]] = {
        "eq": lambda: target == value,
        "ne": lambda: target != value,
        "in": lambda: target.in_([EMAIL, value]),
        "orm": lambda: getattr(Person, column) == value,
    }
    condition = conditions[form]()
    with pytest.raises(SQLAlchemyKMSError) as caught:
        if form == "orm":
            with Session(engine) as session:
                session.scalars(select(Person).where(condition)).all()
        else:
            with engine.connect() as conn:
                conn.execute(select(people.c.id).where(condition, people.c.ssn.is_not(None)))
    assert_clean_encryption_error(caught.value, column, secrets)


# -- 2. another column's error -----------------------------------------------------------


class Size(enum.Enum):
    SMALL = "small"
    LARGE = "large"


def orders_table(metadata: MetaData) -> Table:
    return Table(
        "leak_orders",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("size", Enum(Size, native_enum=False, validate_strings=True)),
        Column("due", Date),
        Column("quantity", Integer, nullable=False),
        Column("ssn", KMSEncrypted(String(50))),
        Column("email", KMSEncrypted(String(100), deterministic=True)),
    )


class Order:
    def __init__(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self, name, value)


@pytest.fixture
def orders(engine: Engine, vault: KeyVault) -> Iterator[Table]:
    metadata = MetaData()
    table = orders_table(metadata)
    metadata.create_all(engine)
    mapper_registry = registry()
    mapper_registry.map_imperatively(Order, table)
    yield table
    mapper_registry.dispose()


GOOD = {"quantity": 1, "ssn": SSN, "email": EMAIL}
# a bad value for a plain column of the statement, failing on every database
PLAIN_FAILURES: dict[str, tuple[dict[str, Any], type[BaseException]]] = {
    # the Enum's bind processor refuses it before the statement runs
    "enum_lookup": ({"size": "medium", "quantity": 1}, sa_exc.StatementError),
    # the database refuses it (NOT NULL)
    "not_null": ({"size": Size.SMALL, "quantity": None}, sa_exc.IntegrityError),
}
FINE = {"size": Size.SMALL, "quantity": 1}


def _check_statement_error(error: BaseException, expected: type[BaseException]) -> None:
    assert isinstance(error, expected), f"{type(error).__name__}: {error!s:.300}"
    assert isinstance(error, sa_exc.StatementError)
    assert not isinstance(error, SQLAlchemyKMSError)
    assert_no_plaintext(error, (EMAIL,))
    assert SSN not in str(error.params) and EMAIL not in str(error.params)
    # nor their ciphertexts: an encrypted column's value is shown as a placeholder
    shown = _leaves(error.params)
    assert not [leaf for leaf in shown if isinstance(leaf, (bytes, bytearray, memoryview))]
    assert HIDDEN in shown or "<hidden>" in shown


def _leaves(params: Any) -> list[Any]:
    if isinstance(params, dict):
        return [leaf for value in params.values() for leaf in _leaves(value)]
    if isinstance(params, (list, tuple)):
        return [leaf for value in params for leaf in _leaves(value)]
    return [params]


def _encrypted_entries(params: Any) -> list[Any]:
    """The values shown for ``ssn`` and ``email`` in an error's parameters (by name)."""
    rows = params if isinstance(params, list) else [params]
    return [row[key] for row in rows if isinstance(row, dict) for key in ("ssn", "email")]


@pytest.mark.parametrize("case", list(PLAIN_FAILURES))
@pytest.mark.parametrize("many", [False, True], ids=["one", "executemany"])
def test_another_columns_error_shows_no_plaintext(
    engine: Engine, orders: Table, case: str, many: bool
) -> None:
    bad, expected = PLAIN_FAILURES[case]
    rows = [{**GOOD, "id": 1, **bad}]
    if many:
        rows = [{**GOOD, "id": 1, **FINE}, {**GOOD, "id": 2, **bad}]
    with pytest.raises(sa_exc.StatementError) as caught, engine.begin() as conn:
        conn.execute(insert(orders), rows if many else rows[0])
    _check_statement_error(caught.value, expected)
    for shown in _encrypted_entries(caught.value.params):
        assert shown in (HIDDEN, "<hidden>")


@pytest.mark.parametrize("case", list(PLAIN_FAILURES))
def test_another_columns_error_in_the_orm_shows_no_plaintext(
    engine: Engine, orders: Table, case: str
) -> None:
    bad, expected = PLAIN_FAILURES[case]
    values = {**GOOD, "id": 1, **bad}
    with pytest.raises(sa_exc.StatementError) as caught, Session(engine) as session:
        session.add(Order(**values))
        session.commit()
    _check_statement_error(caught.value, expected)


def test_a_bad_date_on_sqlite_shows_no_plaintext(
    engine: Engine, orders: Table, db_name: str
) -> None:
    if db_name != "sqlite":
        pytest.skip("SQLite's Date type refuses a string before the statement runs")
    with pytest.raises(sa_exc.StatementError) as caught, engine.begin() as conn:
        conn.execute(insert(orders), [{**GOOD, "id": 1, "due": "2024-13-45"}])
    _check_statement_error(caught.value, sa_exc.StatementError)
    assert isinstance(caught.value.orig, TypeError)


def test_a_plain_columns_error_of_a_statement_without_encrypted_values_is_untouched(
    engine: Engine, orders: Table
) -> None:
    with pytest.raises(sa_exc.IntegrityError) as caught, engine.begin() as conn:
        conn.execute(insert(orders), {"id": 1, "quantity": None})
    params: Any = caught.value.params
    assert HIDDEN not in str(params) and "<hidden>" not in str(params)
    assert 1 in (params.values() if isinstance(params, dict) else params)
