"""The report commands: ``status`` and ``verify``, printing what the library reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import click

from ..lifecycle import ColumnStatus, TableStatus
from ..lifecycle.verify import ColumnCheck, FailedValue, VerifyReport
from ._context import (
    CliContext,
    batch_size_option,
    pass_cli,
    shared_options,
    table_option,
)
from ._output import echo_json, spread, table_lines

__all__ = ["status", "verify"]

#: Exit status of ``verify`` when values could not be checked (the KMS) and none failed.
VERIFY_UNCHECKED: Final = 3
#: Failed rows listed per column by ``verify`` unless ``--show`` says otherwise.
SHOWN_FAILURES: Final = 20


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
                        "other_mode_rows": column.other_mode_rows,
                        "total": column.total,
                    }
                    for column in table.columns
                ],
            }
            for table in report
        ]
    }


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
            table_lines(rows)
        else:
            click.echo(
                "  key versions: none yet (create-keys, create_all or a first write makes one)"
            )
        click.echo("  rows per key version:")
        table_lines(
            [
                (
                    column.column,
                    "deterministic" if column.deterministic else "randomized",
                    spread(column.rows_by_version, column.null_rows, column.other_rows, "other"),
                )
                for column in table.columns
            ]
        )
        _print_other_mode(table.table, table.columns)


def _print_other_mode(table: str, columns: Sequence[ColumnStatus | ColumnCheck]) -> None:
    for column in columns:
        if column.other_mode is not None:
            click.echo(f"    {table}.{column.column}: {column.other_mode}")


@click.command()
@shared_options(kms="ignored", models="required")
@table_option(required=False, help="Report this table only (default: every encrypted table).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pass_cli
def status(cli: CliContext, table_names: tuple[str, ...], as_json: bool) -> None:
    """Key versions and rows per key version of each encrypted table.

    For each table: its keys (purpose data or search, version, state, the
    active one marked *, provider, master key id, created) and, per encrypted
    column, how many rows are stored under each key version, as counted by
    the database from the stored headers (nothing is decrypted; no KMS call).
    Columns' "other" rows are plaintext or not in sqlalchemy-kms's format.
    """
    tables = cli.tables(table_names)
    with cli.open_vault(master_key=False) as vault:
        report = vault.status(tables)
    if as_json:
        echo_json(_status_data(report))
    elif not report:
        click.echo("no tables with encrypted columns in the models")
    else:
        _print_status(report)


# -- verify ---------------------------------------------------------------------------


def _label(failed: FailedValue) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in failed.primary_key.items())


def _print_verify(report: VerifyReport) -> None:
    for check in report.tables:
        click.echo(click.style(f"{check.table}: {check.rows} rows", bold=True))
        rows = [
            (
                column.column,
                "deterministic" if column.deterministic else "randomized",
                spread(column.rows_by_version, column.null_rows, column.other_rows, "other"),
                f"{column.failures} FAILED" if column.failures else "ok",
            )
            for column in check.columns
        ]
        if rows:
            table_lines(rows, indent=2)
        _print_other_mode(check.table, check.columns)
        for column in check.columns:
            where = f"{check.table}.{column.column}"
            for failed in column.failed:
                reason = f": {failed.reason}" if failed.reason else ""
                click.echo(f"    {where} [{_label(failed)}]: {failed.error}{reason}")
            more = column.failures - len(column.failed)
            if more > 0:
                click.echo(f"    {where}: ... and {more} more")
    for problem in report.kms_problems:
        click.echo(f"  {problem}")
    if report.failures:
        click.echo(
            f"FAILED: {report.failures} of {report.values} stored value(s) did not decrypt "
            f"({', '.join(report.failed_columns)})"
        )
    if report.unchecked:
        click.echo(
            f"NOT CHECKED: {report.unchecked} of {report.values} stored value(s): their key "
            "could not be had from the KMS (see above); this says nothing of the values"
        )
    if not report.failures and not report.unchecked:
        click.echo(
            f"OK: all {report.values} stored value(s) in {len(report.tables)} table(s) decrypt"
        )


@click.command()
@shared_options(kms="required", models="required")
@table_option(required=False, help="Verify this table only (default: every encrypted table).")
@batch_size_option("Rows read per query.")
@click.option(
    "--show",
    "shown",
    type=click.IntRange(min=0),
    default=SHOWN_FAILURES,
    show_default=True,
    help="Failed rows listed per column (all are counted).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def verify(
    ctx: click.Context, table_names: tuple[str, ...], batch_size: int, shown: int, as_json: bool
) -> None:
    """Decrypt every stored value of the encrypted tables.

    Reads each table by primary key in batches and decrypts every value of
    every encrypted column (the values are checked, never printed). Reports
    rows per key version and, for each value that does not decrypt, its
    primary key and the error class. A key the KMS does not give (unreachable,
    access denied) is said once, and its values are counted as not checked,
    apart from values that fail. Use it after a restore, an import, a rewrap
    or before destroying a key.

    \b
    Exit status:
      0  every value decrypted
      1  some value did not decrypt (damaged, altered, or its key destroyed)
      3  no value failed, but some could not be checked: the KMS could not be
         reached or denied access
    """
    cli = ctx.ensure_object(CliContext)
    tables = cli.tables(table_names)
    with cli.open_vault() as vault:
        report = vault.verify(tables, batch_size=batch_size, shown=shown)
    if as_json:
        echo_json(report.as_dict())
    else:
        _print_verify(report)
    if report.failures:
        ctx.exit(1)
    if report.unchecked:
        ctx.exit(VERIFY_UNCHECKED)
