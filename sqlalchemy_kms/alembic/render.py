"""How autogenerate writes encrypted columns and the operations into a migration script.

:func:`render_item` is the hook for ``context.configure(render_item=...)``;
the renderers of the operations are registered with Alembic's
``renderers.dispatch_for(<operation class>)`` and write ``op.<op_name>(...)``
from the name each operation class carries.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

from alembic.autogenerate import renderers
from alembic.autogenerate.api import AutogenContext
from alembic.autogenerate.render import _repr_type

from ..providers.uri import provider_uri
from ..types import KMSEncrypted
from .ops import (
    ColumnOp,
    CreateKmsKeyTableOp,
    DecryptColumnOp,
    DropKmsKeyTableOp,
    EncryptColumnOp,
    KMSOperation,
    ReencryptTableOp,
    RewrapKmsKeysOp,
    RotateKmsKeyOp,
)

__all__ = ["render_item"]

log = logging.getLogger(__name__)


# -- KMSEncrypted types ---------------------------------------------------------------------


def _render_callable(fn: Callable[..., Any], autogen_context: AutogenContext) -> str | None:
    """``module.qualname`` for an importable function (adding its import), else ``None``."""
    qualname = getattr(fn, "__qualname__", None)
    if not qualname or "<" in qualname:  # lambdas, local functions
        return None
    module_name = getattr(fn, "__module__", None) or "builtins"
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    if found is not fn:
        return None
    if module_name == "builtins":
        return str(qualname)
    autogen_context.imports.add(f"import {module_name}")
    return f"{module_name}.{qualname}"


def _render_kms_type(type_: KMSEncrypted, autogen_context: AutogenContext) -> str:
    autogen_context.imports.add("from sqlalchemy_kms import KMSEncrypted")
    arguments = [_repr_type(type_.inner_type, autogen_context)]
    if type_.deterministic:
        arguments.append("deterministic=True")
    if type_.normalize is not None:
        rendered = _render_callable(type_.normalize, autogen_context)
        if rendered is None:
            log.warning(
                "cannot render normalize=%r of an encrypted column: left out of the "
                "migration script (it does not change the DDL); add it by hand where a "
                "migration rewrites values",
                type_.normalize,
            )
        else:
            arguments.append(f"normalize={rendered}")
    if type_.accept_plaintext:
        arguments.append("accept_plaintext=True")
    return f"KMSEncrypted({', '.join(arguments)})"


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """``render_item`` hook for ``context.configure()``: renders ``KMSEncrypted`` columns.

    ``KMSEncrypted(String(200), deterministic=True)`` becomes
    ``KMSEncrypted(sa.String(length=200), deterministic=True)`` (the inner
    type rendered the way Alembic renders any type) and
    ``from sqlalchemy_kms import KMSEncrypted`` is added to the script's
    imports. ``normalize=`` is rendered when it is an importable function
    (``str.lower``, ``myapp.text.fold_case``). Everything else returns
    ``False``: Alembic's default rendering. To combine with a hook of your own::

        def my_render_item(type_, obj, autogen_context):
            rendered = sqlalchemy_kms.alembic.render_item(type_, obj, autogen_context)
            if rendered is not False:
                return rendered
            ...
    """
    if type_ == "type" and isinstance(obj, KMSEncrypted):
        return _render_kms_type(obj, autogen_context)
    return False


# -- the operations -------------------------------------------------------------------------


def _call(op: KMSOperation, *arguments: str, options: str = "") -> str:
    """``op.<op_name>(arguments..., options)``: the operation as the script calls it."""
    return f"op.{op.op_name}({', '.join(arguments)}{options})"


def _options(*pairs: tuple[str, Any, Any]) -> str:
    """``, name=value`` for each option that differs from its default."""
    return "".join(f", {name}={value!r}" for name, value, default in pairs if value != default)


def _render_columns(columns: Mapping[str, KMSEncrypted], autogen_context: AutogenContext) -> str:
    items = ", ".join(
        f"{name!r}: {_render_kms_type(kms_type, autogen_context)}"
        for name, kms_type in columns.items()
    )
    return f"{{{items}}}"


@renderers.dispatch_for(CreateKmsKeyTableOp)
@renderers.dispatch_for(DropKmsKeyTableOp)
def _render_key_table_op(
    autogen_context: AutogenContext, op: CreateKmsKeyTableOp | DropKmsKeyTableOp
) -> str:
    return _call(op, repr(op.table_name), options=_options(("schema", op.schema, None)))


@renderers.dispatch_for(EncryptColumnOp)
@renderers.dispatch_for(DecryptColumnOp)
def _render_column_op(autogen_context: AutogenContext, op: ColumnOp) -> str:
    return _call(
        op,
        repr(op.table_name),
        repr(op.column_name),
        _render_kms_type(op.kms_type, autogen_context),
        options=_options(("schema", op.schema, None), ("batch_size", op.batch_size, 1000)),
    )


@renderers.dispatch_for(RotateKmsKeyOp)
def _render_rotate_kms_key(autogen_context: AutogenContext, op: RotateKmsKeyOp) -> str:
    columns = f", columns={_render_columns(op.columns, autogen_context)}" if op.columns else ""
    options = _options(
        ("search", op.search, False),
        ("reencrypt", op.reencrypt, True),
        ("schema", op.schema, None),
        ("batch_size", op.batch_size, 1000),
    )
    return _call(op, repr(op.table_name), options=options + columns)


@renderers.dispatch_for(ReencryptTableOp)
def _render_reencrypt_table(autogen_context: AutogenContext, op: ReencryptTableOp) -> str:
    return _call(
        op,
        repr(op.table_name),
        _render_columns(op.columns, autogen_context),
        options=_options(("schema", op.schema, None), ("batch_size", op.batch_size, 1000)),
    )


@renderers.dispatch_for(RewrapKmsKeysOp)
def _render_rewrap_kms_keys(autogen_context: AutogenContext, op: RewrapKmsKeysOp) -> str:
    return _call(
        op,
        repr(provider_uri(op.provider)),
        options=_options(("table_name", op.table_name, None), ("schema", op.schema, None)),
    )
