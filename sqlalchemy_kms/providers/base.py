"""The interface every key provider implements, and the call counting they all share.

A provider wraps and unwraps data keys with a master key it never reveals.
The vault calls it once per table and key version, never per value. Each
call passes an *encryption context*: non-secret strings that the provider
binds to the wrapped key (AWS KMS checks them and records them in CloudTrail;
key policies can test them). sqlalchemy-kms always sends::

    {"table": "<schema.>table", "key_version": "<n>"}

and, for the search keys of deterministic columns, ``"purpose": "search"`` too.

Example of a use::

    >>> from sqlalchemy_kms import LocalKms
    >>> provider = LocalKms(bytes(32))
    >>> key = provider.generate_data_key({"table": "patients", "key_version": "1"})
    >>> provider.unwrap(key.wrapped, {"table": "patients", "key_version": "1"},
    ...                 key.master_key_id) == key.plaintext
    True
    >>> key
    <GeneratedDataKey master_key_id='local:...' wrapped=... bytes>
    >>> dict(provider.calls)
    {'GenerateDataKey': 1, 'Decrypt': 1}

Writing a provider means implementing the protected hooks
:meth:`~KeyProvider._generate_data_key`, :meth:`~KeyProvider._unwrap` and
:meth:`~KeyProvider._wrap` (and :attr:`~KeyProvider.master_key_id`). The
public methods of the same names are template methods: they count the call
in :attr:`KeyProvider.calls` and then call the hook, so every provider counts
the same way. A provider that can re-wrap a key without it leaving the KMS
(AWS KMS ``ReEncrypt``) also overrides :meth:`~KeyProvider._rewraps_from` and
:meth:`~KeyProvider._rewrap_from`. A provider answers :meth:`~KeyProvider.owns`
for its own master key only, never by the look of other providers' ids::

    >>> import os
    >>> from sqlalchemy_kms.providers.base import GeneratedDataKey, KeyProvider
    >>> class XorKms(KeyProvider):     # a toy: shows the hooks, protects nothing
    ...     name = "xor"
    ...     master_key_id = "xor:1"
    ...     def _generate_data_key(self, context):
    ...         plaintext = os.urandom(32)
    ...         return GeneratedDataKey(plaintext, self._wrap(plaintext, context)[0], "xor:1")
    ...     def _wrap(self, plaintext, context):
    ...         return bytes(b ^ 0x5A for b in plaintext), "xor:1"
    ...     def _unwrap(self, wrapped, context, master_key_id):
    ...         return bytes(b ^ 0x5A for b in wrapped)
    >>> toy = XorKms()
    >>> made = toy.generate_data_key({"table": "t", "key_version": "1"})
    >>> toy.unwrap(made.wrapped, {"table": "t", "key_version": "1"}, "xor:1") == made.plaintext
    True
    >>> dict(toy.calls), toy.owns("xor:1"), toy.owns("local:00")
    ({'GenerateDataKey': 1, 'Decrypt': 1}, True, False)

A provider uses only keys wrapped under master keys it owns. The key table
is data: whoever may write the database could insert a key row made under a
master key of their own, and the application would then encrypt new values
under a data key they know. So :meth:`~KeyProvider.unwrap` refuses any other
master key before the hook runs, with
:class:`~sqlalchemy_kms.errors.ForeignMasterKeyError`::

    >>> toy.unwrap(made.wrapped, {"table": "t", "key_version": "2"}, "xor:2")
    Traceback (most recent call last):
    ...
    sqlalchemy_kms.errors.ForeignMasterKeyError: Decrypt refused for table t key version 2 \
master key xor:2: this provider holds master key xor:1 only; ...
"""

from __future__ import annotations

import abc
import threading
from collections import Counter
from collections.abc import Mapping
from typing import final

from ..errors import ForeignMasterKeyError

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

    ``calls`` counts the calls made to this provider, by operation name
    (``"GenerateDataKey"``, ``"Decrypt"``, ``"Encrypt"``, ``"ReEncrypt"``,
    and for AWS KMS ``"DescribeKey"``), for metrics and tests. A call is
    counted when it is made, whether it then succeeds or fails.

    Subclasses implement the protected hooks (``_generate_data_key``,
    ``_unwrap``, ``_wrap``), never the public methods, which count the call
    and then call the hook.
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

    # -- the public operations: count, then call the hook --------------------------------

    @final
    def generate_data_key(self, context: Mapping[str, str]) -> GeneratedDataKey:
        """Make a new 256-bit data key wrapped under the master key, bound to ``context``.

        Counted as ``"GenerateDataKey"``.
        """
        self._count("GenerateDataKey")
        return self._generate_data_key(context)

    @final
    def unwrap(self, wrapped: bytes, context: Mapping[str, str], master_key_id: str) -> bytes:
        """Return the plaintext of a data key wrapped under ``master_key_id``.

        ``master_key_id`` is the one the key table records for the key. A
        master key this provider does not own is refused before the hook
        runs (:meth:`_check_master_key`), with
        :class:`~sqlalchemy_kms.errors.ForeignMasterKeyError`. Counted as
        ``"Decrypt"``, refused or not.
        """
        self._count("Decrypt")
        self._check_master_key(master_key_id, context)
        return self._unwrap(wrapped, context, master_key_id)

    @final
    def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> tuple[bytes, str]:
        """Wrap an existing data key under the master key: ``(wrapped, master_key_id)``.

        Counted as ``"Encrypt"``.
        """
        self._count("Encrypt")
        return self._wrap(plaintext, context)

    @final
    def rewrap_from(
        self,
        source: KeyProvider,
        wrapped: bytes,
        context: Mapping[str, str],
        source_master_key_id: str,
    ) -> tuple[bytes, str]:
        """Re-wrap a key wrapped by ``source`` under this provider's master key.

        Returns ``(wrapped, master_key_id)``. When this provider can re-wrap
        from ``source`` inside the KMS (AWS KMS to AWS KMS: ``ReEncrypt``), the
        data key never leaves the KMS and the call is counted as
        ``"ReEncrypt"``. Otherwise ``source`` unwraps it (``"Decrypt"``,
        counted by ``source``) and this provider wraps it (``"Encrypt"``), so
        the data key passes through this process's memory. A composite
        ``source`` (:class:`~sqlalchemy_kms.providers.multi.MultiKms`) is
        first narrowed to its member that holds ``source_master_key_id``; a
        master key ``source`` does not own is refused either way, so a rewrap
        never adopts a key row someone else's master key made.
        """
        source = source.provider_for(source_master_key_id)
        if self._rewraps_from(source):
            source._check_master_key(source_master_key_id, context)
            self._count("ReEncrypt")
            return self._rewrap_from(source, wrapped, context, source_master_key_id)
        plaintext = source.unwrap(wrapped, context, source_master_key_id)
        return self.wrap(plaintext, context)

    # -- the hooks a provider implements -----------------------------------------------------

    @abc.abstractmethod
    def _generate_data_key(self, context: Mapping[str, str]) -> GeneratedDataKey:
        """Hook of :meth:`generate_data_key`: make and wrap a new 256-bit data key."""

    @abc.abstractmethod
    def _unwrap(self, wrapped: bytes, context: Mapping[str, str], master_key_id: str) -> bytes:
        """Hook of :meth:`unwrap`: the plaintext of a wrapped data key.

        Raise a :class:`~sqlalchemy_kms.errors.KMSError` subclass on failure,
        never an error that shows key bytes.
        """

    @abc.abstractmethod
    def _wrap(self, plaintext: bytes, context: Mapping[str, str]) -> tuple[bytes, str]:
        """Hook of :meth:`wrap`: ``(wrapped, master_key_id)`` for an existing data key."""

    def _rewraps_from(self, source: KeyProvider) -> bool:
        """Whether :meth:`_rewrap_from` can re-wrap keys of ``source`` (a single
        provider) without them leaving the KMS. By default no."""
        return False

    def _rewrap_from(
        self,
        source: KeyProvider,
        wrapped: bytes,
        context: Mapping[str, str],
        source_master_key_id: str,
    ) -> tuple[bytes, str]:
        """Hook of :meth:`rewrap_from`, called only when :meth:`_rewraps_from` is true."""
        raise NotImplementedError(f"{type(self).__name__} cannot re-wrap inside the KMS")

    # -- which master keys this provider answers for -----------------------------------------

    def owns(self, master_key_id: str, *, resolve: bool = False) -> bool:
        """Whether ``master_key_id`` names this provider's own master key.

        A provider answers for its own master key only, and never by the form
        of an id (it does not know other providers' id formats). By default the
        answer comes from what the provider already knows, without a KMS call;
        with ``resolve=True`` a provider whose key has other names (AWS KMS: an
        alias and the key ARN behind it) may ask the KMS once to learn them.
        Here: the id equals :attr:`master_key_id`.
        """
        return master_key_id == self.master_key_id

    def _check_master_key(self, master_key_id: str, context: Mapping[str, str]) -> None:
        """Refuse a key wrapped under a master key this provider was not given.

        Called by :meth:`unwrap` (and for the source of :meth:`rewrap_from`)
        before any KMS call. By default: :meth:`owns` with ``resolve=True``,
        else :class:`~sqlalchemy_kms.errors.ForeignMasterKeyError`. The key
        table is data that whoever may write the database can change; only the
        master keys given to the provider decide which rows are used.
        """
        if not self.owns(master_key_id, resolve=True):
            raise self._foreign(master_key_id, context, self._not_owned_reason())

    def _not_owned_reason(self) -> str:
        """Why :meth:`_check_master_key` refused, for the error's message."""
        return f"this provider holds master key {self.master_key_id} only"

    def _foreign(
        self, master_key_id: str, context: Mapping[str, str], reason: str
    ) -> ForeignMasterKeyError:
        """The error for a key row of a master key this provider does not own."""
        return ForeignMasterKeyError(
            f"{reason}; a key of any other master key is never used. If that master key is "
            "yours (the old key of a rewrap), name it with this one in a MultiKms; if not, "
            "the key table holds a row this application did not make",
            operation="Decrypt",
            table=context.get("table"),
            key_version=int(context["key_version"]) if "key_version" in context else None,
            master_key_id=master_key_id,
        )

    @property
    def members(self) -> tuple[KeyProvider, ...]:
        """The single providers this one is made of: itself (a
        :class:`~sqlalchemy_kms.providers.multi.MultiKms` lists its members).
        Each counts its own ``calls``."""
        return (self,)

    def provider_for(self, master_key_id: str) -> KeyProvider:
        """The provider that unwraps keys wrapped under ``master_key_id``.

        A single provider is its own answer (and its :meth:`unwrap` refuses
        a master key it does not own). A
        :class:`~sqlalchemy_kms.providers.multi.MultiKms` answers with the
        member that :meth:`owns` the id.
        """
        return self

    def resolved_master_key_id(self) -> str:
        """The master key id as the key table records it (AWS KMS: the key ARN)."""
        return self.master_key_id
