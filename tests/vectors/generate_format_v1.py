"""Generate ``format_v1.json``: known-answer vectors for stored value format v1.

This is an independent implementation of ``docs/format.md``: it uses only
``cryptography``'s HKDF, AES-GCM and AES-SIV primitives and the standard
library, never ``sqlalchemy_kms``, so the vectors check the library against
the specification rather than against itself. Every input (data key, salt,
nonce) is fixed, so running it again writes the same file::

    python tests/vectors/generate_format_v1.py            # rewrite format_v1.json
    python tests/vectors/generate_format_v1.py --check    # exit 1 if the file differs

``tests/test_format.py`` checks that the library produces exactly these
bytes and decrypts them.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

OUTPUT = Path(__file__).with_name("format_v1.json")

FORMAT_VERSION = 0x01
ALGORITHMS = {"randomized": 0x01, "deterministic": 0x02}
GCM_SUBKEY_INFO = b"sqlalchemy-kms/v1/aes-256-gcm-subkey"
SIV_KEY_INFO = b"sqlalchemy-kms/v1/aes-256-siv-column-key"


# -- the format, from the specification ------------------------------------------


def header(algorithm: str, key_version: int) -> bytes:
    """format version (1 byte) || algorithm (1 byte) || key version (u32, big-endian)."""
    return bytes([FORMAT_VERSION, ALGORITHMS[algorithm]]) + key_version.to_bytes(4, "big")


def length_prefixed(name: str) -> bytes:
    raw = name.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def binding(scope: str, column: str) -> bytes:
    """u16 len || scope || u16 len || column, UTF-8, lengths big-endian."""
    return length_prefixed(scope) + length_prefixed(column)


def gcm_subkey(data_key: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=32, salt=salt, info=GCM_SUBKEY_INFO).derive(data_key)


def siv_key(data_key: bytes, scope: str, column: str) -> bytes:
    info = SIV_KEY_INFO + binding(scope, column)
    return HKDF(algorithm=SHA256(), length=64, salt=None, info=info).derive(data_key)


def encrypt_randomized(
    data_key: bytes,
    key_version: int,
    scope: str,
    column: str,
    salt: bytes,
    nonce: bytes,
    plaintext: bytes,
) -> tuple[bytes, bytes, bytes]:
    """Return ``(stored, associated data, subkey)``."""
    head = header("randomized", key_version)
    ad = head + binding(scope, column)
    key = gcm_subkey(data_key, salt)
    return head + salt + nonce + AESGCM(key).encrypt(nonce, plaintext, ad), ad, key


def encrypt_deterministic(
    data_key: bytes, key_version: int, scope: str, column: str, plaintext: bytes
) -> tuple[bytes, bytes, bytes]:
    """Return ``(stored, associated data, column key)``."""
    head = header("deterministic", key_version)
    ad = head + binding(scope, column)
    key = siv_key(data_key, scope, column)
    return head + AESSIV(key).encrypt(plaintext, [ad]), ad, key


# -- the vectors ---------------------------------------------------------------------

KEY_A = bytes(range(32))
KEY_B = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
KEY_C = bytes.fromhex("c0ffee00" * 8)

NOTES = (
    "Follow-up in two weeks. Blood pressure 128/84, pulse 72. Continue current "
    "medication; review lipid panel at next visit. Patient asked about travel "
    "vaccinations (hepatitis A, typhoid) for a trip in March."
)


class Case(NamedTuple):
    description: str
    data_key: bytes
    key_version: int
    algorithm: str
    scope: str
    column: str
    plaintext: bytes
    salt: str = ""  # hex, randomized only
    nonce: str = ""  # hex, randomized only


PROFILE = {"city": "서울", "allergies": ["penicillin"], "age": 34}

CASES = [
    Case("randomized: short ASCII text", KEY_A, 1, "randomized", "patients", "name",
         b"Kim Minji", salt="a0a1a2a3a4a5a6a7", nonce="b0b1b2b3b4b5b6b7b8b9babb"),
    Case("randomized: empty plaintext", KEY_A, 1, "randomized", "patients", "notes",
         b"", salt="a0a1a2a3a4a5a6a7", nonce="000000000000000000000001"),
    Case("randomized: UTF-8 Korean text", KEY_A, 2, "randomized", "patients", "name",
         "김민지".encode(), salt="0011223344556677", nonce="8899aabbccddeeff00112233"),
    Case("randomized: longer value (a 203-byte note)", KEY_B, 1, "randomized", "visits", "notes",
         NOTES.encode(), salt="5a17c0de5a17c0de", nonce="0f0e0d0c0b0a090807060504"),
    Case("randomized: schema-qualified scope clinic.patients", KEY_B, 3, "randomized",
         "clinic.patients", "name",
         b"Lee Jiwoo", salt="1122334455667788", nonce="a1b2c3d4e5f60718293a4b5c"),
    Case("randomized: key version 300 (> 255)", KEY_C, 300, "randomized", "patients", "name",
         b"Park Seojun", salt="ffffffffffffffff", nonce="ffffffffffffffffffffffff"),
    Case("randomized: key version 0x01020304, integer encoding", KEY_C, 0x01020304,
         "randomized", "accounts", "balance",
         b"-42", salt="0102030405060708", nonce="090a0b0c0d0e0f1011121314"),
    Case("randomized: all 256 byte values (LargeBinary)", KEY_A, 7, "randomized", "files", "blob",
         bytes(range(256)), salt="deadbeefcafebabe", nonce="1234567890abcdef12345678"),
    Case("randomized: compact JSON with non-ASCII", KEY_B, 1, "randomized", "patients", "profile",
         json.dumps(PROFILE, separators=(",", ":"), ensure_ascii=False).encode(),
         salt="0000000000000000", nonce="000000000000000000000000"),
    Case("deterministic: short ASCII text", KEY_A, 1, "deterministic", "patients", "email",
         b"kim@example.com"),
    Case("deterministic: same plaintext, another column", KEY_A, 1, "deterministic",
         "patients", "email_backup", b"kim@example.com"),
    Case("deterministic: empty plaintext", KEY_A, 1, "deterministic", "patients", "email",
         b""),
    Case("deterministic: UTF-8 Korean text", KEY_A, 2, "deterministic", "patients", "name",
         "김민지".encode()),
    Case("deterministic: schema-qualified scope clinic.patients", KEY_B, 3, "deterministic",
         "clinic.patients", "ssn", b"900101-1234567"),
    Case("deterministic: key version 70000, 16-byte UUID", KEY_C, 70000, "deterministic",
         "orders", "customer_id", uuid.UUID("12345678-1234-5678-1234-567812345678").bytes),
    Case("deterministic: longer value (a 203-byte note)", KEY_B, 1, "deterministic", "visits",
         "notes", NOTES.encode()),
]  # fmt: skip


def build() -> dict[str, Any]:
    vectors = []
    for case in CASES:
        description, key, version, algorithm, scope, column, plaintext, salt, nonce = case
        assert len(key) == 32 and 1 <= version <= 2**31 - 1
        vector: dict[str, Any] = {
            "description": description,
            "data_key": key.hex(),
            "key_version": version,
            "algorithm": algorithm,
            "scope": scope,
            "column": column,
        }
        if algorithm == "randomized":
            stored, ad, derived = encrypt_randomized(
                key, version, scope, column, bytes.fromhex(salt), bytes.fromhex(nonce), plaintext
            )
            vector["salt"] = salt
            vector["nonce"] = nonce
        else:
            stored, ad, derived = encrypt_deterministic(key, version, scope, column, plaintext)
        vector["plaintext"] = plaintext.hex()
        vector["stored"] = stored.hex()
        vector["associated_data"] = ad.hex()
        vector["derived_key"] = derived.hex()
        vectors.append(vector)
    return {
        "format_version": 1,
        "comment": (
            "Known-answer vectors for the sqlalchemy-kms stored value format v1 "
            "(docs/format.md). All byte strings are lowercase hex. 'data_key' is the "
            "32-byte key the header's key version names: the table's data key for "
            "randomized values, its search key for deterministic values. 'derived_key' "
            "is the AES-256-GCM subkey (randomized) or the 64-byte AES-SIV column key "
            "(deterministic); 'associated_data' is header || column binding. "
            "Generated by generate_format_v1.py."
        ),
        "vectors": vectors,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT.name} differs from the generator's output", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
