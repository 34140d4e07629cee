"""sqlalchemy_kms.alembic as a package: what importing it registers, and each op's one name."""

from __future__ import annotations

import inspect
import io
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from alembic.autogenerate import render_python_code
from alembic.operations import MigrateOperation, Operations, ops
from alembic.runtime.migration import MigrationContext
from sqlalchemy import String

import sqlalchemy_kms.alembic as kms_alembic
from sqlalchemy_kms import KMSEncrypted
from sqlalchemy_kms.alembic.ops import KMSOperation, operation
from sqlalchemy_kms.errors import ConfigurationError

OP_NAMES = {
    "create_kms_key_table",
    "drop_kms_key_table",
    "encrypt_column",
    "decrypt_column",
    "rotate_kms_key",
    "reencrypt_table",
    "rewrap_kms_keys",
}


def sample_calls() -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """Arguments for calling each operation as a migration does: ``op.<name>(*args, **kw)``."""
    phone = KMSEncrypted(String(30))
    return {
        "create_kms_key_table": (("kms_data_keys",), {}),
        "drop_kms_key_table": ((), {"schema": "vault"}),
        "encrypt_column": (("patients", "phone", phone), {}),
        "decrypt_column": (("patients", "phone", phone), {"batch_size": 10}),
        "rotate_kms_key": (("patients",), {"reencrypt": False}),
        "reencrypt_table": (("patients", {"phone": phone}), {}),
        "rewrap_kms_keys": (("aws-kms://alias/next",), {"table_name": "patients"}),
    }


def operation_classes() -> list[type[KMSOperation]]:
    found: list[type[KMSOperation]] = []
    pending = list(KMSOperation.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "op_name" in vars(cls):
            found.append(cls)
    return found


def test_importing_the_package_registers_every_operation() -> None:
    """In a fresh interpreter, ``import sqlalchemy_kms.alembic`` alone puts every op on
    ``Operations`` and gives each operation class a renderer."""
    script = textwrap.dedent(
        """
        import sqlalchemy_kms.alembic
        from alembic.autogenerate import renderers
        from alembic.operations import Operations
        from sqlalchemy_kms.alembic.ops import KMSOperation

        pending = list(KMSOperation.__subclasses__())
        while pending:
            cls = pending.pop()
            pending.extend(cls.__subclasses__())
            if "op_name" in vars(cls):
                assert callable(getattr(Operations, cls.op_name, None)), cls
                assert renderers.dispatch(cls).__module__ == "sqlalchemy_kms.alembic.render"
                print(cls.op_name)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == sorted(OP_NAMES)


def test_each_operation_name_is_written_once() -> None:
    """The op method, the class it builds, its diff tuple, the implementation's messages and
    the rendered call all carry the one name the class was registered with."""
    classes = operation_classes()
    assert sorted(cls.op_name for cls in classes) == sorted(OP_NAMES)
    calls = sample_calls()
    recorded: list[MigrateOperation] = []
    recording = Operations(MigrationContext.configure(dialect_name="sqlite"))
    recording.invoke = recorded.append  # type: ignore[assignment,method-assign]
    offline = Operations(
        MigrationContext.configure(
            dialect_name="postgresql", opts={"as_sql": True, "output_buffer": io.StringIO()}
        )
    )
    rendering = MigrationContext.configure(dialect_name="sqlite")
    for cls in classes:
        name = cls.op_name
        # Alembic's convention: the classmethod behind op.<name> is also Class.<name>
        assert inspect.getattr_static(cls, name) is inspect.getattr_static(cls, "run")
        args, kwargs = calls[name]
        getattr(recording, name)(*args, **kwargs)
        made = recorded.pop()
        assert type(made) is cls
        assert made.to_diff_tuple()[0] == name
        code = render_python_code(
            ops.UpgradeOps(ops=[made]),
            render_item=kms_alembic.render_item,
            migration_context=rendering,
        )
        assert f"    op.{name}(" in code, code
        # the registered implementation runs: DDL renders, row and key work refuses --sql
        try:
            getattr(offline, name)(*args, **kwargs)
        except ConfigurationError as error:
            assert str(error).startswith(f"op.{name}() reads and rewrites rows"), error
        else:
            assert name.endswith("_kms_key_table")
    assert not recorded


def test_operation_needs_the_class_own_run_classmethod() -> None:
    class NoRun(KMSOperation):
        pass

    with pytest.raises(TypeError, match="needs its own run"):
        operation("no_run_kms_op")(NoRun)
    assert not hasattr(Operations, "no_run_kms_op")


def test_public_names() -> None:
    assert sorted(kms_alembic.__all__) == [
        "CreateKmsKeyTableOp",
        "DecryptColumnOp",
        "DropKmsKeyTableOp",
        "EncryptColumnOp",
        "ReencryptTableOp",
        "RewrapKmsKeysOp",
        "RotateKmsKeyOp",
        "provider_from_uri",
        "render_item",
    ]
    for name in kms_alembic.__all__:
        assert getattr(kms_alembic, name) is not None
    assert {cls.__name__ for cls in operation_classes()} <= set(kms_alembic.__all__)
