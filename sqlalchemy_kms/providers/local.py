"""A local master key, for development, demos and tests. Not for production.

The master key is 32 bytes held in this process (given as bytes, or read
from a key file that holds them base64-encoded). Anyone with the key file
can unwrap every data key: in production use
:class:`~sqlalchemy_kms.providers.aws.AwsKms`, where the master key never
leaves the KMS.

Wrapped keys are ``0x01 || key id (8) || nonce (12) || AES-256-GCM(data key)``
with the encryption context (sorted JSON) as associated data, so a wrapped
key only unwraps for the table and key version it was made for. A key row of
another local master key (the row's ``master_key_id``, or the key id in the
wrapped bytes) raises :class:`~sqlalchemy_kms.errors.ForeignMasterKeyError`
before any decryption.

Example::

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "master.key")
    >>> kms = LocalKms.generate_key_file(path)
    >>> kms.master_key_id == LocalKms(key_file=path).master_key_id
    True
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import KMSInvalidCiphertextError
from .base import GeneratedDataKey, KeyProvider

__all__ = ["LocalKms"]

_WRAP_VERSION = 1
_AAD_PREFIX = b"sqlalchemy-kms/local-wrap/v1"
_ID_SIZE = 8
_NONCE_SIZE = 12


def _fingerprint(master_key: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"sqlalchemy-kms/local-key-id")
    digest.update(master_key)
    return digest.finalize()[:_ID_SIZE]


def _context_aad(context: Mapping[str, str]) -> bytes:
    return _AAD_PREFIX + json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode()


class LocalKms(KeyProvider):
    """A master key kept in this process: for development, demos and tests.

    Give exactly one of ``key`` (32 bytes) or ``key_file`` (a file written by
    :meth:`generate_key_file`); a path given as ``key`` is taken as the key
    file. ``master_key_id`` is ``local:`` followed by a fingerprint of the
    key, never the key itself.
    """

    name = "local"

    def __init__(
        self,
        key: bytes | str | os.PathLike[str] | None = None,
        *,
        key_file: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(key, (str, os.PathLike)):  # LocalKms("master.key")
            key, key_file = None, key
        if (key is None) == (key_file is None):
            raise ValueError("give exactly one of key or key_file")
        if key_file is not None:
            key = self._read_key_file(Path(key_file))
        assert key is not None
        if not isinstance(key, bytes) or len(key) != 32:
            raise ValueError("a local master key is exactly 32 bytes")
        self._id = _fingerprint(key)
        self._aead = AESGCM(key)

    @staticmethod
    def _read_key_file(path: Path) -> bytes:
        try:
            return base64.b64decode(path.read_text().strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{path} is not a sqlalchemy-kms local key file") from None

    @classmethod
    def generate_key_file(cls, path: str | os.PathLike[str]) -> LocalKms:
        """Write a new random master key to ``path`` (mode 0600, never overwrites)."""
        key = os.urandom(32)
        fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.b64encode(key).decode() + "\n")
        return cls(key)

    def __repr__(self) -> str:
        return f"LocalKms(master_key_id={self.master_key_id!r})"

    @property
    def master_key_id(self) -> str:
        """``local:`` and 16 hex digits: a fingerprint of the key, never the key.

        :meth:`owns` is true for this id only.
        """
        return "local:" + self._id.hex()

    def _generate_data_key(self, context: Mapping[str, str]) -> GeneratedDataKey:
        plaintext = os.urandom(32)
        return GeneratedDataKey(plaintext, self._seal(plaintext, context), self.master_key_id)

    def _seal(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        nonce = os.urandom(_NONCE_SIZE)
        sealed = self._aead.encrypt(nonce, plaintext, _context_aad(context))
        return bytes([_WRAP_VERSION]) + self._id + nonce + sealed

    def _wrap(self, plaintext: bytes, context: Mapping[str, str]) -> tuple[bytes, str]:
        return self._seal(plaintext, context), self.master_key_id

    def _not_owned_reason(self) -> str:
        return f"wrapped under another local master key, not {self.master_key_id}"

    def _unwrap(self, wrapped: bytes, context: Mapping[str, str], master_key_id: str) -> bytes:
        table = context.get("table")
        version = int(context["key_version"]) if "key_version" in context else None
        if len(wrapped) < 1 + _ID_SIZE + _NONCE_SIZE + 16 or wrapped[0] != _WRAP_VERSION:
            raise KMSInvalidCiphertextError(
                "wrapped data key is malformed",
                operation="Decrypt",
                table=table,
                key_version=version,
                master_key_id=master_key_id,
            )
        if wrapped[1 : 1 + _ID_SIZE] != self._id:  # the row names our key, the bytes do not
            raise self._foreign(
                "local:" + wrapped[1 : 1 + _ID_SIZE].hex(), context, self._not_owned_reason()
            )
        nonce = wrapped[1 + _ID_SIZE : 1 + _ID_SIZE + _NONCE_SIZE]
        try:
            return self._aead.decrypt(
                nonce, wrapped[1 + _ID_SIZE + _NONCE_SIZE :], _context_aad(context)
            )
        except InvalidTag:
            raise KMSInvalidCiphertextError(
                "wrapped data key does not match its encryption context or was altered",
                operation="Decrypt",
                table=table,
                key_version=version,
                master_key_id=master_key_id,
            ) from None
