"""The ``sqlalchemy-kms`` command line: watch envelope encryption at work.

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
(:class:`~sqlalchemy_kms.LocalKms`): made on the first run, reused after.
Anyone holding that file can decrypt the demo database, which is why it is
for development only. ``--kms aws-kms://KEY`` uses
:class:`~sqlalchemy_kms.AwsKms` with a boto3 client configured the usual way
(``AWS_PROFILE``, ``AWS_REGION``, ``AWS_ENDPOINT_URL_KMS``, ...); ``KEY`` is
an alias name, alias ARN, key ARN or key id. The database file is created
afresh on every run.

Errors of the library (a KMS that refuses, a key that does not exist, ...)
are reported as one line and exit status 1.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

import click
from botocore.exceptions import BotoCoreError
from sqlalchemy import URL, Date, Integer, String, Text, create_engine, exc, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from . import __version__
from .errors import SQLAlchemyKMSError
from .providers import AwsKms, KeyProvider, LocalKms
from .types import KMSEncrypted
from .vault import KeyVault

__all__ = [
    "DATABASE_FILE",
    "DEFAULT_DEMO_DIR",
    "KEY_FILE",
    "KmsUri",
    "cli",
    "demo",
    "main",
    "parse_kms_uri",
]

#: Folder ``demo`` works in unless ``--dir`` says otherwise (relative to the current folder).
DEFAULT_DEMO_DIR: Final = "sqlalchemy-kms-demo"
#: Name of the demo's SQLite database inside the demo folder (replaced on every run).
DATABASE_FILE: Final = "demo.sqlite3"
#: Name of the demo's local master key file inside the demo folder (kept between runs).
KEY_FILE: Final = "local-master.key"

_PROG_NAME: Final = "sqlalchemy-kms"
_AWS_SCHEME: Final = "aws-kms://"
_LOCAL_SCHEME: Final = "local://"
_HEX_WIDTH: Final = 24  # hex digits of a stored value shown after its header (and salt)
_TEXT_WIDTH: Final = 60


# -- the --kms option -----------------------------------------------------------


class KmsUri(NamedTuple):
    """A parsed ``--kms`` value.

    ``scheme`` is ``"local"`` or ``"aws-kms"``. ``key_id`` is what follows the
    scheme: for ``aws-kms`` the AWS KMS key (alias name, alias ARN, key ARN or
    key id); for ``local`` the path of a :class:`~sqlalchemy_kms.LocalKms` key
    file, or ``None`` for a bare ``local`` (the demo's own key file).
    """

    scheme: str
    key_id: str | None = None

    def __str__(self) -> str:
        return self.scheme if self.key_id is None else f"{self.scheme}://{self.key_id}"


def parse_kms_uri(uri: str) -> KmsUri:
    """Parse ``local``, ``local://PATH`` or ``aws-kms://KEY``; :class:`ValueError`
    for anything else.

    >>> parse_kms_uri("aws-kms://alias/my-app-cmk")
    KmsUri(scheme='aws-kms', key_id='alias/my-app-cmk')
    >>> parse_kms_uri("local")
    KmsUri(scheme='local', key_id=None)
    >>> parse_kms_uri("local:///etc/app/master.key")
    KmsUri(scheme='local', key_id='/etc/app/master.key')
    """
    value = uri.strip()
    if value.lower() in ("local", "local://"):
        return KmsUri("local")
    if value.lower().startswith(_LOCAL_SCHEME):
        return KmsUri("local", value[len(_LOCAL_SCHEME) :])
    if value.lower().startswith(_AWS_SCHEME):
        key_id = value[len(_AWS_SCHEME) :].strip()
        if not key_id:
            raise ValueError(
                "aws-kms:// needs a key after the scheme, e.g. aws-kms://alias/my-app-cmk"
            )
        return KmsUri("aws-kms", key_id)
    scheme = value.split("://", 1)[0] if "://" in value else value
    raise ValueError(
        f"unknown KMS {scheme!r}; use 'local', 'local://PATH' (a LocalKms key file) or "
        "'aws-kms://KEY' (KEY: alias/NAME, an alias or key ARN, or a key id)"
    )


def _region_of_arn(key_id: str) -> str | None:
    """The region named by a KMS key or alias ARN, ``None`` for other key ids."""
    parts = key_id.split(":", 5)
    if len(parts) == 6 and parts[0] == "arn" and parts[2] == "kms" and parts[3]:
        return parts[3]
    return None


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
        return AwsKms(key_id, region_name=region or _region_of_arn(key_id))
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


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``sqlalchemy-kms`` command (the console script's entry point).

    ``argv`` defaults to the process's arguments. Exits the process.
    """
    cli.main(args=list(argv) if argv is not None else None, prog_name=_PROG_NAME)


if __name__ == "__main__":
    main()
