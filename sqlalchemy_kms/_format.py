"""The stored form of an encrypted value (format version 1).

Every stored value starts with a six-byte header that says how to decrypt it
without trying keys::

    offset  size  field
    0       1     format version            0x01
    1       1     algorithm                 0x01 randomized, 0x02 deterministic
    2       4     data key version          big-endian, 1 .. 2**31 - 1

followed, for algorithm 0x01 (AES-256-GCM under a derived subkey), by::

    6       8     subkey salt
    14      12    nonce
    26      n+16  AES-GCM ciphertext and tag

and, for algorithm 0x02 (AES-256-SIV, deterministic), by::

    6       n+16  AES-SIV output (synthetic IV, then ciphertext)

The associated data of both algorithms is the six header bytes followed by
the column binding (:func:`column_aad`), so the header is authenticated and a
value copied to another column or table does not decrypt.

``docs/format.md`` is the full specification; ``tests/vectors/`` holds
known-answer vectors for it.

Example::

    >>> header = pack_header(ALG_RANDOMIZED, 7)
    >>> header.hex()
    '010100000007'
    >>> parse_header(header + bytes(40))
    (1, 7)
"""

from __future__ import annotations

import struct
from typing import Final

from .errors import InvalidCiphertextError

FORMAT_VERSION: Final = 1
ALG_RANDOMIZED: Final = 0x01
ALG_DETERMINISTIC: Final = 0x02

HEADER_SIZE: Final = 6
SALT_SIZE: Final = 8
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
SIV_TAG_SIZE: Final = 16

#: A randomized value's header and salt: together they pick the subkey.
SUBKEY_PREFIX_SIZE: Final = HEADER_SIZE + SALT_SIZE
#: Where a randomized value's ciphertext (after header, salt and nonce) starts.
RANDOMIZED_CIPHERTEXT_OFFSET: Final = SUBKEY_PREFIX_SIZE + NONCE_SIZE

#: Bytes a randomized value adds to its plaintext.
RANDOMIZED_OVERHEAD: Final = HEADER_SIZE + SALT_SIZE + NONCE_SIZE + TAG_SIZE
#: Bytes a deterministic value adds to its plaintext.
DETERMINISTIC_OVERHEAD: Final = HEADER_SIZE + SIV_TAG_SIZE
#: The largest overhead of any algorithm: what a column must hold beyond the plaintext.
MAX_OVERHEAD: Final = max(RANDOMIZED_OVERHEAD, DETERMINISTIC_OVERHEAD)

#: Key versions are stored as a signed 32-bit INTEGER in the key table.
MAX_KEY_VERSION: Final = 0x7FFFFFFF

_HEADER = struct.Struct(">BBI")
_MIN_SIZE = {
    ALG_RANDOMIZED: RANDOMIZED_OVERHEAD,
    ALG_DETERMINISTIC: DETERMINISTIC_OVERHEAD,
}

#: HKDF ``info`` for the randomized algorithm's per-salt subkey.
GCM_SUBKEY_INFO: Final = b"sqlalchemy-kms/v1/aes-256-gcm-subkey"
#: HKDF ``info`` prefix for the deterministic algorithm's per-column key.
SIV_KEY_INFO: Final = b"sqlalchemy-kms/v1/aes-256-siv-column-key"


def pack_header(algorithm: int, key_version: int) -> bytes:
    """The six header bytes for ``algorithm`` under data key ``key_version``."""
    if not 1 <= key_version <= MAX_KEY_VERSION:
        raise ValueError(f"key version must be in 1..{MAX_KEY_VERSION}, not {key_version}")
    return _HEADER.pack(FORMAT_VERSION, algorithm, key_version)


def parse_header(stored: bytes) -> tuple[int, int]:
    """Return ``(algorithm, key_version)`` of a stored value, checking its size.

    Raises :class:`~sqlalchemy_kms.errors.InvalidCiphertextError` (without
    table and column; the caller adds them) for anything that is not a
    well-formed value of a known format version and algorithm.
    """
    if len(stored) < HEADER_SIZE:
        raise InvalidCiphertextError("value is too short to be a ciphertext")
    fmt, algorithm, key_version = _HEADER.unpack_from(stored)
    if fmt != FORMAT_VERSION:
        raise InvalidCiphertextError(f"unknown format version {fmt}")
    minimum = _MIN_SIZE.get(algorithm)
    if minimum is None:
        raise InvalidCiphertextError(f"unknown algorithm {algorithm}")
    if len(stored) < minimum:
        raise InvalidCiphertextError("value is truncated")
    if not 1 <= key_version <= MAX_KEY_VERSION:
        raise InvalidCiphertextError(f"key version {key_version} is out of range")
    return algorithm, key_version


def _length_prefixed(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("name too long")
    return len(raw).to_bytes(2, "big") + raw


def column_aad(scope: str, column: str) -> bytes:
    """The column binding: ``u16 len || scope || u16 len || column`` in UTF-8.

    ``scope`` is the table name, schema-qualified (``schema.table``) when the
    table has a schema.

    >>> column_aad("patients", "name").hex()
    '000870617469656e747300046e616d65'
    """
    return _length_prefixed(scope) + _length_prefixed(column)


def siv_key_info(scope: str, column: str) -> bytes:
    """HKDF ``info`` of the deterministic key of one column."""
    return SIV_KEY_INFO + column_aad(scope, column)
