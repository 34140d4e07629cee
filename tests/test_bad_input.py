"""Stored values that are not what this column wrote: never a wrong value, never a stray error.

A property test feeds the decoder of real columns (``KMSEncrypted.process_result_value``
with a vault bound, what SQLAlchemy calls for every fetched value) with random
bytes, truncated, extended and bit-flipped ciphertexts, valid headers naming
other key versions, other format versions and algorithms, plaintext dressed as
ciphertext, ciphertexts of other columns and tables, and authentic ciphertexts
of bytes the column's type cannot hold. Every case must end in
:class:`~sqlalchemy_kms.errors.DecryptionError` naming the table and column (or
:class:`~sqlalchemy_kms.errors.KMSError` for the key version whose wrapped key
does not unwrap), and genuine values must come back exactly.

``SQLALCHEMY_KMS_HYPOTHESIS_EXAMPLES`` sets the number of examples (default
10000); a smaller end-to-end property runs a twentieth of that through real
``UPDATE`` and ``SELECT`` statements.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    JSON,
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
    Uuid,
    create_engine,
    select,
    text,
)
from sqlalchemy.engine import Engine

from sqlalchemy_kms import KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms._format import column_aad
from sqlalchemy_kms.errors import DecryptionError, KMSError

EXAMPLES = int(os.environ.get("SQLALCHEMY_KMS_HYPOTHESIS_EXAMPLES", "10000"))
DB_EXAMPLES = max(50, EXAMPLES // 20)

BROKEN_VERSION = 2  # its wrapped key is damaged in the key table
ACTIVE_VERSION = 3

# column name -> (inner type, deterministic, strategy of genuine values)
JSON_VALUES = st.recursive(
    st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
COLUMNS: dict[str, tuple[Any, bool, st.SearchStrategy[Any]]] = {
    "s": (String(100), False, st.text(max_size=100)),
    "s_det": (String(100), True, st.text(max_size=100)),
    "i": (Integer, False, st.integers(-(2**31), 2**31 - 1)),
    "i_det": (Integer, True, st.integers(-(2**31), 2**31 - 1)),
    "n": (
        Numeric(10, 2),
        False,
        st.decimals(min_value=-(10**7), max_value=10**7, places=2, allow_nan=False),
    ),
    "f": (Float, False, st.floats(allow_nan=False)),
    "b": (Boolean, False, st.booleans()),
    "d": (Date, False, st.dates()),
    "ts": (DateTime, False, st.datetimes()),
    "u": (Uuid, False, st.uuids()),
    "e": (Enum("red", "green", "blue", name="bi_color"), False, st.sampled_from(["red", "green"])),
    "j": (JSON, False, JSON_VALUES),
    "bin": (LargeBinary(64), False, st.binary(max_size=64)),
}

# authentic plaintexts that no writer of these types produces
ODD_PLAINTEXTS = [
    b"",
    b"\xff\xfe",
    b"abc",
    b"-",
    b"1.5.5",
    b"sNaN",
    b"NaN",
    b"Infinity",
    b"1e999999999",
    b"9" * 5000,
    b"2024-13-45",
    b"\x02",
    b"[" * 50_000,
    b'{"a": ' * 20_000,
    b"\x00" * 15,
]


@dataclass
class Lab:
    engine: Engine
    vault: KeyVault
    values: Table
    other: Table
    # genuine ciphertexts made under key version 1, before the rotations
    old: list[tuple[str, Any, bytes]]


def lab_tables(metadata: MetaData) -> tuple[Table, Table]:
    values = Table(
        "bi_values",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        *(
            Column(name, KMSEncrypted(inner, deterministic=det))
            for name, (inner, det, _) in COLUMNS.items()
        ),
    )
    other = Table(
        "bi_other",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("s", KMSEncrypted(String(100))),
        Column("s_det", KMSEncrypted(String(100), deterministic=True)),
    )
    return values, other


OLD_SAMPLES: dict[str, list[Any]] = {
    "s": ["Kim Minji", ""],
    "s_det": ["kim@example.com"],
    "i": [0, -(2**31)],
    "i_det": [42],
    "n": [Decimal("1.50"), Decimal("-12345.67")],
    "f": [0.1 + 0.2],
    "b": [True, False],
    "d": [dt.date(2024, 2, 29)],
    "ts": [dt.datetime(2024, 1, 31, 23, 59, 59, 999999)],
    "u": [uuid.UUID(int=7)],
    "e": ["blue"],
    "j": [{"a": [1, 2.5, None, "x"]}],
    "bin": [b"\x00\x01"],
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    path: Path = tmp_path_factory.mktemp("bad-input") / "lab.db"
    engine = create_engine(f"sqlite:///{path}")
    vault = KeyVault(engine, LocalKms(os.urandom(32)))
    vault.create_table()
    metadata = MetaData()
    values, other = lab_tables(metadata)
    metadata.create_all(engine)  # version 1 of the data and search keys
    old = [
        (name, value, values.c[name].type.process_bind_param(value, engine.dialect))
        for name, samples in OLD_SAMPLES.items()
        for value in samples
    ]
    for search in (False, True):
        assert vault.rotate_key(values, search=search) == BROKEN_VERSION
        assert vault.rotate_key(values, search=search) == ACTIVE_VERSION
    with engine.begin() as conn:  # damage version 2's wrapped keys
        for row in conn.execute(
            text("SELECT purpose, wrapped_key FROM kms_data_keys WHERE key_version = :v"),
            {"v": BROKEN_VERSION},
        ).all():
            damaged = bytearray(row.wrapped_key)
            damaged[-1] ^= 0x01
            conn.execute(
                text(
                    "UPDATE kms_data_keys SET wrapped_key = :w "
                    "WHERE scope = 'bi_values' AND purpose = :p AND key_version = :v"
                ),
                {"w": bytes(damaged), "p": row.purpose, "v": BROKEN_VERSION},
            )
    vault.clear_cache()
    assert vault.active_key_version(values) == ACTIVE_VERSION
    yield Lab(engine, vault, values, other, old)
    vault.close()
    engine.dispose()


# -- the cases ---------------------------------------------------------------------------------


@dataclass
class Case:
    """A stored value for one column and what reading it may give."""

    table: str
    column: str
    stored: Any
    kind: str
    value: Any = None  # the value it must give, when ``kind == "genuine"``

    def __repr__(self) -> str:
        shown = self.stored.hex() if isinstance(self.stored, bytes) else repr(self.stored)
        return f"Case({self.kind}, {self.table}.{self.column}, {shown[:200]})"


def encrypt(lab: Lab, table: Table, column: str, value: Any) -> bytes:
    stored: bytes = table.c[column].type.process_bind_param(value, lab.engine.dialect)
    return stored


@st.composite
def genuine(draw: st.DrawFn, lab: Lab) -> tuple[str, Any, bytes]:
    """A value of a column and its stored form, under the active or an old key version."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(lab.old))
    column = draw(st.sampled_from(sorted(COLUMNS)))
    value = draw(COLUMNS[column][2])
    return column, value, encrypt(lab, lab.values, column, value)


def _flip_bits(draw: st.DrawFn, stored: bytes) -> bytes:
    positions = draw(
        st.lists(st.integers(0, len(stored) * 8 - 1), min_size=1, max_size=3, unique=True)
    )
    flipped = bytearray(stored)
    for bit in positions:
        flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


KINDS = [
    "genuine",
    "genuine-buffer",
    "random",
    "truncated",
    "extended",
    "bit-flip",
    "key-version",
    "format-version",
    "algorithm",
    "plaintext",
    "other-column",
    "other-table",
    "authentic-odd",
    "not-bytes",
]


@st.composite
def cases(draw: st.DrawFn, lab: Lab) -> Case:
    kind = draw(st.sampled_from(KINDS))
    column, value, stored = draw(genuine(lab))
    case = Case("bi_values", column, stored, kind)
    if kind == "genuine":
        case.value = value
    elif kind == "genuine-buffer":  # drivers may return memoryview or bytearray
        case.stored = draw(st.sampled_from([memoryview, bytearray]))(stored)
        case.value = value
    elif kind == "random":
        case.stored = draw(st.binary(max_size=120))
    elif kind == "truncated":
        case.stored = stored[: draw(st.integers(0, len(stored) - 1))]
    elif kind == "extended":
        case.stored = stored + draw(st.binary(min_size=1, max_size=20))
    elif kind == "bit-flip":
        case.stored = _flip_bits(draw, stored)
    elif kind == "key-version":
        version = draw(
            st.sampled_from([0, 1, 2, 3, 4, 2**31 - 1, 2**31, 2**32 - 1])
            | st.integers(0, 2**32 - 1)
        )
        case.stored = stored[:2] + version.to_bytes(4, "big") + stored[6:]
    elif kind == "format-version":
        case.stored = bytes([draw(st.integers(0, 255).filter(lambda v: v != 1))]) + stored[1:]
    elif kind == "algorithm":
        case.stored = stored[:1] + bytes([draw(st.integers(0, 255))]) + stored[2:]
    elif kind == "plaintext":  # a header followed by the value itself, padded or not
        codec = lab.values.c[column].type._codec
        body = codec.encode(value) + draw(st.binary(max_size=40))
        algorithm = draw(st.sampled_from([1, 2]))
        version = draw(st.sampled_from([1, ACTIVE_VERSION]))
        case.stored = bytes([1, algorithm]) + version.to_bytes(4, "big") + body
    elif kind == "other-column":
        others = [c for c in COLUMNS if c != column]
        case.column = draw(st.sampled_from(others))
    elif kind == "other-table":  # same column name, same type, another table
        case.column = draw(st.sampled_from(["s", "s_det"]))
        case.stored = encrypt(lab, lab.values, case.column, draw(st.text(max_size=20)))
        case.table = "bi_other"
    elif kind == "authentic-odd":
        # written under the column's own key and binding, but not by this type's encoder
        plaintext = draw(st.sampled_from(ODD_PLAINTEXTS) | st.binary(max_size=40))
        aad = column_aad("bi_values", column)
        if COLUMNS[column][1]:
            case.stored = lab.vault.encrypt_deterministic("bi_values", column, aad, plaintext)
        else:
            case.stored = lab.vault.encrypt("bi_values", aad, plaintext)
    elif kind == "not-bytes":
        case.stored = draw(st.sampled_from(["text", 7, 1.5, stored.hex(), [stored]]))
    if (
        kind not in ("genuine", "genuine-buffer")
        and case.stored == stored
        and case.table == ("bi_values")
        and case.column == column
    ):
        case.kind, case.value = "genuine", value  # a mutation that changed nothing
    return case


def _names_version(stored: Any, version: int) -> bool:
    return (
        isinstance(stored, bytes)
        and len(stored) >= 6
        and stored[0] == 1
        and stored[1] in (1, 2)
        and int.from_bytes(stored[2:6], "big") == version
    )


def check(case: Case, outcome: Any, error: BaseException | None) -> None:
    """What a read of ``case.stored`` may end in."""
    if error is not None:
        assert isinstance(error, (DecryptionError, KMSError)), (
            f"{type(error).__module__}.{type(error).__qualname__} escaped: {error!r}"
        )
        assert case.kind not in ("genuine", "genuine-buffer"), f"a genuine value failed: {error}"
        if isinstance(error, KMSError):
            assert _names_version(case.stored, BROKEN_VERSION), f"KMS error for {case}: {error}"
            assert error.key_version == BROKEN_VERSION
        assert (error.table, error.column) == (case.table, case.column), str(error)
        return
    if case.kind in ("genuine", "genuine-buffer"):
        assert outcome == case.value and type(outcome) is type(case.value), (outcome, case.value)
    elif case.kind == "authentic-odd":
        # authentic bytes the codec accepts: a value of the column's type, never garbage
        python_type = lab_python_type(case.column)
        assert python_type is None or isinstance(outcome, python_type), (outcome, python_type)
    else:
        pytest.fail(f"{case} was read as {outcome!r} instead of failing")


def lab_python_type(column: str) -> type[Any] | None:
    return {
        "s": str,
        "s_det": str,
        "i": int,
        "i_det": int,
        "n": Decimal,
        "f": float,
        "b": bool,
        "d": dt.date,
        "ts": dt.datetime,
        "u": uuid.UUID,
        "e": str,
        "j": None,  # any JSON value
        "bin": bytes,
    }[column]


def read_directly(lab: Lab, case: Case) -> list[tuple[Any, BaseException | None]]:
    """Decode ``case.stored`` as SQLAlchemy would for a fetched row (the column type's
    result processor, with its fast path for cached keys) and through
    ``process_result_value``; one ``(value, error)`` for each."""
    table = lab.values if case.table == "bi_values" else lab.other
    column_type = table.c[case.column].type
    dialect = lab.engine.dialect
    readers = [
        column_type.result_processor(dialect, None),
        lambda stored: column_type.process_result_value(stored, dialect),
    ]
    outcomes: list[tuple[Any, BaseException | None]] = []
    for read in readers:
        try:
            outcomes.append((read(case.stored), None))
        except Exception as error:
            outcomes.append((None, error))
    return outcomes


@pytest.fixture(scope="module")
def case_strategy(lab: Lab) -> st.SearchStrategy[Case]:
    return cases(lab)


@pytest.mark.slow
def test_every_stored_value_decrypts_right_or_fails_cleanly(
    lab: Lab, case_strategy: st.SearchStrategy[Case]
) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=case_strategy)
    def property_(case: Case) -> None:
        for outcome, error in read_directly(lab, case):
            check(case, outcome, error)

    property_()


@pytest.mark.slow
def test_through_real_statements(lab: Lab, case_strategy: st.SearchStrategy[Case]) -> None:
    """The same property end to end: the stored bytes are written with raw SQL and
    read back with an ordinary ``SELECT`` of the encrypted column."""
    with lab.engine.begin() as conn:
        conn.execute(text("DELETE FROM bi_values"))
        conn.execute(text("DELETE FROM bi_other"))
        conn.execute(text("INSERT INTO bi_values (id) VALUES (1)"))
        conn.execute(text("INSERT INTO bi_other (id) VALUES (1)"))

    @settings(
        max_examples=DB_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=case_strategy.filter(lambda c: isinstance(c.stored, (bytes, bytearray))))
    def property_(case: Case) -> None:
        table = lab.values if case.table == "bi_values" else lab.other
        with lab.engine.begin() as conn:
            conn.execute(
                text(f"UPDATE {case.table} SET {case.column} = :stored WHERE id = 1"),
                {"stored": bytes(case.stored)},
            )
        outcome, error = None, None
        try:
            with lab.engine.connect() as conn:
                outcome = conn.execute(select(table.c[case.column])).scalar_one()
        except Exception as exc:
            error = exc
        check(case, outcome, error)

    property_()


@pytest.mark.parametrize("column", sorted(COLUMNS))
def test_authentic_values_the_type_cannot_hold(lab: Lab, column: str) -> None:
    """Every odd plaintext, under the column's own key and binding (as a writer with
    another encoder, or a column whose declared type was changed, would leave)."""
    aad = column_aad("bi_values", column)
    for plaintext in ODD_PLAINTEXTS:
        if COLUMNS[column][1]:
            stored = lab.vault.encrypt_deterministic("bi_values", column, aad, plaintext)
        else:
            stored = lab.vault.encrypt("bi_values", aad, plaintext)
        case = Case("bi_values", column, stored, "authentic-odd")
        for outcome, error in read_directly(lab, case):
            check(case, outcome, error)
