"""The ``policy`` command: the least-privilege KMS policy for the roles that use sqlalchemy-kms."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import click

from .._keytable import table_scope
from ._context import CliContext, shared_options
from ._output import echo_json

__all__ = ["policy", "policy_document"]


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


@click.command()
@shared_options(
    db="ignored",
    kms="ignored",
    models="optional",
    key_table="ignored",
    models_help="The application's models: without --table, the policy covers every "
    "table with encrypted columns in them; with it, --table is checked against them.",
)
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
    help="A table the role may use (SCHEMA.TABLE for a table with a schema). Repeat. "
    "Required without --models.",
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

    The tables are the --table values, or, without any, the encrypted tables
    of --models. No database or KMS is used: --db, --kms and --key-table are
    accepted, so that the other commands' options can be given, and ignored.
    """
    if iam and key_arn is None:
        raise click.UsageError("--iam needs --key-arn (the IAM policy's Resource)", ctx=ctx)
    cli = ctx.ensure_object(CliContext)
    scopes: list[str] = list(table_names)
    if cli.models is not None:
        scopes = [table_scope(table) for table in cli.tables(table_names)]
        if not scopes:
            raise click.UsageError("the models have no tables with encrypted columns", ctx=ctx)
    elif not scopes:
        [table_param] = [param for param in ctx.command.params if param.name == "table_names"]
        raise click.MissingParameter(
            ctx=ctx, param=table_param, message="Give --table (repeat it), or --models."
        )
    echo_json(
        policy_document(role_arn, scopes, admin_role_arn=admin_role_arn, key_arn=key_arn, iam=iam)
    )
