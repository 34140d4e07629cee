"""The error hierarchy, messages and pickling."""

from __future__ import annotations

import copy
import inspect
import pickle
import re
from typing import Any

import pytest

import sqlalchemy_kms
from sqlalchemy_kms import errors
from sqlalchemy_kms.errors import (
    DecryptionError,
    EncryptionError,
    InvalidCiphertextError,
    KMSError,
    SQLAlchemyKMSError,
    UnknownKeyVersionError,
    ValueTooLongError,
    VaultNotFoundError,
)

_TREE_LINE = re.compile(r"^(?P<prefix>[ │├└─]*)(?P<name>[A-Z][A-Za-z]*Error)\b")


def documented_tree() -> dict[str, str | None]:
    """``{class name: parent name}`` as drawn in the errors module's docstring."""
    doc = errors.__doc__
    assert doc is not None
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "SQLAlchemyKMSError")
    root_indent = len(lines[start]) - len(lines[start].lstrip())
    tree: dict[str, str | None] = {}
    stack: list[str] = []
    for line in lines[start:]:
        if not line.strip():
            break
        match = _TREE_LINE.match(line)
        assert match, f"unexpected line in the tree: {line!r}"
        offset = len(match["prefix"]) - root_indent
        assert offset % 4 == 0, f"misaligned tree line: {line!r}"
        depth = offset // 4
        assert depth <= len(stack), f"tree line too deep: {line!r}"
        del stack[depth:]
        tree[match["name"]] = stack[-1] if stack else None
        stack.append(match["name"])
    return tree


COMMON = {"table", "column", "key_version", "master_key_id", "operation"}


def extra_arguments(cls: type[SQLAlchemyKMSError]) -> dict[str, str]:
    """Values for the keyword arguments a class requires beyond the common ones."""
    return {
        name: f"<{name}>"
        for name, parameter in inspect.signature(cls).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        and parameter.default is inspect.Parameter.empty
        and name not in COMMON
    }


def make(cls: type[SQLAlchemyKMSError], message: str, **attributes: Any) -> SQLAlchemyKMSError:
    return cls(message, **attributes, **extra_arguments(cls))


TREE = documented_tree()
ALL_CLASSES = [getattr(errors, name) for name in TREE]
KMS_CLASSES = [cls for cls in ALL_CLASSES if issubclass(cls, KMSError)]


def defined_exception_classes() -> set[str]:
    return {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
    }


# -- hierarchy ---------------------------------------------------------------------------


def test_tree_is_parsed() -> None:
    assert TREE["SQLAlchemyKMSError"] is None
    assert list(TREE.values()).count(None) == 1
    assert len(TREE) > 10


@pytest.mark.parametrize("name", list(TREE))
def test_documented_class_exists_and_is_exported(name: str) -> None:
    assert name in errors.__all__
    cls = getattr(errors, name)
    assert inspect.isclass(cls)
    assert issubclass(cls, SQLAlchemyKMSError)


@pytest.mark.parametrize(("name", "parent"), [(n, p) for n, p in TREE.items() if p])
def test_documented_parent(name: str, parent: str) -> None:
    cls = getattr(errors, name)
    library_bases = [base for base in cls.__bases__ if issubclass(base, SQLAlchemyKMSError)]
    assert library_bases == [getattr(errors, parent)]


def test_root_derives_from_exception() -> None:
    assert SQLAlchemyKMSError.__bases__ == (Exception,)


def test_every_error_class_is_in_the_tree_and_all() -> None:
    assert defined_exception_classes() == set(TREE)
    assert set(errors.__all__) == set(TREE)


def test_every_exported_name_exists() -> None:
    for name in errors.__all__:
        assert hasattr(errors, name), name


def test_package_exports_the_root() -> None:
    assert sqlalchemy_kms.SQLAlchemyKMSError is SQLAlchemyKMSError
    assert sqlalchemy_kms.errors is errors


def test_value_too_long_is_a_value_error() -> None:
    err = ValueTooLongError("9 characters, at most 5", table="patients", column="code")
    assert isinstance(err, ValueError)
    assert isinstance(err, EncryptionError)
    assert isinstance(err, SQLAlchemyKMSError)
    with pytest.raises(ValueError, match=r"patients\.code"):
        raise err


def test_one_except_clause_catches_everything() -> None:
    for cls in ALL_CLASSES:
        with pytest.raises(SQLAlchemyKMSError):
            raise make(cls, "reason", table="t")


# -- messages -------------------------------------------------------------------------------


def test_docstring_example() -> None:
    err = DecryptionError(
        "authentication tag does not match", table="patients", column="name", key_version=1
    )
    assert str(err) == (
        "cannot decrypt patients.name (key version 1): authentication tag does not match"
    )


@pytest.mark.parametrize(
    "cls", [cls for cls in ALL_CLASSES if issubclass(cls, DecryptionError)]
)
def test_decryption_messages_name_table_column_and_version(cls: type[DecryptionError]) -> None:
    err = make(cls, "the reason given", table="clinic.patients", column="ssn", key_version=17)
    text = str(err)
    assert "clinic.patients.ssn" in text
    assert "key version 17" in text
    assert "the reason given" in text
    assert (err.table, err.column, err.key_version) == ("clinic.patients", "ssn", 17)


def test_decryption_message_without_key_version() -> None:
    text = str(InvalidCiphertextError("value is truncated", table="patients", column="name"))
    assert "patients.name" in text
    assert "key version" not in text
    assert "value is truncated" in text


def test_decryption_message_with_table_only() -> None:
    text = str(UnknownKeyVersionError("no such key", table="patients", key_version=4))
    assert "patients" in text
    assert "key version 4" in text


def test_message_without_location_still_reads() -> None:
    text = str(DecryptionError("bad"))
    assert text.endswith("bad")
    assert "None" not in text


@pytest.mark.parametrize(
    "cls", [cls for cls in ALL_CLASSES if issubclass(cls, EncryptionError)]
)
def test_encryption_messages_name_table_and_column(cls: type[EncryptionError]) -> None:
    err = make(cls, "too long", table="patients", column="name")
    text = str(err)
    assert "patients.name" in text
    assert "too long" in text
    assert "encrypt" in text


def test_vault_not_found_names_the_column() -> None:
    err = VaultNotFoundError("engine dialect sqlite", table="patients", column="name")
    text = str(err)
    assert "patients.name" in text
    assert "KeyVault" in text
    assert "engine dialect sqlite" in text


@pytest.mark.parametrize("cls", KMS_CLASSES)
def test_kms_messages_name_operation_table_version_and_master_key(cls: type[KMSError]) -> None:
    master = "arn:aws:kms:us-east-1:123456789012:key/0f0e0d0c-1111-2222-3333-444455556666"
    err = make(
        cls,
        "AccessDeniedException",
        table="billing.invoices",
        key_version=12,
        master_key_id=master,
        operation="Decrypt",
    )
    text = str(err)
    assert "Decrypt" in text
    assert "billing.invoices" in text
    assert "key version 12" in text
    assert master in text
    assert "AccessDeniedException" in text
    assert err.operation == "Decrypt"
    assert err.master_key_id == master


def test_kms_message_without_details() -> None:
    text = str(KMSError("timeout"))
    assert "timeout" in text
    assert "None" not in text


def test_reason_is_kept_separately() -> None:
    err = DecryptionError("just the reason", table="t", column="c")
    assert err.reason == "just the reason"
    assert str(err) != err.reason


# -- pickling ------------------------------------------------------------------------------

ATTRIBUTES = ("reason", "table", "column", "key_version", "master_key_id", "operation")


def full_error(cls: type[SQLAlchemyKMSError]) -> SQLAlchemyKMSError:
    return make(
        cls,
        "why it failed",
        table="clinic.patients",
        column="name",
        key_version=3,
        master_key_id="local:0123456789abcdef",
        operation="Decrypt",
    )


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_pickle_round_trip(cls: type[SQLAlchemyKMSError], protocol: int) -> None:
    err = full_error(cls)
    clone = pickle.loads(pickle.dumps(err, protocol=protocol))
    assert type(clone) is cls
    assert str(clone) == str(err)
    assert clone.args == err.args
    for name in ATTRIBUTES:
        assert getattr(clone, name) == getattr(err, name), name
    for name, value in extra_arguments(cls).items():
        assert getattr(clone, name) == value
    assert vars(clone) == vars(err)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_pickle_round_trip_with_missing_attributes(cls: type[SQLAlchemyKMSError]) -> None:
    err = make(cls, "only a reason")
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is cls
    assert str(clone) == str(err)
    for name in ATTRIBUTES:
        assert getattr(clone, name) == getattr(err, name), name


def test_pickle_keeps_attributes_set_after_construction() -> None:
    err = InvalidCiphertextError("authentication failed", key_version=2)
    err.table = "patients"
    err.column = "ssn"
    err.args = (err._render(),)
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.table, clone.column, clone.key_version) == ("patients", "ssn", 2)
    assert "patients.ssn" in str(clone)
    assert str(clone) == str(err)


def test_pickle_keeps_notes() -> None:
    err = full_error(KMSError)
    err.add_note("while refreshing keys")
    clone = pickle.loads(pickle.dumps(err))
    assert clone.__notes__ == ["while refreshing keys"]


def test_pickled_value_too_long_is_still_a_value_error() -> None:
    clone = pickle.loads(pickle.dumps(ValueTooLongError("too long", table="t", column="c")))
    assert isinstance(clone, ValueError)
    assert isinstance(clone, EncryptionError)
    assert "t.c" in str(clone)


@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy])
def test_copy(copier: object) -> None:
    err = full_error(UnknownKeyVersionError)
    clone = copier(err)  # type: ignore[operator]
    assert type(clone) is UnknownKeyVersionError
    assert str(clone) == str(err)
    assert clone.key_version == 3
