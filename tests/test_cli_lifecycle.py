"""The key lifecycle commands of ``sqlalchemy-kms``: status, rotate, reencrypt, retire,
destroy, export-keys, import-keys, verify, rewrap, policy, create-table and create-keys.

Each database test runs on SQLite, PostgreSQL and MariaDB (the ``db_url``
fixture); the ``engine`` fixture drops the tables a test made. The
application's side (writing rows, reading them back) uses its own engine and
vault, as a running application would; the commands use theirs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlalchemy_kms import AwsKms, KeyVault, LocalKms
from sqlalchemy_kms import cli as cli_module
from sqlalchemy_kms.cli import cli, load_metadata, policy_document
from tests.cli_models import Base, Patient, Visit, audit_log, log_metadata

KEY_TABLE = "cli_kms_keys"
MODELS = "tests.cli_models:Base"
ROOT = Path(__file__).resolve().parent.parent
PATIENTS = 10
VISITS = 3
NULL_PHONES = {3, 6, 9}


def patient(number: int) -> Patient:
    phone = None if number in NULL_PHONES else f"+82 10-0000-{number:04d}"
    return Patient(
        id=number, name=f"Patient {number:02d}", phone=phone, email=f"p{number}@example.com"
    )


def plaintexts() -> list[str]:
    values = []
    for number in range(1, PATIENTS + 1):
        row = patient(number)
        values += [row.name, row.email] + ([row.phone] if row.phone else [])
    return values + [f"visit note {number}" for number in range(1, VISITS + 1)]


@dataclass
class App:
    """An application's database (with rows) and the local master key file it uses."""

    engine: Engine
    db_url: str
    key_file: Path
    vault: KeyVault

    @property
    def kms(self) -> str:
        return f"local://{self.key_file}"

    def run(
        self,
        *args: str,
        kms: str | None = "",
        models: bool = True,
        key_table: str = KEY_TABLE,
        input: str | None = None,
    ) -> Result:
        """``sqlalchemy-kms ARGS --db ... --key-table ... [--models ...] [--kms ...]``."""
        argv = [*args, "--db", self.db_url, "--key-table", key_table]
        if models:
            argv += ["--models", MODELS]
        kms = self.kms if kms == "" else kms
        if kms is not None:
            argv += ["--kms", kms]
        return CliRunner().invoke(cli, argv, input=input)

    def ok(self, *args: str, **options: Any) -> Result:
        result = self.run(*args, **options)
        assert result.exit_code == 0, result.output
        return result

    def status(self, **options: Any) -> dict[str, Any]:
        """``status --json`` by table."""
        data = json.loads(self.ok("status", "--json", **options).stdout)
        return {table["table"]: table for table in data["tables"]}

    def read(self, vault: KeyVault | None = None) -> list[tuple[Any, ...]]:
        """Every patient and visit, decrypted by the application's (or ``vault``'s) engine."""
        engine = self.engine if vault is None else vault.engine
        (vault or self.vault).clear_cache()
        with Session(engine) as session:
            patients = session.scalars(select(Patient).order_by(Patient.id)).all()
            visits = session.scalars(select(Visit).order_by(Visit.id)).all()
            return [(p.id, p.name, p.phone, p.email) for p in patients] + [
                (v.id, v.note) for v in visits
            ]


def expected_rows() -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for number in range(1, PATIENTS + 1):
        row = patient(number)
        rows.append((row.id, row.name, row.phone, row.email))
    return rows + [(number, f"visit note {number}") for number in range(1, VISITS + 1)]


def columns(table: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {column["column"]: column for column in table["columns"]}


def keys(table: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(key["purpose"], key["version"]): key for key in table["keys"]}


def one_line_error(result: Result) -> str:
    """The single ``Error: ...`` line of a failed command (no traceback)."""
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "master.key"
    LocalKms.generate_key_file(path)
    return path


@pytest.fixture
def app(engine: Engine, db_url: str, key_file: Path) -> Iterator[App]:
    """Patients and visits written through the ORM under the local master key."""
    vault = KeyVault(engine, LocalKms(key_file=key_file), table_name=KEY_TABLE)
    vault.create_table()
    Base.metadata.create_all(engine)  # makes each encrypted table's keys
    with Session(engine) as session:
        session.add_all(patient(number) for number in range(1, PATIENTS + 1))
        session.add_all(Visit(id=n, note=f"visit note {n}") for n in range(1, VISITS + 1))
        session.commit()
    yield App(engine, db_url, key_file, vault)
    vault.close()


@pytest.fixture
def aws_env(kms_endpoint: str, cmk: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Point boto3's normal configuration at the moto KMS server."""
    for name in ("AWS_PROFILE", "AWS_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


# -- status ----------------------------------------------------------------------------------------


def test_status_text(app: App) -> None:
    output = app.ok("status").stdout
    master_key_id = LocalKms(key_file=app.key_file).master_key_id
    assert output.splitlines()[0] == "cli_patients"
    assert "cli_visits" in output
    assert "cli_wards" not in output  # no encrypted column
    assert "purpose  version  state    active  provider  master key id" in output
    lines = output.splitlines()
    data_key = next(line.split() for line in lines if line.strip().startswith("data     1"))
    assert data_key[:6] == ["data", "1", "enabled", "*", "local", master_key_id]
    assert any(line.split()[:4] == ["search", "1", "enabled", "*"] for line in lines)
    assert any(line.split() == ["name", "randomized", "v1:", "10"] for line in lines)
    assert any(line.split() == ["phone", "randomized", "v1:", "7,", "NULL:", "3"] for line in lines)
    assert any(line.split() == ["email", "deterministic", "v1:", "10"] for line in lines)
    assert any(line.split() == ["note", "randomized", "v1:", "3"] for line in lines)
    for value in plaintexts():
        assert value not in output


def test_status_json(app: App) -> None:
    report = app.status()
    assert list(report) == ["cli_patients", "cli_visits"]
    patients = report["cli_patients"]
    assert set(keys(patients)) == {("data", 1), ("search", 1)}
    data_key = keys(patients)[("data", 1)]
    assert data_key["state"] == "enabled"
    assert data_key["active"] is True
    assert data_key["provider"] == "local"
    assert data_key["master_key_id"] == LocalKms(key_file=app.key_file).master_key_id
    assert data_key["created_at"]
    spread = columns(patients)
    assert spread["name"]["rows_by_version"] == {"1": PATIENTS}
    assert spread["phone"]["rows_by_version"] == {"1": PATIENTS - len(NULL_PHONES)}
    assert spread["phone"]["null_rows"] == len(NULL_PHONES)
    assert spread["phone"]["total"] == PATIENTS
    assert spread["email"]["deterministic"] is True
    assert spread["email"]["rows_by_version"] == {"1": PATIENTS}
    assert set(keys(report["cli_visits"])) == {("data", 1)}
    assert columns(report["cli_visits"])["note"]["rows_by_version"] == {"1": VISITS}
    # without --kms, or with one it cannot use: status makes no KMS call
    assert app.status(kms=None) == report
    assert app.status(kms="local:///no/such/master.key") == report
    data = json.loads(app.ok("status", "--json", "--table", "cli_visits", kms=None).stdout)
    assert [table["table"] for table in data["tables"]] == ["cli_visits"]


# -- rotate and reencrypt --------------------------------------------------------------------------


def test_rotate_then_reencrypt_moves_every_row_to_version_2(app: App) -> None:
    result = app.ok("rotate", "--table", "cli_patients")
    assert result.stdout == "cli_patients: data key version 2 is now active\n"
    before = columns(app.status()["cli_patients"])
    assert before["name"]["rows_by_version"] == {"1": PATIENTS}  # rotation touches no row

    output = app.ok("reencrypt", "--table", "cli_patients", "--batch-size", "3").stdout
    lines = output.splitlines()
    # not a terminal: one plain line per batch, then the summary
    assert [line.split(" rows scanned")[0] for line in lines[:-1]] == [
        "cli_patients: 3/10",
        "cli_patients: 6/10",
        "cli_patients: 9/10",
        "cli_patients: 10/10",
    ]
    assert lines[-1] == (
        "cli_patients: done: 10 rows scanned, 10 rewritten, 0 changed meanwhile by the application"
    )

    report = app.status()["cli_patients"]
    assert keys(report)[("data", 2)]["active"] is True
    assert keys(report)[("data", 1)]["active"] is False
    spread = columns(report)
    assert spread["name"]["rows_by_version"] == {"2": PATIENTS}
    assert spread["phone"]["rows_by_version"] == {"2": PATIENTS - len(NULL_PHONES)}
    assert spread["email"]["rows_by_version"] == {"1": PATIENTS}  # the search key was not rotated
    assert columns(app.status()["cli_visits"])["note"]["rows_by_version"] == {"1": VISITS}
    assert app.read() == expected_rows()

    again = app.ok("reencrypt", "--table", "cli_patients").stdout  # finished: changes nothing
    assert "10 rows scanned, 0 rewritten" in again


def test_rotate_search_key_with_reencrypt(app: App) -> None:
    output = app.ok("rotate", "--table", "cli_patients", "--search", "--reencrypt").stdout
    assert output.splitlines()[0] == "cli_patients: search key version 2 is now active"
    assert "cli_patients: done: 10 rows scanned, 10 rewritten" in output
    spread = columns(app.status()["cli_patients"])
    assert spread["email"]["rows_by_version"] == {"2": PATIENTS}
    assert spread["name"]["rows_by_version"] == {"1": PATIENTS}
    app.vault.clear_cache()
    with Session(app.engine) as session:  # equality still finds the rows
        found = session.scalars(select(Patient.id).where(Patient.email == "p4@example.com"))
        assert found.all() == [4]


def test_rotate_refuses_a_key_the_table_does_not_have(app: App) -> None:
    result = app.run("rotate", "--table", "cli_visits", "--search")
    assert result.exit_code == 2
    assert "cli_visits has no deterministic columns" in result.output
    result = app.run("rotate", "--table", "cli_wards")
    assert result.exit_code == 2
    assert "no table 'cli_wards' with encrypted columns" in result.output
    assert "cli_patients, cli_visits" in result.output
    assert set(keys(app.status()["cli_visits"])) == {("data", 1)}


def test_reencrypt_shows_a_progress_bar_on_a_terminal(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_module, "_isatty", lambda stream: True)
    app.ok("rotate", "--table", "cli_patients")
    output = app.ok("reencrypt", "--table", "cli_patients", "--batch-size", "2").stdout
    assert "rows scanned, 2 rewritten" not in output  # no per-batch lines
    assert "cli_patients: re-encrypting" in output  # the bar's label
    assert output.splitlines()[-1].startswith("cli_patients: done: 10 rows scanned, 10 rewritten")


# -- retire and destroy ----------------------------------------------------------------------------


NO_GRACE = ("--grace-period", "0")


def test_retire_is_refused_while_rows_use_the_key(app: App) -> None:
    app.ok("rotate", "--table", "cli_patients")
    early = app.run("retire", "--table", "cli_patients", "--version", "1")
    assert early.exit_code == 1
    assert "retire allowed after " in one_line_error(early)
    refused = app.run("retire", "--table", "cli_patients", "--version", "1", *NO_GRACE)
    assert refused.exit_code == 1
    line = one_line_error(refused)
    assert "cli_patients key version 1" in line
    assert "stored values still use this key" in line

    active = app.run("retire", "--table", "cli_patients", "--version", "2", *NO_GRACE)
    assert active.exit_code == 1
    assert "the active key cannot be retired" in one_line_error(active)

    app.ok("reencrypt", "--table", "cli_patients")
    done = app.ok("retire", "--table", "cli_patients", "--version", "1", *NO_GRACE, kms=None)
    assert done.stdout == "cli_patients: data key version 1 retired\n"
    report = keys(app.status()["cli_patients"])
    assert report[("data", 1)]["state"] == "retired"
    assert report[("data", 2)]["state"] == "enabled"
    assert app.read() == expected_rows()


def retired_version_1(app: App) -> None:
    app.ok("rotate", "--table", "cli_patients", "--reencrypt")
    app.ok("retire", "--table", "cli_patients", "--version", "1", *NO_GRACE)


def test_destroy_needs_yes_without_a_terminal(app: App) -> None:
    retired_version_1(app)
    refused = app.run(
        "destroy", "--table", "cli_patients", "--version", "1", *NO_GRACE, models=False
    )
    assert refused.exit_code == 2
    assert "pass --yes" in refused.output
    assert ("data", 1) in keys(app.status()["cli_patients"])

    early = app.run("destroy", "--table", "cli_patients", "--version", "1", "--yes")
    assert early.exit_code == 1
    assert "destroy allowed after " in one_line_error(early)
    done = app.ok(
        "destroy", "--table", "cli_patients", "--version", "1", "--yes", *NO_GRACE, models=False
    )
    assert done.stdout == "cli_patients: data key version 1 destroyed\n"
    assert set(keys(app.status()["cli_patients"])) == {("data", 2), ("search", 1)}
    assert app.ok("verify").stdout.splitlines()[-1].startswith("OK: ")
    assert app.read() == expected_rows()


def test_destroy_asks_for_the_table_name_on_a_terminal(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    retired_version_1(app)
    monkeypatch.setattr(cli_module, "_isatty", lambda stream: True)
    args = ("destroy", "--table", "cli_patients", "--version", "1", *NO_GRACE)
    wrong = app.run(*args, input="cli_visits\n")
    assert wrong.exit_code == 1
    assert "Type the table name (cli_patients) to confirm" in wrong.output
    assert "nothing was destroyed" in one_line_error(wrong)
    assert ("data", 1) in keys(app.status()["cli_patients"])

    app.ok(*args, input="cli_patients\n")
    assert ("data", 1) not in keys(app.status()["cli_patients"])


def test_destroy_refuses_a_key_that_is_not_retired(app: App) -> None:
    app.ok("rotate", "--table", "cli_patients")
    refused = app.run("destroy", "--table", "cli_patients", "--version", "1", "--yes")
    assert refused.exit_code == 1
    assert "only a retired key can be destroyed" in one_line_error(refused)
    missing = app.run("destroy", "--table", "cli_patients", "--version", "7", "--yes")
    assert missing.exit_code == 1
    assert "no such key version" in one_line_error(missing)
    assert ("data", 1) in keys(app.status()["cli_patients"])


# -- export and import -----------------------------------------------------------------------------


def test_export_then_import_into_an_empty_key_table(app: App, tmp_path: Path) -> None:
    app.ok("rotate", "--table", "cli_visits")
    exported = json.loads(app.ok("export-keys", models=False, kms=None).stdout)
    assert exported["format"] == "sqlalchemy-kms-keys"
    assert len(exported["keys"]) == 4  # patients: data + search; visits: data 1 and 2
    backup = tmp_path / "keys.json"
    saved = app.ok("export-keys", "--output", str(backup), models=False, kms=None)
    assert saved.stdout == f"exported 4 key(s) to {backup}\n"
    assert json.loads(backup.read_text())["keys"] == exported["keys"]

    with app.engine.begin() as conn:  # the key table is lost
        conn.execute(text(f"DELETE FROM {KEY_TABLE}"))
    lost = app.run("verify")
    assert lost.exit_code == 1
    assert "UnknownKeyVersionError" in lost.stdout

    imported = app.ok("import-keys", str(backup), models=False, kms=None)
    assert imported.stdout == "imported 4 key(s); 0 already present\n"
    assert app.ok("verify").stdout.splitlines()[-1].startswith("OK: ")
    assert app.read() == expected_rows()
    again = app.ok("import-keys", str(backup), models=False, kms=None)
    assert again.stdout == "imported 0 key(s); 4 already present\n"

    # a database without a key table: import-keys creates it
    restored = "cli_kms_keys_restored"
    app.ok("import-keys", str(backup), models=False, kms=None, key_table=restored)
    assert app.ok("verify", key_table=restored).stdout.splitlines()[-1].startswith("OK: ")


def test_import_conflict_exits_1_and_imports_nothing(app: App, tmp_path: Path) -> None:
    exported = json.loads(app.ok("export-keys", models=False).stdout)
    exported["keys"][0]["wrapped_key"] = base64.b64encode(os.urandom(60)).decode()
    exported["keys"].append(dict(exported["keys"][1], scope="cli_elsewhere"))
    conflicting = tmp_path / "conflicting.json"
    conflicting.write_text(json.dumps(exported))
    result = app.run("import-keys", str(conflicting), models=False)
    assert result.exit_code == 1
    assert one_line_error(result) == (
        "Error: cli_patients key version 1: the key table holds a different key with the same "
        "id under the same master key; nothing imported"
    )
    after = json.loads(app.ok("export-keys", models=False).stdout)
    assert "cli_elsewhere" not in {key["scope"] for key in after["keys"]}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not JSON"),
        ('{"format": "something else", "keys": []}', "not a sqlalchemy-kms key export"),
        ('{"keys": 3}', "is not a sqlalchemy-kms key export"),
        (
            '{"format": "sqlalchemy-kms-keys", "version": 1, "keys": [{"scope": "x"}]}',
            "the key export is damaged: key 1: it has no 'key_version'; nothing imported",
        ),
    ],
)
def test_import_of_a_damaged_file_is_one_line(
    app: App, tmp_path: Path, content: str, message: str
) -> None:
    damaged = tmp_path / "damaged.json"
    damaged.write_text(content)
    result = app.run("import-keys", str(damaged), models=False)
    assert result.exit_code == 1
    assert message in one_line_error(result)


def test_import_refuses_an_invalid_state_and_imports_nothing(app: App, tmp_path: Path) -> None:
    exported = json.loads(app.ok("export-keys", models=False).stdout)
    valid = dict(exported["keys"][0], scope="cli_restored")
    exported["keys"] = [valid, dict(valid, key_version=2, state="ENABLED")]
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps(exported))
    result = app.run("import-keys", str(invalid), models=False)
    assert result.exit_code == 1
    assert one_line_error(result) == (
        "Error: the key export is damaged: key 2: state must be 'enabled' or 'retired', "
        "not 'ENABLED'; nothing imported"
    )
    after = json.loads(app.ok("export-keys", models=False).stdout)
    assert "cli_restored" not in {key["scope"] for key in after["keys"]}


def test_import_of_one_version_after_a_rewrap(app: App, tmp_path: Path) -> None:
    backup = tmp_path / "keys.json"
    app.ok("export-keys", "--output", str(backup), models=False)
    new_key = tmp_path / "new.key"
    LocalKms.generate_key_file(new_key)
    new = f"local://{new_key}"
    app.ok("rewrap", "--to", new, models=False)
    # the backup's keys are the same data keys under the old master key: present already
    again = app.ok("import-keys", str(backup), models=False, kms=None)
    assert again.stdout == "imported 0 key(s); 3 already present\n"

    with app.engine.begin() as conn:  # one version destroyed by mistake
        conn.execute(
            text(f"DELETE FROM {KEY_TABLE} WHERE scope = 'cli_patients' AND purpose = 'data'")
        )
    assert app.run("verify", kms=new).exit_code == 1
    one = ("import-keys", "--table", "cli_patients", "--version", "1", str(backup))
    restored = app.ok(*one, models=False, kms=None)
    assert restored.stdout == "imported 1 key(s); 0 already present\n"
    assert app.ok(*one, models=False, kms=None).stdout == "imported 0 key(s); 1 already present\n"
    search = app.ok(*one[:5], "--search", str(backup), models=False, kms=None)
    assert search.stdout == "imported 0 key(s); 1 already present\n"
    # restored as it was backed up, under the old master key: rewrap moves it over
    moved = app.ok("rewrap", "--to", new, models=False)
    assert moved.stdout == f"rewrapped 1 key(s) under {new}\n"
    assert app.ok("verify", kms=new).stdout.splitlines()[-1].startswith("OK: ")

    missing = app.run(*one[:4], "9", str(backup), models=False)
    assert missing.exit_code == 1
    assert "holds no data key version 9 of cli_patients" in one_line_error(missing)
    no_table = app.run("import-keys", "--version", "1", str(backup), models=False)
    assert no_table.exit_code == 2 and "--version needs --table" in no_table.stderr
    no_version = app.run(*one[:3], "--search", str(backup), models=False)
    assert no_version.exit_code == 2 and "give --version too" in no_version.stderr
    too_high = app.run(*one[:4], str(2**31), str(backup), models=False)
    assert too_high.exit_code == 2


# -- verify ----------------------------------------------------------------------------------------


def corrupt_phone(engine: Engine, number: int) -> None:
    """Flip one bit of a stored value with raw SQL, as a damaged disk or a bad restore would."""
    with engine.begin() as conn:
        stored = bytes(
            conn.execute(
                text("SELECT phone FROM cli_patients WHERE id = :id"), {"id": number}
            ).scalar_one()
        )
        damaged = stored[:-1] + bytes([stored[-1] ^ 1])
        conn.execute(
            text("UPDATE cli_patients SET phone = :phone WHERE id = :id"),
            {"phone": damaged, "id": number},
        )


def test_verify_passes_on_good_tables(app: App) -> None:
    output = app.ok("verify", "--batch-size", "4").stdout
    lines = output.splitlines()
    assert "cli_patients: 10 rows" in lines
    assert "cli_visits: 3 rows" in lines
    assert any(
        line.split() == ["phone", "randomized", "v1:", "7,", "NULL:", "3", "ok"] for line in lines
    )
    assert lines[-1] == "OK: all 30 stored value(s) in 2 table(s) decrypt"
    for value in plaintexts():
        assert value not in output
    data = json.loads(app.ok("verify", "--json", "--table", "cli_visits").stdout)
    assert data["ok"] is True
    [visits] = data["tables"]
    assert visits["table"] == "cli_visits"
    assert visits["columns"][0]["rows_by_version"] == {"1": VISITS}


def test_verify_names_the_column_and_primary_key_of_a_bad_value(app: App) -> None:
    corrupt_phone(app.engine, 7)
    result = app.run("verify", "--batch-size", "3")
    assert result.exit_code == 1
    output = result.stdout
    assert "cli_patients.phone [id=7]: InvalidCiphertextError" in output
    assert output.splitlines()[-1] == (
        "FAILED: 1 of 30 stored value(s) did not decrypt (cli_patients.phone)"
    )
    assert any(
        line.split()[:2] == ["name", "randomized"] and line.endswith("ok")
        for line in output.splitlines()
    )
    for value in plaintexts():
        assert value not in output

    data = json.loads(app.run("verify", "--json").stdout)
    assert data["ok"] is False
    patients = {table["table"]: table for table in data["tables"]}["cli_patients"]
    phone = columns(patients)["phone"]
    assert phone["failures"] == 1
    assert phone["rows_by_version"] == {"1": 7}  # counted by header, decrypted or not
    assert phone["failed_rows"] == [
        {
            "primary_key": {"id": 7},
            "error": "InvalidCiphertextError",
            "reason": phone["failed_rows"][0]["reason"],
        }
    ]
    assert columns(patients)["name"]["failures"] == 0
    # the other table is fine on its own
    assert app.run("verify", "--table", "cli_visits").exit_code == 0


def test_verify_needs_the_master_key(app: App) -> None:
    result = app.run("verify", kms=None)
    assert result.exit_code == 2
    assert "Missing option '--kms'" in result.output


# -- rewrap ----------------------------------------------------------------------------------------


def test_rewrap_to_a_second_local_key(app: App, tmp_path: Path) -> None:
    new_key = tmp_path / "new-master.key"
    new_provider = LocalKms.generate_key_file(new_key)
    result = app.ok("rewrap", "--to", f"local://{new_key}", models=False)
    assert result.stdout == f"rewrapped 3 key(s) under local://{new_key}\n"
    for table in app.status().values():
        for key in table["keys"]:
            assert key["master_key_id"] == new_provider.master_key_id

    assert app.ok("verify", kms=f"local://{new_key}").stdout.startswith("cli_patients")
    old = app.run("verify", kms=app.kms)
    assert old.exit_code == 3  # not checked: the old master key no longer wraps them
    assert "ForeignMasterKeyError" in old.stdout and "FAILED" not in old.stdout

    # the application, given only the new master key, reads everything
    only_new = KeyVault(
        app.engine, LocalKms(key_file=new_key), table_name=KEY_TABLE, replace=True
    )
    try:
        assert app.read(only_new) == expected_rows()
    finally:
        only_new.close()
    again = app.ok("rewrap", "--to", f"local://{new_key}", models=False, kms=f"local://{new_key}")
    assert again.stdout.startswith("rewrapped 0 key(s)")


@pytest.mark.usefixtures("aws_env")
def test_rewrap_to_aws_kms_then_rotate_there(app: App, cmk: dict[str, str]) -> None:
    aws = f"aws-kms://{cmk['alias']}"
    first = app.ok("rewrap", "--to", aws, "--table", "cli_visits", models=False)
    assert first.stdout == f"rewrapped 1 key(s) under {aws}\n"
    rest = app.ok("rewrap", "--to", aws, models=False)
    assert rest.stdout == f"rewrapped 2 key(s) under {aws}\n"
    for table in app.status().values():
        for key in table["keys"]:
            assert (key["provider"], key["master_key_id"]) == ("aws-kms", cmk["arn"])

    rotated = app.ok("rotate", "--table", "cli_visits", "--reencrypt", kms=aws)
    assert rotated.stdout.startswith("cli_visits: data key version 2 is now active\n")
    assert keys(app.status()["cli_visits"])[("data", 2)]["master_key_id"] == cmk["arn"]
    assert app.ok("verify", kms=aws).stdout.splitlines()[-1].startswith("OK: all 30 ")
    with_aws = KeyVault(app.engine, AwsKms(cmk["alias"]), table_name=KEY_TABLE, replace=True)
    try:
        assert app.read(with_aws) == expected_rows()
    finally:
        with_aws.close()


# -- create-table and create-keys ------------------------------------------------------------------


def test_create_table_and_create_keys(engine: Engine, db_url: str, key_file: Path) -> None:
    base = ["--db", db_url, "--key-table", KEY_TABLE]
    runner = CliRunner()
    missing = runner.invoke(cli, ["status", *base, "--models", MODELS])
    assert missing.exit_code == 1
    assert "create it with 'sqlalchemy-kms create-table'" in one_line_error(missing)

    for _ in range(2):  # safe to run again
        made = runner.invoke(cli, ["create-table", *base])
        assert made.exit_code == 0, made.output
        assert made.stdout == f"key table {KEY_TABLE} is ready\n"

    kms = ["--kms", f"local://{key_file}", "--models", MODELS]
    first = runner.invoke(cli, ["create-keys", *base, *kms])
    assert first.exit_code == 0, first.output
    assert first.stdout == (
        "cli_patients: data key version 1, search key version 1\ncli_visits: data key version 1\n"
    )
    second = runner.invoke(cli, ["create-keys", *base, *kms, "--table", "cli_visits"])
    assert second.stdout == "cli_visits: data key version 1\n"
    exported = json.loads(runner.invoke(cli, ["export-keys", *base]).stdout)
    assert sorted((k["scope"], k["purpose"]) for k in exported["keys"]) == [
        ("cli_patients", "data"),
        ("cli_patients", "search"),
        ("cli_visits", "data"),
    ]


# -- options ---------------------------------------------------------------------------------------


def test_options_from_the_environment_in_a_child_process(app: App) -> None:
    env = dict(os.environ, SQLALCHEMY_KMS_DB=app.db_url, SQLALCHEMY_KMS_KMS=app.kms)
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-m",
            "sqlalchemy_kms.cli",
            "verify",
            "--json",
            "--models",
            "tests.cli_models:metadata",  # importable because the current folder is on sys.path
            "--key-table",
            KEY_TABLE,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True


@pytest.mark.parametrize(
    "spec",
    [
        "tests.cli_models:Base",
        "tests.cli_models:metadata",
        "tests.cli_models:Base.registry",
        "tests.cli_models",
    ],
)
def test_models_forms(spec: str) -> None:
    assert load_metadata(spec) is Base.metadata


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.no_such_models:Base", "cannot import tests.no_such_models: ModuleNotFoundError"),
        ("tests.cli_models:Nothing", "tests.cli_models has no Nothing"),
        ("tests.cli_models:Patient.id", "not a MetaData, declarative Base or registry"),
        (":Base", "give the models as MODULE:ATTR"),
    ],
)
def test_bad_models_are_a_usage_error(tmp_path: Path, spec: str, message: str) -> None:
    result = CliRunner().invoke(
        cli, ["status", "--db", f"sqlite:///{tmp_path / 'x.db'}", "--models", spec]
    )
    assert result.exit_code == 2
    assert "Invalid value for '--models'" in result.output
    assert message in result.output


@pytest.mark.parametrize(
    ("kms", "message"),
    [
        ("local", "'local' needs the key file: local://PATH"),
        ("local:///no/such/master.key", "cannot read the local key file /no/such/master.key"),
        ("gcp-kms://key", "unknown KMS 'gcp-kms'"),
    ],
)
def test_bad_kms_is_a_usage_error(tmp_path: Path, kms: str, message: str) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "verify",
            "--db",
            f"sqlite:///{tmp_path / 'x.db'}",
            "--models",
            MODELS,
            "--kms",
            kms,
        ],
    )
    assert result.exit_code == 2
    assert message in result.output


def test_bad_database_url_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["export-keys", "--db", "nosuchdb://x/y"])
    assert result.exit_code == 2
    assert "Invalid value for '--db'" in result.output


# -- policy ----------------------------------------------------------------------------------------

APP_ROLE = "arn:aws:iam::111122223333:role/billing-app"
ADMIN_ROLE = "arn:aws:iam::111122223333:role/key-admin"
KEY_ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def policy(*args: str) -> Any:
    result = CliRunner().invoke(cli, ["policy", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_policy_is_a_key_policy_limited_to_the_tables() -> None:
    document = policy("--role-arn", APP_ROLE, "--table", "invoices", "--table", "billing.payments")
    assert document["Version"] == "2012-10-17"
    [statement] = document["Statement"]
    assert statement["Principal"] == {"AWS": APP_ROLE}
    assert statement["Effect"] == "Allow"
    assert statement["Action"] == ["kms:GenerateDataKey", "kms:Decrypt"]
    assert statement["Resource"] == "*"
    assert statement["Condition"] == {
        "StringEquals": {"kms:EncryptionContext:table": ["invoices", "billing.payments"]}
    }


def test_policy_with_an_admin_role() -> None:
    document = policy("--role-arn", APP_ROLE, "--table", "invoices", "--admin-role-arn", ADMIN_ROLE)
    application, admin, describe = document["Statement"]
    assert application["Principal"] == {"AWS": APP_ROLE}
    assert set(application["Action"]) == {"kms:GenerateDataKey", "kms:Decrypt"}
    assert admin["Principal"] == describe["Principal"] == {"AWS": ADMIN_ROLE}
    assert {"kms:ReEncrypt*", "kms:Encrypt"} <= set(admin["Action"])
    assert admin["Condition"] == application["Condition"]
    assert describe["Action"] == ["kms:DescribeKey"]
    assert "Condition" not in describe  # DescribeKey carries no encryption context
    assert len({statement["Sid"] for statement in document["Statement"]}) == 3


def test_policy_as_iam_policies() -> None:
    documents = policy(
        "--role-arn",
        APP_ROLE,
        "--table",
        "invoices",
        "--table",
        "invoices",
        "--key-arn",
        KEY_ARN,
        "--admin-role-arn",
        ADMIN_ROLE,
        "--iam",
    )
    assert list(documents) == [APP_ROLE, ADMIN_ROLE]
    [application] = documents[APP_ROLE]["Statement"]
    assert "Principal" not in application
    assert application["Resource"] == KEY_ARN
    assert application["Condition"] == {
        "StringEquals": {"kms:EncryptionContext:table": ["invoices"]}
    }
    for statement in documents[ADMIN_ROLE]["Statement"]:
        assert statement["Resource"] == KEY_ARN
        assert "Principal" not in statement
    assert policy_document(APP_ROLE, ["a"], key_arn=KEY_ARN, iam=True) == {
        APP_ROLE: documents[APP_ROLE]
        | {
            "Statement": [
                dict(
                    application, Condition={"StringEquals": {"kms:EncryptionContext:table": ["a"]}}
                )
            ]
        }
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--iam"], "--iam needs --key-arn"),
        (["--key-arn", "1234abcd"], "'1234abcd' is not an ARN"),
        ([], None),
    ],
)
def test_policy_usage_errors(args: Sequence[str], message: str | None) -> None:
    base = ["policy", "--role-arn", APP_ROLE]
    result = CliRunner().invoke(cli, [*base, *args] + ([] if message is None else ["--table", "t"]))
    assert result.exit_code == 2
    assert (message or "Missing option '--table'") in result.output


def test_policy_help_documents_the_encryption_context() -> None:
    result = CliRunner().invoke(cli, ["policy", "--help"])
    assert result.exit_code == 0
    assert '{"table": "<table>", "key_version": "<n>"}' in result.output
    assert '"purpose": "search"' in result.output


def test_rewrap_of_some_tables_keeps_the_others_readable(app: App, tmp_path: Path) -> None:
    new_key = tmp_path / "new-master.key"
    LocalKms.generate_key_file(new_key)
    new = f"local://{new_key}"
    result = app.ok(
        "rewrap", "--to", new, "--table", "cli_visits", "--table", "cli_patients", models=False
    )
    assert result.stdout == f"rewrapped 3 key(s) under {new}\n"
    assert app.ok("verify", kms=new).stdout.splitlines()[-1].startswith("OK: all 30 ")


def test_verify_a_table_without_primary_key(engine: Engine, db_url: str, key_file: Path) -> None:
    vault = KeyVault(engine, LocalKms(key_file=key_file), table_name=KEY_TABLE)
    try:
        vault.create_table()
        log_metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                audit_log.insert(),
                [{"entry": f"entry {n}", "actor": f"actor {n}"} for n in range(5)],
            )
        args = [
            "verify",
            "--db",
            db_url,
            "--key-table",
            KEY_TABLE,
            "--kms",
            f"local://{key_file}",
            "--models",
            "tests.cli_models:log_metadata",
            "--batch-size",
            "2",
        ]
        good = CliRunner().invoke(cli, args)
        assert good.exit_code == 0, good.output
        assert "cli_audit_log: 5 rows" in good.stdout
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE cli_audit_log SET entry = :entry WHERE actor = 'actor 3'"),
                {"entry": b"not a ciphertext"},
            )
        bad = CliRunner().invoke(cli, args)
        assert bad.exit_code == 1
        assert re.search(r"cli_audit_log\.entry \[row=\d\]: InvalidCiphertextError", bad.stdout)
        assert "entry 3" not in bad.stdout
    finally:
        vault.close()
