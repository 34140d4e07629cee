"""The ciphers behind the stored format, over ``cryptography``'s AEADs.

A :class:`DataKeyCipher` holds one unwrapped data key (one table, one key
version) with everything prepared that encrypting and decrypting need, so no
cipher object and no key is rebuilt per value:

* randomized values use AES-256-GCM under a *subkey* derived with
  HKDF-SHA256 from the data key and a random 8-byte salt. A writer keeps one
  subkey for at most :data:`SUBKEY_ENCRYPTIONS` values and then draws a new
  salt. Nonces are random 96-bit values, so each subkey stays far inside the
  GCM bound for random nonces, and the number of values one data key can
  protect is not limited by GCM's nonce space (the same idea as the AWS
  Encryption SDK's per-message derived keys). See ``docs/format.md``.
* deterministic values use AES-256-SIV under a per-column key derived with
  HKDF-SHA256 from the data key and the column binding.

Example::

    >>> import os
    >>> from sqlalchemy_kms._format import column_aad
    >>> cipher = DataKeyCipher(os.urandom(32), key_version=1)
    >>> aad = column_aad("patients", "name")
    >>> stored = cipher.encrypt(b"Kim Minji", aad)
    >>> cipher.decrypt(stored, aad)
    b'Kim Minji'
    >>> cipher.encrypt_deterministic(b"x", "patients", "name") == \\
    ...     cipher.encrypt_deterministic(b"x", "patients", "name")
    True
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Final, Literal, overload

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._format import (
    ALG_DETERMINISTIC,
    ALG_RANDOMIZED,
    GCM_SUBKEY_INFO,
    HEADER_SIZE,
    NONCE_SIZE,
    RANDOMIZED_CIPHERTEXT_OFFSET,
    SALT_SIZE,
    SUBKEY_PREFIX_SIZE,
    column_aad,
    pack_header,
    siv_key_info,
)
from .errors import InvalidCiphertextError

#: Values one writer encrypts under one subkey before it draws a new salt.
#: With random 96-bit nonces the chance of any nonce repeating under one
#: subkey is below 2**-64 at this count, and across 2**48 values under one
#: data key below 2**-33.
SUBKEY_ENCRYPTIONS: Final = 2**16

#: Subkeys of other writers kept per data key for decryption.
MAX_READER_SUBKEYS: Final = 4096

DATA_KEY_SIZE: Final = 32

# every cipher of this process, so a forked child can give each a salt of its own
_LIVE_CIPHERS: weakref.WeakSet[DataKeyCipher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cipher in list(_LIVE_CIPHERS):
        cipher._after_fork()


def salt_prefix(stored: bytes) -> bytes:
    """A randomized value's ``header || salt``: what picks the subkey that opens it."""
    return stored[:SUBKEY_PREFIX_SIZE]


def header_of(stored: bytes) -> bytes:
    """A stored value's six header bytes."""
    return stored[:HEADER_SIZE]


def derive_gcm_subkey(data_key: bytes, salt: bytes) -> bytes:
    """HKDF-SHA256(ikm=data key, salt=salt, info=GCM_SUBKEY_INFO), 32 bytes."""
    return HKDF(algorithm=SHA256(), length=32, salt=salt, info=GCM_SUBKEY_INFO).derive(data_key)


def derive_siv_key(data_key: bytes, scope: str, column: str) -> bytes:
    """HKDF-SHA256(ikm=data key, no salt, info=SIV_KEY_INFO || binding), 64 bytes."""
    return HKDF(algorithm=SHA256(), length=64, salt=None, info=siv_key_info(scope, column)).derive(
        data_key
    )


class DataKeyCipher:
    """Encrypts and decrypts values under one unwrapped data key.

    Thread-safe. Holds key material: never log or pickle it; its ``repr``
    shows only the key version.
    """

    __slots__ = (
        "__weakref__",
        "_counter",
        "_data_key",
        "_det_header",
        "_lock",
        "_rand_header",
        "_readers",
        "_siv",
        "_writer",
        "key_version",
    )

    def __init__(self, data_key: bytes, key_version: int, *, salt: bytes | None = None) -> None:
        if len(data_key) != DATA_KEY_SIZE:
            raise ValueError("a data key is 32 bytes")
        self._data_key = bytes(data_key)
        self.key_version = key_version
        self._rand_header = pack_header(ALG_RANDOMIZED, key_version)
        self._det_header = pack_header(ALG_DETERMINISTIC, key_version)
        self._lock = threading.Lock()
        self._readers: dict[bytes, AESGCM] = {}
        self._siv: dict[tuple[str, str], AESSIV] = {}
        #: ``(header || salt, AES-GCM object of the salt's subkey)`` of this writer
        self._writer: tuple[bytes, AESGCM] = self._new_writer(salt)
        self._counter: Iterator[int] = itertools.count()
        _LIVE_CIPHERS.add(self)

    def __repr__(self) -> str:
        return f"<DataKeyCipher key_version={self.key_version}>"

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("DataKeyCipher holds key material and cannot be pickled")

    # -- randomized ----------------------------------------------------------

    def _new_writer(self, salt: bytes | None = None) -> tuple[bytes, AESGCM]:
        salt = os.urandom(SALT_SIZE) if salt is None else salt
        if len(salt) != SALT_SIZE:
            raise ValueError(f"a salt is {SALT_SIZE} bytes")
        aead = AESGCM(derive_gcm_subkey(self._data_key, salt))
        self._remember_reader(salt, aead)
        return self._rand_header + salt, aead

    def _remember_reader(self, salt: bytes, aead: AESGCM) -> None:
        if len(self._readers) >= MAX_READER_SUBKEYS:
            # drop the oldest subkey; it is derived again if needed
            self._readers.pop(next(iter(self._readers)), None)
        self._readers[salt] = aead

    def _after_fork(self) -> None:
        """In a child process: a salt of its own (a salt shared with the parent would
        put both processes' values under one subkey) and a new lock."""
        self._lock = threading.Lock()
        self._writer = self._new_writer()
        self._counter = itertools.count()

    @property
    def writer_salt(self) -> bytes:
        """The salt this process's randomized values are written under now."""
        return self._writer[0][HEADER_SIZE:]

    def _rotate_writer(self, seen: tuple[bytes, AESGCM]) -> tuple[bytes, AESGCM]:
        with self._lock:
            if self._writer is seen:
                self._writer = self._new_writer()
                self._counter = itertools.count(1)
            return self._writer

    @property
    def header(self) -> bytes:
        """The header of this key's randomized values."""
        return self._rand_header

    def encrypt(self, plaintext: bytes, aad: bytes, *, nonce: bytes | None = None) -> bytes:
        """Encrypt ``plaintext`` for the column bound by ``aad`` (randomized).

        ``nonce`` is for known-answer tests only: never pass one otherwise.
        """
        if nonce is None:
            return self.seal(plaintext, self._rand_header + aad)
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a nonce is {NONCE_SIZE} bytes")
        prefix, aead = self._writer
        return prefix + nonce + aead.encrypt(nonce, plaintext, self._rand_header + aad)

    @overload
    def seal(
        self, plaintext: bytes, associated: bytes, *, mutable: Literal[False] = ...
    ) -> bytes: ...

    @overload
    def seal(self, plaintext: bytes, associated: bytes, *, mutable: bool) -> bytes | bytearray: ...

    def seal(
        self, plaintext: bytes, associated: bytes, *, mutable: bool = False
    ) -> bytes | bytearray:
        """:meth:`encrypt` with the associated data given whole: ``header || aad``.

        The hot path of :class:`~sqlalchemy_kms.KMSEncrypted` writes, which
        keep ``header || aad`` per column instead of building it per value.
        ``mutable=True`` builds the value as a ``bytearray`` (SQLite's driver
        binds those faster), at no extra copy.
        """
        writer = self._writer
        if next(self._counter) >= SUBKEY_ENCRYPTIONS:
            writer = self._rotate_writer(writer)
        prefix, aead = writer
        nonce = os.urandom(NONCE_SIZE)
        sealed = aead.encrypt(nonce, plaintext, associated)
        if mutable:
            stored = bytearray(prefix)
            stored += nonce
            stored += sealed
            return stored
        return prefix + nonce + sealed

    def subkey(self, salt: bytes) -> AESGCM:
        """The AES-GCM object of one writer's subkey (derived once, then kept)."""
        return self._readers.get(salt) or self._reader(salt)

    def _reader(self, salt: bytes) -> AESGCM:
        aead = self._readers.get(salt)
        if aead is None:
            aead = AESGCM(derive_gcm_subkey(self._data_key, salt))
            with self._lock:
                self._remember_reader(salt, aead)
        return aead

    # -- deterministic -------------------------------------------------------

    def _column_siv(self, scope: str, column: str) -> AESSIV:
        siv = self._siv.get((scope, column))
        if siv is None:
            siv = AESSIV(derive_siv_key(self._data_key, scope, column))
            self._siv[(scope, column)] = siv
        return siv

    def encrypt_deterministic(
        self, plaintext: bytes, scope: str, column: str, aad: bytes | None = None
    ) -> bytes:
        """Encrypt ``plaintext`` deterministically for one column (the checked entry
        point: ``aad`` is built from ``scope`` and ``column`` when not given)."""
        binding = aad if aad is not None else column_aad(scope, column)
        return self.seal_deterministic(plaintext, scope, column, binding)

    def seal_deterministic(self, plaintext: bytes, scope: str, column: str, aad: bytes) -> bytes:
        """:meth:`encrypt_deterministic` with the column binding given: the hot path."""
        header = self._det_header
        siv = self._siv.get((scope, column)) or self._column_siv(scope, column)
        return header + siv.encrypt(plaintext, [header + aad])

    # -- both ----------------------------------------------------------------

    @staticmethod
    def open_salted(aead: AESGCM, stored: bytes, aad: bytes) -> bytes:
        """Decrypt a randomized value with the subkey of its salt, already found
        (``aead`` from :meth:`subkey`): the hot path of reads."""
        return aead.decrypt(
            stored[SUBKEY_PREFIX_SIZE:RANDOMIZED_CIPHERTEXT_OFFSET],
            stored[RANDOMIZED_CIPHERTEXT_OFFSET:],
            stored[:HEADER_SIZE] + aad,
        )

    def open(self, stored: bytes, aad: bytes, scope: str, column: str) -> bytes:
        """Decrypt a value whose header is known to name this cipher's key and whose
        size :func:`~sqlalchemy_kms._format.parse_header` accepted.

        The checked entry point is :meth:`decrypt`; this is the hot path behind
        it. Raises ``cryptography.exceptions.InvalidTag`` on any mismatch.
        """
        header = stored[:HEADER_SIZE]
        if stored[1] == ALG_RANDOMIZED:
            aead = self.subkey(stored[HEADER_SIZE:SUBKEY_PREFIX_SIZE])
            nonce = stored[SUBKEY_PREFIX_SIZE:RANDOMIZED_CIPHERTEXT_OFFSET]
            return aead.decrypt(nonce, stored[RANDOMIZED_CIPHERTEXT_OFFSET:], header + aad)
        return self._column_siv(scope, column).decrypt(stored[HEADER_SIZE:], [header + aad])

    def decrypt(
        self,
        stored: bytes,
        aad: bytes,
        *,
        algorithm: int = ALG_RANDOMIZED,
        scope: str = "",
        column: str = "",
    ) -> bytes:
        """Decrypt a stored value whose header was checked by ``parse_header``.

        Raises :class:`InvalidCiphertextError` when authentication fails or
        the header names another algorithm or key version than this cipher's.
        """
        header = stored[:HEADER_SIZE]
        expected = self._rand_header if algorithm == ALG_RANDOMIZED else self._det_header
        if header != expected or (algorithm == ALG_DETERMINISTIC and not (scope and column)):
            raise InvalidCiphertextError(
                "value does not belong to this key", key_version=self.key_version
            )
        try:
            return self.open(stored, aad, scope, column)
        except InvalidTag:
            raise InvalidCiphertextError(
                "authentication failed: the value was altered, truncated or belongs to "
                "another column, table or key",
                key_version=self.key_version,
            ) from None


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork()
    os.register_at_fork(after_in_child=_after_fork_in_child)
