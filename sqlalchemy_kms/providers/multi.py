"""A provider made of several master keys: the first makes new keys, any of them unwraps.

Rotating the master key (``vault.rewrap(new)``, ``op.rewrap_kms_keys(...)``)
moves data keys from one master key to another; until every key has moved,
and for anything that must still read keys wrapped under the old one (a
partial rewrap, a backup, a downgrade), both master keys are needed.
:class:`MultiKms` holds them:

* the **primary** (the first member) makes new data keys and wraps keys;
* :meth:`~MultiKms.unwrap` goes to the member that
  :meth:`~sqlalchemy_kms.providers.base.KeyProvider.owns` the master key the
  key table records (:meth:`~MultiKms.provider_for`), and raises
  :class:`~sqlalchemy_kms.errors.ForeignMasterKeyError` when none does:
  the members are the only master keys whose key rows are used;
* :meth:`~MultiKms.with_primary` makes a new master key the primary and keeps
  the others.

Example::

    >>> from sqlalchemy_kms.providers import LocalKms, MultiKms
    >>> old, new = LocalKms(bytes(32)), LocalKms(bytes(range(32)))
    >>> context = {"table": "patients", "key_version": "1"}
    >>> under_old = old.generate_data_key(context)
    >>> kms = MultiKms(old).with_primary(new)     # new keys under `new`; `old` still reads
    >>> kms.primary is new and kms.members == (new, old)
    True
    >>> kms.unwrap(under_old.wrapped, context, under_old.master_key_id) == under_old.plaintext
    True
    >>> kms.generate_data_key(context).master_key_id == new.master_key_id
    True
    >>> kms.owns(old.master_key_id), kms.owns("local:0123456789abcdef")
    (True, False)
    >>> dict(kms.calls)
    {'Decrypt': 1, 'GenerateDataKey': 1}

A key wrapped under a master key no member holds is refused by name::

    >>> kms.unwrap(under_old.wrapped, context, "local:0123456789abcdef")
    Traceback (most recent call last):
    ...
    sqlalchemy_kms.errors.ForeignMasterKeyError: Decrypt refused for table patients key \
version 1 master key local:0123456789abcdef: no master key of this MultiKms owns it \
(it holds local:..., local:...); ...

With a vault, ``KeyVault(engine, MultiKms(AwsKms("alias/app-2024"), AwsKms("alias/app-2023")))``
writes under ``alias/app-2024`` and reads keys of either. The key table records
key ARNs: a member named by alias learns its key ARN from its own calls, or
else asks KMS once (``DescribeKey``, so the role needs ``kms:DescribeKey``);
members named by key ARN need no such call.
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import GeneratedDataKey, KeyProvider

__all__ = ["MultiKms"]


class MultiKms(KeyProvider):
    """Several master keys as one provider: ``MultiKms(primary, *others)``.

    New data keys are made and wrapped under ``primary``; a wrapped key is
    unwrapped by the member that owns the master key it was wrapped under.
    A :class:`MultiKms` given as a member adds its members (in order); a
    member given twice is kept once. :attr:`name`, :attr:`master_key_id` and
    :meth:`resolved_master_key_id` are the primary's, since the key table
    records them for the keys the primary makes.

    ``calls`` counts the calls made to the composite; each member counts,
    in its own ``calls``, the calls passed on to it.
    """

    def __init__(self, primary: KeyProvider, *others: KeyProvider) -> None:
        super().__init__()
        members: list[KeyProvider] = []
        for provider in (primary, *others):
            if not isinstance(provider, KeyProvider):
                raise TypeError("MultiKms holds KeyProvider objects such as AwsKms or LocalKms")
            for member in provider.members:
                if not any(member is kept for kept in members):
                    members.append(member)
        self._members = tuple(members)
        self.name = self._members[0].name

    def __repr__(self) -> str:
        return f"MultiKms({', '.join(repr(member) for member in self._members)})"

    @property
    def primary(self) -> KeyProvider:
        """The member that makes and wraps new data keys."""
        return self._members[0]

    @property
    def members(self) -> tuple[KeyProvider, ...]:
        """Every member, the primary first."""
        return self._members

    @property
    def master_key_id(self) -> str:
        """The primary's master key id."""
        return self.primary.master_key_id

    def resolved_master_key_id(self) -> str:
        """The primary's master key id as the key table records it."""
        return self.primary.resolved_master_key_id()

    def with_primary(self, provider: KeyProvider) -> MultiKms:
        """A new :class:`MultiKms` whose primary is ``provider``, keeping the other members.

        After a rewrap to ``provider``, new keys are made under it while keys
        not moved yet still unwrap through the members that made them. This
        :class:`MultiKms` is left as it was.
        """
        return MultiKms(provider, *self._members)

    def owns(self, master_key_id: str, *, resolve: bool = False) -> bool:
        """Whether any member owns ``master_key_id`` (``resolve`` as for the members)."""
        return self._member_for(master_key_id, resolve=resolve) is not None

    def provider_for(self, master_key_id: str) -> KeyProvider:
        """The member that owns ``master_key_id``: the one :meth:`unwrap` uses.

        Members are asked first from what they know, then with
        ``resolve=True`` (an :class:`~sqlalchemy_kms.AwsKms` given an alias
        may ask KMS once for its key ARN). Raises
        :class:`~sqlalchemy_kms.errors.ForeignMasterKeyError`, naming the
        master key, when no member owns it.
        """
        member = self._member_for(master_key_id, resolve=True)
        if member is None:
            raise self._foreign(master_key_id, {}, self._not_owned_reason())
        return member

    def _member_for(self, master_key_id: str, *, resolve: bool) -> KeyProvider | None:
        for member in self._members:
            if member.owns(master_key_id):
                return member
        if resolve:
            for member in self._members:
                if member.owns(master_key_id, resolve=True):
                    return member
        return None

    def _not_owned_reason(self) -> str:
        held = ", ".join(member.master_key_id for member in self._members)
        return f"no master key of this MultiKms owns it (it holds {held})"

    def _generate_data_key(self, context: Mapping[str, str]) -> GeneratedDataKey:
        return self.primary.generate_data_key(context)

    def _wrap(self, plaintext: bytes, context: Mapping[str, str]) -> tuple[bytes, str]:
        return self.primary.wrap(plaintext, context)

    def _check_master_key(self, master_key_id: str, context: Mapping[str, str]) -> None:
        if self._member_for(master_key_id, resolve=True) is None:
            raise self._foreign(master_key_id, context, self._not_owned_reason())

    def _unwrap(self, wrapped: bytes, context: Mapping[str, str], master_key_id: str) -> bytes:
        # the owner checks again, before and (AWS KMS) after its own Decrypt
        return self.provider_for(master_key_id).unwrap(wrapped, context, master_key_id)

    def _rewraps_from(self, source: KeyProvider) -> bool:
        return self.primary._rewraps_from(source)

    def _rewrap_from(
        self,
        source: KeyProvider,
        wrapped: bytes,
        context: Mapping[str, str],
        source_master_key_id: str,
    ) -> tuple[bytes, str]:
        return self.primary.rewrap_from(source, wrapped, context, source_master_key_id)
