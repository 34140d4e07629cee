"""Codecs: values of each inner type to bytes and back, and legacy plaintext parsing."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import JSON, Boolean, Date, DateTime, Integer, Numeric, String, Uuid

from sqlalchemy_kms._codecs import codec_for

UID = uuid.UUID("12345678-1234-5678-1234-567812345678")


@pytest.mark.parametrize(
    ("inner", "raw", "want"),
    [
        (String(20), "Kim", "Kim"),
        (String(20), b"Kim", "Kim"),
        (Integer(), 42, 42),
        (Integer(), b"42", 42),
        (Numeric(10, 2), Decimal("1.50"), Decimal("1.50")),
        (Numeric(10, 2), b"1.50", Decimal("1.50")),
        (Boolean(), b"true", True),
        (Boolean(), "f", False),
        (Boolean(), 1, True),
        (Date(), dt.date(2024, 2, 29), dt.date(2024, 2, 29)),
        (Date(), b"2024-02-29", dt.date(2024, 2, 29)),
        (DateTime(), b"2024-02-29 10:30:00", dt.datetime(2024, 2, 29, 10, 30)),
        (Uuid(), UID.bytes, UID),
        (Uuid(), str(UID).encode(), UID),
        (Uuid(as_uuid=False), str(UID), str(UID)),
        (JSON(), b'{"a": [1]}', {"a": [1]}),
    ],
)
def test_legacy_plaintext_is_parsed_into_the_inner_type(inner: Any, raw: Any, want: Any) -> None:
    got = codec_for(inner).from_legacy(raw)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize(
    ("inner", "value"),
    [
        (String(20), "김민지"),
        (Integer(), -7),
        (Boolean(), False),
        (Uuid(), UID),
        (Numeric(10, 2), Decimal("1.50")),
        (Date(), dt.date(2024, 2, 29)),
    ],
)
def test_legacy_text_parses_back_to_the_value(inner: Any, value: Any) -> None:
    codec = codec_for(inner)
    assert codec.from_legacy(codec.legacy_text(value)) == value


@pytest.mark.parametrize(
    ("inner", "raw"), [(Boolean(), b"maybe"), (Integer(), b"4x2"), (Uuid(), b"not-a-uuid")]
)
def test_unparseable_legacy_plaintext_is_a_value_error(inner: Any, raw: bytes) -> None:
    with pytest.raises(ValueError):
        codec_for(inner).from_legacy(raw)
