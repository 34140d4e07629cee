"""The value codecs, exactly: types refused, ranges and lengths at their bounds, sizes.

Each codec checks a value the way the database would before it is encrypted;
a check that is missing stores a value the column's type cannot hold. These
tests call the codecs directly (no database) and assert exact bytes, exact
bounds and the exact reason of every refusal.
"""

from __future__ import annotations

import copy
import datetime as dt
import enum
import math
import pickle
import uuid
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import (
    ARRAY,
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Double,
    Enum,
    Float,
    Integer,
    LargeBinary,
    Numeric,
    SmallInteger,
    String,
    Text,
    Time,
    Unicode,
    UnicodeText,
    Uuid,
)

from sqlalchemy_kms import _codecs
from sqlalchemy_kms._codecs import SUPPORTED_TYPES, Codec, codec_for
from sqlalchemy_kms.errors import ConfigurationError, EncryptionError, ValueTooLongError

UID = uuid.UUID("12345678-1234-5678-1234-567812345678")


class Color(enum.Enum):
    RED = "r"
    GREEN = "g"


def refusal(codec: Codec, value: Any) -> str:
    """The reason an :class:`EncryptionError` (and nothing else) gives for ``value``."""
    with pytest.raises(EncryptionError) as info:
        codec.encode(value)
    return info.value.reason


# -- the module's surface ------------------------------------------------------------


def test_exported_names() -> None:
    assert _codecs.__all__ == ["SUPPORTED_TYPES", "Codec", "codec_for"]
    for name in _codecs.__all__:
        assert hasattr(_codecs, name)


def test_supported_types_names_exactly_the_types_that_have_a_codec() -> None:
    names = SUPPORTED_TYPES.split(", ")
    assert len(names) == 18
    for name in names:
        inner = getattr(sqlalchemy, name)
        codec_for(inner("a") if inner is Enum else inner())


def test_unsupported_inner_type_names_the_supported_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        codec_for(ARRAY(Integer))
    assert info.value.reason == (
        "KMSEncrypted cannot encrypt ARRAY; supported inner types: " + SUPPORTED_TYPES
    )


@pytest.mark.parametrize(
    ("inner", "name", "max_size"),
    [
        (String(20), "String(20)", 80),
        (String(), "String(None)", None),
        (Text(), "String(None)", None),
        (Unicode(3), "String(3)", 12),
        (UnicodeText(), "String(None)", None),
        (Enum("a", "bcd"), "Enum", 12),
        (Enum(Color), "Enum", 20),
        (Integer(), "Integer(32)", 11),
        (SmallInteger(), "Integer(16)", 6),
        (BigInteger(), "Integer(64)", 20),
        (Float(), "Float", 32),
        (Double(), "Float", 32),
        (Numeric(10, 2), "Numeric", 22),
        (Numeric(), "Numeric", 128),
        (Boolean(), "Boolean", 1),
        (DateTime(), "DateTime", 48),
        (Date(), "Date", 10),
        (Time(), "Time", 40),
        (Uuid(), "Uuid", 16),
        (JSON(), "JSON", None),
        (LargeBinary(), "LargeBinary", None),
        (LargeBinary(100), "LargeBinary", 100),
    ],
)
def test_codec_names_and_max_sizes(inner: Any, name: str, max_size: int | None) -> None:
    codec = codec_for(inner)
    assert (codec.name, codec.max_size) == (name, max_size)
    assert repr(codec) == f"<Codec {name} max_size={max_size}>"


@pytest.mark.parametrize(
    ("inner", "value"),
    [
        (String(20), "김민지"),
        (Text(), "x"),
        (Integer(), 7),
        (Float(), 1.5),
        (Numeric(10, 2), Decimal("1.5")),
        (Numeric(), Decimal("1.5")),
        (Enum(Color), Color.RED),
        (Enum("a", "b"), "b"),
        (Boolean(), True),
        (Date(), dt.date(2024, 2, 29)),
        (DateTime(), dt.datetime(2024, 2, 29, 10, 30)),
        (Time(), dt.time(10, 30)),
        (Uuid(), UID),
        (JSON(), {"a": [1]}),
        (LargeBinary(4), b"ab"),
    ],
)
def test_a_codec_pickles_as_its_inner_type(inner: Any, value: Any) -> None:
    codec = codec_for(inner)
    assert codec.inner is inner
    for clone in (pickle.loads(pickle.dumps(codec)), copy.deepcopy(codec)):
        assert type(clone) is Codec and clone is not codec
        assert repr(clone) == repr(codec)
        assert clone.encode(value) == codec.encode(value)
        assert clone.decode(codec.encode(value)) == value
        assert clone.legacy_text(value) == codec.legacy_text(value)
        assert type(clone.inner) is type(inner)
    assert copy.copy(codec) is not codec


def test_a_codec_not_made_by_codec_for_does_not_pickle() -> None:
    codec = Codec("Raw", bytes, bytes, None)
    assert codec.inner is None
    with pytest.raises(TypeError) as info:
        pickle.dumps(codec)
    assert str(info.value) == "only a codec made by codec_for() can be pickled"


def test_an_enum_without_members_still_has_a_size() -> None:
    assert codec_for(Enum()).max_size == 4


# -- strings ---------------------------------------------------------------------------


@pytest.mark.parametrize("inner", [String(5), Text(), Unicode(5), UnicodeText()])
@pytest.mark.parametrize(("value", "got"), [(5, "int"), (b"abc", "bytes"), (None, "NoneType")])
def test_strings_refuse_other_types(inner: Any, value: Any, got: str) -> None:
    assert refusal(codec_for(inner), value) == f"expected str, got {got}"


def test_string_length_counts_characters_not_bytes() -> None:
    codec = codec_for(String(3))
    assert codec.encode("김민지") == "김민지".encode()
    assert len(codec.encode("😀😀😀")) == codec.max_size == 12
    with pytest.raises(ValueTooLongError) as info:
        codec.encode("김민지x")
    assert info.value.reason == "value has 4 characters; the column holds at most 3"


@pytest.mark.parametrize("inner", [String(10), Text()])
def test_non_ascii_text_round_trips(inner: Any) -> None:
    codec = codec_for(inner)
    for text in ("김민지", "é", "😀", "Zoë\x00"):
        assert codec.encode(text) == text.encode("utf-8")
        assert codec.decode(codec.encode(text)) == text


def test_invalid_utf8_is_not_decoded() -> None:
    with pytest.raises(UnicodeDecodeError):
        codec_for(String(10)).decode(b"\xff")


# -- enumerations -------------------------------------------------------------------


def test_enum_of_strings() -> None:
    codec = codec_for(Enum("low", "high"))
    assert codec.encode("high") == b"high"
    assert codec.decode(b"low") == "low"
    with pytest.raises(EncryptionError) as info:
        codec.encode("medium")
    assert info.value.reason == "value is not one of the enumeration's members"
    assert refusal(codec, 1) == "expected a member of the enumeration, got int"


def test_enum_class_stores_member_names() -> None:
    codec = codec_for(Enum(Color))
    assert codec.encode(Color.GREEN) == b"GREEN"
    assert codec.encode("RED") == b"RED"
    assert codec.decode(b"GREEN") is Color.GREEN
    # a member's value is not its name
    assert refusal(codec, "r") == "value is not one of the enumeration's members"
    assert refusal(codec, None) == "expected a member of the enumeration, got NoneType"
    assert refusal(codec, Shade.DARK) == "expected a member of the enumeration, got Shade"


class Shade(enum.Enum):
    LIGHT = "light"
    DARK = "dark"
    PALE = "light"  # an alias of LIGHT


class Level(str, enum.Enum):
    LOW = "low"
    HIGH = "HIGHEST"


def _values(enum_class: type[enum.Enum]) -> list[str]:
    return [member.value for member in enum_class]


@pytest.mark.parametrize(
    ("inner", "given", "stored", "read"),
    [
        (Enum(Shade, values_callable=_values), Shade.DARK, b"dark", Shade.DARK),
        (Enum(Shade, values_callable=_values), "light", b"light", Shade.LIGHT),
        (Enum(Shade, values_callable=_values), Shade.PALE, b"light", Shade.LIGHT),
        (Enum(Shade), Shade.PALE, b"LIGHT", Shade.LIGHT),
        (Enum(Level, values_callable=_values), Level.HIGH, b"HIGHEST", Level.HIGH),
        (Enum(Level, values_callable=_values), "low", b"low", Level.LOW),
        (Enum(Level), "low", b"LOW", Level.LOW),  # a str member is equal to its value
        (Enum(Level), Level.HIGH, b"HIGH", Level.HIGH),
        (Enum("a", "b", native_enum=False, length=10, validate_strings=True), "b", b"b", "b"),
    ],
)
def test_enum_stores_what_the_plain_column_stores(
    inner: Any, given: Any, stored: bytes, read: Any
) -> None:
    codec = codec_for(inner)
    assert codec.encode(given) == stored
    assert codec.decode(stored) == read and type(codec.decode(stored)) is type(read)
    assert inner._db_value_for_elem(given).encode() == stored  # the plain column's own
    assert inner._object_value_for_elem(stored.decode()) == read
    assert codec.legacy_text(given) == stored
    assert codec.from_legacy(stored.decode()) == read


@pytest.mark.parametrize(
    ("inner", "value"),
    [
        (Enum(Shade, values_callable=_values), "DARK"),
        (Enum(Shade, values_callable=_values), "PALE"),
        (Enum(Shade), "dark"),
        (Enum(Shade), "PALE"),  # an alias's name is not among the values
        (Enum(Level, values_callable=_values), "HIGH"),
        (Enum("a", "b"), "c"),
        (Enum("a", "b", validate_strings=True), "A"),
        (Enum(), "a"),
    ],
)
def test_enum_refuses_unknown_strings_whatever_validate_strings_says(
    inner: Any, value: str
) -> None:
    assert refusal(codec_for(inner), value) == "value is not one of the enumeration's members"


@pytest.mark.parametrize(("value", "got"), [([1], "list"), ({}, "dict"), (b"a", "bytes")])
def test_enum_refuses_other_types_even_unhashable_ones(value: Any, got: str) -> None:
    assert (
        refusal(codec_for(Enum("a")), value) == f"expected a member of the enumeration, got {got}"
    )


@pytest.mark.parametrize(
    ("inner", "stored"),
    [
        (Enum(Shade, values_callable=_values), b"DARK"),
        (Enum(Shade), b"dark"),
        (Enum(Shade), b"PALE"),  # an alias's name is not a stored value
        (Enum("a", "b"), b"c"),
        (Enum("a", "b"), b"\xff"),
    ],
)
def test_enum_does_not_decode_what_is_not_one_of_its_values(inner: Any, stored: bytes) -> None:
    # the plain column raises LookupError for such a value; KeyError is a
    # lookup error too, and what the column type turns into DecryptionError
    with pytest.raises(KeyError):
        codec_for(inner).decode(stored)


def test_enum_sizes_count_the_stored_values() -> None:
    assert codec_for(Enum(Shade, values_callable=_values)).max_size == 20
    assert codec_for(Enum(Shade)).max_size == 20
    assert codec_for(Enum(Level, values_callable=_values)).max_size == 28


def test_non_ascii_enum_member() -> None:
    codec = codec_for(Enum("맑음", "흐림"))
    assert codec.encode("흐림") == "흐림".encode()
    assert codec.decode("맑음".encode()) == "맑음"
    assert codec.max_size == 8


# -- integers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inner", "low", "high", "bits"),
    [
        (SmallInteger(), -32768, 32767, 16),
        (Integer(), -2147483648, 2147483647, 32),
        (BigInteger(), -9223372036854775808, 9223372036854775807, 64),
    ],
)
def test_integer_range_is_the_columns(inner: Any, low: int, high: int, bits: int) -> None:
    codec = codec_for(inner)
    assert codec.encode(low) == str(low).encode()
    assert codec.encode(high) == str(high).encode()
    assert codec.decode(codec.encode(low)) == low
    assert len(codec.encode(low)) == codec.max_size
    for outside in (low - 1, high + 1):
        with pytest.raises(EncryptionError) as info:
            codec.encode(outside)
        assert info.value.reason == f"integer out of the {bits}-bit range of the column"


@pytest.mark.parametrize(
    ("value", "got"),
    [(1.0, "float"), (Decimal("1"), "Decimal"), ("1", "str"), (None, "NoneType")],
)
def test_integers_refuse_other_types(value: Any, got: str) -> None:
    assert refusal(codec_for(Integer()), value) == f"expected int, got {got}"


def test_integers_take_any_index() -> None:
    class Index:
        def __index__(self) -> int:
            return -5

    assert codec_for(SmallInteger()).encode(Index()) == b"-5"


# -- floating point and decimals --------------------------------------------------------


def test_float_encodes_the_shortest_repr() -> None:
    codec = codec_for(Float())
    assert codec.encode(0.1 + 0.2) == b"0.30000000000000004"
    assert codec.encode(3) == b"3.0"
    assert codec.encode(Decimal("1.5")) == b"1.5"
    assert codec.encode(Decimal("0.1")) == b"0.1"
    assert codec.decode(b"-0.0") == 0.0 and math.copysign(1, codec.decode(b"-0.0")) == -1
    assert codec_for(Float(asdecimal=True)).decode(b"1.25") == Decimal("1.25")
    assert type(codec_for(Float(asdecimal=True)).decode(b"1.25")) is Decimal


class _Float(float):
    """A float subclass, as some libraries' scalars are."""


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (math.inf, b"inf"),
        (-math.inf, b"-inf"),
        (math.nan, b"nan"),
        (_Float(math.inf), b"inf"),
        (_Float(2.5), b"2.5"),
        (Decimal("Infinity"), b"inf"),
        (Decimal("-Infinity"), b"-inf"),
        (Decimal("NaN"), b"nan"),
        (1e308, b"1e+308"),
        (Decimal("1.7976931348623157E+308"), b"1.7976931348623157e+308"),
        (2**1023, b"8.98846567431158e+307"),
        (Decimal("1E-400"), b"0.0"),  # below the smallest float: zero, as the column
    ],
)
def test_float_keeps_infinities_and_nan_given_as_such(value: Any, stored: bytes) -> None:
    assert codec_for(Float()).encode(value) == stored


@pytest.mark.parametrize(
    "value", [10**400, -(10**400), 2**1024, Decimal("1E+400"), Decimal("-1E+309")]
)
def test_float_refuses_numbers_beyond_its_range(value: Any) -> None:
    assert refusal(codec_for(Float()), value) == "number out of the range of a float"
    assert refusal(codec_for(Double()), value) == "number out of the range of a float"


@pytest.mark.parametrize(("value", "got"), [(True, "bool"), ("1.5", "str"), (None, "NoneType")])
def test_float_refuses_bools_and_strings(value: Any, got: str) -> None:
    assert refusal(codec_for(Float()), value) == f"expected float, got {got}"


def test_numeric_writes_the_columns_scale() -> None:
    codec = codec_for(Numeric(10, 2))
    assert codec.encode(Decimal("-12345678.90")) == b"-12345678.90"
    assert codec.encode(Decimal("1.5")) == b"1.50"
    assert codec.encode(Decimal("1.500")) == b"1.50"
    assert codec.encode(Decimal("1E+2")) == b"100.00"
    assert codec.encode(Decimal("0.000E+3")) == b"0.00"
    assert codec.encode(7) == b"7.00"
    assert codec.encode(-7) == b"-7.00"
    assert codec.encode(0.5) == b"0.50"
    assert codec.encode(0.1) == b"0.10"  # the float's shortest text, not its binary value
    assert codec.decode(b"1.50") == Decimal("1.50")
    assert str(codec.decode(b"1.5")) == "1.5"  # stored by earlier versions: read as stored
    as_float = codec_for(Numeric(10, 2, asdecimal=False))
    assert as_float.decode(b"1.50") == 1.5 and type(as_float.decode(b"1.50")) is float


class _Decimal(Decimal):
    """A Decimal subclass: not the hot path's exact class, the same value."""


def test_numeric_takes_decimal_subclasses() -> None:
    assert codec_for(Numeric(10, 2)).encode(_Decimal("1.5")) == b"1.50"
    assert codec_for(Numeric()).encode(_Decimal("1.5")) == b"1.5"


@pytest.mark.parametrize("zero", [Decimal("-0.00"), Decimal("-0"), Decimal("-0E-9"), -0.0, 0])
def test_numeric_zero_has_no_sign(zero: Any) -> None:
    assert codec_for(Numeric(10, 2)).encode(zero) == b"0.00"
    assert codec_for(Numeric(3)).encode(zero) == b"0"


@pytest.mark.parametrize(
    ("inner", "largest"),
    [
        (Numeric(10, 2), "99999999.99"),
        (Numeric(5), "99999"),
        (Numeric(2, 2), "0.99"),
        (Numeric(40, 10), "9" * 30 + "." + "9" * 10),
    ],
)
def test_numeric_precision_bound(inner: Any, largest: str) -> None:
    codec = codec_for(inner)
    scale = inner.scale or 0
    for sign in ("", "-"):
        assert codec.encode(Decimal(sign + largest)) == (sign + largest).encode()
        assert len(codec.encode(Decimal(sign + largest))) <= (codec.max_size or 0)
        beyond = Decimal(sign + largest) + (Decimal(1).scaleb(-scale) * (-1 if sign else 1))
        with pytest.raises(ValueTooLongError) as info:
            codec.encode(beyond)
        assert info.value.reason == (
            f"number has more than {inner.precision - scale} digits before the point; "
            f"the column holds Numeric({inner.precision}, {scale})"
        )


@pytest.mark.parametrize(
    ("inner", "value"),
    [
        (Numeric(10, 2), Decimal("123.456")),
        (Numeric(10, 2), Decimal("0.001")),
        (Numeric(10, 2), Decimal("-0.001")),
        (Numeric(10, 2), 0.125),
        (Numeric(5), Decimal("1.5")),
        (Numeric(5), 0.5),
        (Numeric(40, 10), Decimal("1." + "0" * 10 + "1")),
    ],
)
def test_numeric_refuses_digits_beyond_the_scale(inner: Any, value: Any) -> None:
    codec = codec_for(inner)
    with pytest.raises(EncryptionError) as info:
        codec.encode(value)
    assert not isinstance(info.value, ValueTooLongError)
    assert info.value.reason == (
        f"number has more than {inner.scale or 0} digits after the point; the column would round it"
    )


@pytest.mark.parametrize(
    "value",
    [
        Decimal("1E+5000"),
        Decimal("-1E+999999"),
        10**40,
        pytest.param(10**5000, id="10**5000"),
        1e300,
    ],
)
def test_numeric_refuses_huge_values_before_writing_their_digits(value: Any) -> None:
    with pytest.raises(ValueTooLongError):
        codec_for(Numeric(10, 2)).encode(value)


@pytest.mark.parametrize(
    "value",
    [
        Decimal("NaN"),
        Decimal("-sNaN"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        math.inf,
        math.nan,
    ],
)
def test_numeric_with_precision_refuses_non_finite_numbers(value: Any) -> None:
    assert refusal(codec_for(Numeric(10, 2)), value) == (
        "number is not finite; the column holds finite numbers only"
    )


def test_numeric_without_precision_keeps_the_value_as_given() -> None:
    codec = codec_for(Numeric())
    for value, stored in [
        (Decimal("123.456"), b"123.456"),
        (Decimal("1E+5000"), b"1E+5000"),
        (Decimal("1.5"), b"1.5"),
        (Decimal("-0.00"), b"-0.00"),
        (Decimal("NaN"), b"NaN"),
        (7, b"7"),
        (1e16, b"1e+16"),
        (0.1, b"0.1"),
    ]:
        assert codec.encode(value) == stored
    # a scale without a precision is not in the DDL either (NUMERIC)
    assert codec_for(Numeric(scale=2)).encode(Decimal("1.234")) == b"1.234"


@pytest.mark.parametrize("inner", [Numeric(10, 2), Numeric()])
@pytest.mark.parametrize(
    ("value", "got"), [(True, "bool"), (False, "bool"), ("1.50", "str"), (None, "NoneType")]
)
def test_numeric_refuses_bools_and_strings(inner: Any, value: Any, got: str) -> None:
    assert refusal(codec_for(inner), value) == f"expected Decimal, got {got}"


def test_numeric_text_bound_without_precision() -> None:
    codec = codec_for(Numeric())
    assert codec.max_size == 128
    assert codec.encode(Decimal("9" * 128)) == b"9" * 128
    assert codec.encode(-(10**126)) == b"-1" + b"0" * 126
    for value in (Decimal("9" * 129), -(10**127)):
        with pytest.raises(ValueTooLongError) as info:
            codec.encode(value)
        assert info.value.reason == "number has 129 digits and signs; too many"
    with pytest.raises(ValueTooLongError) as info:
        codec.encode(10**5000)  # beyond the digits str(int) converts
    assert info.value.reason == "number has 5001 digits and signs; too many"


# -- booleans ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "stored"), [(True, b"\x01"), (1, b"\x01"), (False, b"\x00"), (0, b"\x00")]
)
def test_boolean_encoding(value: Any, stored: bytes) -> None:
    codec = codec_for(Boolean())
    assert codec.encode(value) == stored
    assert codec.decode(stored) is bool(value)


@pytest.mark.parametrize(
    ("value", "got"), [(2, "int"), (-1, "int"), ("true", "str"), (None, "NoneType")]
)
def test_boolean_refuses_other_values(value: Any, got: str) -> None:
    assert refusal(codec_for(Boolean()), value) == f"expected bool, got {got}"


@pytest.mark.parametrize("stored", [b"\x02", b"1", b"", b"\x01\x00"])
def test_boolean_refuses_other_stored_bytes(stored: bytes) -> None:
    with pytest.raises(ValueError, match=r"^not a boolean$"):
        codec_for(Boolean()).decode(stored)


def test_boolean_legacy_text() -> None:
    codec = codec_for(Boolean())
    assert codec.legacy_text(True) == b"1"
    assert codec.legacy_text(1) == b"1"
    assert codec.legacy_text(False) == b"0"
    assert codec.legacy_text(0) == b"0"
    with pytest.raises(EncryptionError):
        codec.legacy_text(2)


@pytest.mark.parametrize(
    ("spelling", "value"),
    [
        *[(s, True) for s in ("1", "t", "true", "y", "yes", "on", " TRUE ", "Yes")],
        *[(s, False) for s in ("0", "f", "false", "n", "no", "off", " FALSE\n", "No")],
    ],
)
def test_boolean_legacy_spellings(spelling: str, value: bool) -> None:
    codec = codec_for(Boolean())
    assert codec.from_legacy(spelling) is value
    assert codec.from_legacy(spelling.encode()) is value


@pytest.mark.parametrize("spelling", ["2", "truth", "nope", "", "yes please", "oui"])
def test_boolean_legacy_refuses_other_spellings(spelling: str) -> None:
    with pytest.raises(ValueError, match=r"^not a boolean$"):
        codec_for(Boolean()).from_legacy(spelling)


# -- dates and times ------------------------------------------------------------------

KST = dt.timezone(dt.timedelta(hours=9))


def test_datetime_refuses_a_date_and_other_types() -> None:
    codec = codec_for(DateTime())
    assert refusal(codec, dt.date(2024, 2, 29)) == "expected datetime, got date"
    assert refusal(codec, "2024-02-29T10:30:00") == "expected datetime, got str"
    assert refusal(codec, dt.time(10, 30)) == "expected datetime, got time"


def test_datetime_encoding() -> None:
    codec = codec_for(DateTime(timezone=True))
    value = dt.datetime(2024, 1, 31, 23, 59, 59, 999999, tzinfo=KST)
    assert codec.encode(value) == b"2024-01-31T23:59:59.999999+09:00"
    assert codec.decode(codec.encode(value)) == value


def test_date_takes_the_date_of_a_datetime() -> None:
    codec = codec_for(Date())
    assert codec.encode(dt.date(2024, 2, 29)) == b"2024-02-29"
    assert codec.encode(dt.datetime(2024, 2, 29, 23, 59)) == b"2024-02-29"
    assert codec.decode(b"2024-02-29") == dt.date(2024, 2, 29)
    assert refusal(codec, "2024-02-29") == "expected date, got str"
    assert refusal(codec, dt.time(1, 2)) == "expected date, got time"


def test_time_refuses_datetimes_and_other_types() -> None:
    codec = codec_for(Time())
    assert codec.encode(dt.time(10, 30, 0, 5)) == b"10:30:00.000005"
    assert codec.decode(b"10:30:00.000005") == dt.time(10, 30, 0, 5)
    assert refusal(codec, dt.datetime(2024, 1, 1, 10, 30)) == "expected time, got datetime"
    assert refusal(codec, "10:30") == "expected time, got str"


# -- UUIDs -------------------------------------------------------------------------------


def test_uuid_encoding() -> None:
    codec = codec_for(Uuid())
    assert codec.encode(UID) == UID.bytes
    assert codec.encode(str(UID)) == UID.bytes
    assert codec.decode(UID.bytes) == UID
    assert codec_for(Uuid(as_uuid=False)).decode(UID.bytes) == str(UID)
    assert codec.legacy_text(UID) == str(UID).encode()
    assert codec.legacy_text(str(UID).upper()) == str(UID).encode()


def test_uuid_refusals() -> None:
    codec = codec_for(Uuid())
    assert refusal(codec, "not-a-uuid") == "string is not a UUID"
    assert refusal(codec, UID.int) == "expected uuid.UUID, got int"
    assert refusal(codec, UID.bytes) == "expected uuid.UUID, got bytes"


# -- JSON ----------------------------------------------------------------------------------


def test_json_is_compact_and_keeps_non_ascii() -> None:
    codec = codec_for(JSON())
    assert codec.encode({"이름": "김민지", "a": [1, 2.5, None, True]}) == (
        '{"이름":"김민지","a":[1,2.5,null,true]}'.encode()
    )
    assert codec.decode('{"é":[1]}'.encode()) == {"é": [1]}


@pytest.mark.parametrize(
    ("value", "error"),
    [(math.nan, "ValueError"), ({"x": math.inf}, "ValueError"), ({1, 2}, "TypeError")],
)
def test_json_refuses_what_json_cannot_hold(value: Any, error: str) -> None:
    assert refusal(codec_for(JSON()), value) == f"value is not JSON serializable ({error})"


# -- binary ------------------------------------------------------------------------------


def test_binary_takes_bytes_like_values() -> None:
    codec = codec_for(LargeBinary(4))
    for value in (b"\x00\xff\x00\xff", bytearray(b"ab"), memoryview(b"abc")):
        encoded = codec.encode(value)
        assert encoded == bytes(value) and type(encoded) is bytes
    # a driver may return a bytearray or memoryview: the value is bytes all the same
    assert type(codec.decode(bytearray(b"ab"))) is bytes  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "got"), [(5, "int"), ("abcd", "str"), ([1, 2], "list"), (None, "NoneType")]
)
def test_binary_refuses_other_types(value: Any, got: str) -> None:
    # bytes(5) would be five zero bytes: an int must never get that far
    for inner in (LargeBinary(), LargeBinary(10)):
        assert refusal(codec_for(inner), value) == f"expected bytes, got {got}"


def test_binary_length_bound() -> None:
    codec = codec_for(LargeBinary(4))
    assert codec.encode(b"1234") == b"1234"
    with pytest.raises(ValueTooLongError) as info:
        codec.encode(b"12345")
    assert info.value.reason == "value has 5 bytes; the column holds at most 4"
    assert codec_for(LargeBinary()).encode(bytes(100_000)) == bytes(100_000)


# -- legacy plaintext ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inner", "raw", "want"),
    [
        (Float(), 1.5, 1.5),
        (Float(), 1e300, 1e300),
        (Numeric(10, 2), 0.25, Decimal("0.25")),
        (Uuid(), UID, UID),
        (Uuid(as_uuid=False), UID, str(UID)),
        (Time(), dt.time(10, 30), dt.time(10, 30)),
        (DateTime(), dt.datetime(2024, 2, 29, 10, 30), dt.datetime(2024, 2, 29, 10, 30)),
        (JSON(), {"이름": "김민지"}, {"이름": "김민지"}),
        (JSON(), ["é", 1], ["é", 1]),
        (String(10), "김민지", "김민지"),
        (String(10), "김민지".encode(), "김민지"),
        (String(10), memoryview("é".encode()), "é"),
        (Integer(), 7, 7),
        (Boolean(), True, True),
        (Enum(Color), "RED", Color.RED),
    ],
)
def test_from_legacy_of_native_values(inner: Any, raw: Any, want: Any) -> None:
    got = codec_for(inner).from_legacy(raw)
    assert got == want and type(got) is type(want)


def test_legacy_text_of_the_other_types_is_their_encoding() -> None:
    value = Decimal("1.50")
    codec = codec_for(Numeric(10, 2))
    assert codec.legacy_text(value) == codec.encode(value) == b"1.50"
