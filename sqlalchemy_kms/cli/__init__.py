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
for an application's own database. Every one of them takes these four
options; one a command does not use is accepted and ignored (its ``--help``
says so), so the same options, or environment variables, serve every command:

``--db URL``
    SQLAlchemy URL of the database (env ``SQLALCHEMY_KMS_DB``).
``--kms URI``
    The master key: ``aws-kms://KEY`` or ``local://PATH`` (a LocalKms key
    file) (env ``SQLALCHEMY_KMS_KMS``). Required by the commands that call
    the KMS (create-keys, rotate, reencrypt, rewrap, verify); the others
    (status, retire, destroy, export-keys, import-keys, create-table, policy)
    ignore it.
``--models MODULE:ATTR``
    The application's ``MetaData``, or a declarative ``Base`` or
    ``registry`` whose ``.metadata`` is used; the current folder is put on
    ``sys.path``, so run from the application's folder. Required by
    create-keys, status, rotate, reencrypt, retire and verify; used when
    given by destroy (to check ``--table``) and policy (its encrypted tables
    are the default ``--table`` values); ignored by create-table, rewrap,
    export-keys and import-keys.
``--key-table NAME``
    The key table (``kms_data_keys``; ``SCHEMA.NAME`` for another schema).

``policy`` uses no database and no KMS: it ignores ``--db``, ``--kms`` and
``--key-table`` too.

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
    sqlalchemy-kms policy --role-arn arn:aws:iam::111122223333:role/app \
        --models myapp.models:Base                         # every encrypted table

Errors of the library (a KMS that refuses, a key that does not exist, a
refused lifecycle step, ...) and of the database are reported as one line
and exit status 1; wrong options exit with status 2. ``verify`` exits with
status 1 when any value does not decrypt, and 3 when none failed but some
could not be checked (the KMS could not be reached or denied access).

The package holds one module per command group, each a thin layer over the
library: :mod:`._demo` (``demo``), :mod:`._keys` (``create-table``,
``create-keys``, ``rotate``, ``reencrypt``, ``rewrap``, ``retire``,
``destroy``, ``export-keys``, ``import-keys``), :mod:`._reports` (``status``,
``verify``) and :mod:`._policy` (``policy``). :mod:`._context` holds the
context object the key commands share (``--db``, ``--kms``, ``--models``,
``--key-table``: :func:`._context.shared_options`; it opens the vault) and the
KMS URI parameter type;
:mod:`._output` how they print.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click
from sqlalchemy import exc

from .. import __version__
from ..errors import SQLAlchemyKMSError
from ..providers.uri import KmsUri, parse_kms_uri
from ._context import CliContext, KmsUriType, load_metadata
from ._demo import DATABASE_FILE, DEFAULT_DEMO_DIR, KEY_FILE, PROG_NAME, demo
from ._demo import SAMPLES as _SAMPLES  # noqa: F401  (the demo's patients, for tests)
from ._keys import (
    create_keys,
    create_table,
    destroy,
    export_keys,
    import_keys,
    reencrypt,
    retire,
    rewrap,
    rotate,
)
from ._output import isatty as _isatty  # noqa: F401  (patchable: see package_setting)
from ._output import one_line
from ._policy import policy, policy_document
from ._reports import status, verify

__all__ = [
    "DATABASE_FILE",
    "DEFAULT_DEMO_DIR",
    "KEY_FILE",
    "CliContext",
    "KmsUri",
    "KmsUriType",
    "cli",
    "create_keys",
    "create_table",
    "demo",
    "destroy",
    "export_keys",
    "import_keys",
    "load_metadata",
    "main",
    "parse_kms_uri",
    "policy",
    "policy_document",
    "reencrypt",
    "retire",
    "rewrap",
    "rotate",
    "status",
    "verify",
]


class _Group(click.Group):
    """A click group that reports library and database errors as one line, exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SQLAlchemyKMSError as error:
            raise click.ClickException(one_line(str(error))) from None
        except exc.DBAPIError as error:
            # the driver's own message: SQLAlchemy's would list the statement's parameters
            raise click.ClickException(f"database error: {one_line(str(error.orig))}") from None


@click.group(cls=_Group)
@click.version_option(__version__, "--version", prog_name=PROG_NAME, message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """sqlalchemy-kms: transparent SQLAlchemy column encryption with KMS-wrapped data keys.

    Run "sqlalchemy-kms demo" to see it encrypt, store and decrypt a few rows.
    The other commands manage the keys of an application's database; each
    takes --db URL (or SQLALCHEMY_KMS_DB), --kms URI (or SQLALCHEMY_KMS_KMS),
    --models MODULE:ATTR and --key-table NAME, and ignores those it does not
    use. See "sqlalchemy-kms COMMAND --help".
    """
    ctx.obj = CliContext()


for _command in (
    demo,
    status,
    verify,
    rotate,
    reencrypt,
    rewrap,
    retire,
    destroy,
    export_keys,
    import_keys,
    create_table,
    create_keys,
    policy,
):
    cli.add_command(_command)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``sqlalchemy-kms`` command (the console script's entry point).

    ``argv`` defaults to the process's arguments. Exits the process.
    """
    cli.main(args=list(argv) if argv is not None else None, prog_name=PROG_NAME)
