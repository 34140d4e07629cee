"""Key providers: where master keys live.

* :class:`~sqlalchemy_kms.providers.aws.AwsKms`: AWS KMS through boto3 (production).
* :class:`~sqlalchemy_kms.providers.local.LocalKms`: a local master key, for
  development, demos and tests only.
* :class:`~sqlalchemy_kms.providers.base.KeyProvider`: the interface to
  implement for another KMS.
"""

from .aws import AwsKms
from .base import GeneratedDataKey, KeyProvider
from .local import LocalKms

__all__ = ["AwsKms", "GeneratedDataKey", "KeyProvider", "LocalKms"]
