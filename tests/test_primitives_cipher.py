"""DataKeyCipher at its bounds: subkey rotation, remembered subkeys, lengths, algorithms.

A writer keeps one salt (one subkey) for exactly 2**16 values; a reader
remembers at most 4,096 subkeys per data key; salts, nonces and data keys
of the wrong length are refused; a value is opened only by the algorithm
its header names. These tests call the cipher directly, with no database.
"""

from __future__ import annotations

import copy
import os
import pickle

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sqlalchemy_kms import _cipher
from sqlalchemy_kms._cipher import DataKeyCipher, derive_gcm_subkey
from sqlalchemy_kms._format import (
    ALG_DETERMINISTIC,
    ALG_RANDOMIZED,
    column_aad,
    pack_header,
    parse_header,
)
from sqlalchemy_kms.errors import InvalidCiphertextError

KEY = bytes(range(32))
SALT = bytes.fromhex("0011223344556677")
AAD = column_aad("patients", "name")


def salt_of(stored: bytes | bytearray) -> bytes:
    return bytes(stored[6:14])


def test_constants() -> None:
    assert _cipher.SUBKEY_ENCRYPTIONS == 65536
    assert _cipher.MAX_READER_SUBKEYS == 4096
    assert _cipher.DATA_KEY_SIZE == 32


# -- the writer's salt ---------------------------------------------------------------


def test_a_writer_draws_a_new_salt_after_exactly_65536_values() -> None:
    cipher = DataKeyCipher(KEY, 1, salt=SALT)
    header = pack_header(ALG_RANDOMIZED, 1)
    first = [cipher.seal(b"", header) for _ in range(65535)]
    assert {salt_of(v) for v in first} == {SALT}
    # value 65,536 still uses the first salt; value 65,537 draws a new one
    assert salt_of(cipher.seal(b"", header)) == SALT
    second_salt = salt_of(cipher.seal(b"", header))
    assert second_salt != SALT
    # the new salt is used for 65,536 values too, counting the one that drew it
    second = [cipher.seal(b"", header) for _ in range(65535)]
    assert {salt_of(v) for v in second} == {second_salt}
    third_salt = salt_of(cipher.seal(b"", header))
    assert third_salt not in (SALT, second_salt)
    # values under every salt still open
    for stored in (first[0], second[-1]):
        assert cipher.decrypt(stored, b"") == b""


def test_encrypt_with_a_nonce_counts_no_value() -> None:
    # known-answer encryption uses the current salt and does not advance the count
    cipher = DataKeyCipher(KEY, 1, salt=SALT)
    for _ in range(3):
        stored = cipher.encrypt(b"x", AAD, nonce=bytes(12))
        assert stored[:14] == pack_header(ALG_RANDOMIZED, 1) + SALT
        assert stored[14:26] == bytes(12)
    assert cipher.decrypt(stored, AAD) == b"x"


@pytest.mark.parametrize("size", [0, 7, 9, 16])
def test_salt_length_is_checked(size: int) -> None:
    with pytest.raises(ValueError) as info:
        DataKeyCipher(KEY, 1, salt=bytes(size))
    assert str(info.value) == "a salt is 8 bytes"


@pytest.mark.parametrize("size", [0, 11, 13, 16])
def test_nonce_length_is_checked(size: int) -> None:
    cipher = DataKeyCipher(KEY, 1, salt=SALT)
    with pytest.raises(ValueError) as info:
        cipher.encrypt(b"x", AAD, nonce=bytes(size))
    assert str(info.value) == "a nonce is 12 bytes"


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_data_key_length_is_checked(size: int) -> None:
    with pytest.raises(ValueError) as info:
        DataKeyCipher(bytes(size), 1)
    assert str(info.value) == "a data key is 32 bytes"


def test_the_layout_of_a_randomized_value() -> None:
    cipher = DataKeyCipher(KEY, 7, salt=SALT)
    assert cipher.header == bytes.fromhex("010100000007")
    stored = cipher.encrypt("김민지".encode(), AAD)
    assert stored[:14] == bytes.fromhex("010100000007") + SALT
    assert len(stored) == 6 + 8 + 12 + 9 + 16
    nonce = stored[14:26]
    subkey = AESGCM(derive_gcm_subkey(KEY, SALT))
    assert subkey.decrypt(nonce, stored[26:], stored[:6] + AAD) == "김민지".encode()


def test_seal_builds_a_bytearray_when_asked() -> None:
    cipher = DataKeyCipher(KEY, 3, salt=SALT)
    associated = cipher.header + AAD
    stored = cipher.seal(b"value", associated, mutable=True)
    assert type(stored) is bytearray
    assert stored[:14] == cipher.header + SALT
    assert cipher.decrypt(bytes(stored), AAD) == b"value"
    plain = cipher.seal(b"value", associated)
    assert type(plain) is bytes
    assert cipher.decrypt(plain, AAD) == b"value"


# -- remembered subkeys ------------------------------------------------------------------


def test_at_most_4096_reader_subkeys_are_remembered() -> None:
    cipher = DataKeyCipher(KEY, 1, salt=SALT)
    writer = cipher.subkey(SALT)
    assert cipher.subkey(SALT) is writer
    others = [i.to_bytes(8, "big") for i in range(1, 4097)]
    # the writer's subkey and 4,095 others: all are kept
    kept = [cipher.subkey(salt) for salt in others[:4095]]
    assert cipher.subkey(SALT) is writer
    assert cipher.subkey(others[0]) is kept[0]
    # one more drops the oldest, the writer's; it is derived again when needed
    cipher.subkey(others[4095])
    again = cipher.subkey(SALT)
    assert again is not writer
    nonce = bytes(12)
    assert again.decrypt(nonce, writer.encrypt(nonce, b"x", None), None) == b"x"


def test_a_reader_opens_values_of_other_writers() -> None:
    writer = DataKeyCipher(KEY, 2)
    reader = DataKeyCipher(KEY, 2)
    stored = writer.encrypt("Zoë".encode(), AAD)
    assert salt_of(stored) != salt_of(reader.encrypt(b"", AAD))
    assert reader.decrypt(stored, AAD) == "Zoë".encode()
    assert reader.subkey(salt_of(stored)) is reader.subkey(salt_of(stored))


# -- the algorithm a value names must be the column's ---------------------------------------


def refusal(cipher: DataKeyCipher, stored: bytes, **kwargs: object) -> InvalidCiphertextError:
    with pytest.raises(InvalidCiphertextError) as info:
        cipher.decrypt(stored, AAD, **kwargs)  # type: ignore[arg-type]
    return info.value


def test_decrypt_defaults_to_randomized() -> None:
    cipher = DataKeyCipher(KEY, 4)
    assert cipher.decrypt(cipher.encrypt(b"x", AAD), AAD) == b"x"


def test_a_randomized_value_is_refused_in_a_deterministic_column() -> None:
    cipher = DataKeyCipher(KEY, 4)
    stored = cipher.encrypt(b"x", AAD)
    err = refusal(cipher, stored, algorithm=ALG_DETERMINISTIC, scope="patients", column="name")
    assert err.reason == "value does not belong to this key"
    assert err.key_version == 4


def test_a_deterministic_value_is_refused_in_a_randomized_column() -> None:
    cipher = DataKeyCipher(KEY, 4)
    stored = cipher.encrypt_deterministic(b"x", "patients", "name")
    assert parse_header(stored) == (ALG_DETERMINISTIC, 4)
    err = refusal(cipher, stored, algorithm=ALG_RANDOMIZED, scope="patients", column="name")
    assert err.reason == "value does not belong to this key"
    kwargs = {"algorithm": ALG_DETERMINISTIC, "scope": "patients", "column": "name"}
    assert cipher.decrypt(stored, AAD, **kwargs) == b"x"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "names", [{}, {"scope": "patients"}, {"column": "name"}, {"scope": "", "column": "name"}]
)
def test_deterministic_decryption_needs_scope_and_column(names: dict[str, str]) -> None:
    cipher = DataKeyCipher(KEY, 4)
    stored = cipher.encrypt_deterministic(b"x", "patients", "name")
    err = refusal(cipher, stored, algorithm=ALG_DETERMINISTIC, **names)
    assert err.reason == "value does not belong to this key"


def test_another_key_version_is_refused() -> None:
    stored = DataKeyCipher(KEY, 5).encrypt(b"x", AAD)
    err = refusal(DataKeyCipher(KEY, 6), stored)
    assert (err.reason, err.key_version) == ("value does not belong to this key", 6)


def test_a_failed_authentication_says_so() -> None:
    cipher = DataKeyCipher(KEY, 4)
    stored = cipher.encrypt(b"x", AAD)
    with pytest.raises(InvalidCiphertextError) as info:
        cipher.decrypt(stored, column_aad("patients", "email"))
    assert info.value.reason == (
        "authentication failed: the value was altered, truncated or belongs to "
        "another column, table or key"
    )
    assert info.value.key_version == 4
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_deterministic_values_depend_on_the_column_only() -> None:
    cipher = DataKeyCipher(KEY, 1)
    one = cipher.encrypt_deterministic("김민지".encode(), "환자", "이름")
    assert one == DataKeyCipher(KEY, 1).encrypt_deterministic("김민지".encode(), "환자", "이름")
    assert one != cipher.encrypt_deterministic("김민지".encode(), "환자", "별명")
    assert one[:6] == pack_header(ALG_DETERMINISTIC, 1)
    assert len(one) == 6 + 16 + len("김민지".encode())
    given = cipher.encrypt_deterministic(b"x", "t", "c", aad=column_aad("t", "c"))
    assert given == cipher.encrypt_deterministic(b"x", "t", "c")


# -- key material stays inside -----------------------------------------------------------


def test_repr_shows_only_the_key_version() -> None:
    key = os.urandom(32)
    cipher = DataKeyCipher(key, 12)
    assert repr(cipher) == "<DataKeyCipher key_version=12>"


def test_a_cipher_cannot_be_pickled_or_copied() -> None:
    cipher = DataKeyCipher(KEY, 1)
    for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError) as info:
            attempt(cipher)
        assert str(info.value) == "DataKeyCipher holds key material and cannot be pickled"


# -- the pieces the hot path uses ---------------------------------------------------------


def test_slices_of_a_stored_value() -> None:
    stored = DataKeyCipher(KEY, 9, salt=SALT).encrypt(b"x", AAD)
    assert _cipher.header_of(stored) == bytes.fromhex("010100000009")
    assert _cipher.salt_prefix(stored) == bytes.fromhex("010100000009") + SALT


def test_open_salted_decrypts_with_a_found_subkey() -> None:
    cipher = DataKeyCipher(KEY, 9, salt=SALT)
    stored = cipher.encrypt("김민지".encode(), AAD)
    aead = cipher.subkey(SALT)
    assert DataKeyCipher.open_salted(aead, stored, AAD) == "김민지".encode()
    with pytest.raises(InvalidTag):
        DataKeyCipher.open_salted(aead, stored, column_aad("patients", "email"))


def test_writer_salt_follows_rotation() -> None:
    cipher = DataKeyCipher(KEY, 1, salt=SALT)
    assert cipher.writer_salt == SALT
    header = cipher.header
    for _ in range(65537):
        stored = cipher.seal(b"", header)
    assert cipher.writer_salt == salt_of(stored) != SALT


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_a_forked_child_writes_under_a_salt_of_its_own() -> None:
    cipher = DataKeyCipher(KEY, 1, salt=SALT)
    parent_value = cipher.encrypt(b"parent", AAD)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into the test runner
        code = 1
        try:
            os.close(read)
            child_value = cipher.encrypt(b"child", AAD)
            opened = cipher.decrypt(parent_value, AAD) == b"parent"
            os.write(write, cipher.writer_salt + salt_of(child_value) + child_value)
            code = 0 if opened else 2
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child_salt, value_salt, child_value = report[:8], report[8:16], report[16:]
    assert child_salt == value_salt
    assert child_salt != SALT
    # the parent keeps its salt and reads the child's value
    assert cipher.writer_salt == SALT
    assert cipher.decrypt(child_value, AAD) == b"child"
