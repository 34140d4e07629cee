"""How the commands print: headings, aligned fields and columns, JSON, one-line errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import click

__all__ = [
    "echo_json",
    "field",
    "heading",
    "isatty",
    "key_name",
    "one_line",
    "spread",
    "table_lines",
]


def one_line(message: str) -> str:
    """``message`` with every run of whitespace (newlines too) made one space."""
    return " ".join(message.split())


def package_setting(name: str, default: Any) -> Any:
    """``sqlalchemy_kms.cli.<name>`` as it is now: the package's own names are the
    ones to patch (a test, or a wrapper script), so commands read them from there."""
    package = sys.modules.get(__name__.rpartition(".")[0])
    return getattr(package, name, default)


def isatty(stream: Literal["stdin", "stdout"]) -> bool:
    """Whether the command's standard input or output is a terminal."""
    handle = sys.stdin if stream == "stdin" else sys.stdout
    return handle is not None and handle.isatty()


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON (values JSON does not know, as strings)."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def heading(title: str) -> None:
    """A blank line, then ``title`` in bold, underlined with dashes."""
    click.echo()
    click.echo(click.style(title, bold=True))
    click.echo("-" * len(title))


def field(label: str, value: object, indent: int = 2) -> None:
    """One ``label  value`` line, labels aligned."""
    click.echo(f"{' ' * indent}{label:<14} {value}")


def table_lines(rows: Sequence[Sequence[str]], indent: int = 4) -> None:
    """Print rows as left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        click.echo((" " * indent + "  ".join(cells)).rstrip())


def spread(rows_by_version: Mapping[int, int], nulls: int, others: int, other: str) -> str:
    """Rows per key version on one line: ``v1: 7, NULL: 3``."""
    parts = [f"v{version}: {count}" for version, count in sorted(rows_by_version.items())]
    if nulls:
        parts.append(f"NULL: {nulls}")
    if others:
        parts.append(f"{other}: {others}")
    return ", ".join(parts) or "no rows"


def key_name(search: bool) -> str:
    """What a key of one mode is called in messages."""
    return "search key" if search else "data key"
