"""Key providers: where master keys live, and how the library talks to them.

* :class:`~sqlalchemy_kms.providers.aws.AwsKms`: AWS KMS through boto3 (production).
* :class:`~sqlalchemy_kms.providers.local.LocalKms`: a local master key, for
  development, demos and tests only.
* :class:`~sqlalchemy_kms.providers.multi.MultiKms`: several master keys as
  one provider (the first makes new keys, any of them unwraps), for master
  key rotation.
* :class:`~sqlalchemy_kms.providers.base.KeyProvider`: the interface to
  implement for another KMS (its protected hooks; the public methods count calls).
* :mod:`~sqlalchemy_kms.providers.uri`: KMS URIs (``aws-kms://KEY``, ``local://PATH``).
"""

from .aws import AwsKms
from .base import GeneratedDataKey, KeyProvider
from .local import LocalKms
from .multi import MultiKms

__all__ = ["AwsKms", "GeneratedDataKey", "KeyProvider", "LocalKms", "MultiKms"]
