"""The ``sqlalchemy-kms`` command line: the demo, and the key lifecycle of an application.

``sqlalchemy-kms demo`` writes a few patient records through the ORM into a
SQLite database, then shows what the database holds (ciphertext only), what
the application reads back (plaintext), the key table (wrapped data keys,
never plaintext ones) and how few KMS calls all of that took::

    sqlalchemy-kms --version
    sqlalchemy-kms demo                                  # ./sqlalchemy-kms-demo, local master key
    sqlalchemy-kms demo --dir /tmp/kms-demo --rows 1000  # more rows, same KMS calls
    sqlalchemy-kms demo --kms aws-kms://alias/my-app-cmk --region ap-northeast-2
    sqlalchemy-kms demo --kms aws-kms://arn:aws:kms:us-east-1:111122223333:key/1234abcd-...

The default ``--kms local`` keeps the master key in a file of the demo folder
(:class:`~sqlalchemy_kms.LocalKms`): made on the first run, reused after
(``--kms local://PATH`` names the file). Anyone holding that file can decrypt
the demo database, which is why it is for development only. ``--kms
aws-kms://KEY`` uses :class:`~sqlalchemy_kms.AwsKms` with a boto3 client
configured the usual way (``AWS_PROFILE``, ``AWS_REGION``,
``AWS_ENDPOINT_URL_KMS``, ...); ``KEY`` is an alias name, alias ARN, key ARN
or key id. The database file is created afresh on every run.

Key lifecycle
-------------
The other commands are thin layers over :class:`~sqlalchemy_kms.KeyVault`
for an application's own database. They share these options:

``--db URL``
    SQLAlchemy URL of the database (env ``SQLALCHEMY_KMS_DB``).
``--kms URI``
    The master key: ``aws-kms://KEY`` or ``local://PATH`` (a LocalKms key
    file) (env ``SQLALCHEMY_KMS_KMS``). Commands that never call the KMS
    (status, retire, destroy, export-keys, import-keys, create-table) do
    without it.
``--models MODULE:ATTR``
    The application's ``MetaData``, or a declarative ``Base`` or
    ``registry`` whose ``.metadata`` is used; the current folder is put on
    ``sys.path``, so run from the application's folder.
``--key-table NAME``
    The key table (``kms_data_keys``; ``SCHEMA.NAME`` for another schema).

A key rotation, start to end::

    export SQLALCHEMY_KMS_DB=postgresql+psycopg://app@db/app
    export SQLALCHEMY_KMS_KMS=aws-kms://alias/app-cmk
    sqlalchemy-kms create-table                           # once; idempotent
    sqlalchemy-kms create-keys --models myapp.models:Base # keys ahead of time
    sqlalchemy-kms status --models myapp.models:Base      # keys, rows per key version
    sqlalchemy-kms rotate --models myapp.models:Base --table patients   # prints: version 2
    sqlalchemy-kms reencrypt --models myapp.models:Base --table patients --batch-size 5000
    sqlalchemy-kms status --models myapp.models:Base --table patients --json
    sqlalchemy-kms retire --models myapp.models:Base --table patients --version 1
    sqlalchemy-kms destroy --table patients --version 1 --yes          # crypto-shredding

Backups, checks, a new master key and the KMS key policy::

    sqlalchemy-kms export-keys --output keys.json          # wrapped keys only
    sqlalchemy-kms import-keys keys.json                   # conflicts: exit status 1
    sqlalchemy-kms verify --models myapp.models:Base       # decrypt every value; 1 on failure
    sqlalchemy-kms rewrap --to aws-kms://alias/new-cmk     # --kms: the current master key
    sqlalchemy-kms policy --role-arn arn:aws:iam::111122223333:role/app \
        --table patients --table visits --admin-role-arn arn:aws:iam::111122223333:role/ops

Errors of the library (a KMS that refuses, a key that does not exist, a
refused lifecycle step, ...) and of the database are reported as one line
and exit status 1; wrong options exit with status 2. ``verify`` exits with
status 1 when any value does not decrypt.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, TextIO

import click
from botocore.exceptions import BotoCoreError
from sqlalchemy import (
    URL,
    Column,
    Date,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    exc,
    inspect,
    select,
    text,
    tuple_,
    type_coerce,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import NullType

from . import __version__
from ._format import parse_header
from .errors import (
    ConfigurationError,
    InvalidCiphertextError,
    KMSError,
    SQLAlchemyKMSError,
    UnknownKeyVersionError,
)
from .lifecycle import Progress, TableStatus
from .providers import AwsKms, KeyProvider, LocalKms
from .providers.base import GeneratedDataKey
from .providers.uri import KmsUri, parse_kms_uri, region_of_arn
from .types import KMSEncrypted, encrypted_columns
from .vault import DEFAULT_KEY_TABLE, KeyVault, table_scope

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

__all__ = [
    "DATABASE_FILE",
    "DEFAULT_DEMO_DIR",
    "KEY_FILE",
    "KmsUri",
    "cli",
    "demo",
    "load_metadata",
    "main",
    "parse_kms_uri",
    "policy_document",
]

#: Folder ``demo`` works in unless ``--dir`` says otherwise (relative to the current folder).
DEFAULT_DEMO_DIR: Final = "sqlalchemy-kms-demo"
#: Name of the demo's SQLite database inside the demo folder (replaced on every run).
DATABASE_FILE: Final = "demo.sqlite3"
#: Name of the demo's local master key file inside the demo folder (kept between runs).
KEY_FILE: Final = "local-master.key"

_PROG_NAME: Final = "sqlalchemy-kms"
_HEX_WIDTH: Final = 24  # hex digits of a stored value shown after its header (and salt)
_TEXT_WIDTH: Final = 60


# -- the --kms option -----------------------------------------------------------


def _kms_option(ctx: click.Context, param: click.Parameter, value: str) -> KmsUri:
    """Click callback of ``--kms``: the parsed value, or a usage error."""
    try:
        return parse_kms_uri(value)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None


# -- the demo's model -------------------------------------------------------------


class _DemoBase(DeclarativeBase):
    """Declarative base of the demo's model."""


class _Patient(_DemoBase):
    """A patient: the personal columns are encrypted, ``ward`` is not (for contrast)."""

    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ward: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(KMSEncrypted(String(100)))
    phone: Mapped[str | None] = mapped_column(KMSEncrypted(String(32)))
    national_id: Mapped[str] = mapped_column(KMSEncrypted(String(20)))
    birth_date: Mapped[dt.date] = mapped_column(KMSEncrypted(Date))
    notes: Mapped[str | None] = mapped_column(KMSEncrypted(Text))


_ENCRYPTED_COLUMNS: Final = ("name", "phone", "national_id", "birth_date", "notes")


class _Sample(NamedTuple):
    ward: str
    name: str
    phone: str
    national_id: str
    birth_date: dt.date
    notes: str | None


# Made-up people; the numbers follow real formats but belong to no one.
_SAMPLES: Final = (
    _Sample(
        "3B",
        "김민지",
        "+82 10-2481-3579",
        "900314-2481357",
        dt.date(1990, 3, 14),
        "Allergic to penicillin. 페니실린 알레르기.",
    ),
    _Sample(
        "3B",
        "María García López",
        "+34 612 345 678",
        "48291736K",
        dt.date(1985, 7, 22),
        "Type 2 diabetes, metformin 500 mg twice daily.",
    ),
    _Sample("ICU", "Jonas Weber", "+49 30 9018 2201", "T22000129", dt.date(1972, 11, 2), None),
    _Sample(
        "5A",
        "Aiko Tanaka",
        "+81 90-7315-2468",
        "4821 7390 1536",
        dt.date(2001, 1, 30),
        "Post-operative check on Friday; next of kin informed.",
    ),
)


def _generated(number: int) -> _Patient:
    """The ``number``-th generated patient (``--rows``)."""
    return _Patient(
        ward=("1A", "2C", "4D")[number % 3],
        name=f"Generated Patient {number:05d}",
        phone=f"+82 10-0000-{number % 10000:04d}",
        national_id=f"GEN-{number:08d}",
        birth_date=dt.date(1940, 1, 1) + dt.timedelta(days=(number * 97) % 25000),
        notes=None if number % 2 else f"Routine check-up #{number}.",
    )


# -- output ---------------------------------------------------------------------


def _heading(title: str) -> None:
    click.echo()
    click.echo(click.style(title, bold=True))
    click.echo("-" * len(title))


def _field(label: str, value: object, indent: int = 2) -> None:
    click.echo(f"{' ' * indent}{label:<14} {value}")


def _stored(value: object) -> str:
    """A stored value as hex: its six-byte header apart, the rest truncated."""
    if value is None:
        return "NULL"
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return repr(value)
    raw = bytes(value)
    if len(raw) < 6:
        return f"{raw.hex()} ({len(raw)} bytes)"
    parts = [raw[0:1].hex(), raw[1:2].hex(), raw[2:6].hex()]
    body = raw[6:]
    if raw[1] == 1 and len(body) > 8:  # randomized: the writer's subkey salt comes first
        parts.append(body[:8].hex())
        body = body[8:]
    rest = body.hex()
    if len(rest) > _HEX_WIDTH:
        rest = rest[:_HEX_WIDTH] + "..."
    return f"{' '.join(parts)} {rest} ({len(raw)} bytes)"


def _wrapped(value: bytes) -> str:
    """A wrapped data key as truncated hex (it is ciphertext, but no need to print it all)."""
    digits = value.hex()
    if len(digits) > _HEX_WIDTH + 8:
        digits = digits[: _HEX_WIDTH + 8] + "..."
    return f"{digits} ({len(value)} bytes)"


def _shorten(value: object) -> str:
    if value is None:
        return "None"
    shown = str(value)
    return shown if len(shown) <= _TEXT_WIDTH else shown[: _TEXT_WIDTH - 3] + "..."


def _one_line(message: str) -> str:
    return " ".join(message.split())


# -- the command group --------------------------------------------------------------


class _Group(click.Group):
    """A click group that reports library and database errors as one line, exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SQLAlchemyKMSError as error:
            raise click.ClickException(_one_line(str(error))) from None
        except exc.DBAPIError as error:
            # the driver's own message: SQLAlchemy's would list the statement's parameters
            raise click.ClickException(f"database error: {_one_line(str(error.orig))}") from None


@click.group(cls=_Group)
@click.version_option(
    __version__, "--version", prog_name=_PROG_NAME, message="%(prog)s %(version)s"
)
def cli() -> None:
    """sqlalchemy-kms: transparent SQLAlchemy column encryption with KMS-wrapped data keys.

    Run "sqlalchemy-kms demo" to see it encrypt, store and decrypt a few rows.
    The other commands manage the keys of an application's database; they
    take --db URL (or SQLALCHEMY_KMS_DB), --kms URI (or SQLALCHEMY_KMS_KMS),
    --models MODULE:ATTR and --key-table NAME. See "sqlalchemy-kms COMMAND --help".
    """


def _local_provider(folder: Path, path: str | None = None) -> tuple[LocalKms, Path, bool]:
    """The demo's local master key: reused from ``path`` (default: a file in
    ``folder``) if there, else made."""
    key_file = Path(path).expanduser() if path else folder / KEY_FILE
    if key_file.exists():
        try:
            return LocalKms(key_file=key_file), key_file, True
        except ValueError as error:
            raise click.ClickException(
                f"{_one_line(str(error))}; move it away to let the demo make a new one"
            ) from None
    return LocalKms.generate_key_file(key_file), key_file, False


def _aws_provider(key_id: str, region: str | None) -> AwsKms:
    """An :class:`AwsKms` for ``key_id`` with a normally configured boto3 client."""
    try:
        return AwsKms(key_id, region_name=region or region_of_arn(key_id))
    except BotoCoreError as error:
        raise click.ClickException(
            f"cannot set up the AWS KMS client: {_one_line(str(error))}"
        ) from None


def _fresh_database(folder: Path) -> Path:
    """Remove the previous run's database (and SQLite side files); return its path."""
    database = folder / DATABASE_FILE
    for suffix in ("", "-journal", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    return database


@cli.command()
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DEMO_DIR,
    show_default=True,
    help="Working folder for the database and the local master key file (created if missing).",
)
@click.option(
    "--kms",
    "kms",
    metavar="URI",
    default="local",
    show_default=True,
    callback=_kms_option,
    help="Master key: 'local' (a key file in the working folder), local://PATH (that "
    "key file, made if missing) or aws-kms://KEY (alias/NAME, an alias or key ARN, or a key id).",
)
@click.option(
    "--region",
    default=None,
    help="AWS region for aws-kms:// (default: boto3's configuration, or the region of a key ARN).",
)
@click.option(
    "--rows",
    type=click.IntRange(0, 1_000_000),
    default=20,
    show_default=True,
    help="Generated rows to write besides the sample patients; the number of "
    "KMS calls does not grow with it.",
)
def demo(folder: Path, kms: KmsUri, region: str | None, rows: int) -> None:
    """Encrypt, store and read back patient records, showing each step.

    Writes sample patients (and --rows generated ones) through the ORM into a
    fresh SQLite database in --dir, then prints the ciphertext SQL sees, the
    rows decrypted by the ORM, the key table with its wrapped data keys, and
    the KMS calls made.
    """
    if region is not None and kms.scheme != "aws-kms":
        raise click.UsageError("--region applies to --kms aws-kms://... only")
    folder = folder.expanduser().resolve()
    provider: KeyProvider
    key_file: Path | None = None
    reused = False
    if kms.scheme == "aws-kms":
        assert kms.key_id is not None
        provider = _aws_provider(kms.key_id, region)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if kms.scheme == "local":
            provider, key_file, reused = _local_provider(folder, kms.key_id)
        database = _fresh_database(folder)
    except OSError as error:
        raise click.ClickException(_one_line(str(error))) from None

    click.echo(click.style(f"{_PROG_NAME} {__version__} demo", bold=True))

    _heading("Where things are")
    _field("folder", folder)
    _field("database", f"{database} (SQLite, created afresh on every run)")
    if isinstance(provider, LocalKms):
        state = "reused from an earlier run" if reused else "created now"
        _field("master key", f"{key_file} (LocalKms key file, {state})")
        _field("master key id", provider.master_key_id)
        click.echo("  The key file IS the master key: whoever has it can decrypt this")
        click.echo("  database. Fine for a demo; in production use aws-kms://, where the")
        click.echo("  master key never leaves the KMS.")
    else:
        assert isinstance(provider, AwsKms)
        _field("master key", f"{kms} (AWS KMS; the master key never leaves the KMS)")
        _field("region", provider.client.meta.region_name or "(boto3 default)")
        _field("endpoint", provider.client.meta.endpoint_url)

    engine = create_engine(URL.create("sqlite", database=str(database)))
    vault = KeyVault(engine, provider)
    try:
        _run_demo(engine, vault, provider, rows)
    finally:
        vault.close()
        engine.dispose()


def _run_demo(engine: Engine, vault: KeyVault, provider: KeyProvider, rows: int) -> None:
    """The steps of ``demo`` after the provider and the database are ready."""
    vault.create_table()
    _DemoBase.metadata.create_all(engine)  # makes the data key of "patients"

    _heading("Rows written through the ORM")
    with Session(engine) as session:
        session.add_all(_Patient(**sample._asdict()) for sample in _SAMPLES)
        session.add_all(_generated(number) for number in range(1, rows + 1))
        session.commit()
    total = len(_SAMPLES) + rows
    _field("table", _Patient.__tablename__)
    _field("rows", f"{total} ({len(_SAMPLES)} sample patients + {rows} generated), one transaction")
    _field("encrypted", ", ".join(_ENCRYPTED_COLUMNS))
    _field("not encrypted", "id, ward")

    _heading("Stored ciphertext, as raw SQL sees it")
    query = f"SELECT id, ward, {', '.join(_ENCRYPTED_COLUMNS)} FROM patients ORDER BY id"
    click.echo(f"  {query}")
    click.echo("  Each value: 01 (format) 01 (AES-256-GCM, randomized) 00000001 (data key")
    click.echo("  version), then the subkey salt, nonce, ciphertext and tag. Equal values")
    click.echo("  look different. NULL stays NULL.")
    with engine.connect() as conn:
        raw_rows = conn.execute(text(query + " LIMIT :shown"), {"shown": len(_SAMPLES)}).all()
    for raw in raw_rows:
        click.echo()
        click.echo(f"  id {raw.id}, ward {raw.ward}")
        for name in _ENCRYPTED_COLUMNS:
            _field(name, _stored(getattr(raw, name)), indent=4)
    if rows:
        click.echo()
        click.echo(f"  ... and {rows} generated rows, not shown.")

    _heading("The same rows read back through the ORM (decrypted)")
    vault.clear_cache()
    click.echo("  The key cache was cleared first, as in a newly started process: the")
    click.echo("  data key is unwrapped once for the table, not once per value.")
    with Session(engine) as session:
        patients = session.scalars(select(_Patient).order_by(_Patient.id)).all()
        for patient in patients[: len(_SAMPLES)]:
            click.echo()
            click.echo(f"  id {patient.id}, ward {patient.ward}")
            for name in _ENCRYPTED_COLUMNS:
                _field(name, _shorten(getattr(patient, name)), indent=4)
    click.echo()
    click.echo(f"  {len(patients)} rows decrypted in all.")

    _heading("Key table (wrapped data keys; plaintext keys are never stored)")
    keys = vault.table
    # every column but the timestamp; the wrapped key is the only key material stored
    shown = [column for column in keys.c if column.name != "created_at"]
    with engine.connect() as conn:
        key_rows = conn.execute(select(*shown).order_by(*keys.primary_key.columns)).all()
    click.echo(f"  table {keys.fullname}: {len(key_rows)} key(s)")
    for key in key_rows:
        click.echo()
        for column in shown:
            value = getattr(key, column.name)
            if isinstance(value, (bytes, bytearray, memoryview)):
                value = _wrapped(bytes(value))
            _field(column.name, value)

    _heading("KMS calls")
    calls = provider.calls
    others = sorted(set(calls) - {"GenerateDataKey", "Decrypt"})
    for operation in ("GenerateDataKey", "Decrypt", *others):
        click.echo(f"  {operation + ':':<17} {calls[operation]}")
    click.echo(
        f"  {'total:':<17} {sum(calls.values())} for {total} rows written and read "
        f"({len(key_rows)} encrypted table(s))"
    )
    stats = vault.stats()
    click.echo(f"  {'key cache:':<17} {stats['cache_hits']} hits, {stats['cache_misses']} misses")
    click.echo("  GenerateDataKey runs once per table's data key, and Decrypt at most once")
    click.echo("  per key while it is cached, however many rows: try a larger --rows.")


# -- the key lifecycle commands: shared options ----------------------------------------

_DB_ENV: Final = "SQLALCHEMY_KMS_DB"
_KMS_ENV: Final = "SQLALCHEMY_KMS_KMS"
_SHOWN_FAILURES: Final = 20  # failed rows listed per column by ``verify`` (all are counted)


def _lifecycle_kms_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> KmsUri | None:
    """Click callback of the lifecycle commands' ``--kms``/``--to``: a parsed URI
    naming a real master key (``local`` needs its key file: ``local://PATH``)."""
    if value is None:
        return None
    try:
        uri = parse_kms_uri(value)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None
    if uri.scheme == "local" and not uri.key_id:
        raise click.BadParameter(
            "'local' needs the key file: local://PATH (e.g. local://master.key)",
            ctx=ctx,
            param=param,
        )
    return uri


_db_option = click.option(
    "--db",
    "db_url",
    metavar="URL",
    envvar=_DB_ENV,
    required=True,
    help=f"SQLAlchemy database URL [env: {_DB_ENV}].",
)
_key_table_option = click.option(
    "--key-table",
    "key_table_name",
    metavar="NAME",
    default=DEFAULT_KEY_TABLE,
    show_default=True,
    help="The key table: NAME or SCHEMA.NAME.",
)
_KMS_HELP = (
    "Master key: aws-kms://KEY (alias/NAME, an alias or key ARN, or a key id) or "
    f"local://PATH (a LocalKms key file) [env: {_KMS_ENV}]."
)


def _kms_uri_option(*, required: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--kms",
        "kms_uri",
        metavar="URI",
        envvar=_KMS_ENV,
        required=required,
        callback=_lifecycle_kms_option,
        help=_KMS_HELP if required else "Accepted and ignored: this command makes no KMS call.",
    )


def _models_option(*, required: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--models",
        "models",
        metavar="MODULE:ATTR",
        required=required,
        help="The application's MetaData, or a declarative Base or registry whose "
        ".metadata is used (e.g. myapp.models:Base); the current folder is on sys.path.",
    )


def _batch_size_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--batch-size``: rows per batch of a job that walks a table."""
    return click.option(
        "--batch-size", type=click.IntRange(min=1), default=1000, show_default=True, help=help
    )


def _table_option(
    *, required: bool, help: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--table",
        "table_names",
        metavar="TABLE",
        multiple=True,
        required=required,
        help=help + " Repeat for several tables.",
    )


def load_metadata(spec: str) -> MetaData:
    """Import ``module:attr`` and return its :class:`~sqlalchemy.MetaData`.

    ``attr`` (dotted names allowed) is a ``MetaData``, or anything with a
    ``.metadata`` that is one: a declarative ``Base``, a ``registry``. Without
    ``:attr``, the module's ``metadata``, then its ``Base``, is used. The
    current folder is put on ``sys.path`` first. :class:`ValueError` when it
    cannot be imported or found.
    """
    module_name, _, attr = spec.partition(":")
    module_name = module_name.strip()
    if not module_name:
        raise ValueError("give the models as MODULE:ATTR, e.g. myapp.models:Base")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise ValueError(
            f"cannot import {module_name}: {type(error).__name__}: {_one_line(str(error))}"
        ) from None
    candidates = [attr.strip()] if attr.strip() else ["metadata", "Base"]
    for candidate in candidates:
        found: Any = module
        try:
            for part in candidate.split("."):
                found = getattr(found, part)
        except AttributeError:
            continue
        if isinstance(found, MetaData):
            return found
        metadata = getattr(found, "metadata", None)
        if isinstance(metadata, MetaData):
            return metadata
        raise ValueError(
            f"{module_name}:{candidate} is a {type(found).__name__}, not a MetaData, "
            "declarative Base or registry"
        )
    raise ValueError(f"{module_name} has no {' or '.join(candidates)}")


def _metadata(ctx: click.Context, spec: str | None) -> MetaData | None:
    if spec is None:
        return None
    try:
        return load_metadata(spec)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx=ctx, param_hint="'--models'") from None


def _provider(ctx: click.Context, uri: KmsUri, option: str) -> KeyProvider:
    """The provider named by a parsed ``--kms``/``--to``."""
    assert uri.key_id is not None
    if uri.scheme == "aws-kms":
        return _aws_provider(uri.key_id, None)
    path = Path(uri.key_id).expanduser()
    try:
        return LocalKms(key_file=path)
    except OSError as error:
        raise click.BadParameter(
            f"cannot read the local key file {path}: {error.strerror or error}",
            ctx=ctx,
            param_hint=f"'{option}'",
        ) from None
    except ValueError as error:
        raise click.BadParameter(_one_line(str(error)), ctx=ctx, param_hint=f"'{option}'") from None


class _NoKms(KeyProvider):
    """The provider of commands run without ``--kms``: any use is an error."""

    name = "none"

    def _refuse(self) -> ConfigurationError:
        return ConfigurationError(f"this needs the master key: give --kms URI (or set {_KMS_ENV})")

    @property
    def master_key_id(self) -> str:
        raise self._refuse()

    def generate_data_key(self, context: Mapping[str, str]) -> GeneratedDataKey:
        raise self._refuse()

    def unwrap(self, wrapped: bytes, context: Mapping[str, str], master_key_id: str) -> bytes:
        raise self._refuse()

    def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> tuple[bytes, str]:
        raise self._refuse()


@contextmanager
def _opened(
    db_url: str,
    kms_uri: KmsUri | None,
    key_table_name: str,
    *,
    need_key_table: bool = True,
) -> Iterator[KeyVault]:
    """The vault of one command: engine, provider and key table; closed afterwards.

    Without ``kms_uri`` (commands that make no KMS call) the provider refuses any use.
    """
    ctx = click.get_current_context()
    provider = _provider(ctx, kms_uri, "--kms") if kms_uri is not None else _NoKms()
    try:
        engine = create_engine(db_url)
    except (exc.ArgumentError, exc.NoSuchModuleError, ImportError, ValueError) as error:
        raise click.BadParameter(
            f"cannot use the database URL: {_one_line(str(error))}", ctx=ctx, param_hint="'--db'"
        ) from None
    schema, _, name = key_table_name.rpartition(".")
    vault = KeyVault(engine, provider, table_name=name, schema=schema or None)
    try:
        if need_key_table:
            with engine.connect() as conn:
                exists = inspect(conn).has_table(name, schema=schema or None)
            if not exists:
                raise click.ClickException(
                    f"the key table {vault.table.fullname} does not exist in this database; "
                    "create it with 'sqlalchemy-kms create-table' (or check --key-table)"
                )
        yield vault
    finally:
        vault.close()
        engine.dispose()


def _encrypted_tables(metadata: MetaData) -> dict[str, Table]:
    return {
        table_scope(table): table for table in metadata.sorted_tables if encrypted_columns(table)
    }


def _select_tables(ctx: click.Context, metadata: MetaData, names: Sequence[str]) -> list[Table]:
    """The tables named by ``--table`` (all with encrypted columns when none is named)."""
    known = _encrypted_tables(metadata)
    if not names:
        return list(known.values())
    chosen: list[Table] = []
    for name in names:
        table = known.get(name)
        if table is None:
            by_name = [t for t in known.values() if t.name == name]
            table = by_name[0] if len(by_name) == 1 else None
        if table is None:
            listed = ", ".join(known) or "none"
            raise click.BadParameter(
                f"no table {name!r} with encrypted columns in the models (they have: {listed})",
                ctx=ctx,
                param_hint="'--table'",
            )
        if table not in chosen:
            chosen.append(table)
    return chosen


def _isatty(stream: Literal["stdin", "stdout"]) -> bool:
    """Whether the command's standard input or output is a terminal."""
    handle = sys.stdin if stream == "stdin" else sys.stdout
    return handle is not None and handle.isatty()


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _key_name(search: bool) -> str:
    return "search key" if search else "data key"


# -- status ---------------------------------------------------------------------------


def _status_data(report: Sequence[TableStatus]) -> dict[str, Any]:
    return {
        "tables": [
            {
                "table": table.table,
                "keys": [
                    {
                        "purpose": key.purpose,
                        "version": key.key_version,
                        "state": key.state,
                        "active": key.active,
                        "provider": key.provider,
                        "master_key_id": key.master_key_id,
                        "created_at": key.created_at.isoformat() if key.created_at else None,
                    }
                    for key in table.keys
                ],
                "columns": [
                    {
                        "column": column.column,
                        "deterministic": column.deterministic,
                        "rows_by_version": {
                            str(version): count
                            for version, count in sorted(column.rows_by_version.items())
                        },
                        "null_rows": column.null_rows,
                        "other_rows": column.other_rows,
                        "total": column.total,
                    }
                    for column in table.columns
                ],
            }
            for table in report
        ]
    }


def _table_lines(rows: Sequence[Sequence[str]], indent: int = 4) -> None:
    """Print rows as left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        click.echo((" " * indent + "  ".join(cells)).rstrip())


def _spread(rows_by_version: Mapping[int, int], nulls: int, others: int, other: str) -> str:
    parts = [f"v{version}: {count}" for version, count in sorted(rows_by_version.items())]
    if nulls:
        parts.append(f"NULL: {nulls}")
    if others:
        parts.append(f"{other}: {others}")
    return ", ".join(parts) or "no rows"


def _print_status(report: Sequence[TableStatus]) -> None:
    for number, table in enumerate(report):
        if number:
            click.echo()
        click.echo(click.style(table.table, bold=True))
        if table.keys:
            click.echo("  key versions:")
            header = ("purpose", "version", "state", "active", "provider", "master key id")
            rows = [(*header, "created")]
            for key in table.keys:
                created = key.created_at.isoformat(sep=" ") if key.created_at else "-"
                rows.append(
                    (
                        key.purpose,
                        str(key.key_version),
                        key.state,
                        "*" if key.active else "",
                        key.provider,
                        key.master_key_id,
                        created,
                    )
                )
            _table_lines(rows)
        else:
            click.echo(
                "  key versions: none yet (create-keys, create_all or a first write makes one)"
            )
        click.echo("  rows per key version:")
        _table_lines(
            [
                (
                    column.column,
                    "deterministic" if column.deterministic else "randomized",
                    _spread(column.rows_by_version, column.null_rows, column.other_rows, "other"),
                )
                for column in table.columns
            ]
        )


@cli.command()
@_db_option
@_kms_uri_option(required=False)
@_models_option(required=True)
@_key_table_option
@_table_option(required=False, help="Report this table only (default: every encrypted table).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def status(
    ctx: click.Context,
    db_url: str,
    kms_uri: KmsUri | None,
    models: str,
    key_table_name: str,
    table_names: tuple[str, ...],
    as_json: bool,
) -> None:
    """Key versions and rows per key version of each encrypted table.

    For each table: its keys (purpose data or search, version, state, the
    active one marked *, provider, master key id, created) and, per encrypted
    column, how many rows are stored under each key version, as counted by
    the database from the stored headers (nothing is decrypted; no KMS call).
    Columns' "other" rows are plaintext or not in sqlalchemy-kms's format.
    """
    metadata = _metadata(ctx, models)
    assert metadata is not None
    tables = _select_tables(ctx, metadata, table_names)
    with _opened(db_url, None, key_table_name) as vault:
        report = vault.status(tables)
    if as_json:
        _echo_json(_status_data(report))
    elif not report:
        click.echo("no tables with encrypted columns in the models")
    else:
        _print_status(report)


# -- rotate and re-encrypt ---------------------------------------------------------------


def _reencrypt(vault: KeyVault, table: Table, batch_size: int) -> Progress:
    """``vault.reencrypt`` with a progress bar on a terminal, plain lines otherwise."""
    with ExitStack() as stack:
        bar: ProgressBar[int] | None = None
        done = 0
        terminal = _isatty("stdout")

        def report(state: Progress) -> None:
            nonlocal bar, done
            if not terminal:
                click.echo(str(state))
                return
            if bar is None:
                bar = stack.enter_context(
                    click.progressbar(
                        length=max(state.total, state.scanned, 1),
                        label=f"{state.table}: re-encrypting",
                        show_pos=True,
                    )
                )
            bar.update(state.scanned - done)
            done = state.scanned

        final = vault.reencrypt(table, batch_size=batch_size, progress=report)
    click.echo(
        f"{final.table}: done: {final.scanned} rows scanned, {final.rewritten} rewritten, "
        f"{final.conflicts} changed meanwhile by the application"
    )
    return final


@cli.command()
@_db_option
@_kms_uri_option(required=True)
@_models_option(required=True)
@_key_table_option
@_table_option(required=True, help="The table whose key is rotated.")
@click.option(
    "--search",
    is_flag=True,
    help="Rotate the search key (deterministic columns) instead of the data key.",
)
@click.option(
    "--reencrypt",
    "then_reencrypt",
    is_flag=True,
    help="Re-encrypt the table's rows under the new key right after.",
)
@_batch_size_option("Rows per transaction for --reencrypt.")
@click.pass_context
def rotate(
    ctx: click.Context,
    db_url: str,
    kms_uri: KmsUri,
    models: str,
    key_table_name: str,
    table_names: tuple[str, ...],
    search: bool,
    then_reencrypt: bool,
    batch_size: int,
) -> None:
    """Make a new active data key (or search key) for a table; print its version.

    New values use the new key at once in this process and within the
    vault's refresh interval (60 s by default) in running applications;
    values under older versions stay readable. Move them with 'reencrypt'
    (or --reencrypt), then check with 'status' and 'retire' the old version.
    Rows an application wrote under the old key before it noticed the new
    one are moved by running 'reencrypt' again; 'retire' refuses while any
    row still uses the old key.
    """
    metadata = _metadata(ctx, models)
    assert metadata is not None
    tables = _select_tables(ctx, metadata, table_names)
    for table in tables:
        modes = {column.type.deterministic for column in encrypted_columns(table)}  # type: ignore[attr-defined]
        if search not in modes:
            kind = "deterministic" if search else "randomized"
            raise click.BadParameter(
                f"{table_scope(table)} has no {kind} columns, so no {_key_name(search)} to rotate"
                + ("" if search else "; use --search for its search key"),
                ctx=ctx,
                param_hint="'--table'",
            )
    with _opened(db_url, kms_uri, key_table_name) as vault:
        for table in tables:
            version = vault.rotate_key(table, search=search)
            click.echo(f"{table_scope(table)}: {_key_name(search)} version {version} is now active")
            if then_reencrypt:
                _reencrypt(vault, table, batch_size)


@cli.command()
@_db_option
@_kms_uri_option(required=True)
@_models_option(required=True)
@_key_table_option
@_table_option(required=True, help="The table to re-encrypt.")
@_batch_size_option("Rows read and rewritten per transaction.")
@click.pass_context
def reencrypt(
    ctx: click.Context,
    db_url: str,
    kms_uri: KmsUri,
    models: str,
    key_table_name: str,
    table_names: tuple[str, ...],
    batch_size: int,
) -> None:
    """Move every encrypted value of a table to its active keys, online.

    Walks the table by primary key, --batch-size rows per short transaction,
    updating a row only if it still holds what was read (the application
    may keep writing). Interrupted, run it again: it resumes; finished, run
    again, it changes nothing. Shows a progress bar on a terminal, one line
    per batch otherwise.
    """
    metadata = _metadata(ctx, models)
    assert metadata is not None
    tables = _select_tables(ctx, metadata, table_names)
    with _opened(db_url, kms_uri, key_table_name) as vault:
        for table in tables:
            _reencrypt(vault, table, batch_size)


# -- rewrap ------------------------------------------------------------------------------


@cli.command()
@_db_option
@_kms_uri_option(required=True)
@_key_table_option
@click.option(
    "--to",
    "to_uri",
    metavar="URI",
    required=True,
    callback=_lifecycle_kms_option,
    help="The new master key: aws-kms://KEY or local://PATH.",
)
@_table_option(required=False, help="Rewrap this table's keys only (default: every key).")
@click.pass_context
def rewrap(
    ctx: click.Context,
    db_url: str,
    kms_uri: KmsUri,
    key_table_name: str,
    to_uri: KmsUri,
    table_names: tuple[str, ...],
) -> None:
    """Wrap the data keys under another master key (--kms: the current one).

    No row is touched: the data keys stay the same, only their wrapped form
    in the key table changes. From AWS KMS to AWS KMS this is KMS ReEncrypt
    (the data key never leaves KMS); otherwise the key is unwrapped with
    --kms and wrapped with --to in this process. Keys already under --to are
    skipped, so it can be run again. Afterwards run the application with
    --to's master key; keep the old one as long as backups of the key table
    made before need it.
    """
    new_provider = _provider(ctx, to_uri, "--to")
    with _opened(db_url, kms_uri, key_table_name) as vault:
        if not table_names:
            count = vault.rewrap(new_provider)
        else:
            count = sum(
                vault.rewrap(new_provider, table=name) for name in dict.fromkeys(table_names)
            )
    click.echo(f"rewrapped {count} key(s) under {to_uri}")


# -- retire and destroy ---------------------------------------------------------------------


_version_option = click.option(
    "--version",
    "version",
    type=click.IntRange(min=1),
    required=True,
    help="The key version.",
)
_search_option = click.option(
    "--search", is_flag=True, help="A search key (deterministic columns), not a data key."
)


@cli.command()
@_db_option
@_kms_uri_option(required=False)
@_models_option(required=True)
@_key_table_option
@click.option("--table", "table_name", metavar="TABLE", required=True, help="The table.")
@_version_option
@_search_option
@click.pass_context
def retire(
    ctx: click.Context,
    db_url: str,
    kms_uri: KmsUri | None,
    models: str,
    key_table_name: str,
    table_name: str,
    version: int,
    search: bool,
) -> None:
    """Retire an old key version: it is no longer used nor offered for reads.

    Refused (exit status 1) while any stored value of the table still uses
    it (run 'reencrypt' first) or while it is the active version. A retired
    key stays in the key table until 'destroy'.
    """
    metadata = _metadata(ctx, models)
    assert metadata is not None
    [table] = _select_tables(ctx, metadata, [table_name])
    with _opened(db_url, None, key_table_name) as vault:
        vault.retire_key(table, version, search=search)
    click.echo(f"{table_scope(table)}: {_key_name(search)} version {version} retired")


@cli.command()
@_db_option
@_kms_uri_option(required=False)
@_models_option(required=False)
@_key_table_option
@click.option("--table", "table_name", metavar="TABLE", required=True, help="The table.")
@_version_option
@_search_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def destroy(
    ctx: click.Context,
    db_url: str,
    kms_uri: KmsUri | None,
    models: str | None,
    key_table_name: str,
    table_name: str,
    version: int,
    search: bool,
    yes: bool,
) -> None:
    """Delete a retired key version for good (crypto-shredding).

    Every value still encrypted under it, in this database or in any backup
    or export, can never be decrypted again. Only a retired key can be
    destroyed. Without --yes it asks you to type the table name; without
    --yes and without a terminal it refuses (exit status 2).
    """
    if not yes and not _isatty("stdin"):
        raise click.UsageError(
            "destroying a key cannot be undone: pass --yes (no terminal to ask on)", ctx=ctx
        )
    metadata = _metadata(ctx, models)
    table: Table | str = table_name
    if metadata is not None:
        [table] = _select_tables(ctx, metadata, [table_name])
    scope = table_scope(table) if isinstance(table, Table) else table
    with _opened(db_url, None, key_table_name) as vault:
        vault.check_destroyable(table, version, search=search)
        if not yes:
            click.echo(
                f"Destroying {_key_name(search)} version {version} of {scope} makes every value "
                "still under it unreadable for good, here and in every backup."
            )
            typed = click.prompt(
                f"Type the table name ({scope}) to confirm", default="", show_default=False
            )
            if typed.strip() != scope:
                raise click.ClickException("the name did not match; nothing was destroyed")
        vault.destroy_key(table, version, search=search, confirm=True)
    click.echo(f"{scope}: {_key_name(search)} version {version} destroyed")


# -- export and import ------------------------------------------------------------------------


@cli.command("export-keys")
@_db_option
@_kms_uri_option(required=False)
@_key_table_option
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Write the JSON to this file instead of standard output.",
)
def export_keys(
    db_url: str, kms_uri: KmsUri | None, key_table_name: str, output: Path | None
) -> None:
    """Print the key table as JSON: wrapped keys only, safe to keep as a backup.

    The export is useless without the master key that wrapped the keys, and
    the master key is useless without the export (or the key table): keep
    both, apart. Restore with 'import-keys'.
    """
    with _opened(db_url, None, key_table_name) as vault:
        data = vault.export_keys()
    text = json.dumps(data, indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as error:
        raise click.ClickException(f"cannot write {output}: {error.strerror or error}") from None
    click.echo(f"exported {len(data['keys'])} key(s) to {output}")


@cli.command("import-keys")
@_db_option
@_kms_uri_option(required=False)
@_key_table_option
@click.argument("file", type=click.File("r", encoding="utf-8"))
def import_keys(db_url: str, kms_uri: KmsUri | None, key_table_name: str, file: TextIO) -> None:
    """Restore keys from an 'export-keys' FILE ('-' for standard input).

    Creates the key table if it does not exist. Keys already present with
    the same wrapped key are skipped; a key with the same table, purpose and
    version but another wrapped key is a conflict: nothing is imported and
    the exit status is 1.
    """
    try:
        data = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise click.ClickException(f"{file.name} is not JSON: {_one_line(str(error))}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise click.ClickException(f"{file.name} is not a sqlalchemy-kms key export")
    with _opened(db_url, None, key_table_name, need_key_table=False) as vault:
        vault.create_table()
        added = vault.import_keys(data)  # a damaged export is a KeyLifecycleError
    skipped = len(data["keys"]) - added
    click.echo(f"imported {added} key(s); {skipped} already present")


# -- verify --------------------------------------------------------------------------------


@dataclass
class _ColumnCheck:
    """What ``verify`` found in one encrypted column."""

    column: str
    deterministic: bool
    rows_by_version: dict[int, int] = field(default_factory=dict)
    null_rows: int = 0
    other_rows: int = 0  # values without a header of ours: plaintext, or damaged
    failures: int = 0
    failed_rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _TableCheck:
    table: str
    rows: int = 0
    columns: list[_ColumnCheck] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(column.failures for column in self.columns)


def _pk_label(names: Sequence[str], values: Sequence[Any]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in zip(names, values, strict=True))


def _batches(
    vault: KeyVault, table: Table, columns: Sequence[Column[Any]], batch_size: int
) -> Iterator[tuple[list[str], list[tuple[tuple[Any, ...], tuple[Any, ...]]]]]:
    """The table's rows in batches: (primary key names, [(key values, raw stored values)]).

    Walked by primary key (keyset pagination, one short read per batch); a
    table without a usable primary key (none, or an encrypted one) is read in
    one streamed query and its rows are named by their position.
    """
    raw = [type_coerce(column, NullType()) for column in columns]
    primary_key = list(table.primary_key.columns)
    if not primary_key or any(isinstance(c.type, KMSEncrypted) for c in primary_key):
        with vault.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, max_row_buffer=batch_size)
            position = 0
            for partition in result.execute(select(*raw)).partitions(batch_size):
                batch = []
                for row in partition:
                    position += 1
                    batch.append(((position,), tuple(row)))
                yield ["row"], batch
        return
    names = [column.name for column in primary_key]
    key = tuple_(*primary_key) if len(primary_key) > 1 else primary_key[0]
    last: tuple[Any, ...] | None = None
    while True:
        query = select(*primary_key, *raw)
        if last is not None:
            query = query.where(key > (tuple_(*last) if len(last) > 1 else last[0]))
        query = query.order_by(*primary_key).limit(batch_size)
        with vault.engine.connect() as conn:
            rows = conn.execute(query).all()
        if not rows:
            return
        width = len(primary_key)
        yield names, [(tuple(row[:width]), tuple(row[width:])) for row in rows]
        last = tuple(rows[-1][:width])


def _verify_table(vault: KeyVault, table: Table, batch_size: int, shown: int) -> _TableCheck:
    """Decrypt every stored value of ``table``'s encrypted columns."""
    columns = encrypted_columns(table)
    check = _TableCheck(
        table_scope(table),
        columns=[
            _ColumnCheck(column.name, column.type.deterministic)  # type: ignore[attr-defined]
            for column in columns
        ],
    )
    dialect = vault.engine.dialect
    # a key that cannot be had (unknown version, KMS refusal) fails every value under it:
    # remembered by (algorithm, version), so the KMS is not asked again for each value
    broken_keys: dict[tuple[int, int], BaseException] = {}
    for names, batch in _batches(vault, table, columns, batch_size):
        check.rows += len(batch)
        for key_values, stored_values in batch:
            for column, found, stored in zip(columns, check.columns, stored_values, strict=True):
                if stored is None:
                    found.null_rows += 1
                    continue
                error: BaseException | None = None
                header: tuple[int, int] | None = None
                if isinstance(stored, (bytes, bytearray, memoryview)):
                    try:
                        header = parse_header(bytes(stored))
                    except InvalidCiphertextError:
                        header = None
                if header is not None and header in broken_keys:
                    error = broken_keys[header]
                else:
                    try:
                        column_type: KMSEncrypted = column.type  # type: ignore[assignment]
                        column_type.process_result_value(stored, dialect)
                    except Exception as failure:
                        error = failure
                        if header is not None and isinstance(
                            failure, (KMSError, UnknownKeyVersionError)
                        ):
                            broken_keys[header] = failure
                if header is None:
                    found.other_rows += 1  # plaintext (accept_plaintext=True) or not ours
                else:
                    version = header[1]
                    found.rows_by_version[version] = found.rows_by_version.get(version, 0) + 1
                if error is None:
                    continue
                found.failures += 1
                if len(found.failed_rows) < shown:
                    reason = getattr(error, "reason", None)
                    found.failed_rows.append(
                        {
                            "primary_key": dict(zip(names, key_values, strict=True)),
                            "error": type(error).__name__,
                            "reason": _one_line(str(reason))
                            if isinstance(error, SQLAlchemyKMSError)
                            else None,
                            "label": _pk_label(names, key_values),
                        }
                    )
    return check


def _verify_data(checks: Sequence[_TableCheck]) -> dict[str, Any]:
    return {
        "ok": not any(check.failures for check in checks),
        "tables": [
            {
                "table": check.table,
                "rows": check.rows,
                "failures": check.failures,
                "columns": [
                    {
                        "column": column.column,
                        "deterministic": column.deterministic,
                        "rows_by_version": {
                            str(version): count
                            for version, count in sorted(column.rows_by_version.items())
                        },
                        "null_rows": column.null_rows,
                        "other_rows": column.other_rows,
                        "failures": column.failures,
                        "failed_rows": [
                            {name: value for name, value in row.items() if name != "label"}
                            for row in column.failed_rows
                        ],
                    }
                    for column in check.columns
                ],
            }
            for check in checks
        ],
    }


def _print_verify(checks: Sequence[_TableCheck]) -> None:
    values = failures = 0
    failed_columns: list[str] = []
    for check in checks:
        click.echo(click.style(f"{check.table}: {check.rows} rows", bold=True))
        rows = []
        for column in check.columns:
            spread = _spread(column.rows_by_version, column.null_rows, column.other_rows, "other")
            verdict = f"{column.failures} FAILED" if column.failures else "ok"
            rows.append(
                (
                    column.column,
                    "deterministic" if column.deterministic else "randomized",
                    spread,
                    verdict,
                )
            )
            values += check.rows - column.null_rows
            failures += column.failures
            if column.failures:
                failed_columns.append(f"{check.table}.{column.column}")
        if rows:
            _table_lines(rows, indent=2)
        for column in check.columns:
            for row in column.failed_rows:
                reason = f": {row['reason']}" if row["reason"] else ""
                click.echo(
                    f"    {check.table}.{column.column} [{row['label']}]: {row['error']}{reason}"
                )
            more = column.failures - len(column.failed_rows)
            if more > 0:
                click.echo(f"    {check.table}.{column.column}: ... and {more} more")
    if failures:
        click.echo(
            f"FAILED: {failures} of {values} stored value(s) did not decrypt "
            f"({', '.join(failed_columns)})"
        )
    else:
        click.echo(f"OK: all {values} stored value(s) in {len(checks)} table(s) decrypt")


@cli.command()
@_db_option
@_kms_uri_option(required=True)
@_models_option(required=True)
@_key_table_option
@_table_option(required=False, help="Verify this table only (default: every encrypted table).")
@_batch_size_option("Rows read per query.")
@click.option(
    "--show",
    "shown",
    type=click.IntRange(min=0),
    default=_SHOWN_FAILURES,
    show_default=True,
    help="Failed rows listed per column (all are counted).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def verify(
    ctx: click.Context,
    db_url: str,
    kms_uri: KmsUri,
    models: str,
    key_table_name: str,
    table_names: tuple[str, ...],
    batch_size: int,
    shown: int,
    as_json: bool,
) -> None:
    """Decrypt every stored value of the encrypted tables; exit 1 if any fails.

    Reads each table by primary key in batches and decrypts every value of
    every encrypted column (the values are checked, never printed). Reports
    rows per key version and, for each value that does not decrypt, its
    primary key and the error class. Use it after a restore, an import, a
    rewrap or before destroying a key.
    """
    metadata = _metadata(ctx, models)
    assert metadata is not None
    tables = _select_tables(ctx, metadata, table_names)
    with _opened(db_url, kms_uri, key_table_name) as vault:
        checks = [_verify_table(vault, table, batch_size, shown) for table in tables]
    if as_json:
        _echo_json(_verify_data(checks))
    else:
        _print_verify(checks)
    if any(check.failures for check in checks):
        ctx.exit(1)


# -- policy -------------------------------------------------------------------------------------

_POLICY_VERSION: Final = "2012-10-17"
_CONTEXT_TABLE_KEY: Final = "kms:EncryptionContext:table"
_APP_ACTIONS: Final = ("kms:GenerateDataKey", "kms:Decrypt")
# rotate and reencrypt make and unwrap data keys; rewrap uses Encrypt (from another
# provider) or ReEncrypt (AWS KMS to AWS KMS); DescribeKey resolves the key ARN
_ADMIN_CONTEXT_ACTIONS: Final = (
    "kms:GenerateDataKey",
    "kms:Decrypt",
    "kms:Encrypt",
    "kms:ReEncrypt*",
)
_ADMIN_PLAIN_ACTIONS: Final = ("kms:DescribeKey",)


def policy_document(
    role_arn: str,
    tables: Sequence[str],
    *,
    admin_role_arn: str | None = None,
    key_arn: str | None = None,
    iam: bool = False,
) -> dict[str, Any]:
    """The least-privilege KMS policy for roles using sqlalchemy-kms on ``tables``.

    Key policy (default): statements with ``Principal`` and ``Resource: "*"``
    (the key the policy is attached to). ``iam=True``: IAM policy documents
    (no principal, ``Resource`` = ``key_arn``), one per role, keyed by role ARN.
    """
    scopes = list(dict.fromkeys(tables))
    condition = {"StringEquals": {_CONTEXT_TABLE_KEY: scopes}}
    resource = key_arn if iam else "*"
    if iam and key_arn is None:
        raise ValueError("an IAM policy needs the key ARN")

    def statement(
        sid: str, principal: str, actions: Sequence[str], limited: bool
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"Sid": sid, "Effect": "Allow"}
        if not iam:
            body["Principal"] = {"AWS": principal}
        body["Action"] = list(actions)
        body["Resource"] = resource
        if limited:
            body["Condition"] = condition
        return body

    application = [statement("SqlalchemyKmsApplication", role_arn, _APP_ACTIONS, True)]
    admin: list[dict[str, Any]] = []
    if admin_role_arn is not None:
        admin = [
            statement("SqlalchemyKmsAdministration", admin_role_arn, _ADMIN_CONTEXT_ACTIONS, True),
            statement("SqlalchemyKmsDescribeKey", admin_role_arn, _ADMIN_PLAIN_ACTIONS, False),
        ]
    if not iam:
        return {"Version": _POLICY_VERSION, "Statement": application + admin}
    documents = {role_arn: {"Version": _POLICY_VERSION, "Statement": application}}
    if admin_role_arn is not None:
        documents[admin_role_arn] = {"Version": _POLICY_VERSION, "Statement": admin}
    return documents


def _arn_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.startswith("arn:"):
        raise click.BadParameter(f"{value!r} is not an ARN (arn:aws:...)", ctx=ctx, param=param)
    return value


@cli.command()
@click.option(
    "--role-arn",
    required=True,
    callback=_arn_option,
    metavar="ARN",
    help="The application's role (or user) ARN.",
)
@click.option(
    "--table",
    "table_names",
    metavar="TABLE",
    multiple=True,
    required=True,
    help="A table the role may use (SCHEMA.TABLE for a table with a schema). Repeat.",
)
@click.option(
    "--key-arn",
    callback=_arn_option,
    metavar="ARN",
    help="The KMS key's ARN (needed by --iam).",
)
@click.option(
    "--admin-role-arn",
    callback=_arn_option,
    metavar="ARN",
    help="A role that rotates, re-encrypts and rewraps keys (statements of its own).",
)
@click.option(
    "--iam",
    is_flag=True,
    help="Print IAM policies (one per role, keyed by role ARN) instead of key policy statements.",
)
@click.pass_context
def policy(
    ctx: click.Context,
    role_arn: str,
    table_names: tuple[str, ...],
    key_arn: str | None,
    admin_role_arn: str | None,
    iam: bool,
) -> None:
    """Print a least-privilege KMS policy (JSON) for roles using sqlalchemy-kms.

    \b
    sqlalchemy-kms sends this encryption context with every KMS call:
        {"table": "<table>", "key_version": "<n>"}
    with "purpose": "search" added for the search keys of deterministic
    columns (<table> is SCHEMA.TABLE for a table with a schema). KMS checks
    it on Decrypt and records it in CloudTrail; the policy lets --role-arn
    call only kms:GenerateDataKey and kms:Decrypt, and only with a "table"
    that is one of the --table values (Condition StringEquals
    kms:EncryptionContext:table).

    With --admin-role-arn, that role gets its own statements: kms:Encrypt,
    kms:ReEncrypt* (rewrap), kms:GenerateDataKey and kms:Decrypt (rotate,
    reencrypt), limited to the same tables, and kms:DescribeKey (which
    carries no encryption context, so it has no condition).

    By default the output is a key policy document: merge its statements
    into the key's policy, next to the statement that lets your account
    administer the key. With --iam the output maps each role ARN to an IAM
    policy document to attach to that role (Resource: --key-arn).
    """
    if iam and key_arn is None:
        raise click.UsageError("--iam needs --key-arn (the IAM policy's Resource)", ctx=ctx)
    _echo_json(
        policy_document(
            role_arn, table_names, admin_role_arn=admin_role_arn, key_arn=key_arn, iam=iam
        )
    )


# -- create-table and create-keys -----------------------------------------------------------------


@cli.command("create-table")
@_db_option
@_kms_uri_option(required=False)
@_key_table_option
def create_table(db_url: str, kms_uri: KmsUri | None, key_table_name: str) -> None:
    """Create the key table if it does not exist (safe to run again)."""
    with _opened(db_url, None, key_table_name, need_key_table=False) as vault:
        vault.create_table()
        click.echo(f"key table {vault.table.fullname} is ready")


@cli.command("create-keys")
@_db_option
@_kms_uri_option(required=True)
@_models_option(required=True)
@_key_table_option
@_table_option(required=False, help="Make this table's keys only (default: every encrypted table).")
@click.pass_context
def create_keys(
    ctx: click.Context,
    db_url: str,
    kms_uri: KmsUri,
    models: str,
    key_table_name: str,
    table_names: tuple[str, ...],
) -> None:
    """Make the keys the encrypted tables need, ahead of time (safe to run again).

    A data key for tables with randomized columns, a search key for tables
    with deterministic ones; existing keys are kept. Prints the active
    versions.
    """
    metadata = _metadata(ctx, models)
    assert metadata is not None
    tables = _select_tables(ctx, metadata, table_names)
    with _opened(db_url, kms_uri, key_table_name) as vault:
        made = vault.create_keys(tables)
    for scope, versions in made.items():
        keys = ", ".join(f"{purpose} key version {v}" for purpose, v in versions.items())
        click.echo(f"{scope}: {keys}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``sqlalchemy-kms`` command (the console script's entry point).

    ``argv`` defaults to the process's arguments. Exits the process.
    """
    cli.main(args=list(argv) if argv is not None else None, prog_name=_PROG_NAME)


if __name__ == "__main__":
    main()
