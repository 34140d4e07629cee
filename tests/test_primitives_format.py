"""The stored format's constants, header checks and column binding, at their bounds.

The known-answer vectors in ``test_format.py`` pin the bytes; these tests pin
the numbers and the refusals one by one, so that a changed constant or a
check that is off by one fails with a message that names it.
"""

from __future__ import annotations

import pytest

from sqlalchemy_kms import _format
from sqlalchemy_kms._format import (
    ALG_DETERMINISTIC,
    ALG_RANDOMIZED,
    HEADER_SIZE,
    MAX_KEY_VERSION,
    column_aad,
    pack_header,
    parse_header,
    siv_key_info,
)
from sqlalchemy_kms.errors import InvalidCiphertextError


def test_constants_are_the_specs() -> None:
    # docs/format.md: every one of these is written into, or read from, stored values
    assert _format.FORMAT_VERSION == 1
    assert (_format.ALG_RANDOMIZED, _format.ALG_DETERMINISTIC) == (1, 2)
    assert _format.HEADER_SIZE == 6
    assert _format.SALT_SIZE == 8
    assert _format.NONCE_SIZE == 12
    assert _format.TAG_SIZE == 16
    assert _format.SIV_TAG_SIZE == 16
    assert _format.SUBKEY_PREFIX_SIZE == 14
    assert _format.RANDOMIZED_CIPHERTEXT_OFFSET == 26
    assert _format.RANDOMIZED_OVERHEAD == 42
    assert _format.DETERMINISTIC_OVERHEAD == 22
    assert _format.MAX_OVERHEAD == 42
    assert _format.MAX_KEY_VERSION == 2**31 - 1
    assert _format.GCM_SUBKEY_INFO == b"sqlalchemy-kms/v1/aes-256-gcm-subkey"
    assert _format.SIV_KEY_INFO == b"sqlalchemy-kms/v1/aes-256-siv-column-key"


# -- pack_header ---------------------------------------------------------------------


def test_pack_header_bytes() -> None:
    assert pack_header(ALG_RANDOMIZED, 1) == b"\x01\x01\x00\x00\x00\x01"
    assert pack_header(ALG_DETERMINISTIC, 0x01020304) == b"\x01\x02\x01\x02\x03\x04"
    assert pack_header(ALG_RANDOMIZED, 2**31 - 1) == b"\x01\x01\x7f\xff\xff\xff"


@pytest.mark.parametrize("key_version", [0, -1, 2**31, 2**32 - 1])
def test_pack_header_refuses_key_versions_out_of_range(key_version: int) -> None:
    with pytest.raises(ValueError) as info:
        pack_header(ALG_RANDOMIZED, key_version)
    assert str(info.value) == f"key version must be in 1..2147483647, not {key_version}"


# -- parse_header ----------------------------------------------------------------------


def reason(stored: bytes) -> str:
    with pytest.raises(InvalidCiphertextError) as info:
        parse_header(stored)
    assert (info.value.table, info.value.column) == (None, None)
    return info.value.reason


@pytest.mark.parametrize("size", [0, 1, 5])
def test_parse_header_too_short(size: int) -> None:
    assert reason(b"\x01\x01\x00\x00\x00\x01"[:size]) == "value is too short to be a ciphertext"


def test_a_bare_header_is_truncated_not_too_short() -> None:
    assert reason(pack_header(ALG_RANDOMIZED, 1)) == "value is truncated"
    assert reason(pack_header(ALG_DETERMINISTIC, 1)) == "value is truncated"


@pytest.mark.parametrize(("algorithm", "minimum"), [(ALG_RANDOMIZED, 42), (ALG_DETERMINISTIC, 22)])
def test_parse_header_minimum_sizes(algorithm: int, minimum: int) -> None:
    header = pack_header(algorithm, 9)
    assert parse_header(header + bytes(minimum - HEADER_SIZE)) == (algorithm, 9)
    assert reason(header + bytes(minimum - HEADER_SIZE - 1)) == "value is truncated"


@pytest.mark.parametrize("fmt", [0, 2, 255])
def test_parse_header_unknown_format_version(fmt: int) -> None:
    stored = bytes([fmt]) + pack_header(ALG_RANDOMIZED, 1)[1:] + bytes(40)
    assert reason(stored) == f"unknown format version {fmt}"


@pytest.mark.parametrize("algorithm", [0, 3, 255])
def test_parse_header_unknown_algorithm(algorithm: int) -> None:
    stored = bytes([1, algorithm]) + (1).to_bytes(4, "big") + bytes(40)
    assert reason(stored) == f"unknown algorithm {algorithm}"


@pytest.mark.parametrize("key_version", [0, 2**31, 2**32 - 1])
def test_parse_header_key_version_out_of_range(key_version: int) -> None:
    stored = bytes([1, ALG_RANDOMIZED]) + key_version.to_bytes(4, "big") + bytes(40)
    assert reason(stored) == f"key version {key_version} is out of range"


@pytest.mark.parametrize("key_version", [1, 2, MAX_KEY_VERSION - 1, MAX_KEY_VERSION])
def test_parse_header_key_versions_in_range(key_version: int) -> None:
    stored = pack_header(ALG_DETERMINISTIC, key_version) + bytes(16)
    assert parse_header(stored) == (ALG_DETERMINISTIC, key_version)


# -- the column binding ------------------------------------------------------------------


def test_column_binding_of_non_ascii_names() -> None:
    assert column_aad("환자", "이름") == (
        b"\x00\x06" + "환자".encode() + b"\x00\x06" + "이름".encode()
    )
    assert column_aad("", "") == b"\x00\x00\x00\x00"


def test_names_up_to_65535_utf8_bytes_are_bound() -> None:
    longest = "x" * 0xFFFF
    assert column_aad(longest, "c") == b"\xff\xff" + longest.encode() + b"\x00\x01c"
    # the bound counts bytes: 32768 two-byte characters are one byte too many
    almost = "é" * 32767 + "x"
    assert column_aad("t", almost)[3:6] == b"\xff\xff\xc3"
    for name in ("x" * 0x10000, "é" * 32768):
        with pytest.raises(ValueError) as info:
            column_aad("t", name)
        assert str(info.value) == "name too long"
        with pytest.raises(ValueError):
            column_aad(name, "c")


def test_siv_key_info_is_the_prefix_and_the_binding() -> None:
    assert siv_key_info("patients", "name") == (
        b"sqlalchemy-kms/v1/aes-256-siv-column-key"
        + bytes.fromhex("000870617469656e747300046e616d65")
    )
