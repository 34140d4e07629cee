"""The key commands: create-table, create-keys, rotate, reencrypt, rewrap, retire, destroy,
export-keys and import-keys, each a thin layer over one :class:`~sqlalchemy_kms.KeyVault` method."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import click
from sqlalchemy import Table

from .._format import MAX_KEY_VERSION
from .._keytable import KeySeries, scope_of, table_scope
from ..lifecycle import Progress
from ..lifecycle.backup import read_export, select_keys, write_export
from ..lifecycle.retire import DEFAULT_GRACE_PERIOD
from ..providers.uri import KmsUri
from ..types import encrypted_series
from ..vault import KeyVault
from . import _output
from ._context import (
    CliContext,
    KmsUriType,
    batch_size_option,
    pass_cli,
    shared_options,
    table_option,
)
from ._output import key_name, one_line

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

__all__ = [
    "create_keys",
    "create_table",
    "destroy",
    "export_keys",
    "import_keys",
    "reencrypt",
    "retire",
    "rewrap",
    "rotate",
]


# -- create-table and create-keys -----------------------------------------------------------


@click.command("create-table")
@shared_options(kms="ignored", models="ignored")
@pass_cli
def create_table(cli: CliContext) -> None:
    """Create the key table if it does not exist (safe to run again)."""
    with cli.open_vault(master_key=False, key_table_needed=False) as vault:
        vault.create_table()
        click.echo(f"key table {vault.table.fullname} is ready")


@click.command("create-keys")
@shared_options(kms="required", models="required")
@table_option(required=False, help="Make this table's keys only (default: every encrypted table).")
@pass_cli
def create_keys(cli: CliContext, table_names: tuple[str, ...]) -> None:
    """Make the keys the encrypted tables need, ahead of time (safe to run again).

    A data key for tables with randomized columns, a search key for tables
    with deterministic ones; existing keys are kept. Prints the active
    versions.
    """
    tables = cli.tables(table_names)
    with cli.open_vault() as vault:
        made = vault.create_keys(tables)
    for scope, versions in made.items():
        keys = ", ".join(f"{purpose} key version {v}" for purpose, v in versions.items())
        click.echo(f"{scope}: {keys}")


# -- rotate and re-encrypt ---------------------------------------------------------------


def _reencrypt(vault: KeyVault, table: Table, batch_size: int) -> Progress:
    """``vault.reencrypt`` with a progress bar on a terminal, plain lines otherwise."""
    with ExitStack() as stack:
        bar: ProgressBar[int] | None = None
        done = 0
        terminal = _output.package_setting("_isatty", _output.isatty)("stdout")

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


@click.command()
@shared_options(kms="required", models="required")
@table_option(required=True, help="The table whose key is rotated.")
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
@batch_size_option("Rows per transaction for --reencrypt.")
@pass_cli
def rotate(
    cli: CliContext,
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
    tables = cli.tables(table_names)
    for table in tables:
        if KeySeries(table_scope(table), search) not in encrypted_series([table]):
            kind = "deterministic" if search else "randomized"
            raise click.BadParameter(
                f"{table_scope(table)} has no {kind} columns, so no {key_name(search)} to rotate"
                + ("" if search else "; use --search for its search key"),
                param_hint="'--table'",
            )
    with cli.open_vault() as vault:
        for table in tables:
            version = vault.rotate_key(table, search=search)
            click.echo(f"{table_scope(table)}: {key_name(search)} version {version} is now active")
            if then_reencrypt:
                _reencrypt(vault, table, batch_size)


@click.command()
@shared_options(kms="required", models="required")
@table_option(required=True, help="The table to re-encrypt.")
@batch_size_option("Rows read and rewritten per transaction.")
@pass_cli
def reencrypt(cli: CliContext, table_names: tuple[str, ...], batch_size: int) -> None:
    """Move every encrypted value of a table to its active keys, online.

    Walks the table by primary key, --batch-size rows per short transaction,
    updating a row only if it still holds what was read (the application
    may keep writing). Interrupted, run it again: it resumes; finished, run
    again, it changes nothing. Shows a progress bar on a terminal, one line
    per batch otherwise.
    """
    tables = cli.tables(table_names)
    with cli.open_vault() as vault:
        for table in tables:
            _reencrypt(vault, table, batch_size)


# -- rewrap ------------------------------------------------------------------------------


@click.command()
@shared_options(kms="required", models="ignored")
@click.option(
    "--to",
    "to_uri",
    metavar="URI",
    type=KmsUriType(),
    required=True,
    help="The new master key: aws-kms://KEY or local://PATH.",
)
@table_option(required=False, help="Rewrap this table's keys only (default: every key).")
@pass_cli
def rewrap(cli: CliContext, to_uri: KmsUri, table_names: tuple[str, ...]) -> None:
    """Wrap the data keys under another master key (--kms: the current one).

    No row is touched: the data keys stay the same, only their wrapped form
    in the key table changes. From AWS KMS to AWS KMS this is KMS ReEncrypt
    (the data key never leaves KMS); otherwise the key is unwrapped with
    --kms and wrapped with --to in this process. Keys already under --to are
    skipped, so it can be run again. Afterwards run the application with
    --to's master key; keep the old one as long as backups of the key table
    made before need it.
    """
    new_provider = cli.provider(to_uri, "--to")
    with cli.open_vault() as vault:
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
_grace_option = click.option(
    "--grace-period",
    "grace_period",
    type=click.FloatRange(min=0),
    default=DEFAULT_GRACE_PERIOD,
    show_default=True,
    metavar="SECONDS",
    help="Seconds after the next version was made before this version may be retired "
    "or destroyed; lower it only if every process uses a shorter refresh interval.",
)


@click.command()
@shared_options(kms="ignored", models="required")
@click.option("--table", "table_name", metavar="TABLE", required=True, help="The table.")
@_version_option
@_search_option
@_grace_option
@pass_cli
def retire(
    cli: CliContext, table_name: str, version: int, search: bool, grace_period: float
) -> None:
    """Retire an old key version: it is no longer used nor offered for reads.

    Refused (exit status 1) while it is the active version, within the grace
    period after the next version was made (the message says from when it is
    allowed), or while any stored value of the table still uses it (run
    'reencrypt' first). A retired key stays in the key table until 'destroy'.
    """
    [table] = cli.tables([table_name])
    with cli.open_vault(master_key=False) as vault:
        vault.grace_period = grace_period
        vault.retire_key(table, version, search=search)
    click.echo(f"{table_scope(table)}: {key_name(search)} version {version} retired")


@click.command()
@shared_options(
    kms="ignored",
    models="optional",
    models_help="The application's models: with them, --table is checked against their "
    "encrypted tables and may be a table's name without its schema.",
)
@click.option("--table", "table_name", metavar="TABLE", required=True, help="The table.")
@_version_option
@_search_option
@_grace_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_cli
def destroy(
    cli: CliContext, table_name: str, version: int, search: bool, grace_period: float, yes: bool
) -> None:
    """Delete a retired key version for good (crypto-shredding).

    Every value still encrypted under it, in this database or in any backup
    or export, can never be decrypted again. Only a retired key can be
    destroyed, after the grace period, and only when a count made as it is
    deleted finds no value under it. Without --yes it asks you to type the
    table name; without --yes and without a terminal it refuses (exit status 2).
    """
    if not yes and not _output.package_setting("_isatty", _output.isatty)("stdin"):
        raise click.UsageError(
            "destroying a key cannot be undone: pass --yes (no terminal to ask on)"
        )
    table: Table | str = table_name
    if cli.models is not None:
        [table] = cli.tables([table_name])
    scope = scope_of(table)
    with cli.open_vault(master_key=False) as vault:
        vault.grace_period = grace_period
        vault.check_destroyable(table, version, search=search)
        if not yes:
            click.echo(
                f"Destroying {key_name(search)} version {version} of {scope} makes every value "
                "still under it unreadable for good, here and in every backup."
            )
            typed = click.prompt(
                f"Type the table name ({scope}) to confirm", default="", show_default=False
            )
            if typed.strip() != scope:
                raise click.ClickException("the name did not match; nothing was destroyed")
        vault.destroy_key(table, version, search=search, confirm=True)
    click.echo(f"{scope}: {key_name(search)} version {version} destroyed")


# -- export and import ------------------------------------------------------------------------


@click.command("export-keys")
@shared_options(kms="ignored", models="ignored")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Write the JSON to this file instead of standard output.",
)
@pass_cli
def export_keys(cli: CliContext, output: Path | None) -> None:
    """Print the key table as JSON: wrapped keys only, safe to keep as a backup.

    The export is useless without the master key that wrapped the keys, and
    the master key is useless without the export (or the key table): keep
    both, apart. Restore with 'import-keys'.
    """
    with cli.open_vault(master_key=False) as vault:
        data = vault.export_keys()
    text = json.dumps(data, indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        write_export(data, output)  # mode 0600: a backup of keys is a target too
    except OSError as error:
        raise click.ClickException(f"cannot write {output}: {error.strerror or error}") from None
    click.echo(f"exported {len(data['keys'])} key(s) to {output}")


@click.command("import-keys")
@shared_options(kms="ignored", models="ignored")
@click.option(
    "--table",
    "table_name",
    metavar="TABLE",
    default=None,
    help="Import this table's keys only (schema.table when it has a schema).",
)
@click.option(
    "--version",
    "version",
    type=click.IntRange(1, MAX_KEY_VERSION),
    default=None,
    help="Import this version of the table's data key only (with --table).",
)
@click.option(
    "--search",
    is_flag=True,
    help="With --version: that version of the search key (deterministic columns).",
)
@click.argument("file", type=click.File("r", encoding="utf-8"))
@pass_cli
def import_keys(
    cli: CliContext, table_name: str | None, version: int | None, search: bool, file: TextIO
) -> None:
    """Restore keys from an 'export-keys' FILE ('-' for standard input).

    Creates the key table if it does not exist. Every key of the file is
    checked first (state, purpose, version, encoding); one invalid key and
    nothing is imported (exit status 1). --table imports one table's keys,
    --table and --version one version of its data key (add --search for its
    search key): a destroyed version comes back from a backup as it is.

    Keys the key table holds already are skipped: with the same wrapped key,
    or wrapped under another master key (the same data key, rewrapped since
    the export). A key with the same table, purpose, version and master key
    but another wrapped key is a conflict: nothing is imported and the exit
    status is 1.
    """
    if version is not None and table_name is None:
        raise click.UsageError("--version needs --table: the version of which table's key?")
    if search and version is None:
        raise click.UsageError("--search chooses a search key version: give --version too")
    try:
        data = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise click.ClickException(f"{file.name} is not JSON: {one_line(str(error))}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise click.ClickException(f"{file.name} is not a sqlalchemy-kms key export")
    with cli.open_vault(master_key=False, key_table_needed=False) as vault:
        vault.create_table()
        # an invalid or conflicting export is a KeyLifecycleError: one line, exit status 1
        added = vault.import_keys(data, table=table_name, version=version, search=search)
    chosen = select_keys(read_export(data), table=table_name, version=version, search=search)
    click.echo(f"imported {added} key(s); {len(chosen) - added} already present")
