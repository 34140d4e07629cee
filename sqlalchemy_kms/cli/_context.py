"""What the key commands share: the context object that opens the vault, and their options.

The group puts one :class:`CliContext` on ``click.Context.obj``. Every key
command takes the same four options, ``--db``, ``--kms``, ``--models`` and
``--key-table`` (:func:`shared_options`); each command says which of them it
needs, and one it does not use is accepted and ignored, never refused, so one
command line (or one set of environment variables) serves every command. The
options store their values on the context as they are parsed, and a command
asks it for the tables named by ``--table`` and for the vault::

    @click.command()
    @shared_options(kms="required", models="required")
    @pass_cli
    def command(cli: CliContext) -> None:
        with cli.open_vault() as vault:
            vault.create_keys(cli.tables([]))

KMS URIs are parsed by :class:`KmsUriType` (through
:func:`~sqlalchemy_kms.providers.uri.parse_kms_uri`) and turned into
providers by :func:`~sqlalchemy_kms.providers.uri.provider_from_uri`.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, Literal

import click
from sqlalchemy import MetaData, Table, create_engine, exc

from .._keytable import DEFAULT_KEY_TABLE, table_scope
from ..errors import ConfigurationError
from ..providers.base import GeneratedDataKey, KeyProvider
from ..providers.uri import KmsUri, parse_kms_uri, provider_from_uri
from ..types import encrypted_columns
from ..vault import KeyVault
from ._output import one_line

__all__ = [
    "DB_ENV",
    "KMS_ENV",
    "CliContext",
    "KmsUriType",
    "NoKms",
    "batch_size_option",
    "db_option",
    "key_table_option",
    "kms_option",
    "load_metadata",
    "models_option",
    "pass_cli",
    "shared_options",
    "table_option",
]

#: Environment variable of ``--db``.
DB_ENV: Final = "SQLALCHEMY_KMS_DB"
#: Environment variable of ``--kms``.
KMS_ENV: Final = "SQLALCHEMY_KMS_KMS"

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
#: How a command uses one of the shared options: it must be given, it may be, or it is
#: accepted and ignored.
Use = Literal["required", "optional", "ignored"]


if TYPE_CHECKING:
    _ParamType = click.ParamType[KmsUri]
else:  # click before 8.4 takes no type parameters
    _ParamType = click.ParamType


class KmsUriType(_ParamType):
    """A KMS URI: ``aws-kms://KEY``, ``local://PATH``, and a bare ``local`` where
    the command has a key file of its own to use (the demo)."""

    name = "uri"

    def __init__(self, *, bare_local: bool = False) -> None:
        self.bare_local = bare_local

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> KmsUri:
        if isinstance(value, KmsUri):
            return value
        try:
            uri = parse_kms_uri(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)
        if uri.scheme == "local" and not uri.key_id and not self.bare_local:
            self.fail(
                "'local' needs the key file: local://PATH (e.g. local://master.key)", param, ctx
            )
        return uri


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
            f"cannot import {module_name}: {type(error).__name__}: {one_line(str(error))}"
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


class NoKms(KeyProvider):
    """The provider of commands run without ``--kms``: any use is an error that
    says to give it."""

    name = "none"

    def _refuse(self) -> ConfigurationError:
        return ConfigurationError(f"this needs the master key: give --kms URI (or set {KMS_ENV})")

    @property
    def master_key_id(self) -> str:
        raise self._refuse()

    def _generate_data_key(self, context: Mapping[str, str]) -> GeneratedDataKey:
        raise self._refuse()

    def _unwrap(self, wrapped: bytes, context: Mapping[str, str], master_key_id: str) -> bytes:
        raise self._refuse()

    def _wrap(self, plaintext: bytes, context: Mapping[str, str]) -> tuple[bytes, str]:
        raise self._refuse()


class CliContext:
    """The options a key command runs with, and the vault they open.

    ``db_url``, ``kms``, ``models`` and ``key_table`` are set by the shared
    options as click parses them.
    """

    def __init__(self) -> None:
        self.db_url: str | None = None
        self.kms: KmsUri | None = None
        self.models: str | None = None
        self.key_table: str = DEFAULT_KEY_TABLE
        self._metadata: MetaData | None = None

    def __repr__(self) -> str:
        return f"<CliContext db={self.db_url!r} kms={self.kms} models={self.models!r}>"

    # -- the application's models ---------------------------------------------------------

    def metadata(self) -> MetaData | None:
        """The ``MetaData`` named by ``--models`` (``None`` without it); a usage error
        when it cannot be loaded."""
        if self.models is None:
            return None
        if self._metadata is None:
            try:
                self._metadata = load_metadata(self.models)
            except ValueError as error:
                raise click.BadParameter(str(error), param_hint="'--models'") from None
        return self._metadata

    def tables(self, names: Sequence[str]) -> list[Table]:
        """The tables with encrypted columns named by ``--table`` (all of them when
        none is named); a usage error for a name the models do not have."""
        metadata = self.metadata()
        if metadata is None:
            raise click.UsageError("this needs the models: give --models MODULE:ATTR")
        known = {
            table_scope(table): table
            for table in metadata.sorted_tables
            if encrypted_columns(table)
        }
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
                    param_hint="'--table'",
                )
            if table not in chosen:
                chosen.append(table)
        return chosen

    # -- the master key and the vault ----------------------------------------------------------

    def provider(self, uri: KmsUri, option: str = "--kms") -> KeyProvider:
        """The provider named by a parsed ``--kms`` (or ``--to``).

        A local key file that cannot be used is a usage error of ``option``; an
        AWS KMS client that cannot be set up is a library error (exit status 1).
        """
        try:
            return provider_from_uri(uri)
        except ConfigurationError as error:
            if uri.scheme != "local":
                raise
            raise click.BadParameter(one_line(str(error)), param_hint=f"'{option}'") from None

    @contextmanager
    def open_vault(
        self, *, master_key: bool = True, key_table_needed: bool = True
    ) -> Iterator[KeyVault]:
        """The vault on ``--db`` with ``--key-table``; closed, with its engine, afterwards.

        With ``master_key=False`` (a command that makes no KMS call), or without
        ``--kms``, the provider refuses any use. With ``key_table_needed`` a
        missing key table is an error that says how to create it.
        """
        provider = self.provider(self.kms) if master_key and self.kms is not None else NoKms()
        if self.db_url is None:
            raise click.UsageError(f"give the database: --db URL (or set {DB_ENV})")
        try:
            engine = create_engine(self.db_url)
        except (exc.ArgumentError, exc.NoSuchModuleError, ImportError, ValueError) as error:
            raise click.BadParameter(
                f"cannot use the database URL: {one_line(str(error))}", param_hint="'--db'"
            ) from None
        schema, _, name = self.key_table.rpartition(".")
        vault = KeyVault(engine, provider, table_name=name, schema=schema or None)
        try:
            if key_table_needed:
                with engine.connect() as conn:
                    exists = vault.key_table.exists(conn)
                if not exists:
                    raise click.ClickException(
                        f"the key table {vault.table.fullname} does not exist in this database; "
                        "create it with 'sqlalchemy-kms create-table' (or check --key-table)"
                    )
            yield vault
        finally:
            vault.close()
            engine.dispose()


#: Passes the :class:`CliContext` to a command (made if the command runs on its own).
pass_cli = click.make_pass_decorator(CliContext, ensure=True)


def _store(attribute: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback that keeps an option's value on the :class:`CliContext`."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            setattr(ctx.ensure_object(CliContext), attribute, value)
        return value

    return callback


db_option: Final[Decorator] = click.option(
    "--db",
    metavar="URL",
    envvar=DB_ENV,
    required=True,
    expose_value=False,
    callback=_store("db_url"),
    help=f"SQLAlchemy database URL [env: {DB_ENV}].",
)
key_table_option: Final[Decorator] = click.option(
    "--key-table",
    metavar="NAME",
    default=DEFAULT_KEY_TABLE,
    show_default=True,
    expose_value=False,
    callback=_store("key_table"),
    help="The key table: NAME or SCHEMA.NAME.",
)
_KMS_HELP: Final = (
    "Master key: aws-kms://KEY (alias/NAME, an alias or key ARN, or a key id) or "
    f"local://PATH (a LocalKms key file) [env: {KMS_ENV}]."
)


def kms_option(*, required: bool) -> Decorator:
    """``--kms``: the master key (``required``), or accepted and ignored."""
    return click.option(
        "--kms",
        metavar="URI",
        type=KmsUriType(),
        envvar=KMS_ENV,
        required=required,
        expose_value=False,
        callback=_store("kms"),
        help=_KMS_HELP if required else "Accepted and ignored: this command makes no KMS call.",
    )


_MODELS_HELP: Final = (
    "The application's MetaData, or a declarative Base or registry whose "
    ".metadata is used (e.g. myapp.models:Base); the current folder is on sys.path."
)


def models_option(*, required: bool, help: str | None = None) -> Decorator:
    """``--models``: the application's ``MetaData`` (loaded when a command asks)."""
    return click.option(
        "--models",
        metavar="MODULE:ATTR",
        required=required,
        expose_value=False,
        callback=_store("models"),
        help=help or _MODELS_HELP,
    )


def _ignored(name: str, metavar: str, why: str, envvar: str | None = None) -> Decorator:
    """An option a command accepts, so that shared command lines work, and ignores."""
    return click.option(
        name,
        metavar=metavar,
        envvar=envvar,
        expose_value=False,
        help=f"Accepted and ignored: {why}.",
    )


def shared_options(
    *,
    kms: Use,
    models: Use,
    db: Literal["required", "ignored"] = "required",
    key_table: Literal["optional", "ignored"] = "optional",
    models_help: str | None = None,
) -> Decorator:
    """``--db``, ``--kms``, ``--models`` and ``--key-table``, as one command uses them.

    ``"required"``: the command needs it; ``"optional"``: it uses it when given
    (``--key-table`` has a default); ``"ignored"``: accepted, checked only as
    far as its type goes, and unused. ``--kms`` is never merely optional: a
    command that calls the KMS requires it.
    """
    if kms == "optional":
        raise ValueError("--kms is required or ignored")
    options = [
        db_option
        if db != "ignored"
        else _ignored("--db", "URL", "this command does not use the database", DB_ENV),
        kms_option(required=kms == "required"),
        models_option(required=models == "required", help=models_help)
        if models != "ignored"
        else _ignored("--models", "MODULE:ATTR", "this command does not use the models"),
        key_table_option
        if key_table != "ignored"
        else _ignored("--key-table", "NAME", "this command does not use the key table"),
    ]

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):  # --db first in --help
            command = option(command)
        return command

    return apply


def batch_size_option(help: str) -> Decorator:
    """``--batch-size``: rows per batch of a job that walks a table."""
    return click.option(
        "--batch-size", type=click.IntRange(min=1), default=1000, show_default=True, help=help
    )


def table_option(*, required: bool, help: str) -> Decorator:
    """``--table``, repeatable: the tables a command works on."""
    return click.option(
        "--table",
        "table_names",
        metavar="TABLE",
        multiple=True,
        required=required,
        help=help + " Repeat for several tables.",
    )
