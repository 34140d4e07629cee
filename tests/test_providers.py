"""Key providers: LocalKms, and AwsKms against a moto KMS server over HTTP."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from sqlalchemy_kms import AwsKms, LocalKms
from sqlalchemy_kms.errors import (
    ForeignMasterKeyError,
    KMSAccessDeniedError,
    KMSError,
    KMSInvalidCiphertextError,
    KMSKeyDisabledError,
    KMSKeyNotFoundError,
    KMSUnavailableError,
    SQLAlchemyKMSError,
)
from sqlalchemy_kms.providers import GeneratedDataKey, KeyProvider
from sqlalchemy_kms.providers.base import encryption_context

from .helpers import REGION, kms_client

CONTEXT = {"table": "patients", "key_version": "1"}


def key_forms(key: bytes) -> list[str]:
    """Ways a key's bytes could leak into text."""
    return [
        key.hex(),
        key.hex().upper(),
        base64.b64encode(key).decode(),
        base64.urlsafe_b64encode(key).decode(),
        base64.b64encode(key).decode().rstrip("="),
        repr(key),
    ]


# == LocalKms ===============================================================================


def test_encryption_context() -> None:
    assert encryption_context("clinic.patients", "data", 7) == {
        "table": "clinic.patients",
        "key_version": "7",
    }
    assert encryption_context("clinic.patients", "search", 7) == {
        "table": "clinic.patients",
        "key_version": "7",
        "purpose": "search",
    }


def test_local_search_context_is_bound(local_kms: LocalKms) -> None:
    """A search key and a data key of the same table and version are not interchangeable."""
    data = encryption_context("patients", "data", 1)
    search = encryption_context("patients", "search", 1)
    generated = local_kms.generate_data_key(search)
    assert local_kms.unwrap(generated.wrapped, search, generated.master_key_id) == (
        generated.plaintext
    )
    with pytest.raises(KMSInvalidCiphertextError):
        local_kms.unwrap(generated.wrapped, data, generated.master_key_id)


def test_local_round_trip(local_kms: LocalKms) -> None:
    generated = local_kms.generate_data_key(CONTEXT)
    assert isinstance(generated, GeneratedDataKey)
    assert isinstance(local_kms, KeyProvider)
    assert len(generated.plaintext) == 32
    assert generated.plaintext not in generated.wrapped
    assert generated.master_key_id == local_kms.master_key_id
    assert local_kms.unwrap(generated.wrapped, CONTEXT, generated.master_key_id) == (
        generated.plaintext
    )


def test_local_data_keys_are_fresh(local_kms: LocalKms) -> None:
    first = local_kms.generate_data_key(CONTEXT)
    second = local_kms.generate_data_key(CONTEXT)
    assert first.plaintext != second.plaintext
    assert first.wrapped != second.wrapped


def test_local_same_key_unwraps_across_instances() -> None:
    key = os.urandom(32)
    generated = LocalKms(key).generate_data_key(CONTEXT)
    other = LocalKms(key)
    assert other.master_key_id == generated.master_key_id
    assert other.unwrap(generated.wrapped, CONTEXT, generated.master_key_id) == (
        generated.plaintext
    )


def test_local_master_key_id_depends_on_the_key() -> None:
    assert LocalKms(os.urandom(32)).master_key_id != LocalKms(os.urandom(32)).master_key_id
    assert LocalKms(os.urandom(32)).master_key_id.startswith("local:")


@pytest.mark.parametrize(
    "context",
    [
        {"table": "doctors", "key_version": "1"},
        {"table": "patients", "key_version": "2"},
        {"table": "other_schema.patients", "key_version": "1"},
        {"table": "patients", "key_version": "1", "extra": "x"},
    ],
    ids=["other-table", "other-version", "other-schema", "extra-entry"],
)
def test_local_wrong_context(local_kms: LocalKms, context: dict[str, str]) -> None:
    generated = local_kms.generate_data_key(CONTEXT)
    with pytest.raises(KMSInvalidCiphertextError) as info:
        local_kms.unwrap(generated.wrapped, context, generated.master_key_id)
    err = info.value
    assert err.table == context["table"]
    assert err.key_version == int(context["key_version"])
    assert err.operation == "Decrypt"
    assert err.master_key_id == generated.master_key_id
    assert context["table"] in str(err)
    assert f"key version {context['key_version']}" in str(err)


def test_local_another_master_key(local_kms: LocalKms) -> None:
    generated = local_kms.generate_data_key(CONTEXT)
    other = LocalKms(os.urandom(32))
    with pytest.raises(KMSInvalidCiphertextError, match="another local master key") as info:
        other.unwrap(generated.wrapped, CONTEXT, generated.master_key_id)
    assert info.value.master_key_id == generated.master_key_id
    assert info.value.table == "patients"
    assert info.value.key_version == 1


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize(
    "damage",
    [
        lambda w: b"",
        lambda w: w[:1],
        lambda w: w[:20],
        lambda w: w[: 1 + 8 + 12 + 15],
        lambda w: w[:-1],
        lambda w: w + b"\x00",
        lambda w: b"\x02" + w[1:],
        lambda w: b"\x00" + w[1:],
        lambda w: _flip(w, 12),  # nonce
        lambda w: _flip(w, len(w) - 1),  # tag
        lambda w: _flip(w, 30),  # encrypted key
        lambda w: os.urandom(len(w)),
    ],
    ids=[
        "empty", "one-byte", "header-only", "one-short-of-minimum", "truncated",
        "extended", "wrong-format-version", "zero-format-version", "nonce-flipped",
        "tag-flipped", "body-flipped", "random",
    ],
)
def test_local_damaged_wrapped_key(local_kms: LocalKms, damage: Any) -> None:
    generated = local_kms.generate_data_key(CONTEXT)
    with pytest.raises(KMSInvalidCiphertextError) as info:
        local_kms.unwrap(damage(generated.wrapped), CONTEXT, generated.master_key_id)
    assert info.value.operation == "Decrypt"
    assert info.value.table == "patients"


@pytest.mark.parametrize("key", [b"", bytes(16), bytes(31), bytes(33), bytes(64)])
def test_local_wrong_key_length(key: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        LocalKms(key)


@pytest.mark.parametrize("key", [bytearray(32), 32])
def test_local_key_must_be_bytes(key: Any) -> None:
    with pytest.raises(ValueError):
        LocalKms(key)


def test_local_key_given_as_a_path_is_a_key_file(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    made = LocalKms.generate_key_file(path)
    assert LocalKms(str(path)).master_key_id == LocalKms(path).master_key_id == made.master_key_id
    with pytest.raises(FileNotFoundError):
        LocalKms("x" * 32)  # a str is a path, never key material


def test_local_exactly_one_of_key_and_key_file(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    LocalKms.generate_key_file(path)
    with pytest.raises(ValueError, match="exactly one"):
        LocalKms()
    with pytest.raises(ValueError, match="exactly one"):
        LocalKms(os.urandom(32), key_file=path)


def test_local_key_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    written = LocalKms.generate_key_file(path)
    assert isinstance(written, LocalKms)
    key = base64.b64decode(path.read_text().strip(), validate=True)
    assert len(key) == 32
    assert LocalKms(key).master_key_id == written.master_key_id

    for loaded in (LocalKms(key_file=path), LocalKms(key_file=str(path))):
        assert loaded.master_key_id == written.master_key_id
        generated = written.generate_data_key(CONTEXT)
        assert loaded.unwrap(generated.wrapped, CONTEXT, generated.master_key_id) == (
            generated.plaintext
        )
        generated = loaded.generate_data_key(CONTEXT)
        assert written.unwrap(generated.wrapped, CONTEXT, generated.master_key_id) == (
            generated.plaintext
        )


def test_local_key_files_differ(tmp_path: Path) -> None:
    first = LocalKms.generate_key_file(tmp_path / "a.key")
    second = LocalKms.generate_key_file(tmp_path / "b.key")
    assert first.master_key_id != second.master_key_id
    assert (tmp_path / "a.key").read_text() != (tmp_path / "b.key").read_text()


def test_local_key_file_mode_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    old_umask = os.umask(0o022)
    try:
        LocalKms.generate_key_file(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_local_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    first = LocalKms.generate_key_file(path)
    content = path.read_text()
    with pytest.raises(FileExistsError):
        LocalKms.generate_key_file(path)
    assert path.read_text() == content
    assert LocalKms(key_file=path).master_key_id == first.master_key_id


def test_local_key_file_does_not_follow_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.key"
    link = tmp_path / "master.key"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        LocalKms.generate_key_file(link)
    assert not target.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        b"this is not base64!\n",
        b"c2hvcnQ",  # bad padding
        b"\xff\xfe\x00garbage",
        b"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n",
    ],
    ids=["empty", "newline", "not-base64", "bad-padding", "binary", "pem"],
)
def test_local_bad_key_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "master.key"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        LocalKms(key_file=path)


@pytest.mark.parametrize("length", [16, 31, 33, 64])
def test_local_key_file_with_wrong_key_length(tmp_path: Path, length: int) -> None:
    path = tmp_path / "master.key"
    path.write_text(base64.b64encode(os.urandom(length)).decode() + "\n")
    with pytest.raises(ValueError, match="32 bytes"):
        LocalKms(key_file=path)


def test_local_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        LocalKms(key_file=tmp_path / "absent.key")


def test_local_repr_and_id_never_show_the_key(tmp_path: Path) -> None:
    key = os.urandom(32)
    provider = LocalKms(key)
    for text in (repr(provider), str(provider), provider.master_key_id):
        for form in key_forms(key):
            assert form not in text
    assert provider.master_key_id in repr(provider)

    path = tmp_path / "master.key"
    from_file = LocalKms.generate_key_file(path)
    file_key = base64.b64decode(path.read_text())
    for text in (repr(from_file), from_file.master_key_id, repr(LocalKms(key_file=path))):
        for form in key_forms(file_key):
            assert form not in text


def test_generated_data_key_repr_hides_the_plaintext(local_kms: LocalKms) -> None:
    generated = local_kms.generate_data_key(CONTEXT)
    text = repr(generated)
    for form in key_forms(generated.plaintext):
        assert form not in text
    assert generated.master_key_id in text


def test_local_calls_counter(local_kms: LocalKms) -> None:
    assert local_kms.calls["GenerateDataKey"] == 0
    assert local_kms.calls["Decrypt"] == 0
    first = local_kms.generate_data_key(CONTEXT)
    local_kms.generate_data_key(CONTEXT)
    local_kms.unwrap(first.wrapped, CONTEXT, first.master_key_id)
    with pytest.raises(KMSInvalidCiphertextError):
        local_kms.unwrap(first.wrapped, {"table": "x", "key_version": "1"}, "local:x")
    assert local_kms.calls["GenerateDataKey"] == 2
    assert local_kms.calls["Decrypt"] == 2


def test_local_owns_only_its_own_master_key(local_kms: LocalKms) -> None:
    other = LocalKms(os.urandom(32))
    assert local_kms.owns(local_kms.master_key_id)
    assert local_kms.owns(local_kms.master_key_id, resolve=True)
    assert not local_kms.owns(other.master_key_id)
    assert not local_kms.owns("arn:aws:kms:us-east-1:123456789012:key/" + "0" * 36)
    assert not local_kms.owns(local_kms.master_key_id.upper())
    assert not local_kms.owns("local:")


# == the base class: public operations count, then call the hooks ===========================


class HookOnlyKms(KeyProvider):
    """A provider that implements only the protected hooks (XOR: shows the calls only)."""

    name = "hook-only"

    def __init__(self, mask: int, fail: bool = False) -> None:
        super().__init__()
        self.mask = mask
        self.fail = fail
        self.hooks: list[str] = []

    @property
    def master_key_id(self) -> str:
        return f"hook-only:{self.mask}"

    def _xor(self, data: bytes) -> bytes:
        return bytes(b ^ self.mask for b in data)

    def _generate_data_key(self, context: Mapping[str, str]) -> GeneratedDataKey:
        self.hooks.append("generate")
        plaintext = os.urandom(32)
        return GeneratedDataKey(plaintext, self._xor(plaintext), self.master_key_id)

    def _unwrap(self, wrapped: bytes, context: Mapping[str, str], master_key_id: str) -> bytes:
        self.hooks.append("unwrap")
        if self.fail:
            raise KMSUnavailableError("down", operation="Decrypt", master_key_id=master_key_id)
        return self._xor(wrapped)

    def _wrap(self, plaintext: bytes, context: Mapping[str, str]) -> tuple[bytes, str]:
        self.hooks.append("wrap")
        return self._xor(plaintext), self.master_key_id


def test_a_provider_with_only_the_hooks_gets_every_call_counted() -> None:
    source, target = HookOnlyKms(0x11), HookOnlyKms(0x22)
    made = source.generate_data_key(CONTEXT)
    assert source.unwrap(made.wrapped, CONTEXT, made.master_key_id) == made.plaintext
    wrapped, master_key_id = target.wrap(made.plaintext, CONTEXT)
    assert master_key_id == target.master_key_id
    assert target.unwrap(wrapped, CONTEXT, master_key_id) == made.plaintext
    rewrapped, _ = target.rewrap_from(source, made.wrapped, CONTEXT, made.master_key_id)
    assert rewrapped == wrapped
    assert source.calls == {"GenerateDataKey": 1, "Decrypt": 2}
    # no ReEncrypt hook: the generic rewrap is the source's Decrypt and the target's Encrypt
    assert target.calls == {"Encrypt": 2, "Decrypt": 1}
    assert source.hooks == ["generate", "unwrap", "unwrap"]
    assert target.hooks == ["wrap", "unwrap", "wrap"]


def test_a_failing_call_is_counted_too() -> None:
    provider = HookOnlyKms(0x33, fail=True)
    with pytest.raises(KMSUnavailableError):
        provider.unwrap(b"x" * 32, CONTEXT, provider.master_key_id)
    assert provider.calls == {"Decrypt": 1}


def test_a_provider_missing_a_hook_cannot_be_made() -> None:
    class NoUnwrap(KeyProvider):
        master_key_id = "no-unwrap"

        def _generate_data_key(self, context: Mapping[str, str]) -> GeneratedDataKey:
            raise NotImplementedError

        def _wrap(self, plaintext: bytes, context: Mapping[str, str]) -> tuple[bytes, str]:
            raise NotImplementedError

    with pytest.raises(TypeError, match="_unwrap"):
        NoUnwrap()  # type: ignore[abstract]


def test_a_provider_that_rewraps_inside_its_kms_counts_reencrypt() -> None:
    class ReEncrypting(HookOnlyKms):
        def _rewraps_from(self, source: KeyProvider) -> bool:
            return isinstance(source, HookOnlyKms)

        def _rewrap_from(
            self,
            source: KeyProvider,
            wrapped: bytes,
            context: Mapping[str, str],
            source_master_key_id: str,
        ) -> tuple[bytes, str]:
            assert isinstance(source, HookOnlyKms)
            self.hooks.append("rewrap")
            return bytes(b ^ source.mask ^ self.mask for b in wrapped), self.master_key_id

    source, target = HookOnlyKms(0x11), ReEncrypting(0x44)
    made = source.generate_data_key(CONTEXT)
    rewrapped, _ = target.rewrap_from(source, made.wrapped, CONTEXT, made.master_key_id)
    assert target.unwrap(rewrapped, CONTEXT, target.master_key_id) == made.plaintext
    assert target.calls == {"ReEncrypt": 1, "Decrypt": 1}
    assert source.calls == {"GenerateDataKey": 1}  # the data key never left the "KMS"
    assert target.hooks == ["rewrap", "unwrap"]


def test_the_base_owns_only_the_master_key_id() -> None:
    provider = HookOnlyKms(0x55)
    assert provider.owns("hook-only:85")
    assert not provider.owns("hook-only:86")
    assert not provider.owns("local:" + "0" * 16)
    assert provider.provider_for("anything") is provider  # a single provider is asked for all


def test_the_base_unwraps_keys_of_its_own_master_key_only() -> None:
    """A key row naming another master key is refused before the hook runs."""
    provider, other = HookOnlyKms(0x55), HookOnlyKms(0x56)
    made = other.generate_data_key(CONTEXT)
    with pytest.raises(ForeignMasterKeyError) as info:
        provider.unwrap(made.wrapped, CONTEXT, made.master_key_id)
    assert isinstance(info.value, KMSInvalidCiphertextError)
    assert info.value.master_key_id == "hook-only:86"
    assert (info.value.table, info.value.key_version) == ("patients", 1)
    assert "hook-only:85" in str(info.value)
    assert provider.hooks == []  # never unwrapped
    assert provider.calls == {"Decrypt": 1}
    for secret in key_forms(made.plaintext) + key_forms(made.wrapped):
        assert secret not in str(info.value)
    # nor re-wrapped from a source that does not own it
    with pytest.raises(ForeignMasterKeyError):
        HookOnlyKms(0x57).rewrap_from(provider, made.wrapped, CONTEXT, made.master_key_id)
    assert provider.hooks == []


# == AwsKms (moto server over HTTP) =======================================================


def alias_arn(cmk: dict[str, str]) -> str:
    return cmk["arn"].split(":key/")[0] + ":" + cmk["alias"]


def test_aws_generate_data_key(kms: AwsKms, kms_endpoint: str, cmk: dict[str, str]) -> None:
    generated = kms.generate_data_key(CONTEXT)
    assert len(generated.plaintext) == 32
    assert generated.master_key_id == cmk["arn"]
    assert generated.plaintext not in generated.wrapped

    plain = kms_client(kms_endpoint)
    response = plain.decrypt(
        CiphertextBlob=generated.wrapped, KeyId=cmk["arn"], EncryptionContext=CONTEXT
    )
    assert response["Plaintext"] == generated.plaintext
    assert response["KeyId"] == cmk["arn"]

    assert kms.unwrap(generated.wrapped, CONTEXT, generated.master_key_id) == (
        generated.plaintext
    )
    assert kms.counter.calls == {"GenerateDataKey": 1, "Decrypt": 1}  # type: ignore[attr-defined]
    assert kms.calls == {"GenerateDataKey": 1, "Decrypt": 1}


def test_aws_wraps_exactly_what_plain_boto3_makes(
    kms: AwsKms, kms_endpoint: str, cmk: dict[str, str]
) -> None:
    """A data key made by plain boto3 unwraps through AwsKms: the stored form is the blob."""
    plain = kms_client(kms_endpoint)
    response = plain.generate_data_key(
        KeyId=cmk["key_id"], KeySpec="AES_256", EncryptionContext=CONTEXT
    )
    assert kms.unwrap(response["CiphertextBlob"], CONTEXT, response["KeyId"]) == (
        response["Plaintext"]
    )


@pytest.mark.parametrize("form", ["key_id", "arn", "alias", "alias_arn"])
def test_aws_key_id_forms(kms_endpoint: str, cmk: dict[str, str], form: str) -> None:
    key_id = alias_arn(cmk) if form == "alias_arn" else cmk[form]
    provider = AwsKms(key_id, client=kms_client(kms_endpoint))
    assert provider.master_key_id == key_id
    generated = provider.generate_data_key(CONTEXT)
    assert generated.master_key_id == cmk["arn"]
    assert provider.unwrap(generated.wrapped, CONTEXT, generated.master_key_id) == (
        generated.plaintext
    )
    # the configured form of the id unwraps as well
    assert provider.unwrap(generated.wrapped, CONTEXT, key_id) == generated.plaintext


@pytest.mark.parametrize(
    "context",
    [
        {"table": "doctors", "key_version": "1"},
        {"table": "patients", "key_version": "2"},
    ],
    ids=["other-table", "other-version"],
)
def test_aws_wrong_context(kms: AwsKms, context: dict[str, str]) -> None:
    generated = kms.generate_data_key(CONTEXT)
    with pytest.raises(KMSInvalidCiphertextError) as info:
        kms.unwrap(generated.wrapped, context, generated.master_key_id)
    err = info.value
    assert err.table == context["table"]
    assert err.key_version == int(context["key_version"])
    assert err.master_key_id == generated.master_key_id
    assert err.operation == "Decrypt"
    assert isinstance(err.__cause__, ClientError)


def test_aws_damaged_wrapped_key(kms: AwsKms) -> None:
    generated = kms.generate_data_key(CONTEXT)
    with pytest.raises(KMSInvalidCiphertextError):
        kms.unwrap(generated.wrapped[:-5], CONTEXT, generated.master_key_id)


def test_aws_unknown_master_key(kms_endpoint: str) -> None:
    provider = AwsKms("alias/no-such-key", client=kms_client(kms_endpoint))
    with pytest.raises(KMSKeyNotFoundError) as info:
        provider.generate_data_key(CONTEXT)
    assert info.value.master_key_id == "alias/no-such-key"
    assert info.value.operation == "GenerateDataKey"
    assert "alias/no-such-key" in str(info.value)


def test_aws_requires_a_key_id() -> None:
    with pytest.raises(ValueError):
        AwsKms("", client=boto3.client("kms", region_name=REGION))


def test_aws_repr(kms: AwsKms, cmk: dict[str, str]) -> None:
    assert cmk["alias"] in repr(kms)
    assert kms.master_key_id == cmk["alias"]


# -- owns: this key only -----------------------------------------------------------------


def second_cmk(endpoint: str) -> dict[str, str]:
    """Another master key on the moto server, with an alias of its own."""
    client = kms_client(endpoint)
    metadata = client.create_key(Description="sqlalchemy-kms tests, second key")["KeyMetadata"]
    alias = f"alias/sqlalchemy-kms-second-{metadata['KeyId'][:8]}"
    client.create_alias(AliasName=alias, TargetKeyId=metadata["KeyId"])
    return {"key_id": metadata["KeyId"], "arn": metadata["Arn"], "alias": alias}


def test_aws_does_not_own_other_providers_ids_nor_other_keys(
    kms: AwsKms, kms_endpoint: str, cmk: dict[str, str]
) -> None:
    other = second_cmk(kms_endpoint)
    local_id = LocalKms(os.urandom(32)).master_key_id
    assert not kms.owns(local_id)
    assert not kms.owns(local_id, resolve=True)
    assert not kms.owns("hook-only:1", resolve=True)
    assert kms.counter.calls == {}  # type: ignore[attr-defined]  # no KMS call for those
    assert not kms.owns(other["arn"])
    assert not kms.owns(other["alias"], resolve=True)
    assert not kms.owns(other["arn"], resolve=True)
    assert kms.owns(cmk["alias"])
    assert kms.owns(cmk["arn"], resolve=True)


def test_aws_owns_its_key_arn_once_known(kms: AwsKms, cmk: dict[str, str]) -> None:
    """The ARN behind an alias: not known to a fresh provider without a KMS call; asked for
    once with ``resolve=True``; learned from what KMS reports back."""
    calls = kms.counter.calls  # type: ignore[attr-defined]
    assert not kms.owns(cmk["arn"])
    assert calls == {}
    assert kms.owns(cmk["arn"], resolve=True)
    assert kms.owns(cmk["arn"], resolve=True) and kms.owns(cmk["arn"])
    assert calls == {"DescribeKey": 1}
    assert kms.calls == {"DescribeKey": 1}


def test_aws_learns_its_key_arn_from_generate_data_key(
    kms_endpoint: str, cmk: dict[str, str]
) -> None:
    provider = AwsKms(cmk["alias"], client=kms_client(kms_endpoint))
    provider.generate_data_key(CONTEXT)
    assert provider.owns(cmk["arn"])
    assert provider.calls == {"GenerateDataKey": 1}


def test_aws_configured_by_key_arn_needs_no_describe_key(
    kms_endpoint: str, cmk: dict[str, str]
) -> None:
    other = second_cmk(kms_endpoint)
    provider = AwsKms(cmk["arn"], client=kms_client(kms_endpoint))
    assert provider.owns(cmk["arn"])
    assert not provider.owns(other["arn"], resolve=True)
    assert provider.calls == {}


# -- only keys of its own master key: before and after Decrypt ----------------------------


def decrypt_key_ids(client: Any) -> list[str]:
    """The ``KeyId`` of every Decrypt the client sends."""
    sent: list[str] = []
    client.meta.events.register(
        "provide-client-params.kms.Decrypt", lambda params, **kw: sent.append(params["KeyId"])
    )
    return sent


def test_aws_refuses_a_key_of_another_master_key_before_decrypt(
    kms: AwsKms, kms_endpoint: str
) -> None:
    other = second_cmk(kms_endpoint)
    theirs = AwsKms(other["arn"], client=kms_client(kms_endpoint)).generate_data_key(CONTEXT)
    kms.generate_data_key(CONTEXT)  # knows its key ARN now
    with pytest.raises(ForeignMasterKeyError) as info:
        kms.unwrap(theirs.wrapped, CONTEXT, theirs.master_key_id)
    assert info.value.master_key_id == other["arn"]
    assert info.value.operation == "Decrypt"
    assert kms.counter.calls == {"GenerateDataKey": 1}  # type: ignore[attr-defined]
    for secret in key_forms(theirs.plaintext):
        assert secret not in str(info.value)


def test_aws_decrypt_names_its_own_key_never_the_rows(
    kms_endpoint: str, cmk: dict[str, str]
) -> None:
    """Until the key ARN is known, Decrypt names the alias, so KMS refuses a key of any
    other master key; the ARN it answers with is then this provider's."""
    other = second_cmk(kms_endpoint)
    theirs = AwsKms(other["arn"], client=kms_client(kms_endpoint)).generate_data_key(CONTEXT)
    ours = kms_client(kms_endpoint).generate_data_key(
        KeyId=cmk["key_id"], KeySpec="AES_256", EncryptionContext=CONTEXT
    )
    provider = AwsKms(cmk["alias"], client=kms_client(kms_endpoint))
    sent = decrypt_key_ids(provider.client)
    with pytest.raises(ForeignMasterKeyError):  # KMS refused; DescribeKey names the refusal
        provider.unwrap(theirs.wrapped, CONTEXT, theirs.master_key_id)
    assert sent == [cmk["alias"]]
    assert provider.calls == {"Decrypt": 1, "DescribeKey": 1}

    fresh = AwsKms(cmk["alias"], client=kms_client(kms_endpoint))
    sent = decrypt_key_ids(fresh.client)
    assert fresh.unwrap(ours["CiphertextBlob"], CONTEXT, ours["KeyId"]) == ours["Plaintext"]
    assert fresh.owns(cmk["arn"])  # learned from Decrypt's answer
    with pytest.raises(ForeignMasterKeyError):
        fresh.unwrap(theirs.wrapped, CONTEXT, theirs.master_key_id)
    assert fresh.unwrap(ours["CiphertextBlob"], CONTEXT, ours["KeyId"]) == ours["Plaintext"]
    assert sent == [cmk["alias"], cmk["arn"]]
    assert fresh.calls == {"Decrypt": 3}  # no DescribeKey


def stubbed_decrypt(provider: AwsKms, answered_by: str) -> Stubber:
    stubber = Stubber(provider.client)
    stubber.add_response("decrypt", {"KeyId": answered_by, "Plaintext": b"\x07" * 32})
    return stubber


@pytest.mark.parametrize("knows_its_arn", [True, False], ids=["known-arn", "fresh"])
def test_aws_decrypt_answer_must_be_the_rows_key(
    kms_endpoint: str, cmk: dict[str, str], knows_its_arn: bool
) -> None:
    other = second_cmk(kms_endpoint)
    provider = AwsKms(cmk["alias"], client=kms_client(kms_endpoint))
    if knows_its_arn:
        provider.generate_data_key(CONTEXT)
    with stubbed_decrypt(provider, other["arn"]) as stubber:
        with pytest.raises(ForeignMasterKeyError, match="as the key table records") as info:
            provider.unwrap(b"\x01" * 64, CONTEXT, cmk["arn"])
        stubber.assert_no_pending_responses()
    assert info.value.master_key_id == other["arn"]
    assert not provider.owns(other["arn"])  # an answer for another key teaches nothing


@pytest.mark.parametrize("configured", ["alias", "arn"])
def test_aws_decrypt_answer_must_be_its_own_key(
    kms_endpoint: str, cmk: dict[str, str], configured: str
) -> None:
    """A row recording the configured id: the key that decrypted must be this one."""
    other = second_cmk(kms_endpoint)
    provider = AwsKms(cmk[configured], client=kms_client(kms_endpoint))
    provider.generate_data_key(CONTEXT)
    with stubbed_decrypt(provider, other["arn"]) as stubber:
        with pytest.raises(ForeignMasterKeyError) as info:
            provider.unwrap(b"\x01" * 64, CONTEXT, cmk[configured])
        stubber.assert_no_pending_responses()
    assert info.value.master_key_id == other["arn"]
    with stubbed_decrypt(provider, cmk["arn"]):
        assert provider.unwrap(b"\x01" * 64, CONTEXT, cmk[configured]) == b"\x07" * 32


def test_aws_rewrap_refuses_a_source_key_of_another_master_key(
    kms: AwsKms, kms_endpoint: str
) -> None:
    """ReEncrypt would adopt another master key's data key under the target: refused."""
    other = second_cmk(kms_endpoint)
    theirs = AwsKms(other["arn"], client=kms_client(kms_endpoint)).generate_data_key(CONTEXT)
    target = AwsKms(second_cmk(kms_endpoint)["arn"], client=kms_client(kms_endpoint))
    kms.generate_data_key(CONTEXT)
    with pytest.raises(ForeignMasterKeyError):
        target.rewrap_from(kms, theirs.wrapped, CONTEXT, theirs.master_key_id)
    assert "ReEncrypt" not in target.calls

    ours = kms.generate_data_key(CONTEXT)

    def another_source(parsed: dict[str, Any], **kwargs: Any) -> None:
        parsed["SourceKeyId"] = other["arn"]

    target.client.meta.events.register("after-call.kms.ReEncrypt", another_source)
    with pytest.raises(ForeignMasterKeyError) as info:
        target.rewrap_from(kms, ours.wrapped, CONTEXT, ours.master_key_id)
    assert info.value.master_key_id == other["arn"]


def test_aws_rewrap_from_aws_is_reencrypt(
    kms: AwsKms, kms_endpoint: str, cmk: dict[str, str]
) -> None:
    other = second_cmk(kms_endpoint)
    target = AwsKms(other["alias"], client=kms_client(kms_endpoint))
    made = kms.generate_data_key(CONTEXT)
    wrapped, master_key_id = target.rewrap_from(kms, made.wrapped, CONTEXT, made.master_key_id)
    assert master_key_id == other["arn"]
    assert target.owns(other["arn"])  # learned from ReEncrypt's answer
    assert target.calls == {"ReEncrypt": 1}
    assert kms.calls == {"GenerateDataKey": 1}  # no Decrypt: the key stayed in KMS
    assert target.unwrap(wrapped, CONTEXT, master_key_id) == made.plaintext


# -- building the client ---------------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Test credentials and region only; no configuration files, profiles or endpoints."""
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_KMS",
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_MAX_ATTEMPTS",
        "AWS_RETRY_MODE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    return monkeypatch


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_aws_client_honours_endpoint_environment(
    aws_env: pytest.MonkeyPatch, kms_endpoint: str, cmk: dict[str, str]
) -> None:
    aws_env.setenv("AWS_ENDPOINT_URL_KMS", kms_endpoint)
    provider = AwsKms(cmk["arn"])
    assert provider.client.meta.endpoint_url == kms_endpoint
    generated = provider.generate_data_key(CONTEXT)
    assert provider.unwrap(generated.wrapped, CONTEXT, generated.master_key_id) == (
        generated.plaintext
    )
    plain = kms_client(kms_endpoint).decrypt(
        CiphertextBlob=generated.wrapped, KeyId=cmk["arn"], EncryptionContext=CONTEXT
    )
    assert plain["Plaintext"] == generated.plaintext


def test_aws_client_endpoint_url_argument(
    aws_env: pytest.MonkeyPatch, kms_endpoint: str, cmk: dict[str, str], closed_port: int
) -> None:
    # the explicit argument wins over the environment
    aws_env.setenv("AWS_ENDPOINT_URL_KMS", f"http://127.0.0.1:{closed_port}")
    aws_env.delenv("AWS_DEFAULT_REGION")
    provider = AwsKms(cmk["alias"], endpoint_url=kms_endpoint, region_name=REGION)
    assert provider.client.meta.endpoint_url == kms_endpoint
    assert provider.client.meta.region_name == REGION
    generated = provider.generate_data_key(CONTEXT)
    assert generated.master_key_id == cmk["arn"]
    assert provider.unwrap(generated.wrapped, CONTEXT, generated.master_key_id) == (
        generated.plaintext
    )


def test_aws_client_options(aws_env: pytest.MonkeyPatch, kms_endpoint: str) -> None:
    provider = AwsKms(
        "alias/x",
        endpoint_url=kms_endpoint,
        connect_timeout=1.5,
        read_timeout=2.5,
        max_attempts=4,
        retry_mode="adaptive",
    )
    config = provider.client.meta.config
    assert config.connect_timeout == 1.5
    assert config.read_timeout == 2.5
    assert config.retries["mode"] == "adaptive"


def test_aws_unreachable_endpoint_fails_fast(aws_env: pytest.MonkeyPatch, closed_port: int) -> None:
    provider = AwsKms(
        "alias/x",
        endpoint_url=f"http://127.0.0.1:{closed_port}",
        connect_timeout=0.5,
        max_attempts=1,
    )
    started = time.monotonic()
    with pytest.raises(KMSUnavailableError) as info:
        provider.generate_data_key(CONTEXT)
    assert time.monotonic() - started < 10
    assert info.value.operation == "GenerateDataKey"
    assert info.value.master_key_id == "alias/x"
    assert info.value.table == "patients"

    started = time.monotonic()
    with pytest.raises(KMSUnavailableError) as info:
        provider.unwrap(b"\x01" * 64, CONTEXT, "arn:aws:kms:us-east-1:123456789012:key/k")
    assert time.monotonic() - started < 10
    assert info.value.operation == "Decrypt"
    assert info.value.master_key_id == "arn:aws:kms:us-east-1:123456789012:key/k"
    assert isinstance(info.value, KMSError)


def test_aws_silent_endpoint_times_out(aws_env: pytest.MonkeyPatch) -> None:
    """A server that accepts connections and never answers: bounded by read_timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        provider = AwsKms(
            "alias/x",
            endpoint_url=f"http://127.0.0.1:{port}",
            connect_timeout=0.5,
            read_timeout=0.5,
            max_attempts=1,
        )
        started = time.monotonic()
        with pytest.raises(KMSUnavailableError) as info:
            provider.generate_data_key(CONTEXT)
        assert time.monotonic() - started < 10
    assert info.value.operation == "GenerateDataKey"


# -- fault injection -------------------------------------------------------------------------

MAPPING = [
    ("AccessDeniedException", KMSAccessDeniedError),
    ("DisabledException", KMSKeyDisabledError),
    ("KMSInvalidStateException", KMSKeyDisabledError),
    ("NotFoundException", KMSKeyNotFoundError),
    ("InvalidCiphertextException", KMSInvalidCiphertextError),
    ("IncorrectKeyException", KMSInvalidCiphertextError),
    ("ThrottlingException", KMSUnavailableError),
    ("KMSInternalException", KMSUnavailableError),
]
VERSION_CONTEXT = {"table": "clinic.patients", "key_version": "7"}


def check_error(err: KMSError, cls: type[KMSError], code: str, operation: str, master: str) -> None:
    assert type(err) is cls
    assert isinstance(err, KMSError)
    assert isinstance(err, SQLAlchemyKMSError)
    assert err.operation == operation
    assert err.table == "clinic.patients"
    assert err.key_version == 7
    assert err.master_key_id == master
    text = str(err)
    for part in (operation, "clinic.patients", "key version 7", master, code):
        assert part in text
    assert isinstance(err.__cause__, ClientError)
    assert err.__cause__.response["Error"]["Code"] == code


@pytest.mark.parametrize(("code", "cls"), MAPPING)
def test_aws_decrypt_errors(kms: AwsKms, cmk: dict[str, str], code: str, cls: type) -> None:
    wrapped = kms.generate_data_key(VERSION_CONTEXT).wrapped
    with Stubber(kms.client) as stubber:
        stubber.add_client_error(
            "decrypt", service_error_code=code, service_message="injected", http_status_code=400
        )
        with pytest.raises(KMSError) as info:
            kms.unwrap(wrapped, VERSION_CONTEXT, cmk["arn"])
        stubber.assert_no_pending_responses()
    check_error(info.value, cls, code, "Decrypt", cmk["arn"])


@pytest.mark.parametrize(("code", "cls"), MAPPING)
def test_aws_generate_errors(kms: AwsKms, cmk: dict[str, str], code: str, cls: type) -> None:
    with Stubber(kms.client) as stubber:
        stubber.add_client_error(
            "generate_data_key",
            service_error_code=code,
            service_message="injected",
            http_status_code=400,
        )
        with pytest.raises(KMSError) as info:
            kms.generate_data_key(VERSION_CONTEXT)
        stubber.assert_no_pending_responses()
    check_error(info.value, cls, code, "GenerateDataKey", cmk["alias"])


def test_aws_unknown_error_code_is_a_plain_kms_error(kms: AwsKms, cmk: dict[str, str]) -> None:
    with Stubber(kms.client) as stubber:
        stubber.add_client_error("decrypt", service_error_code="SomethingNewException")
        with pytest.raises(KMSError) as info:
            kms.unwrap(b"\x01" * 64, VERSION_CONTEXT, cmk["arn"])
    check_error(info.value, KMSError, "SomethingNewException", "Decrypt", cmk["arn"])


def test_aws_error_injected_by_event_handler(kms: AwsKms, cmk: dict[str, str]) -> None:
    """A ``before-call`` handler answering for Decrypt, as a key policy denial would."""
    wrapped = kms.generate_data_key(VERSION_CONTEXT).wrapped

    def deny(**kwargs: Any) -> tuple[AWSResponse, dict[str, Any]]:
        http = AWSResponse("https://kms.invalid/", 400, {}, _Body(b""))
        error = {
            "Error": {"Code": "AccessDeniedException", "Message": "not allowed"},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        }
        return http, error

    kms.client.meta.events.register_first("before-call.kms.Decrypt", deny)
    try:
        with pytest.raises(KMSAccessDeniedError) as info:
            kms.unwrap(wrapped, VERSION_CONTEXT, cmk["arn"])
    finally:
        kms.client.meta.events.unregister("before-call.kms.Decrypt", deny)
    check_error(info.value, KMSAccessDeniedError, "AccessDeniedException", "Decrypt", cmk["arn"])
    # and without the handler the same key unwraps again
    assert len(kms.unwrap(wrapped, VERSION_CONTEXT, cmk["arn"])) == 32


# -- retries ----------------------------------------------------------------------------------


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **kwargs: Any) -> Iterator[bytes]:
        yield self._data


class Throttler:
    """A ``before-send`` hook: answers the first ``times`` attempts with ThrottlingException
    (inside botocore's retry loop, so retries really happen) and counts attempts."""

    def __init__(self, times: int) -> None:
        self.times = times
        self.attempts = 0

    def __call__(self, request: Any, **kwargs: Any) -> AWSResponse | None:
        self.attempts += 1
        if self.attempts > self.times:
            return None  # on to the real server
        body = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"})
        return AWSResponse(
            request.url,
            400,
            {"Content-Type": "application/x-amz-json-1.1"},
            _Body(body.encode()),
        )


def test_aws_throttling_is_retried(
    aws_env: pytest.MonkeyPatch, kms_endpoint: str, cmk: dict[str, str]
) -> None:
    provider = AwsKms(cmk["alias"], endpoint_url=kms_endpoint, max_attempts=3)
    generate = Throttler(times=2)
    provider.client.meta.events.register("before-send.kms.GenerateDataKey", generate)
    generated = provider.generate_data_key(CONTEXT)
    assert generate.attempts == 3
    assert generated.master_key_id == cmk["arn"]

    decrypt = Throttler(times=2)
    provider.client.meta.events.register("before-send.kms.Decrypt", decrypt)
    assert provider.unwrap(generated.wrapped, CONTEXT, generated.master_key_id) == (
        generated.plaintext
    )
    assert decrypt.attempts == 3
    assert provider.calls == {"GenerateDataKey": 1, "Decrypt": 1}


def test_aws_throttling_after_retries(
    aws_env: pytest.MonkeyPatch, kms_endpoint: str, cmk: dict[str, str]
) -> None:
    provider = AwsKms(cmk["alias"], endpoint_url=kms_endpoint, max_attempts=2)
    decrypt = Throttler(times=100)
    provider.client.meta.events.register("before-send.kms.Decrypt", decrypt)
    wrapped = kms_client(kms_endpoint).generate_data_key(
        KeyId=cmk["arn"], KeySpec="AES_256", EncryptionContext=VERSION_CONTEXT
    )["CiphertextBlob"]
    with pytest.raises(KMSUnavailableError) as info:
        provider.unwrap(wrapped, VERSION_CONTEXT, cmk["arn"])
    assert decrypt.attempts >= 2  # retried before giving up
    assert provider.calls["Decrypt"] == 1
    check_error(info.value, KMSUnavailableError, "ThrottlingException", "Decrypt", cmk["arn"])


@pytest.mark.parametrize("max_attempts", [1, 2])
def test_aws_max_attempts_counts_every_attempt(
    aws_env: pytest.MonkeyPatch, kms_endpoint: str, max_attempts: int
) -> None:
    """``max_attempts`` is the number of attempts, the first one included, as in
    botocore's standard retry mode and ``AWS_MAX_ATTEMPTS``; 1 means no retry."""
    provider = AwsKms("alias/x", endpoint_url=kms_endpoint, max_attempts=max_attempts)
    generate = Throttler(times=100)
    provider.client.meta.events.register("before-send.kms.GenerateDataKey", generate)
    with pytest.raises(KMSUnavailableError):
        provider.generate_data_key(CONTEXT)
    assert generate.attempts == max_attempts, (
        f"AwsKms(max_attempts={max_attempts}) made {generate.attempts} attempts"
    )
