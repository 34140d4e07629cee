"""MultiKms: several master keys as one provider; and the providers' own examples run."""

from __future__ import annotations

import base64
import doctest
import os
from types import ModuleType

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select, text

from sqlalchemy_kms import AwsKms, KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms.errors import ForeignMasterKeyError, KMSInvalidCiphertextError
from sqlalchemy_kms.providers import KeyProvider, MultiKms, base, local, multi, uri

from .helpers import kms_client

CONTEXT = {"table": "patients", "key_version": "1"}


def made_under(provider: KeyProvider) -> tuple[bytes, bytes, str]:
    """(plaintext, wrapped, master key id) of a new data key of ``provider``."""
    key = provider.generate_data_key(CONTEXT)
    return key.plaintext, key.wrapped, key.master_key_id


# -- dispatch ------------------------------------------------------------------------------


def test_unwrap_goes_to_the_member_that_owns_the_master_key() -> None:
    first, second, third = (LocalKms(os.urandom(32)) for _ in range(3))
    keys = [made_under(provider) for provider in (first, second, third)]
    kms = MultiKms(first, second, third)
    for plaintext, wrapped, master_key_id in keys:
        assert kms.unwrap(wrapped, CONTEXT, master_key_id) == plaintext
    assert kms.calls == {"Decrypt": 3}
    for member in (first, second, third):
        assert member.calls == {"GenerateDataKey": 1, "Decrypt": 1}


def test_the_primary_makes_and_wraps_new_keys() -> None:
    primary, other = LocalKms(os.urandom(32)), LocalKms(os.urandom(32))
    kms = MultiKms(primary, other)
    assert kms.primary is primary and kms.members == (primary, other)
    assert kms.master_key_id == kms.resolved_master_key_id() == primary.master_key_id
    assert kms.name == "local"
    made = kms.generate_data_key(CONTEXT)
    assert made.master_key_id == primary.master_key_id
    assert primary.unwrap(made.wrapped, CONTEXT, made.master_key_id) == made.plaintext
    wrapped, master_key_id = kms.wrap(made.plaintext, CONTEXT)
    assert master_key_id == primary.master_key_id
    assert primary.unwrap(wrapped, CONTEXT, master_key_id) == made.plaintext
    assert kms.calls == {"GenerateDataKey": 1, "Encrypt": 1}
    assert other.calls == {}


def test_owns_any_member_key_and_nothing_else() -> None:
    first, second = LocalKms(os.urandom(32)), LocalKms(os.urandom(32))
    kms = MultiKms(first, second)
    assert kms.owns(first.master_key_id) and kms.owns(second.master_key_id)
    assert kms.owns(second.master_key_id, resolve=True)
    assert not kms.owns(LocalKms(os.urandom(32)).master_key_id)
    assert not kms.owns("arn:aws:kms:us-east-1:123456789012:key/" + "0" * 36, resolve=True)
    assert kms.provider_for(second.master_key_id) is second


def test_a_master_key_no_member_holds_is_refused_as_foreign() -> None:
    held, stranger = LocalKms(os.urandom(32)), LocalKms(os.urandom(32))
    plaintext, wrapped, master_key_id = made_under(stranger)
    kms = MultiKms(held)
    with pytest.raises(ForeignMasterKeyError) as info:
        kms.unwrap(wrapped, {"table": "patients", "key_version": "3"}, master_key_id)
    error = info.value
    assert isinstance(error, KMSInvalidCiphertextError)  # a wrong master key, as ever
    assert error.master_key_id == master_key_id
    assert error.table == "patients" and error.key_version == 3
    assert error.operation == "Decrypt"
    message = str(error)
    assert master_key_id in message and held.master_key_id in message
    for secret in (plaintext, wrapped):
        assert secret.hex() not in message
        assert base64.b64encode(secret).decode() not in message
    assert kms.calls == {"Decrypt": 1} and held.calls == {}
    with pytest.raises(ForeignMasterKeyError, match=master_key_id):
        kms.provider_for(master_key_id)


# -- with_primary ------------------------------------------------------------------------


def test_with_primary_makes_new_keys_under_the_new_key_and_keeps_the_old_ones() -> None:
    old, new = LocalKms(os.urandom(32)), LocalKms(os.urandom(32))
    plaintext, wrapped, master_key_id = made_under(old)
    before = MultiKms(old)
    after = before.with_primary(new)
    assert after is not before
    assert before.members == (old,)  # left as it was
    assert after.members == (new, old)
    assert after.generate_data_key(CONTEXT).master_key_id == new.master_key_id
    assert after.unwrap(wrapped, CONTEXT, master_key_id) == plaintext
    assert after.calls == {"GenerateDataKey": 1, "Decrypt": 1}
    assert before.calls == {}


def test_with_primary_of_a_member_moves_it_first_without_a_copy() -> None:
    first, second, third = (LocalKms(os.urandom(32)) for _ in range(3))
    kms = MultiKms(first, second, third).with_primary(third)
    assert kms.members == (third, first, second)


def test_a_multikms_member_adds_its_members() -> None:
    first, second, third = (LocalKms(os.urandom(32)) for _ in range(3))
    kms = MultiKms(third, MultiKms(first, second), first)
    assert kms.members == (third, first, second)
    assert MultiKms(first).with_primary(MultiKms(second, third)).members == (second, third, first)


def test_members_must_be_providers() -> None:
    with pytest.raises(TypeError):
        MultiKms("local://master.key")  # type: ignore[arg-type]


def test_repr_names_master_keys_only() -> None:
    key = os.urandom(32)
    member = LocalKms(key)
    shown = repr(MultiKms(member, LocalKms(os.urandom(32))))
    assert shown.startswith("MultiKms(LocalKms(") and member.master_key_id in shown
    assert key.hex() not in shown and base64.b64encode(key).decode() not in shown


# -- rewrapping --------------------------------------------------------------------------


def test_rewrap_from_a_multikms_source_unwraps_with_its_owning_member() -> None:
    old, older, target = (LocalKms(os.urandom(32)) for _ in range(3))
    plaintext, wrapped, master_key_id = made_under(older)
    source = MultiKms(old, older)
    rewrapped, new_id = target.rewrap_from(source, wrapped, CONTEXT, master_key_id)
    assert new_id == target.master_key_id
    assert target.unwrap(rewrapped, CONTEXT, new_id) == plaintext
    assert older.calls == {"GenerateDataKey": 1, "Decrypt": 1}
    assert old.calls == {}


def test_aws_rewrap_from_a_multikms_of_aws_keys_stays_inside_kms(
    kms: AwsKms, kms_endpoint: str
) -> None:
    """The source MultiKms is narrowed to its AwsKms member, so ReEncrypt is used."""
    client = kms_client(kms_endpoint)
    second = client.create_key(Description="sqlalchemy-kms multi test")["KeyMetadata"]
    made = kms.generate_data_key(CONTEXT)
    target = MultiKms(AwsKms(second["KeyId"], client=kms_client(kms_endpoint)))
    source = MultiKms(LocalKms(os.urandom(32)), kms)
    wrapped, master_key_id = target.rewrap_from(source, made.wrapped, CONTEXT, made.master_key_id)
    assert master_key_id == second["Arn"]
    assert target.calls == {"ReEncrypt": 1}
    assert target.primary.calls == {"ReEncrypt": 1}
    assert source.calls == {} and kms.calls == {"GenerateDataKey": 1}  # no Decrypt
    assert target.unwrap(wrapped, CONTEXT, master_key_id) == made.plaintext


def test_aws_members_named_by_alias_find_their_keys_by_arn(
    kms_endpoint: str, cmk: dict[str, str]
) -> None:
    """A fresh MultiKms of aliases routes a key ARN to its member, asking DescribeKey
    once per member at most, and refuses another key's ARN."""
    client = kms_client(kms_endpoint)
    second = client.create_key(Description="sqlalchemy-kms multi test")["KeyMetadata"]
    alias = f"alias/sqlalchemy-kms-multi-{second['KeyId'][:8]}"
    client.create_alias(AliasName=alias, TargetKeyId=second["KeyId"])
    stranger = client.create_key(Description="sqlalchemy-kms multi test")["KeyMetadata"]
    made = client.generate_data_key(KeyId=alias, KeySpec="AES_256", EncryptionContext=CONTEXT)

    first_kms = AwsKms(cmk["alias"], client=kms_client(kms_endpoint))
    second_kms = AwsKms(alias, client=kms_client(kms_endpoint))
    kms = MultiKms(first_kms, second_kms)
    assert not kms.owns(second["Arn"])  # not known without asking KMS
    assert kms.unwrap(made["CiphertextBlob"], CONTEXT, second["Arn"]) == made["Plaintext"]
    assert kms.unwrap(made["CiphertextBlob"], CONTEXT, second["Arn"]) == made["Plaintext"]
    assert first_kms.calls == {"DescribeKey": 1}
    assert second_kms.calls == {"DescribeKey": 1, "Decrypt": 2}
    assert kms.owns(second["Arn"])
    with pytest.raises(ForeignMasterKeyError, match=stranger["Arn"]):
        kms.unwrap(made["CiphertextBlob"], CONTEXT, stranger["Arn"])
    assert first_kms.calls["DescribeKey"] == second_kms.calls["DescribeKey"] == 1


# -- with a vault -------------------------------------------------------------------------


def test_a_vault_reads_old_keys_and_writes_new_ones_through_a_multikms() -> None:
    old, new = LocalKms(os.urandom(32)), LocalKms(os.urandom(32))
    engine = create_engine("sqlite://")
    metadata = MetaData()
    before, after = (
        Table(
            name,
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=False),
            Column("name", KMSEncrypted(String(50))),
        )
        for name in ("multi_before", "multi_after")
    )
    vault = KeyVault(engine, old)
    vault.create_table()
    before.create(engine)
    with engine.begin() as conn:
        conn.execute(before.insert().values(id=1, name="under the old key"))
    vault.close()

    vault = KeyVault(engine, MultiKms(old).with_primary(new))
    try:
        after.create(engine)  # its keys are made now, under the new primary
        with engine.begin() as conn:
            conn.execute(after.insert().values(id=1, name="under the new key"))
        with engine.connect() as conn:
            assert conn.execute(select(before.c.name)).scalar_one() == "under the old key"
            assert conn.execute(select(after.c.name)).scalar_one() == "under the new key"
            owners = dict(
                conn.execute(text("SELECT scope, master_key_id FROM kms_data_keys")).all()
            )
    finally:
        vault.close()
        engine.dispose()
    assert owners == {"multi_before": old.master_key_id, "multi_after": new.master_key_id}


# -- the examples in the providers' docstrings ------------------------------------------------


@pytest.mark.parametrize("module", [base, local, multi, uri], ids=lambda m: m.__name__)
def test_docstring_examples_run(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0
