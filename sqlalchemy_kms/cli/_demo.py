"""The ``demo`` command: a few patient records written, stored, read back and explained.

``sqlalchemy-kms demo`` writes sample patients (and ``--rows`` generated
ones) through the ORM into a fresh SQLite database, then prints the
ciphertext SQL sees, the rows the ORM decrypts, the key table (wrapped data
keys only) and the KMS calls all of that took. Its model and sample data live
here; nothing in it is used by the other commands.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Final, NamedTuple

import click
from sqlalchemy import URL, Date, Integer, String, Text, create_engine, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .. import __version__
from .._format import ALG_RANDOMIZED, HEADER_SIZE, SALT_SIZE
from ..providers import AwsKms, KeyProvider, LocalKms
from ..providers.uri import KmsUri, provider_from_uri
from ..types import KMSEncrypted
from ..vault import KeyVault
from ._context import KmsUriType
from ._output import field, heading, one_line, package_setting

__all__ = ["DATABASE_FILE", "DEFAULT_DEMO_DIR", "KEY_FILE", "PROG_NAME", "SAMPLES", "demo"]

#: Folder ``demo`` works in unless ``--dir`` says otherwise (relative to the current folder).
DEFAULT_DEMO_DIR: Final = "sqlalchemy-kms-demo"
#: Name of the demo's SQLite database inside the demo folder (replaced on every run).
DATABASE_FILE: Final = "demo.sqlite3"
#: Name of the demo's local master key file inside the demo folder (kept between runs).
KEY_FILE: Final = "local-master.key"
#: The command's name, as ``--version`` and the demo print it.
PROG_NAME: Final = "sqlalchemy-kms"

_HEX_WIDTH: Final = 24  # hex digits of a stored value shown after its header (and salt)
_TEXT_WIDTH: Final = 60


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
SAMPLES: Final = (
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


def _stored(value: object) -> str:
    """A stored value as hex: its header fields apart, the rest truncated."""
    if value is None:
        return "NULL"
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return repr(value)
    raw = bytes(value)
    if len(raw) < HEADER_SIZE:
        return f"{raw.hex()} ({len(raw)} bytes)"
    # format version, algorithm, data key version
    parts = [raw[0:1].hex(), raw[1:2].hex(), raw[2:HEADER_SIZE].hex()]
    body = raw[HEADER_SIZE:]
    if raw[1] == ALG_RANDOMIZED and len(body) > SALT_SIZE:  # the writer's subkey salt first
        parts.append(body[:SALT_SIZE].hex())
        body = body[SALT_SIZE:]
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


# -- the command ----------------------------------------------------------------------


def _local_provider(folder: Path, path: str | None = None) -> tuple[LocalKms, Path, bool]:
    """The demo's local master key: reused from ``path`` (default: a file in
    ``folder``) if there, else made."""
    key_file = Path(path).expanduser() if path else folder / KEY_FILE
    if key_file.exists():
        try:
            return LocalKms(key_file=key_file), key_file, True
        except ValueError as error:
            raise click.ClickException(
                f"{one_line(str(error))}; move it away to let the demo make a new one"
            ) from None
    return LocalKms.generate_key_file(key_file), key_file, False


def _fresh_database(folder: Path) -> Path:
    """Remove the previous run's database (and SQLite side files); return its path."""
    database: Path = folder / str(package_setting("DATABASE_FILE", DATABASE_FILE))
    for suffix in ("", "-journal", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    return database


@click.command()
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
    type=KmsUriType(bare_local=True),
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
        provider = provider_from_uri(kms, region=region)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if kms.scheme == "local":
            provider, key_file, reused = _local_provider(folder, kms.key_id)
        database = _fresh_database(folder)
    except OSError as error:
        raise click.ClickException(one_line(str(error))) from None

    click.echo(click.style(f"{PROG_NAME} {__version__} demo", bold=True))

    heading("Where things are")
    field("folder", folder)
    field("database", f"{database} (SQLite, created afresh on every run)")
    if isinstance(provider, LocalKms):
        state = "reused from an earlier run" if reused else "created now"
        field("master key", f"{key_file} (LocalKms key file, {state})")
        field("master key id", provider.master_key_id)
        click.echo("  The key file IS the master key: whoever has it can decrypt this")
        click.echo("  database. Fine for a demo; in production use aws-kms://, where the")
        click.echo("  master key never leaves the KMS.")
    else:
        assert isinstance(provider, AwsKms)
        field("master key", f"{kms} (AWS KMS; the master key never leaves the KMS)")
        field("region", provider.client.meta.region_name or "(boto3 default)")
        field("endpoint", provider.client.meta.endpoint_url)

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

    heading("Rows written through the ORM")
    with Session(engine) as session:
        session.add_all(_Patient(**sample._asdict()) for sample in SAMPLES)
        session.add_all(_generated(number) for number in range(1, rows + 1))
        session.commit()
    total = len(SAMPLES) + rows
    field("table", _Patient.__tablename__)
    field("rows", f"{total} ({len(SAMPLES)} sample patients + {rows} generated), one transaction")
    field("encrypted", ", ".join(_ENCRYPTED_COLUMNS))
    field("not encrypted", "id, ward")

    heading("Stored ciphertext, as raw SQL sees it")
    query = f"SELECT id, ward, {', '.join(_ENCRYPTED_COLUMNS)} FROM patients ORDER BY id"
    click.echo(f"  {query}")
    click.echo("  Each value: 01 (format) 01 (AES-256-GCM, randomized) 00000001 (data key")
    click.echo("  version), then the subkey salt, nonce, ciphertext and tag. Equal values")
    click.echo("  look different. NULL stays NULL.")
    with engine.connect() as conn:
        raw_rows = conn.execute(text(query + " LIMIT :shown"), {"shown": len(SAMPLES)}).all()
    for raw in raw_rows:
        click.echo()
        click.echo(f"  id {raw.id}, ward {raw.ward}")
        for name in _ENCRYPTED_COLUMNS:
            field(name, _stored(getattr(raw, name)), indent=4)
    if rows:
        click.echo()
        click.echo(f"  ... and {rows} generated rows, not shown.")

    heading("The same rows read back through the ORM (decrypted)")
    vault.clear_cache()
    click.echo("  The key cache was cleared first, as in a newly started process: the")
    click.echo("  data key is unwrapped once for the table, not once per value.")
    with Session(engine) as session:
        patients = session.scalars(select(_Patient).order_by(_Patient.id)).all()
        for patient in patients[: len(SAMPLES)]:
            click.echo()
            click.echo(f"  id {patient.id}, ward {patient.ward}")
            for name in _ENCRYPTED_COLUMNS:
                field(name, _shorten(getattr(patient, name)), indent=4)
    click.echo()
    click.echo(f"  {len(patients)} rows decrypted in all.")

    heading("Key table (wrapped data keys; plaintext keys are never stored)")
    with engine.connect() as conn:
        key_rows = vault.key_table.rows(conn)
    click.echo(f"  table {vault.table.fullname}: {len(key_rows)} key(s)")
    for key in key_rows:
        # every column but the timestamp; the wrapped key is the only key material stored
        click.echo()
        field("scope", key.series.scope)
        field("purpose", key.series.purpose)
        field("key_version", key.version)
        field("state", key.state)
        field("provider", key.provider)
        field("master_key_id", key.master_key_id)
        field("wrapped_key", _wrapped(key.wrapped))

    heading("KMS calls")
    calls = provider.calls
    others = sorted(set(calls) - {"GenerateDataKey", "Decrypt"})
    for operation in ("GenerateDataKey", "Decrypt", *others):
        click.echo(f"  {operation + ':':<17} {calls[operation]}")
    click.echo(
        f"  {'total:':<17} {sum(calls.values())} for {total} rows written and read "
        f"({len(key_rows)} encrypted table(s))"
    )
    stats = vault.stats()
    click.echo(
        f"  {'statements:':<17} {stats['encrypted_statements']} with encrypted values, "
        f"{stats['cache_hits']} of them with every key in memory; "
        f"{stats['cache_misses']} key(s) unwrapped"
    )
    click.echo("  GenerateDataKey runs once per table's data key, and Decrypt at most once")
    click.echo("  per key while it is cached, however many rows: try a larger --rows.")
