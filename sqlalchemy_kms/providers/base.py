"""The interface every key provider implements.

A provider wraps and unwraps data keys with a master key it never reveals.
The vault calls it once per table and key version, never per value. Each
call passes an *encryption context*: non-secret strings that the provider
binds to the wrapped key (AWS KMS checks them and records them in CloudTrail;
key policies can test them). sqlalchemy-kms always sends::

    {"table": "<schema.>table", "key_version": "<n>"}

and, for the search keys of deterministic columns, ``"purpose": "search"`` too.

Writing a provider means implementing :meth:`KeyProvider.generate_data_key`
and :meth:`KeyProvider.unwrap`. Example of a use::

    >>> from sqlalchemy_kms import LocalKms
    >>> provider = LocalKms(bytes(32))
    >>> key = provider.generate_data_key({"table": "patients", "key_version": "1"})
    >>> provider.unwrap(key.wrapped, {"table": "patients", "key_version": "1"},
    ...                 key.master_key_id) == key.plaintext
    True
    >>> key
    <GeneratedDataKey master_key_id='local:...' wrapped=... bytes>
"""

from __future__ import annotations

import abc
import threading
from collections import Counter
from collections.abc import Mapping

__all__ = ["GeneratedDataKey", "KeyProvider", "encryption_context"]


def encryption_context(scope: str, purpose: str, key_version: int) -> dict[str, str]:
    """The encryption context sqlalchemy-kms sends for one key of a table.

    Data keys get ``{"table": scope, "key_version": "N"}``; search keys (for
    deterministic columns) add ``"purpose": "search"``.

    >>> encryption_context("patients", "data", 1)
    {'table': 'patients', 'key_version': '1'}
    >>> encryption_context("patients", "search", 1)
    {'table': 'patients', 'key_version': '1', 'purpose': 'search'}
    """
    context = {"table": scope, "key_version": str(key_version)}
    if purpose != "data":
        context["purpose"] = purpose
    return context


class GeneratedDataKey:
    """A fresh data key: its plaintext (kept in memory only) and its wrapped form."""

    __slots__ = ("master_key_id", "plaintext", "wrapped")

    def __init__(self, plaintext: bytes, wrapped: bytes, master_key_id: str) -> None:
        self.plaintext = plaintext
        self.wrapped = wrapped
        self.master_key_id = master_key_id

    def __repr__(self) -> str:
        return (
            f"<GeneratedDataKey master_key_id={self.master_key_id!r} "
            f"wrapped={len(self.wrapped)} bytes>"
        )


class KeyProvider(abc.ABC):
    """A master key that wraps and unwraps data keys.

    ``calls`` counts the provider calls made, by operation name
    (``"GenerateDataKey"``, ``"Decrypt"``), for metrics and tests.
    """

    #: Short name stored in the key table's ``provider`` column.
    name: str = "abstract"

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._calls_lock = threading.Lock()

    def _count(self, operation: str) -> None:
        with self._calls_lock:
            self.calls[operation] += 1

    @property
    @abc.abstractmethod
    def master_key_id(self) -> str:
        """The master key new data keys are wrapped under, as configured."""

    @abc.abstractmethod
    def generate_data_key(self, context: Mapping[str, str]) -> GeneratedDataKey:
        """Make a new 256-bit data key wrapped under the master key, bound to ``context``."""

    @abc.abstractmethod
    def unwrap(self, wrapped: bytes, context: Mapping[str, str], master_key_id: str) -> bytes:
        """Return the plaintext of a wrapped data key made under ``master_key_id``."""

    @abc.abstractmethod
    def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> tuple[bytes, str]:
        """Wrap an existing data key under the master key: ``(wrapped, master_key_id)``."""

    def owns(self, master_key_id: str) -> bool:
        """Whether this provider can unwrap keys wrapped under ``master_key_id``."""
        return master_key_id == self.master_key_id

    def resolved_master_key_id(self) -> str:
        """The master key id as the key table records it (AWS KMS: the key ARN)."""
        return self.master_key_id

    def rewrap_from(
        self,
        source: KeyProvider,
        wrapped: bytes,
        context: Mapping[str, str],
        source_master_key_id: str,
    ) -> tuple[bytes, str]:
        """Re-wrap a key wrapped by ``source`` under this provider's master key.

        The generic way unwraps with ``source`` and wraps with this provider,
        so the data key passes through this process's memory; providers that
        can do better (AWS KMS ``ReEncrypt``) override it.
        """
        plaintext = source.unwrap(wrapped, context, source_master_key_id)
        return self.wrap(plaintext, context)
