"""AWS KMS as the key provider, through boto3.

Data keys are made with ``GenerateDataKey`` (``KeySpec="AES_256"``) and
unwrapped with ``Decrypt`` (``KeyId`` always given), both with the
encryption context ``{"table": ..., "key_version": ...}``. The wrapped key
stored in the key table is exactly KMS's ``CiphertextBlob``, so anyone with
``kms:Decrypt`` on the master key can unwrap it with plain boto3::

    kms.decrypt(CiphertextBlob=wrapped, KeyId=master_key_id,
                EncryptionContext={"table": "patients", "key_version": "1"})

A key policy can restrict a role to some tables with a condition such as
``"StringEquals": {"kms:EncryptionContext:table": "patients"}``.

An ``AwsKms`` uses only keys of its own master key: the ``key_id`` it was
given and the key ARN behind it. The key table records key ARNs, and the
key table is data that whoever may write the database can change, so a row
naming any other master key raises
:class:`~sqlalchemy_kms.errors.ForeignMasterKeyError` and is never unwrapped
or used, even where the role could decrypt it. To read keys of several
master keys on purpose (the old key during a rewrap), name them all in a
:class:`~sqlalchemy_kms.providers.multi.MultiKms`. Two checks make this hold:

* before ``Decrypt``, the row's master key must be this key. ``Decrypt``
  then names this key (never just what the row says), so KMS itself refuses
  a wrapped key another master key made;
* after ``Decrypt``, the ``KeyId`` KMS answers with (the ARN of the key that
  decrypted) must be the row's master key and this provider's key ARN.

The key ARN behind an alias or key id is learned from KMS's answers to this
provider's own calls (``GenerateDataKey``, ``Encrypt``, ``ReEncrypt``, or the
first ``Decrypt``, made under the configured ``key_id``), or from
``DescribeKey``, asked once, when :meth:`~AwsKms.owns` is asked with
``resolve=True`` or to name a refusal. So a role with only ``kms:Decrypt``
(and ``kms:GenerateDataKey``) works without ``kms:DescribeKey``. Until the
ARN is known, a row naming another key ARN goes to ``Decrypt`` under the
configured ``key_id``, which KMS refuses (``IncorrectKeyException``); the
error is then :class:`~sqlalchemy_kms.errors.ForeignMasterKeyError` if
``DescribeKey`` is allowed, else KMS's own refusal. A provider configured
with the key ARN knows it from the start and never asks. Once the alias is
moved to another key, rows of the old key need the old key named in a
:class:`~sqlalchemy_kms.providers.multi.MultiKms`.

Example::

    kms = AwsKms("alias/demo_cmk")                      # boto3's usual configuration
    kms = AwsKms("arn:aws:kms:...:key/...", region_name="ap-northeast-2")
    kms = AwsKms("alias/demo_cmk", client=boto3.client("kms"))

Creating an ``AwsKms`` adds a filter to botocore's loggers that log
request and response bodies (``botocore.endpoint``, ``botocore.parsers``),
once per process: with them at ``DEBUG``, the ``Plaintext`` of KMS's
requests and responses (data keys) reads ``<redacted>``, and nothing else
is changed (see :mod:`sqlalchemy_kms.providers._redact`).

Without ``client``, one is built the normal boto3 way (environment,
profiles, ``AWS_ENDPOINT_URL_KMS``), with bounded timeouts and botocore's
``standard`` retry mode, which retries throttling with backoff.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)

from ..errors import (
    KMSAccessDeniedError,
    KMSError,
    KMSInvalidCiphertextError,
    KMSKeyDisabledError,
    KMSKeyNotFoundError,
    KMSUnavailableError,
)
from . import _redact
from .base import GeneratedDataKey, KeyProvider

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

__all__ = ["AwsKms"]

#: A KMS key ARN (not an alias ARN): ``arn:PARTITION:kms:REGION:ACCOUNT:key/KEY-ID``.
_KEY_ARN = re.compile(r"arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+")

_ERRORS: dict[str, type[KMSError]] = {
    "AccessDeniedException": KMSAccessDeniedError,
    "DisabledException": KMSKeyDisabledError,
    "KMSInvalidStateException": KMSKeyDisabledError,
    "NotFoundException": KMSKeyNotFoundError,
    "InvalidCiphertextException": KMSInvalidCiphertextError,
    "IncorrectKeyException": KMSInvalidCiphertextError,
    "ThrottlingException": KMSUnavailableError,
    "LimitExceededException": KMSUnavailableError,
    "KMSInternalException": KMSUnavailableError,
    "DependencyTimeoutException": KMSUnavailableError,
}


class AwsKms(KeyProvider):
    """AWS KMS master key ``key_id``: a key id, key ARN, alias name or alias ARN.

    Options used only when ``client`` is not given: ``region_name``,
    ``profile_name``, ``endpoint_url``, ``connect_timeout`` and
    ``read_timeout`` (seconds, default 5 and 10), ``max_attempts`` (default 3)
    and ``retry_mode`` (``"standard"`` or ``"adaptive"``).
    """

    name = "aws-kms"

    def __init__(
        self,
        key_id: str,
        client: KMSClient | None = None,
        *,
        region_name: str | None = None,
        profile_name: str | None = None,
        endpoint_url: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        max_attempts: int = 3,
        retry_mode: str = "standard",
    ) -> None:
        super().__init__()
        if not key_id:
            raise ValueError("key_id is required")
        # botocore logs KMS bodies at DEBUG, data keys included: redact them (once per process)
        _redact.install()
        self._key_id = key_id
        if client is None:
            session = boto3.session.Session(profile_name=profile_name, region_name=region_name)
            config = Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"mode": retry_mode, "total_max_attempts": max_attempts},  # type: ignore[arg-type]
            )
            client = session.client("kms", endpoint_url=endpoint_url, config=config)
        self.client: KMSClient = client
        self._resolved: str | None = None
        # ARNs of our own key: as KMS named them answering calls made under key_id
        self._arns: set[str] = {key_id} if _KEY_ARN.fullmatch(key_id) else set()
        self._lock = threading.Lock()
        self._resolving = threading.Lock()

    def __repr__(self) -> str:
        return f"AwsKms({self._key_id!r})"

    @property
    def master_key_id(self) -> str:
        """The ``key_id`` as configured (key id, key ARN, alias name or alias ARN)."""
        return self._key_id

    def _error(
        self, exc: Exception, operation: str, context: Mapping[str, str], master_key_id: str
    ) -> KMSError:
        version = int(context["key_version"]) if "key_version" in context else None
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
            cls = _ERRORS.get(code, KMSError)
            reason = code
        elif isinstance(exc, (NoCredentialsError, PartialCredentialsError, NoRegionError)):
            cls, reason = KMSError, f"AWS client is not configured ({type(exc).__name__})"
        else:
            cls, reason = KMSUnavailableError, type(exc).__name__
        return cls(
            reason,
            operation=operation,
            table=context.get("table"),
            key_version=version,
            master_key_id=master_key_id,
        )

    def _remember(self, arn: str) -> str:
        """Note ``arn`` as an id of this provider's own master key (KMS reported it)."""
        with self._lock:
            self._arns.add(arn)
        return arn

    def owns(self, master_key_id: str, *, resolve: bool = False) -> bool:
        """Whether ``master_key_id`` names this provider's master key.

        True for the configured ``key_id`` and for the key ARN behind it once
        known: named by KMS answering this provider's own calls, or learned by
        :meth:`resolved_master_key_id`. With ``resolve=True`` and a key ARN
        that nothing else decides, that ARN is asked for (``DescribeKey``,
        once per provider); by default ``owns`` never calls KMS, so a role
        that may only decrypt needs no ``kms:DescribeKey``. False for anything
        else: another key's ARN, another provider's id. :meth:`unwrap` uses
        keys of these master keys only.
        """
        if master_key_id == self._key_id:
            return True
        with self._lock:
            if master_key_id in self._arns:
                return True
        if not resolve or not _KEY_ARN.fullmatch(master_key_id) or _KEY_ARN.fullmatch(self._key_id):
            return False  # not asked to resolve, not a key ARN, or ours is one and differs
        return master_key_id == self.resolved_master_key_id()

    def resolved_master_key_id(self) -> str:
        """The key ARN behind ``key_id`` (``DescribeKey``, asked once)."""
        with self._resolving:
            if self._resolved is None:
                self._count("DescribeKey")
                try:
                    response: Any = self.client.describe_key(KeyId=self._key_id)
                except (ClientError, BotoCoreError) as exc:
                    raise self._error(exc, "DescribeKey", {}, self._key_id) from exc
                self._resolved = self._remember(str(response["KeyMetadata"]["Arn"]))
            return self._resolved

    def _generate_data_key(self, context: Mapping[str, str]) -> GeneratedDataKey:
        try:
            response: Any = self.client.generate_data_key(
                KeyId=self._key_id, KeySpec="AES_256", EncryptionContext=dict(context)
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "GenerateDataKey", context, self._key_id) from exc
        return GeneratedDataKey(
            bytes(response["Plaintext"]),
            bytes(response["CiphertextBlob"]),
            self._remember(str(response["KeyId"])),
        )

    def _wrap(self, plaintext: bytes, context: Mapping[str, str]) -> tuple[bytes, str]:
        try:
            response: Any = self.client.encrypt(
                KeyId=self._key_id, Plaintext=plaintext, EncryptionContext=dict(context)
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "Encrypt", context, self._key_id) from exc
        return bytes(response["CiphertextBlob"]), self._remember(str(response["KeyId"]))

    def _rewraps_from(self, source: KeyProvider) -> bool:
        """From another AWS KMS key: ``ReEncrypt``, and the data key never leaves KMS."""
        return isinstance(source, AwsKms)

    def _rewrap_from(
        self,
        source: KeyProvider,
        wrapped: bytes,
        context: Mapping[str, str],
        source_master_key_id: str,
    ) -> tuple[bytes, str]:
        assert isinstance(source, AwsKms)
        # the source is checked as Decrypt would check it, before and after
        source_key_id = source._decrypt_key_id(source_master_key_id, context)
        try:
            response: Any = self.client.re_encrypt(
                CiphertextBlob=wrapped,
                SourceKeyId=source_key_id,
                SourceEncryptionContext=dict(context),
                DestinationKeyId=self._key_id,
                DestinationEncryptionContext=dict(context),
            )
        except (ClientError, BotoCoreError) as exc:
            error = self._error(exc, "ReEncrypt", context, source_master_key_id)
            if source_key_id != source_master_key_id:
                raise source._explain_refusal(error, source_master_key_id, context) from exc
            raise error from exc
        source._check_decrypted(str(response["SourceKeyId"]), source_master_key_id, context)
        return bytes(response["CiphertextBlob"]), self._remember(str(response["KeyId"]))

    # -- only our own master key: checked before and after Decrypt ---------------------------

    def _known_arns(self) -> set[str]:
        with self._lock:
            return set(self._arns)

    def _decrypt_key_id(self, master_key_id: str, context: Mapping[str, str]) -> str:
        """The ``KeyId`` that Decrypt (or ReEncrypt's source) names for a key the key
        table records under ``master_key_id``; refuses another master key.

        The configured ``key_id`` or a known ARN of ours is named as recorded. A
        key ARN while ours is still unknown (an alias, a role without
        ``kms:DescribeKey``, nothing asked yet) is left to KMS: the call names
        the configured ``key_id``, so KMS refuses a key wrapped under any other,
        and :meth:`_check_decrypted` checks the ARN it answers with.
        """
        if self.owns(master_key_id):
            return master_key_id
        if not self._known_arns() and _KEY_ARN.fullmatch(master_key_id):
            return self._key_id
        raise self._foreign(master_key_id, context, self._not_owned_reason())

    def _check_master_key(self, master_key_id: str, context: Mapping[str, str]) -> None:
        self._decrypt_key_id(master_key_id, context)

    def _not_owned_reason(self) -> str:
        arns = sorted(self._known_arns() - {self._key_id})
        behind = f" (key ARN {', '.join(arns)})" if arns else ""
        return f"this provider holds master key {self._key_id}{behind} only"

    def _check_decrypted(self, arn: str, master_key_id: str, context: Mapping[str, str]) -> None:
        """Check the key ARN that KMS says decrypted a key recorded under ``master_key_id``.

        It must be the row's master key (when the row records a key ARN) and
        ours: a known ARN of ours, or, while none is known, the answer of a call
        made under the configured ``key_id``, which is then ours.
        """
        if _KEY_ARN.fullmatch(master_key_id) and arn != master_key_id:
            raise self._foreign(
                arn,
                context,
                f"KMS decrypted the key with master key {arn}, not with {master_key_id} "
                "as the key table records",
            )
        with self._lock:
            if not self._arns:
                self._arns.add(arn)  # the first answer under key_id: our key ARN
                return
            if arn in self._arns:
                return
        raise self._foreign(arn, context, self._not_owned_reason())

    def _explain_refusal(
        self, error: KMSError, master_key_id: str, context: Mapping[str, str]
    ) -> KMSError:
        """KMS refused a key named by a key ARN ours could not be told from: if
        ``DescribeKey`` now tells, a key of another master key is a
        :class:`ForeignMasterKeyError`; else KMS's own refusal stands."""
        if not isinstance(error, (KMSInvalidCiphertextError, KMSAccessDeniedError)):
            return error  # not a refusal (KMS unreachable, throttling): it stands as it is
        try:
            ours = self.resolved_master_key_id()
        except KMSError:
            return error  # no kms:DescribeKey: KMS's refusal is the answer
        if master_key_id == ours:
            return error
        return self._foreign(master_key_id, context, self._not_owned_reason())

    def _unwrap(self, wrapped: bytes, context: Mapping[str, str], master_key_id: str) -> bytes:
        key_id = self._decrypt_key_id(master_key_id, context)
        try:
            response: Any = self.client.decrypt(
                CiphertextBlob=wrapped, KeyId=key_id, EncryptionContext=dict(context)
            )
        except (ClientError, BotoCoreError) as exc:
            error = self._error(exc, "Decrypt", context, master_key_id)
            if key_id != master_key_id:
                raise self._explain_refusal(error, master_key_id, context) from exc
            raise error from exc
        self._check_decrypted(str(response["KeyId"]), master_key_id, context)
        return bytes(response["Plaintext"])
