"""Stored value format v1: known-answer vectors, a from-spec decoder, and rejection.

The vectors in ``tests/vectors/format_v1.json`` were computed by an
implementation written from ``docs/format.md`` alone
(``tests/vectors/generate_format_v1.py``). Here the library must produce
exactly those bytes, decrypt them, and produce values that a second,
from-spec decoder (``spec_decrypt`` below: standard-library HKDF plus raw
``cryptography`` AEADs) decrypts. Every kind of damage must be refused with
:class:`~sqlalchemy_kms.errors.InvalidCiphertextError`, never another error.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import JSON, Boolean, Integer, String, Text, Uuid, create_engine

from sqlalchemy_kms import KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms._cipher import (
    SUBKEY_ENCRYPTIONS,
    DataKeyCipher,
    derive_gcm_subkey,
    derive_siv_key,
)
from sqlalchemy_kms._format import (
    ALG_DETERMINISTIC,
    ALG_RANDOMIZED,
    DETERMINISTIC_OVERHEAD,
    HEADER_SIZE,
    MAX_KEY_VERSION,
    MAX_OVERHEAD,
    RANDOMIZED_OVERHEAD,
    column_aad,
    pack_header,
    parse_header,
)
from sqlalchemy_kms.errors import InvalidCiphertextError, UnknownKeyVersionError

VECTOR_DIR = Path(__file__).parent / "vectors"
ALGORITHM_IDS = {"randomized": ALG_RANDOMIZED, "deterministic": ALG_DETERMINISTIC}


@dataclass(frozen=True)
class Vector:
    description: str
    data_key: bytes
    key_version: int
    algorithm: str
    scope: str
    column: str
    salt: bytes | None
    nonce: bytes | None
    plaintext: bytes
    stored: bytes
    associated_data: bytes
    derived_key: bytes

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Vector:
        def unhex(name: str) -> bytes | None:
            return bytes.fromhex(raw[name]) if name in raw else None

        return cls(
            description=raw["description"],
            data_key=bytes.fromhex(raw["data_key"]),
            key_version=raw["key_version"],
            algorithm=raw["algorithm"],
            scope=raw["scope"],
            column=raw["column"],
            salt=unhex("salt"),
            nonce=unhex("nonce"),
            plaintext=bytes.fromhex(raw["plaintext"]),
            stored=bytes.fromhex(raw["stored"]),
            associated_data=bytes.fromhex(raw["associated_data"]),
            derived_key=bytes.fromhex(raw["derived_key"]),
        )

    @property
    def algorithm_id(self) -> int:
        return ALGORITHM_IDS[self.algorithm]

    @property
    def aad(self) -> bytes:
        return column_aad(self.scope, self.column)

    def cipher(self) -> DataKeyCipher:
        return DataKeyCipher(self.data_key, self.key_version, salt=self.salt)


def load_vectors() -> list[Vector]:
    document = json.loads((VECTOR_DIR / "format_v1.json").read_text(encoding="utf-8"))
    assert document["format_version"] == 1
    return [Vector.from_json(raw) for raw in document["vectors"]]


VECTORS = load_vectors()


def vectors(algorithm: str | None = None) -> pytest.MarkDecorator:
    """Parametrize a test over the vectors (of one algorithm), ids from descriptions."""
    chosen = [v for v in VECTORS if algorithm is None or v.algorithm == algorithm]
    return pytest.mark.parametrize("vector", chosen, ids=[v.description for v in chosen])


def library_encrypt(vector: Vector) -> bytes:
    cipher = vector.cipher()
    if vector.algorithm == "randomized":
        return cipher.encrypt(vector.plaintext, vector.aad, nonce=vector.nonce)
    return cipher.encrypt_deterministic(vector.plaintext, vector.scope, vector.column)


def library_decrypt(cipher: DataKeyCipher, stored: bytes, scope: str, column: str) -> bytes:
    """What a reader does: check the header, then authenticate and decrypt."""
    algorithm, _ = parse_header(stored)
    return cipher.decrypt(
        stored, column_aad(scope, column), algorithm=algorithm, scope=scope, column=column
    )


# -- a decoder written from docs/format.md ----------------------------------------


class SpecError(Exception):
    """The from-spec decoder refused a value."""


def hkdf_sha256(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    """RFC 5869 with HMAC-SHA256; no salt means 32 zero bytes."""
    prk = hmac.new(salt if salt else bytes(32), ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def spec_binding(scope: str, column: str) -> bytes:
    parts = [name.encode("utf-8") for name in (scope, column)]
    return b"".join(len(part).to_bytes(2, "big") + part for part in parts)


def spec_decrypt(stored: bytes, data_key: bytes, scope: str, column: str) -> bytes:
    if len(stored) < 6:
        raise SpecError("short")
    header = stored[:6]
    fmt, algorithm, key_version = header[0], header[1], int.from_bytes(header[2:6], "big")
    if fmt != 1 or key_version == 0:
        raise SpecError("header")
    ad = header + spec_binding(scope, column)
    if algorithm == 1:
        if len(stored) < 6 + 8 + 12 + 16:
            raise SpecError("truncated")
        salt, nonce, body = stored[6:14], stored[14:26], stored[26:]
        subkey = hkdf_sha256(data_key, salt, b"sqlalchemy-kms/v1/aes-256-gcm-subkey", 32)
        return AESGCM(subkey).decrypt(nonce, body, ad)
    if algorithm == 2:
        if len(stored) < 6 + 16:
            raise SpecError("truncated")
        info = b"sqlalchemy-kms/v1/aes-256-siv-column-key" + spec_binding(scope, column)
        key = hkdf_sha256(data_key, None, info, 64)
        return AESSIV(key).decrypt(stored[6:], [ad])
    raise SpecError("algorithm")


# -- known answers ---------------------------------------------------------------------


@vectors()
def test_library_encrypts_to_the_vector(vector: Vector) -> None:
    assert library_encrypt(vector).hex() == vector.stored.hex()


@vectors()
def test_library_decrypts_the_vector(vector: Vector) -> None:
    assert parse_header(vector.stored) == (vector.algorithm_id, vector.key_version)
    fresh = DataKeyCipher(vector.data_key, vector.key_version)  # another writer's salt
    assert library_decrypt(fresh, vector.stored, vector.scope, vector.column) == vector.plaintext


@vectors()
def test_spec_decoder_decrypts_the_vector(vector: Vector) -> None:
    assert spec_decrypt(vector.stored, vector.data_key, vector.scope, vector.column) == (
        vector.plaintext
    )


@vectors()
def test_spec_decoder_decrypts_library_output(vector: Vector) -> None:
    cipher = DataKeyCipher(vector.data_key, vector.key_version)  # random salt and nonce
    if vector.algorithm == "randomized":
        stored = cipher.encrypt(vector.plaintext, vector.aad)
        assert stored != cipher.encrypt(vector.plaintext, vector.aad)
    else:
        stored = cipher.encrypt_deterministic(vector.plaintext, vector.scope, vector.column)
        assert stored == vector.stored
    assert spec_decrypt(stored, vector.data_key, vector.scope, vector.column) == vector.plaintext


@vectors()
def test_intermediate_values(vector: Vector) -> None:
    header = pack_header(vector.algorithm_id, vector.key_version)
    assert vector.stored[:HEADER_SIZE] == header
    assert header + vector.aad == vector.associated_data
    assert vector.aad == spec_binding(vector.scope, vector.column)
    if vector.algorithm == "randomized":
        assert vector.salt is not None
        derived = derive_gcm_subkey(vector.data_key, vector.salt)
        assert vector.stored[6:14] == vector.salt
        assert vector.stored[14:26] == vector.nonce
    else:
        derived = derive_siv_key(vector.data_key, vector.scope, vector.column)
    assert derived == vector.derived_key


@vectors()
def test_overhead(vector: Vector) -> None:
    overhead = {"randomized": RANDOMIZED_OVERHEAD, "deterministic": DETERMINISTIC_OVERHEAD}
    assert len(vector.stored) == len(vector.plaintext) + overhead[vector.algorithm]


def test_overhead_constants_and_column_size() -> None:
    assert (RANDOMIZED_OVERHEAD, DETERMINISTIC_OVERHEAD, MAX_OVERHEAD) == (42, 22, 42)
    assert KMSEncrypted(String(200)).max_stored_size == 4 * 200 + 42
    assert KMSEncrypted(String(20), deterministic=True).max_stored_size == 80 + 42
    assert KMSEncrypted(Integer).max_stored_size == len("-2147483648") + 42
    assert KMSEncrypted(Boolean).max_stored_size == 1 + 42
    assert KMSEncrypted(Uuid).max_stored_size == 16 + 42
    assert KMSEncrypted(Text).max_stored_size is None
    assert KMSEncrypted(JSON).max_stored_size is None


def test_vectors_file_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location(
        "generate_format_v1", VECTOR_DIR / "generate_format_v1.py"
    )
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.render() == (VECTOR_DIR / "format_v1.json").read_text(encoding="utf-8")


def test_vectors_cover_what_the_format_needs() -> None:
    algorithms = {v.algorithm for v in VECTORS}
    assert algorithms == {"randomized", "deterministic"}
    for algorithm in algorithms:
        chosen = [v for v in VECTORS if v.algorithm == algorithm]
        assert any(not v.plaintext for v in chosen)
        assert any(v.key_version > 255 for v in chosen)
        assert any("." in v.scope for v in chosen)
        assert any(len(v.plaintext) > 64 for v in chosen)


def test_column_binding_encoding() -> None:
    assert column_aad("patients", "name").hex() == "000870617469656e747300046e616d65"
    # lengths count UTF-8 bytes, not characters
    assert column_aad("환자", "") == b"\x00\x06" + "환자".encode() + b"\x00\x00"
    # the length prefix keeps ("ab", "c") and ("a", "bc") apart
    assert column_aad("ab", "c") != column_aad("a", "bc")
    with pytest.raises(ValueError):
        column_aad("x" * 0x10000, "c")


def test_subkey_changes_after_subkey_encryptions() -> None:
    vector = VECTORS[0]
    assert vector.algorithm == "randomized" and vector.salt is not None
    cipher = vector.cipher()
    salts = {cipher.encrypt(b"", b"")[6:14] for _ in range(SUBKEY_ENCRYPTIONS)}
    assert salts == {vector.salt}
    after = cipher.encrypt(b"x", vector.aad)
    assert after[6:14] != vector.salt
    assert library_decrypt(cipher, after, vector.scope, vector.column) == b"x"
    assert spec_decrypt(after, vector.data_key, vector.scope, vector.column) == b"x"


# -- rejection -----------------------------------------------------------------------


@vectors()
def test_every_single_byte_flip_is_rejected(vector: Vector) -> None:
    cipher = vector.cipher()
    for position in range(len(vector.stored)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(vector.stored)
            damaged[position] ^= mask
            # a flip in bytes 2..5 names another key version; this cipher still
            # fails, because the header is part of the associated data
            with pytest.raises(InvalidCiphertextError):
                library_decrypt(cipher, bytes(damaged), vector.scope, vector.column)


@vectors()
def test_swapping_the_algorithm_id_is_rejected(vector: Vector) -> None:
    other = ALG_DETERMINISTIC if vector.algorithm_id == ALG_RANDOMIZED else ALG_RANDOMIZED
    swapped = vector.stored[:1] + bytes([other]) + vector.stored[2:]
    if len(swapped) >= {ALG_RANDOMIZED: 42, ALG_DETERMINISTIC: 22}[other]:
        assert parse_header(swapped) == (other, vector.key_version)
    with pytest.raises(InvalidCiphertextError):
        library_decrypt(vector.cipher(), swapped, vector.scope, vector.column)


@vectors()
def test_every_truncation_is_rejected(vector: Vector) -> None:
    cipher = vector.cipher()
    for length in range(len(vector.stored)):
        with pytest.raises(InvalidCiphertextError):
            library_decrypt(cipher, vector.stored[:length], vector.scope, vector.column)
    with pytest.raises(InvalidCiphertextError):
        library_decrypt(cipher, vector.stored + b"\x00", vector.scope, vector.column)


@vectors()
def test_wrong_scope_or_column_is_rejected(vector: Vector) -> None:
    cipher = vector.cipher()
    for scope, column in [
        (vector.scope, vector.column + "_x"),
        (vector.scope + "_x", vector.column),
        (vector.column, vector.scope),
        ("other." + vector.scope, vector.column),
    ]:
        with pytest.raises(InvalidCiphertextError):
            library_decrypt(cipher, vector.stored, scope, column)
    if vector.algorithm == "deterministic":
        # right key derivation, wrong associated data
        with pytest.raises(InvalidCiphertextError):
            cipher.decrypt(
                vector.stored,
                column_aad(vector.scope, "other"),
                algorithm=ALG_DETERMINISTIC,
                scope=vector.scope,
                column=vector.column,
            )


@vectors()
def test_wrong_data_key_is_rejected(vector: Vector) -> None:
    wrong = DataKeyCipher(bytes(b ^ 0x01 for b in vector.data_key), vector.key_version)
    with pytest.raises(InvalidCiphertextError):
        library_decrypt(wrong, vector.stored, vector.scope, vector.column)


@pytest.mark.parametrize("fmt", [0x00, 0x02, 0x10, 0xFF])
def test_parse_header_rejects_unknown_format_version(fmt: int) -> None:
    stored = bytes([fmt]) + VECTORS[0].stored[1:]
    with pytest.raises(InvalidCiphertextError, match=f"unknown format version {fmt}"):
        parse_header(stored)


@pytest.mark.parametrize("algorithm", [0x00, 0x03, 0x80, 0xFF])
def test_parse_header_rejects_unknown_algorithm(algorithm: int) -> None:
    stored = b"\x01" + bytes([algorithm]) + VECTORS[0].stored[2:]
    with pytest.raises(InvalidCiphertextError, match=f"unknown algorithm {algorithm}"):
        parse_header(stored)


@pytest.mark.parametrize("algorithm", [ALG_RANDOMIZED, ALG_DETERMINISTIC])
@pytest.mark.parametrize("key_version", [0, 0x80000000, 0xFFFFFFFF])
def test_parse_header_rejects_key_versions_out_of_range(algorithm: int, key_version: int) -> None:
    stored = bytes([1, algorithm]) + key_version.to_bytes(4, "big") + bytes(64)
    with pytest.raises(InvalidCiphertextError, match=f"key version {key_version}"):
        parse_header(stored)


@pytest.mark.parametrize(
    ("algorithm", "minimum"),
    [(ALG_RANDOMIZED, RANDOMIZED_OVERHEAD), (ALG_DETERMINISTIC, DETERMINISTIC_OVERHEAD)],
)
def test_parse_header_size_limits(algorithm: int, minimum: int) -> None:
    header = pack_header(algorithm, 1)
    for size in range(minimum):
        with pytest.raises(InvalidCiphertextError):
            parse_header((header + bytes(minimum))[:size])
    assert parse_header(header + bytes(minimum - HEADER_SIZE)) == (algorithm, 1)


def test_pack_header_layout_and_range() -> None:
    assert pack_header(ALG_RANDOMIZED, 7).hex() == "010100000007"
    assert pack_header(ALG_DETERMINISTIC, 300).hex() == "01020000012c"
    assert MAX_KEY_VERSION == 2**31 - 1  # the key table's signed 32-bit INTEGER
    assert pack_header(ALG_RANDOMIZED, MAX_KEY_VERSION).hex() == "01017fffffff"
    assert parse_header(pack_header(ALG_RANDOMIZED, MAX_KEY_VERSION) + bytes(36)) == (
        ALG_RANDOMIZED,
        MAX_KEY_VERSION,
    )
    for bad in (0, -1, 2**31, 2**32 - 1, 2**32, 2**40):
        with pytest.raises(ValueError, match="key version"):
            pack_header(ALG_RANDOMIZED, bad)
    with pytest.raises(ValueError):
        DataKeyCipher(bytes(32), 0)


def test_vault_reports_unknown_key_versions_and_damage() -> None:
    engine = create_engine("sqlite://")
    vault = KeyVault(engine, LocalKms(bytes(32)))
    try:
        vault.create_table()
        assert vault.create_key("patients") == 1
        aad = column_aad("patients", "name")
        stored = vault.encrypt("patients", aad, b"Kim Minji")
        assert parse_header(stored) == (ALG_RANDOMIZED, 1)
        assert vault.decrypt("patients", "name", aad, stored) == b"Kim Minji"

        version_3 = stored[:2] + (3).to_bytes(4, "big") + stored[6:]
        with pytest.raises(UnknownKeyVersionError) as info:
            vault.decrypt("patients", "name", aad, version_3)
        assert info.value.key_version == 3
        version_0 = stored[:2] + bytes(4) + stored[6:]
        with pytest.raises(InvalidCiphertextError):
            vault.decrypt("patients", "name", aad, version_0)
        as_deterministic = stored[:1] + bytes([ALG_DETERMINISTIC]) + stored[2:]
        with pytest.raises((UnknownKeyVersionError, InvalidCiphertextError)):
            vault.decrypt("patients", "name", aad, as_deterministic)
        tampered = stored[:-1] + bytes([stored[-1] ^ 0x01])
        with pytest.raises(InvalidCiphertextError):
            vault.decrypt("patients", "name", aad, tampered)
        with pytest.raises(InvalidCiphertextError):
            vault.decrypt("patients", "email", column_aad("patients", "email"), stored)
    finally:
        vault.close()
        engine.dispose()


# -- properties ------------------------------------------------------------------------

PROPERTY_KEY = bytes(range(100, 132))
PROPERTY_CIPHER = DataKeyCipher(PROPERTY_KEY, 5)
names = st.text(min_size=1, max_size=40)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plaintext=st.binary(max_size=2048), scope=names, column=names, deterministic=st.booleans())
def test_random_plaintexts_round_trip(
    plaintext: bytes, scope: str, column: str, deterministic: bool
) -> None:
    cipher = PROPERTY_CIPHER
    if deterministic:
        stored = cipher.encrypt_deterministic(plaintext, scope, column)
        assert len(stored) == len(plaintext) + DETERMINISTIC_OVERHEAD
        assert stored == cipher.encrypt_deterministic(plaintext, scope, column)
    else:
        stored = cipher.encrypt(plaintext, column_aad(scope, column))
        assert len(stored) == len(plaintext) + RANDOMIZED_OVERHEAD
    assert library_decrypt(cipher, stored, scope, column) == plaintext
    assert spec_decrypt(stored, PROPERTY_KEY, scope, column) == plaintext


headers = st.builds(
    lambda algorithm, version: bytes([1, algorithm]) + version.to_bytes(4, "big"),
    st.sampled_from([ALG_RANDOMIZED, ALG_DETERMINISTIC, 0, 3]),
    st.one_of(st.just(5), st.integers(0, 2**32 - 1)),
)
garbage = st.one_of(
    st.binary(max_size=128),
    st.builds(lambda header, body: header + body, headers, st.binary(max_size=128)),
)


@settings(max_examples=500, deadline=None)
@given(stored=garbage)
def test_random_bytes_never_raise_anything_else(stored: bytes) -> None:
    try:
        plaintext = library_decrypt(PROPERTY_CIPHER, stored, "patients", "name")
    except InvalidCiphertextError:
        return
    assert isinstance(plaintext, bytes)  # a forgery: practically never reached


@settings(max_examples=100, deadline=None)
@given(
    plaintext=st.binary(max_size=64),
    position=st.integers(0, 10**6),
    mask=st.integers(1, 255),
    deterministic=st.booleans(),
)
def test_random_damage_to_fresh_values_is_rejected(
    plaintext: bytes, position: int, mask: int, deterministic: bool
) -> None:
    cipher = PROPERTY_CIPHER
    if deterministic:
        stored = cipher.encrypt_deterministic(plaintext, "patients", "name")
    else:
        stored = cipher.encrypt(plaintext, column_aad("patients", "name"))
    damaged = bytearray(stored)
    damaged[position % len(stored)] ^= mask
    with pytest.raises(InvalidCiphertextError):
        library_decrypt(cipher, bytes(damaged), "patients", "name")
