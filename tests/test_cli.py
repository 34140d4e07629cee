"""The ``sqlalchemy-kms`` command line: the demo's output, KMS call counts and errors."""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from sqlalchemy_kms import LocalKms, __version__
from sqlalchemy_kms import cli as cli_module
from sqlalchemy_kms.cli import (
    DATABASE_FILE,
    DEFAULT_DEMO_DIR,
    KEY_FILE,
    KmsUri,
    cli,
    main,
    parse_kms_uri,
)
from sqlalchemy_kms.cli import _demo as demo_module
from sqlalchemy_kms.cli._context import (
    CliContext,
    KmsUriType,
    NoKms,
    db_option,
    key_table_option,
    kms_option,
    pass_cli,
)
from sqlalchemy_kms.errors import ConfigurationError

WHERE = "Where things are"
WRITTEN = "Rows written through the ORM"
RAW = "Stored ciphertext, as raw SQL sees it"
DECRYPTED = "The same rows read back through the ORM (decrypted)"
KEYS = "Key table (wrapped data keys; plaintext keys are never stored)"
CALLS = "KMS calls"
HEADINGS = (WHERE, WRITTEN, RAW, DECRYPTED, KEYS, CALLS)

MISSING_ALIAS = "alias/sqlalchemy-kms-does-not-exist"


def plaintexts() -> list[str]:
    """Every personal value of the sample patients, as the demo prints it."""
    values: list[str] = []
    for sample in demo_module.SAMPLES:
        values += [sample.name, sample.phone, sample.national_id, sample.birth_date.isoformat()]
        if sample.notes is not None:
            values.append(sample.notes)
    return values


def run_demo(*args: str) -> Result:
    result = CliRunner().invoke(cli, ["demo", *args])
    assert result.exit_code == 0, result.output
    return result


def run_module(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m sqlalchemy_kms.cli ARGS`` in a child process, warnings as errors."""
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "sqlalchemy_kms.cli", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=cwd,
        timeout=120,
        check=False,
    )


def sections(output: str) -> dict[str, str]:
    """The demo's output by heading (a line underlined with dashes)."""
    parts = re.split(r"^(\S.*)\n-+$", output, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def field(section: str, label: str) -> list[str]:
    """The values of every ``label  value`` line of a section."""
    return re.findall(rf"^\s+{re.escape(label)}\s+(.+?)\s*$", section, flags=re.MULTILINE)


def kms_calls(output: str) -> dict[str, int]:
    """The ``Operation: count`` lines of the KMS calls section (and ``total``)."""
    found = re.findall(r"^\s+(\w+):\s+(\d+)\b", sections(output)[CALLS], flags=re.MULTILINE)
    return {operation: int(count) for operation, count in found}


def key_rows(output: str) -> list[dict[str, str]]:
    """The key table rows the demo printed, one dict per row."""
    keys = sections(output)[KEYS]
    labels = ("scope", "key_version", "state", "provider", "master_key_id", "wrapped_key")
    columns = {label: field(keys, label) for label in labels}
    count = len(columns["scope"])
    assert all(len(values) == count for values in columns.values()), keys
    return [{label: columns[label][i] for label in labels} for i in range(count)]


@pytest.fixture
def aws_env(kms_endpoint: str, cmk: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Point boto3's normal configuration at the moto KMS server."""
    for name in ("AWS_PROFILE", "AWS_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


# -- version and entry points ---------------------------------------------------------


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"sqlalchemy-kms {__version__}\n"


def test_main_is_the_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"sqlalchemy-kms {__version__}\n"


def test_runs_as_a_module() -> None:
    done = run_module("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"sqlalchemy-kms {__version__}\n"


# -- the demo with the local master key --------------------------------------------------


def test_demo_shows_every_step(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    output = run_demo("--dir", str(folder), "--rows", "5").output
    parts = sections(output)
    assert list(parts) == list(HEADINGS)

    where = parts[WHERE]
    assert str(folder) in where
    assert str(folder / DATABASE_FILE) in where
    assert str(folder / KEY_FILE) in where
    assert "created now" in where
    assert (folder / DATABASE_FILE).is_file()
    assert (folder / KEY_FILE).is_file()

    assert "9 (4 sample patients + 5 generated)" in parts[WRITTEN]

    raw = parts[RAW]
    assert "SELECT id, ward, name, phone, national_id, birth_date, notes FROM patients" in raw
    for value in plaintexts():
        assert value not in raw
    assert re.search(
        r"^\s+name\s+01 01 00000001 [0-9a-f]{16} [0-9a-f]+\.\.\. \(\d+ bytes\)$",
        raw,
        flags=re.MULTILINE,
    )
    assert re.search(r"^\s+national_id\s+01 01 00000001 [0-9a-f]+", raw, flags=re.MULTILINE)
    assert re.search(r"^\s+notes\s+NULL$", raw, flags=re.MULTILINE)  # None stays NULL

    decrypted = parts[DECRYPTED]
    assert "김민지" in decrypted
    for value in plaintexts():
        assert value in decrypted
    assert "9 rows decrypted in all." in decrypted

    [key] = key_rows(output)
    master_key_id = LocalKms(key_file=folder / KEY_FILE).master_key_id
    assert key["scope"] == "patients"
    assert key["key_version"] == "1"
    assert key["state"] == "enabled"
    assert key["provider"] == "local"
    assert key["master_key_id"] == master_key_id
    assert field(where, "master key id") == [master_key_id]
    assert re.fullmatch(r"[0-9a-f]+\.\.\. \(\d+ bytes\)", key["wrapped_key"])


def test_kms_calls_are_what_the_design_promises(tmp_path: Path) -> None:
    output = run_demo("--dir", str(tmp_path), "--rows", "3").output
    tables = len({key["scope"] for key in key_rows(output)})
    calls = kms_calls(output)
    assert tables == 1
    assert len(key_rows(output)) == tables  # one data key per encrypted table
    assert calls["GenerateDataKey"] == tables  # once per encrypted table
    assert 1 <= calls["Decrypt"] <= tables  # at most once per table (after the cache clear)
    assert calls["total"] == calls["GenerateDataKey"] + calls["Decrypt"]


def test_kms_calls_do_not_grow_with_the_rows(tmp_path: Path) -> None:
    few = run_demo("--dir", str(tmp_path / "few"), "--rows", "0").output
    many = run_demo("--dir", str(tmp_path / "many"), "--rows", "500").output
    assert "504 rows decrypted in all." in sections(many)[DECRYPTED]
    assert "... and 500 generated rows, not shown." in sections(many)[RAW]
    for calls in (kms_calls(few), kms_calls(many)):
        assert calls["GenerateDataKey"] == 1
        assert calls["Decrypt"] == 1


def test_second_run_reuses_the_key_file_and_a_fresh_database(tmp_path: Path) -> None:
    first = run_demo("--dir", str(tmp_path), "--rows", "7").output
    key_text = (tmp_path / KEY_FILE).read_text()
    second = run_demo("--dir", str(tmp_path), "--rows", "2").output

    assert (tmp_path / KEY_FILE).read_text() == key_text
    assert "created now" in sections(first)[WHERE]
    assert "reused from an earlier run" in sections(second)[WHERE]
    [first_key] = key_rows(first)
    [second_key] = key_rows(second)
    assert first_key["master_key_id"] == second_key["master_key_id"]
    assert second_key["key_version"] == "1"  # a new database, so a new first data key
    assert first_key["wrapped_key"] != second_key["wrapped_key"]
    assert "6 rows decrypted in all." in sections(second)[DECRYPTED]
    assert kms_calls(second)["GenerateDataKey"] == 1


def test_no_data_key_or_master_key_is_printed(tmp_path: Path) -> None:
    output = run_demo("--dir", str(tmp_path), "--rows", "1").output
    provider = LocalKms(key_file=tmp_path / KEY_FILE)
    with sqlite3.connect(tmp_path / DATABASE_FILE) as conn:
        wrapped, master_key_id = conn.execute(
            "SELECT wrapped_key, master_key_id FROM kms_data_keys "
            "WHERE scope = 'patients' AND key_version = 1"
        ).fetchone()
    conn.close()
    context = {"table": "patients", "key_version": "1"}  # the documented data key context
    data_key = provider.unwrap(wrapped, context, master_key_id)
    master_key = base64.b64decode((tmp_path / KEY_FILE).read_text())
    printed = output.lower()
    for secret in (data_key, master_key):
        digits = secret.hex()
        for start in range(len(digits) - 16 + 1):
            assert digits[start : start + 16] not in printed
    assert (tmp_path / KEY_FILE).read_text().strip() not in output


def test_default_folder_from_the_console(tmp_path: Path) -> None:
    done = run_module("demo", "--rows", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    folder = tmp_path / DEFAULT_DEMO_DIR
    assert (folder / DATABASE_FILE).is_file()
    assert (folder / KEY_FILE).is_file()
    assert list(sections(done.stdout)) == list(HEADINGS)
    assert "김민지" in sections(done.stdout)[DECRYPTED]


def test_damaged_key_file_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("not a key\n")
    done = run_module("demo", "--dir", str(tmp_path))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("Error: ") and "is not a sqlalchemy-kms local key file" in line


def test_database_error_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_module, "DATABASE_FILE", "no-such-folder/demo.sqlite3")
    result = CliRunner().invoke(cli, ["demo", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a click error, not a crash
    assert result.output.splitlines()[-1] == "Error: database error: unable to open database file"


def test_unusable_folder_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file, not a folder\n")
    done = run_module("demo", "--dir", str(tmp_path / "taken" / "demo"))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("Error: ")


# -- the demo with AWS KMS (moto server) ----------------------------------------------------


@pytest.mark.parametrize("form", ["alias", "arn", "key_id"])
@pytest.mark.usefixtures("aws_env")
def test_demo_with_aws_kms(tmp_path: Path, cmk: dict[str, str], form: str) -> None:
    output = run_demo("--dir", str(tmp_path), "--kms", f"aws-kms://{cmk[form]}").output
    parts = sections(output)
    assert list(parts) == list(HEADINGS)
    assert f"aws-kms://{cmk[form]}" in parts[WHERE]
    assert field(parts[WHERE], "region") == ["us-east-1"]
    assert not (tmp_path / KEY_FILE).exists()  # no local master key with AWS KMS

    for value in plaintexts():
        assert value not in parts[RAW]
        assert value in parts[DECRYPTED]

    [key] = key_rows(output)
    assert key["provider"] == "aws-kms"
    assert key["master_key_id"] == cmk["arn"]
    assert kms_calls(output)["GenerateDataKey"] == 1
    assert kms_calls(output)["Decrypt"] == 1


@pytest.mark.usefixtures("aws_env")
def test_region_option_is_used(tmp_path: Path, cmk: dict[str, str]) -> None:
    output = run_demo(
        "--dir", str(tmp_path), "--kms", f"aws-kms://{cmk['alias']}", "--region", "us-east-1"
    ).output
    assert field(sections(output)[WHERE], "region") == ["us-east-1"]


@pytest.mark.usefixtures("aws_env")
def test_kms_failure_is_a_one_line_error(tmp_path: Path) -> None:
    done = run_module("demo", "--dir", str(tmp_path), "--kms", f"aws-kms://{MISSING_ALIAS}")
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("Error: KMS GenerateDataKey failed for table patients")
    assert MISSING_ALIAS in line
    assert "NotFoundException" in line


@pytest.mark.usefixtures("aws_env")
def test_kms_failure_through_click(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["demo", "--dir", str(tmp_path), "--kms", f"aws-kms://{MISSING_ALIAS}"]
    )
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a click error, not a crash
    assert "Error: KMS GenerateDataKey failed" in result.output


# -- usage errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kms", "message"),
    [
        ("gcp-kms://projects/p/locations/l/keyRings/r/cryptoKeys/k", "unknown KMS 'gcp-kms'"),
        ("vault", "unknown KMS 'vault'"),
        ("aws-kms://", "needs a key after the scheme"),
    ],
)
def test_bad_kms_uri_is_a_usage_error(tmp_path: Path, kms: str, message: str) -> None:
    result = CliRunner().invoke(cli, ["demo", "--dir", str(tmp_path / "x"), "--kms", kms])
    assert result.exit_code == 2
    assert "Invalid value for '--kms'" in result.output
    assert message in result.output
    assert not (tmp_path / "x").exists()


def test_region_needs_aws_kms(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["demo", "--dir", str(tmp_path), "--region", "us-east-1"])
    assert result.exit_code == 2
    assert "--region applies to --kms aws-kms://" in result.output


def test_parse_kms_uri() -> None:
    assert parse_kms_uri("local") == KmsUri("local")
    assert parse_kms_uri("aws-kms://alias/app") == KmsUri("aws-kms", "alias/app")
    arn = "arn:aws:kms:ap-northeast-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    assert parse_kms_uri(f"aws-kms://{arn}") == KmsUri("aws-kms", arn)
    assert str(parse_kms_uri(f"aws-kms://{arn}")) == f"aws-kms://{arn}"
    with pytest.raises(ValueError, match="unknown KMS"):
        parse_kms_uri("kms://alias/app")


# -- the command line's parts ---------------------------------------------------------------


def test_kms_uri_type() -> None:
    lifecycle, demo_kms = KmsUriType(), KmsUriType(bare_local=True)
    assert lifecycle.convert("aws-kms://alias/app", None, None) == KmsUri("aws-kms", "alias/app")
    assert lifecycle.convert("local://m.key", None, None) == KmsUri("local", "m.key")
    assert lifecycle.convert(KmsUri("local", "m.key"), None, None) == KmsUri("local", "m.key")
    assert demo_kms.convert("local", None, None) == KmsUri("local")
    with pytest.raises(click.BadParameter, match="'local' needs the key file"):
        lifecycle.convert("local", None, None)
    with pytest.raises(click.BadParameter, match="unknown KMS 'vault'"):
        demo_kms.convert("vault", None, None)


def test_commands_without_kms_get_a_provider_that_refuses_every_call() -> None:
    refusing = NoKms()
    context = {"table": "t", "key_version": "1"}
    for call in (
        lambda: refusing.master_key_id,
        lambda: refusing.generate_data_key(context),
        lambda: refusing.unwrap(b"wrapped", context, "local:00"),
        lambda: refusing.wrap(bytes(32), context),
    ):
        with pytest.raises(ConfigurationError, match="this needs the master key: give --kms"):
            call()


def test_options_are_kept_on_the_context_object(tmp_path: Path) -> None:
    seen: list[CliContext] = []

    @click.command()
    @db_option
    @kms_option(required=False)
    @key_table_option
    @pass_cli
    def probe(context: CliContext) -> None:
        seen.append(context)

    database = f"sqlite:///{tmp_path / 'x.db'}"
    args = ["--db", database, "--kms", "local://m.key", "--key-table", "app.keys"]
    result = CliRunner().invoke(probe, args)
    assert result.exit_code == 0, result.output
    [context] = seen
    assert (context.db_url, context.kms, context.key_table) == (
        database,
        KmsUri("local", "m.key"),
        "app.keys",
    )


# -- the options every key command shares ------------------------------------------------------

KEY_COMMANDS = (
    "status",
    "verify",
    "rotate",
    "reencrypt",
    "rewrap",
    "retire",
    "destroy",
    "export-keys",
    "import-keys",
    "create-table",
    "create-keys",
    "policy",
)
SHARED = ("--db", "--kms", "--models", "--key-table")


def test_every_key_command_takes_the_shared_options() -> None:
    assert set(KEY_COMMANDS) == set(cli.commands) - {"demo"}
    for name in KEY_COMMANDS:
        command = cli.commands[name]
        options = {opt for param in command.params for opt in param.opts}
        assert set(SHARED) <= options, name
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0
        for option in SHARED:
            assert re.search(rf"^\s+{option} ", result.output, re.MULTILINE), (name, option)


@pytest.fixture
def shared_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """All four shared options, for a SQLite database in ``tmp_path``; the models are
    the test models with a key table of their own (``cli_kms_keys``)."""
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    key = tmp_path / "master.key"
    LocalKms.generate_key_file(key)
    return [
        "--db",
        f"sqlite:///{tmp_path / 'app.db'}",
        "--kms",
        f"local://{key}",
        "--models",
        "tests.cli_models:Base",
        "--key-table",
        "cli_kms_keys",
    ]


def test_options_a_command_does_not_use_are_accepted_and_ignored(
    shared_args: list[str], tmp_path: Path
) -> None:
    def ok(*args: str) -> Result:
        result = CliRunner().invoke(cli, [*args, *shared_args])
        assert result.exit_code == 0, result.output
        return result

    assert "cli_kms_keys is ready" in ok("create-table").output
    assert "cli_patients: data key version 1" in ok("create-keys").output
    export = tmp_path / "keys.json"
    assert "exported " in ok("export-keys", "--output", str(export)).output
    assert "already present" in ok("import-keys", str(export)).output
    new_key = tmp_path / "new.key"
    LocalKms.generate_key_file(new_key)
    assert "rewrapped " in ok("rewrap", "--to", f"local://{new_key}").output
    # a --models that does not import is refused only where the models are used
    broken = [*shared_args]
    broken[broken.index("--models") + 1] = "no_such_module:Base"
    assert CliRunner().invoke(cli, ["create-table", *broken]).exit_code == 0
    assert CliRunner().invoke(cli, ["status", *broken]).exit_code == 2


def test_policy_ignores_the_database_and_takes_its_tables_from_the_models(
    shared_args: list[str],
) -> None:
    role = "arn:aws:iam::111122223333:role/app"
    result = CliRunner().invoke(cli, ["policy", "--role-arn", role, *shared_args])
    assert result.exit_code == 0, result.output
    [statement] = json.loads(result.stdout)["Statement"]
    tables = statement["Condition"]["StringEquals"]["kms:EncryptionContext:table"]
    assert set(tables) == {"cli_patients", "cli_visits"}  # cli_wards has no encrypted column
    assert not (Path(shared_args[1].removeprefix("sqlite:///"))).exists()  # no database opened
    chosen = CliRunner().invoke(
        cli, ["policy", "--role-arn", role, "--table", "cli_visits", *shared_args]
    )
    assert chosen.exit_code == 0, chosen.output
    [statement] = json.loads(chosen.stdout)["Statement"]
    assert statement["Condition"]["StringEquals"]["kms:EncryptionContext:table"] == ["cli_visits"]
    unknown = CliRunner().invoke(
        cli, ["policy", "--role-arn", role, "--table", "nope", *shared_args]
    )
    assert unknown.exit_code == 2
    assert "no table 'nope'" in unknown.output
    missing = CliRunner().invoke(cli, ["policy", "--role-arn", role])
    assert missing.exit_code == 2
    assert "Missing option '--table'. Give --table (repeat it), or --models." in missing.output
