"""Turning the Python values of an inner type into bytes and back, exactly.

Each supported inner type has a :class:`Codec`: ``encode`` checks the value
the way the database would (type, declared length, integer range) and returns
the bytes that are encrypted; ``decode`` gives back an equal value of the
same Python type; ``max_size`` is the most bytes ``encode`` can return for
that declared type (``None``: unbounded), from which the column's DDL size is
computed. A codec pickles as the inner type it was made for (unpickling makes
it again with :func:`codec_for`), so its functions can stay closures, the
fastest form for the per-value calls.

Example::

    >>> from decimal import Decimal
    >>> from sqlalchemy import Numeric, String
    >>> codec = codec_for(Numeric(10, 2))
    >>> codec.decode(codec.encode(Decimal("1.5")))
    Decimal('1.50')
    >>> codec.encode(Decimal("123.456"))
    Traceback (most recent call last):
    ...
    sqlalchemy_kms.errors.EncryptionError: ... more than 2 digits after the point; ...
    >>> codec_for(String(200)).max_size
    800
"""

from __future__ import annotations

import datetime as dt
import json
import math
import operator
import uuid
from collections.abc import Callable
from decimal import Context, Decimal, Inexact, InvalidOperation
from typing import Any

from sqlalchemy import types as sqltypes

from .errors import ConfigurationError, EncryptionError, ValueTooLongError

__all__ = ["SUPPORTED_TYPES", "Codec", "codec_for"]

SUPPORTED_TYPES = (
    "String, Text, Unicode, UnicodeText, Enum, Integer, SmallInteger, BigInteger, Float, "
    "Double, Numeric, Boolean, Date, DateTime, Time, Uuid, JSON, LargeBinary"
)


class Codec:
    """Encoder and decoder of one inner type.

    ``legacy_text`` is the text a plaintext value of the inner type is
    written as when a column is decrypted back to plaintext (and what
    :meth:`from_legacy` parses when a plaintext column is encrypted).
    """

    __slots__ = ("_parse_legacy", "decode", "encode", "inner", "legacy_text", "max_size", "name")

    def __init__(
        self,
        name: str,
        encode: Callable[[Any], bytes],
        decode: Callable[[bytes], Any],
        max_size: int | None,
        legacy_text: Callable[[Any], bytes] | None = None,
        parse_legacy: Callable[[bytes], Any] | None = None,
    ) -> None:
        self.name = name
        self.encode = encode
        self.decode = decode
        self.max_size = max_size
        self.legacy_text = legacy_text or encode
        self._parse_legacy = parse_legacy or decode
        #: the inner type :func:`codec_for` made this codec for (how it pickles)
        self.inner: sqltypes.TypeEngine[Any] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        if self.inner is None:
            raise TypeError("only a codec made by codec_for() can be pickled")
        return (codec_for, (self.inner,))

    def from_legacy(self, raw: Any) -> Any:
        """The value of a plaintext cell as the database driver returned it.

        Accepts the column's old native values (``int``, ``date``, ...), its
        text, or that text as bytes (what a text column becomes after
        ``ALTER ... TYPE`` to binary). Raises ``ValueError`` if it cannot.
        """
        if isinstance(raw, (bytes, bytearray, memoryview)):
            data = bytes(raw)
        elif isinstance(raw, str):
            data = raw.encode("utf-8")
        elif isinstance(raw, float):
            data = repr(raw).encode("ascii")
        elif isinstance(raw, (dt.date, dt.time)):
            data = raw.isoformat().encode("ascii")
        elif isinstance(raw, uuid.UUID):
            data = str(raw).encode("ascii")
        elif isinstance(raw, (dict, list)):
            data = json.dumps(raw).encode("utf-8")
        else:
            data = str(raw).encode("utf-8")
        return self._parse_legacy(data)

    def __repr__(self) -> str:
        return f"<Codec {self.name} max_size={self.max_size}>"


def _wrong_type(value: object, expected: str) -> EncryptionError:
    return EncryptionError(f"expected {expected}, got {type(value).__name__}")


def _string_codec(inner: sqltypes.String) -> Codec:
    length = inner.length

    if length is None:

        def encode(value: Any) -> bytes:
            if not isinstance(value, str):
                raise _wrong_type(value, "str")
            return value.encode("utf-8")

    else:

        def encode(value: Any) -> bytes:
            if not isinstance(value, str):
                raise _wrong_type(value, "str")
            if len(value) > length:
                raise ValueTooLongError(
                    f"value has {len(value)} characters; the column holds at most {length}"
                )
            return value.encode("utf-8")

    decode = bytes.decode  # UTF-8, strict

    # UTF-8 needs at most 4 bytes per character
    return Codec(f"String({length})", encode, decode, None if length is None else 4 * length)


def _enum_codec(inner: sqltypes.Enum) -> Codec:
    # The stored text is what the plain Enum column stores: the entry of
    # ``inner.enums`` for the value, found by SQLAlchemy's own lookups (a member,
    # or that text given as a string); decoding returns what the plain column
    # returns for that text (the member for an enum class, else the string).
    # Unknown strings are refused even without validate_strings: no database
    # can check an encrypted value, and the plain column could not read it.
    stored = {
        key: text.encode("utf-8") for key, text in inner._valid_lookup.items() if text is not None
    }
    objects = {
        text.encode("utf-8"): value
        for text, value in inner._object_lookup.items()
        if text is not None
    }
    max_size = 4 * max((len(text) for text in inner.enums), default=1)

    def encode(value: Any) -> bytes:
        try:
            return stored[value]
        except (KeyError, TypeError):  # TypeError: unhashable, so not a member either
            if isinstance(value, str):
                raise EncryptionError("value is not one of the enumeration's members") from None
            raise _wrong_type(value, "a member of the enumeration") from None

    return Codec("Enum", encode, objects.__getitem__, max_size)


_INT_BITS = {sqltypes.SmallInteger: 16, sqltypes.BigInteger: 64}


def _integer_codec(inner: sqltypes.Integer) -> Codec:
    bits = 32
    for cls, size in _INT_BITS.items():
        if isinstance(inner, cls):
            bits = size
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def encode(value: Any) -> bytes:
        if isinstance(value, (float, Decimal)) or not hasattr(value, "__index__"):
            raise _wrong_type(value, "int")
        number = operator.index(value)
        if not low <= number <= high:
            raise EncryptionError(f"integer out of the {bits}-bit range of the column")
        return str(number).encode("ascii")

    def decode(raw: bytes) -> int:
        return int(raw)

    return Codec(f"Integer({bits})", encode, decode, len(str(low)))


def _float_codec(inner: sqltypes.Float[Any]) -> Codec:
    asdecimal = bool(inner.asdecimal)

    def encode(value: Any) -> bytes:
        if value.__class__ is float:
            return repr(value).encode("ascii")
        if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
            raise _wrong_type(value, "float")
        try:
            number = float(value)
        except OverflowError:  # an int beyond the range
            number = math.inf
        if math.isinf(number) and not (isinstance(value, float) or _is_infinite(value)):
            raise EncryptionError("number out of the range of a float")
        return repr(number).encode("ascii")

    def decode(raw: bytes) -> Any:
        text = raw.decode("ascii")
        return Decimal(text) if asdecimal else float(text)

    return Codec("Float", encode, decode, 32)


def _numeric_codec(inner: sqltypes.Numeric[Any]) -> Codec:
    asdecimal = bool(inner.asdecimal)
    precision = inner.precision

    def decode(raw: bytes) -> Any:
        number = Decimal(raw.decode("ascii"))
        return number if asdecimal else float(number)

    if precision is None:
        return Codec("Numeric", _unbounded_numeric, decode, _UNBOUNDED_NUMERIC)
    return Codec("Numeric", _bounded_numeric(precision, inner.scale or 0), decode, precision + 12)


# Numeric without a precision is PostgreSQL's unconstrained NUMERIC: values are
# kept exactly as given, up to this many characters of text.
_UNBOUNDED_NUMERIC = 128


def _as_decimal(value: Any) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))  # the float's shortest text, not its binary expansion
    raise _wrong_type(value, "Decimal")


def _unbounded_numeric(value: Any) -> bytes:
    if value.__class__ is Decimal:  # the common case first: this is the hot path
        text = str(value)
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(_as_decimal(value))
    if len(text) > _UNBOUNDED_NUMERIC:
        raise ValueTooLongError(f"number has {len(text)} digits and signs; too many")
    return text.encode("ascii")


def _bounded_numeric(precision: int, scale: int) -> Callable[[Any], bytes]:
    """The encoder of ``Numeric(precision, scale)`` (``NUMERIC(p)`` has scale 0).

    The value is written with exactly ``scale`` digits after the point, as the
    plain column returns it (``1.5`` is stored ``1.50``); a value the plain
    column would round (more digits after the point) or refuse (more than
    ``precision - scale`` before it) is refused instead.
    """
    step = Decimal(1).scaleb(-scale)
    zero = Decimal(0).quantize(step)
    # quantize raises Inexact when it would round, InvalidOperation when the
    # result needs more than ``precision`` digits; either is checked before any
    # digit of a huge exponent is written out
    exact = Context(prec=precision, traps=[Inexact, InvalidOperation])

    def encode(value: Any) -> bytes:
        number = value if value.__class__ is Decimal else _as_decimal(value)
        if not number.is_finite():
            raise EncryptionError("number is not finite; the column holds finite numbers only")
        try:
            number = number.quantize(step, None, exact)  # positional: 3x faster than context=
        except Inexact:
            raise EncryptionError(
                f"number has more than {scale} digits after the point; the column would round it"
            ) from None
        except InvalidOperation:
            raise ValueTooLongError(
                f"number has more than {precision - scale} digits before the point; the "
                f"column holds Numeric({precision}, {scale})"
            ) from None
        if not number:
            number = zero  # no negative zero: the column returns 0.00
        return str(number).encode("ascii")

    return encode


def _boolean_codec(inner: sqltypes.Boolean) -> Codec:
    def encode(value: Any) -> bytes:
        if value is True or value == 1:
            return b"\x01"
        if value is False or value == 0:
            return b"\x00"
        raise _wrong_type(value, "bool")

    def decode(raw: bytes) -> bool:
        if raw == b"\x01":
            return True
        if raw == b"\x00":
            return False
        raise ValueError("not a boolean")

    def legacy_text(value: Any) -> bytes:
        return b"1" if encode(value) == b"\x01" else b"0"

    return Codec("Boolean", encode, decode, 1, legacy_text, _legacy_boolean)


def _datetime_codec(inner: sqltypes.DateTime) -> Codec:
    def encode(value: Any) -> bytes:
        if not isinstance(value, dt.datetime):
            raise _wrong_type(value, "datetime")
        return value.isoformat().encode("ascii")

    def decode(raw: bytes) -> dt.datetime:
        return dt.datetime.fromisoformat(raw.decode("ascii"))

    # 2024-01-31T23:59:59.999999+14:00 (up to 32); +HH:MM:SS.ffffff offsets fit in 48
    return Codec("DateTime", encode, decode, 48)


def _date_codec(inner: sqltypes.Date) -> Codec:
    def encode(value: Any) -> bytes:
        if isinstance(value, dt.datetime):
            value = value.date()
        if not isinstance(value, dt.date):
            raise _wrong_type(value, "date")
        return value.isoformat().encode("ascii")

    def decode(raw: bytes) -> dt.date:
        return dt.date.fromisoformat(raw.decode("ascii"))

    return Codec("Date", encode, decode, 10)


def _time_codec(inner: sqltypes.Time) -> Codec:
    def encode(value: Any) -> bytes:
        if not isinstance(value, dt.time):
            raise _wrong_type(value, "time")
        return value.isoformat().encode("ascii")

    def decode(raw: bytes) -> dt.time:
        return dt.time.fromisoformat(raw.decode("ascii"))

    return Codec("Time", encode, decode, 40)


def _uuid_codec(inner: sqltypes.Uuid[Any]) -> Codec:
    as_uuid = bool(inner.as_uuid)

    def encode(value: Any) -> bytes:
        if isinstance(value, uuid.UUID):
            return value.bytes
        if isinstance(value, str):
            try:
                return uuid.UUID(value).bytes
            except ValueError:
                raise EncryptionError("string is not a UUID") from None
        raise _wrong_type(value, "uuid.UUID")

    def decode(raw: bytes) -> Any:
        value = uuid.UUID(bytes=raw)
        return value if as_uuid else str(value)

    def legacy_text(value: Any) -> bytes:
        return str(uuid.UUID(bytes=encode(value))).encode("ascii")

    def parse_legacy(data: bytes) -> Any:
        # a binary UUID column holds 16 bytes; a text one, the UUID's text
        value = uuid.UUID(bytes=data) if len(data) == 16 else uuid.UUID(data.decode("ascii"))
        return value if as_uuid else str(value)

    return Codec("Uuid", encode, decode, 16, legacy_text, parse_legacy)


def _json_codec(inner: sqltypes.JSON) -> Codec:
    def encode(value: Any) -> bytes:
        try:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise EncryptionError(
                f"value is not JSON serializable ({type(exc).__name__})"
            ) from None
        return text.encode("utf-8")

    def decode(raw: bytes) -> Any:
        return json.loads(raw)

    return Codec("JSON", encode, decode, None)


def _binary_codec(inner: sqltypes._Binary) -> Codec:
    length = inner.length

    def encode(value: Any) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise _wrong_type(value, "bytes")
        raw = bytes(value)
        if length is not None and len(raw) > length:
            raise ValueTooLongError(
                f"value has {len(raw)} bytes; the column holds at most {length}"
            )
        return raw

    def decode(raw: bytes) -> bytes:
        return bytes(raw)

    return Codec("LargeBinary", encode, decode, length)


def _is_infinite(value: Any) -> bool:
    return isinstance(value, Decimal) and value.is_infinite()


def _legacy_boolean(data: bytes) -> bool:
    text = data.decode("ascii").strip().lower()
    if text in ("1", "t", "true", "y", "yes", "on"):
        return True
    if text in ("0", "f", "false", "n", "no", "off"):
        return False
    raise ValueError("not a boolean")


# Order matters: Enum is a String, Float a Numeric, DateTime not a Date.
_FACTORIES: tuple[tuple[type[Any], Callable[[Any], Codec]], ...] = (
    (sqltypes.Enum, _enum_codec),
    (sqltypes.String, _string_codec),
    (sqltypes.Boolean, _boolean_codec),
    (sqltypes.Integer, _integer_codec),
    (sqltypes.Float, _float_codec),
    (sqltypes.Numeric, _numeric_codec),
    (sqltypes.DateTime, _datetime_codec),
    (sqltypes.Date, _date_codec),
    (sqltypes.Time, _time_codec),
    (sqltypes.Uuid, _uuid_codec),
    (sqltypes.JSON, _json_codec),
    (sqltypes._Binary, _binary_codec),
)


def codec_for(inner: sqltypes.TypeEngine[Any]) -> Codec:
    """The codec of an inner type instance; :class:`ConfigurationError` if unsupported."""
    for cls, factory in _FACTORIES:
        if isinstance(inner, cls):
            codec = factory(inner)
            codec.inner = inner
            return codec
    raise ConfigurationError(
        f"KMSEncrypted cannot encrypt {type(inner).__name__}; supported inner types: "
        f"{SUPPORTED_TYPES}"
    )
