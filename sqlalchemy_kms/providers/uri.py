"""KMS URIs: the one place that turns ``aws-kms://KEY`` or ``local://PATH`` into a provider.

The command line's ``--kms``, Alembic's ``op.rewrap_kms_keys("aws-kms://...")``
and an application's ``env.py`` all name master keys this way::

    >>> parse_kms_uri("aws-kms://alias/my-app-cmk")
    KmsUri(scheme='aws-kms', key_id='alias/my-app-cmk')
    >>> provider_from_uri("aws-kms://arn:aws:kms:eu-west-1:111122223333:alias/myapp")
    AwsKms('arn:aws:kms:eu-west-1:111122223333:alias/myapp')
    >>> provider_uri(AwsKms("alias/myapp", region_name="eu-west-1"))
    'aws-kms://alias/myapp'
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, NamedTuple

from botocore.exceptions import BotoCoreError

from ..errors import ConfigurationError
from .aws import AwsKms
from .base import KeyProvider
from .local import LocalKms

__all__ = [
    "AWS_SCHEME",
    "LOCAL_SCHEME",
    "KmsUri",
    "parse_kms_uri",
    "provider_from_uri",
    "provider_uri",
    "region_of_arn",
]

#: Scheme of an AWS KMS master key: ``aws-kms://alias/NAME``, a key or alias ARN, a key id.
AWS_SCHEME: Final = "aws-kms://"
#: Scheme of a :class:`~sqlalchemy_kms.LocalKms` key file: ``local://PATH``.
LOCAL_SCHEME: Final = "local://"


class KmsUri(NamedTuple):
    """A parsed KMS URI.

    ``scheme`` is ``"local"`` or ``"aws-kms"``. ``key_id`` is what follows the
    scheme: for ``aws-kms`` the AWS KMS key (alias name, alias ARN, key ARN or
    key id); for ``local`` the path of a :class:`~sqlalchemy_kms.LocalKms` key
    file, or ``None`` for a bare ``local`` (a default key file chosen by the caller).

    >>> str(KmsUri("aws-kms", "alias/app"))
    'aws-kms://alias/app'
    """

    scheme: str
    key_id: str | None = None

    def __str__(self) -> str:
        return self.scheme if self.key_id is None else f"{self.scheme}://{self.key_id}"


def parse_kms_uri(uri: str) -> KmsUri:
    """Parse ``local``, ``local://PATH`` or ``aws-kms://KEY``; :class:`ValueError`
    for anything else.

    >>> parse_kms_uri("local")
    KmsUri(scheme='local', key_id=None)
    >>> parse_kms_uri("local:///etc/app/master.key")
    KmsUri(scheme='local', key_id='/etc/app/master.key')
    """
    value = uri.strip()
    if value.lower() in ("local", LOCAL_SCHEME):
        return KmsUri("local")
    if value.lower().startswith(LOCAL_SCHEME):
        return KmsUri("local", value[len(LOCAL_SCHEME) :])
    if value.lower().startswith(AWS_SCHEME):
        key_id = value[len(AWS_SCHEME) :].strip()
        if not key_id:
            raise ValueError(
                "aws-kms:// needs a key after the scheme, e.g. aws-kms://alias/my-app-cmk"
            )
        return KmsUri("aws-kms", key_id)
    scheme = value.split("://", 1)[0] if "://" in value else value
    raise ValueError(
        f"unknown KMS {scheme!r}; use 'local', 'local://PATH' (a LocalKms key file) or "
        "'aws-kms://KEY' (KEY: alias/NAME, an alias or key ARN, or a key id)"
    )


def region_of_arn(key_id: str) -> str | None:
    """The region named by a KMS key or alias ARN, ``None`` for other key ids.

    >>> region_of_arn("arn:aws:kms:ap-northeast-2:111122223333:key/abcd")
    'ap-northeast-2'
    >>> region_of_arn("alias/app") is None
    True
    """
    parts = key_id.split(":", 5)
    if len(parts) == 6 and parts[0] == "arn" and parts[2] == "kms" and parts[3]:
        return parts[3]
    return None


def provider_from_uri(
    uri: str | KmsUri, *, region: str | None = None
) -> KeyProvider:
    """A key provider from a URI: ``aws-kms://KEY`` or ``local://PATH``.

    ``KEY`` is an AWS KMS key id, key ARN, alias name (``alias/NAME``) or alias
    ARN; the boto3 client is configured the usual way (environment, profiles,
    ``AWS_ENDPOINT_URL_KMS``), and ``region`` or else the region of a key or
    alias ARN is used when one is given. ``PATH`` is a key file written by
    :meth:`LocalKms.generate_key_file <sqlalchemy_kms.LocalKms.generate_key_file>`,
    relative to the current directory unless absolute (development only).

    Raises :class:`~sqlalchemy_kms.errors.ConfigurationError` for an unknown
    scheme, a missing or invalid key file, or an AWS client that cannot be set
    up (no region configured, an unknown profile).
    """
    try:
        parsed = uri if isinstance(uri, KmsUri) else parse_kms_uri(uri)
    except ValueError as error:
        message = str(error).replace("unknown KMS ", "unknown KMS URI scheme ", 1)
        raise ConfigurationError(message) from None
    if parsed.scheme == "aws-kms":
        key_id = parsed.key_id or ""
        try:
            return AwsKms(key_id, region_name=region or region_of_arn(key_id))
        except BotoCoreError as error:
            raise ConfigurationError(
                f"cannot set up the AWS KMS client for {parsed}: {error} "
                "(configure the region with AWS_REGION or a profile, or give a key ARN)"
            ) from None
    if parsed.key_id is None or not parsed.key_id.strip() or parsed.key_id.strip() == ".":
        raise ConfigurationError("local:// needs a key file path, e.g. local://master.key")
    path = Path(parsed.key_id).expanduser()
    try:
        return LocalKms(key_file=path)
    except OSError as error:
        raise ConfigurationError(
            f"cannot read the local key file {path}: {error.strerror or error}"
        ) from None
    except ValueError as error:
        raise ConfigurationError(str(error)) from None


def provider_uri(provider: KeyProvider | str) -> str:
    """The URI that names ``provider`` in a migration script (the reverse of
    :func:`provider_from_uri`); :class:`ValueError` for a provider no URI names."""
    if isinstance(provider, str):
        return provider
    if isinstance(provider, AwsKms):
        return AWS_SCHEME + provider.master_key_id
    raise ValueError(
        f"cannot name {provider!r} by a URI: pass a URI (aws-kms://KEY or local://PATH) instead"
    )
