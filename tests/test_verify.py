"""``vault.verify()`` and :func:`sqlalchemy_kms.lifecycle.verify.verify`: every stored value
decrypted, failures reported by primary key, counts per key version."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, Text, insert, text
from sqlalchemy.engine import Engine

from sqlalchemy_kms import KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms.lifecycle.verify import FailedValue, VerifyReport, verify

ROWS = 12
NULL_NOTES = {4, 8, 12}  # rows whose note is NULL


def people_metadata() -> tuple[MetaData, Table, Table]:
    metadata = MetaData()
    people = Table(
        "verify_people",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", KMSEncrypted(String(100))),
        Column("email", KMSEncrypted(String(100), deterministic=True)),
        Column("note", KMSEncrypted(Text)),
        Column("ward", String(10)),
    )
    plain = Table(
        "verify_plain",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("label", String(20)),
    )
    return metadata, people, plain


def name_of(number: int) -> str:
    return f"Person {number:02d}"


@pytest.fixture
def people(vault: KeyVault, engine: Engine) -> Iterator[tuple[MetaData, Table]]:
    metadata, people, _plain = people_metadata()
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(people),
            [
                {
                    "id": number,
                    "name": name_of(number),
                    "email": f"p{number}@example.com",
                    "note": None if number in NULL_NOTES else f"note {number}",
                    "ward": "3B",
                }
                for number in range(1, ROWS + 1)
            ],
        )
    yield metadata, people


def alter(engine: Engine, column: str, number: int) -> None:
    """Flip the last bit of one stored value with raw SQL, as a bad restore would."""
    with engine.begin() as conn:
        stored = bytes(
            conn.execute(
                text(f"SELECT {column} FROM verify_people WHERE id = :id"), {"id": number}
            ).scalar_one()
        )
        conn.execute(
            text(f"UPDATE verify_people SET {column} = :value WHERE id = :id"),
            {"value": stored[:-1] + bytes([stored[-1] ^ 1]), "id": number},
        )


def test_a_clean_table_verifies(vault: KeyVault, people: tuple[MetaData, Table]) -> None:
    metadata, _table = people
    report = vault.verify(metadata, batch_size=5)  # three batches: 5, 5, 2
    assert isinstance(report, VerifyReport)
    assert report.ok
    assert report.failures == 0
    [check] = report.tables  # the table without encrypted columns is skipped
    assert check.table == "verify_people"
    assert check.rows == ROWS
    columns = {column.column: column for column in check.columns}
    assert list(columns) == ["name", "email", "note"]
    assert columns["name"].rows_by_version == {1: ROWS}
    assert columns["name"].deterministic is False
    assert columns["email"].deterministic is True
    assert columns["email"].rows_by_version == {1: ROWS}
    assert columns["note"].null_rows == len(NULL_NOTES)
    assert columns["note"].rows_by_version == {1: ROWS - len(NULL_NOTES)}
    assert columns["note"].values == ROWS - len(NULL_NOTES)
    assert report.values == 3 * ROWS - len(NULL_NOTES)
    assert all(column.failed == [] and column.ok for column in check.columns)
    assert report.failed_columns == []
    assert report.as_dict()["ok"] is True


def test_counts_follow_key_versions(vault: KeyVault, people: tuple[MetaData, Table]) -> None:
    _metadata, table = people
    vault.rotate_key(table)
    with vault.engine.begin() as conn:
        conn.execute(table.update().where(table.c.id <= 3).values(name="renamed"))
    report = verify(vault.engine, [table])
    columns = {column.column: column for column in report.tables[0].columns}
    assert columns["name"].rows_by_version == {1: ROWS - 3, 2: 3}
    assert columns["email"].rows_by_version == {1: ROWS}  # the search key was not rotated
    assert report.ok


def test_a_value_altered_by_hand_is_reported_with_its_primary_key(
    vault: KeyVault, people: tuple[MetaData, Table], engine: Engine
) -> None:
    _metadata, table = people
    alter(engine, "name", 7)
    report = vault.verify(table, batch_size=4)
    assert not report.ok
    assert report.failures == 1
    assert report.values == 3 * ROWS - len(NULL_NOTES)  # counted, decrypted or not
    assert report.failed_columns == ["verify_people.name"]
    columns = {column.column: column for column in report.tables[0].columns}
    name = columns["name"]
    assert name.failures == 1
    assert not name.ok
    assert name.rows_by_version == {1: ROWS}  # the header is intact
    [failed] = name.failed
    assert failed.primary_key == {"id": 7}
    assert failed.error == "InvalidCiphertextError"
    assert failed.reason is not None and "authentication failed" in failed.reason
    assert name_of(7) not in repr(report)
    assert columns["email"].failures == 0 and columns["note"].failures == 0

    data = report.as_dict()
    assert data["ok"] is False
    [table_data] = data["tables"]
    assert table_data["failures"] == 1
    assert table_data["columns"][0]["failed_rows"] == [
        {"primary_key": {"id": 7}, "error": "InvalidCiphertextError", "reason": failed.reason}
    ]
    assert table_data["columns"][0]["rows_by_version"] == {"1": ROWS}


def test_every_failure_is_counted_but_only_shown_are_listed(
    vault: KeyVault, people: tuple[MetaData, Table], engine: Engine
) -> None:
    _metadata, table = people
    for number in (2, 5, 9, 11):
        alter(engine, "email", number)
    with engine.begin() as conn:  # not a value of ours at all
        conn.execute(text("UPDATE verify_people SET note = :v WHERE id = 1"), {"v": b"plain"})
    report = verify(vault.engine, [table], batch_size=3, shown=2)
    columns = {column.column: column for column in report.tables[0].columns}
    assert columns["email"].failures == 4
    assert [failed.primary_key for failed in columns["email"].failed] == [{"id": 2}, {"id": 5}]
    assert columns["note"].failures == 1
    assert columns["note"].other_rows == 1
    assert columns["note"].rows_by_version == {1: ROWS - len(NULL_NOTES) - 1}
    assert columns["note"].failed == [
        FailedValue({"id": 1}, "InvalidCiphertextError", columns["note"].failed[0].reason)
    ]
    assert report.failures == 5
    assert report.failed_columns == ["verify_people.email", "verify_people.note"]
    assert verify(vault.engine, [table], shown=0).tables[0].columns[1].failed == []


def test_a_key_that_cannot_be_had_is_asked_for_once(
    engine: Engine, vault: KeyVault, people: tuple[MetaData, Table]
) -> None:
    _metadata, table = people
    vault.close()
    stranger = KeyVault(engine, LocalKms(os.urandom(32)))  # another master key
    try:
        report = stranger.verify(table)
        # the values are not failures: they could not be checked, and that is said once
        # per key (data key and search key), not once per value
        assert report.unchecked == report.values == 3 * ROWS - len(NULL_NOTES)
        assert report.failures == 0 and not report.ok
        assert len(report.kms_problems) == 2
        assert all("verify_people key version 1" in line for line in report.kms_problems)
        assert stranger.provider.calls["Decrypt"] <= 2
    finally:
        stranger.close()


def test_a_table_without_primary_key_names_rows_by_position(
    vault: KeyVault, engine: Engine
) -> None:
    metadata = MetaData()
    log = Table("verify_log", metadata, Column("entry", KMSEncrypted(String(50))))
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(log), [{"entry": f"entry {n}"} for n in range(5)])
    assert vault.verify(log, batch_size=2).ok
    with engine.begin() as conn:
        conn.execute(text("UPDATE verify_log SET entry = :v"), {"v": b"\x01\x01garbage"})
    report = vault.verify(log, batch_size=2, shown=10)
    [column] = report.tables[0].columns
    assert report.tables[0].rows == 5
    assert column.failures == 5
    assert [failed.primary_key for failed in column.failed] == [{"row": n} for n in range(1, 6)]


def test_bad_arguments(vault: KeyVault) -> None:
    _metadata, table, _plain = people_metadata()
    with pytest.raises(ValueError, match="batch_size"):
        verify(vault.engine, [table], batch_size=0)
    with pytest.raises(ValueError, match="shown"):
        verify(vault.engine, [table], shown=-1)
