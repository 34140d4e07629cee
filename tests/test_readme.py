"""The README's code blocks run, as written, and do what their comments say.

Every ```python block of README.md runs, in README order, in one namespace, so
that a block may use what an earlier one defined (``Base``, ``engine``,
``vault``). The test prepares what the README leaves to the reader:

* the current folder is a temporary one, so ``sqlite:///app.db`` and
  ``master.key`` land there, and the key file is made with the README's own
  ``python -c "..."`` command;
* AWS KMS is the moto server of the ``kms_endpoint`` fixture
  (``AWS_ENDPOINT_URL_KMS``), with the aliases the README names created;
* :data:`PREPARE` runs before some blocks (and :data:`BEFORE_STATEMENT` before
  some statements), each saying which name the README's prose supplies: the
  ``kms`` client and key ``row`` of the plain-boto3 block, the ``session`` of
  the query block, the users the queries find;
* :data:`SUBSTITUTE` replaces the servers the README names with local ones
  (the async block's PostgreSQL URL by aiosqlite);
* :data:`OWN_NAMESPACE` blocks run apart, where the shared names would clash.

A block with top-level ``await`` runs in an event loop. A statement whose
comment says ``raises NAME`` must raise that error, and ``print(...)  # X``
must print ``X``. The blocks that cannot run are listed in :data:`SKIPPED`,
each with its reason; a skip list entry that matches no block fails the test.

The ```bash blocks' ``sqlalchemy-kms`` command lines run too: the demos in a
temporary folder, and the lifecycle walk-through against a SQLite database
with models written for it. The ``pip`` and ``pytest`` lines are not run
(they install the package and run this very suite).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from alembic.operations import Operations
from click.testing import CliRunner
from sqlalchemy import create_engine, select
from sqlalchemy.orm import DeclarativeBase, Session

import sqlalchemy_kms.errors
from sqlalchemy_kms import AwsKms, KeyVault, LocalKms
from sqlalchemy_kms.cli import cli

from .helpers import kms_client

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: The KMS aliases the README's examples name: the master keys of the demo and of the
#: application, and the new one a rewrap moves to (a key of its own).
ALIASES = ("alias/demo_cmk", "alias/app-cmk")
NEW_CMK = "alias/new-cmk"


@dataclass(frozen=True)
class Block:
    lang: str
    line: int
    code: str

    @property
    def name(self) -> str:
        """The block's first line: how the lists below name it."""
        return self.code.splitlines()[0].strip()


def readme_blocks(lang: str) -> list[Block]:
    text = README.read_text(encoding="utf-8")
    return [
        Block(match["lang"], text.count("\n", 0, match.start()) + 1, match["code"])
        for match in re.finditer(r"^```(?P<lang>\w*)\n(?P<code>.*?)^```", text, re.M | re.S)
        if match["lang"] == lang
    ]


# -- what the test supplies ----------------------------------------------------------------------

Namespace = dict[str, Any]

#: Blocks that do not run, by first line, and why.
SKIPPED: dict[str, str] = {
    "import sqlalchemy_kms.alembic                      # registers the op.* operations": (
        "an excerpt of an Alembic env.py (connectable, context, target_metadata are "
        "Alembic's): migrations_example/env.py does the same and tests/test_alembic.py "
        "runs it; here its imports are checked"
    ),
    "op.create_kms_key_table()                                           # the key table": (
        "operations of a migration script, which run only inside Alembic: "
        "migrations_example's revisions use each of them under tests/test_alembic.py; "
        "here each op.NAME is checked to be a registered operation"
    ),
}


def _use_aws_vault(ns: Namespace) -> None:
    """The AwsKms line replaces the LocalKms one: close that vault, start afresh."""
    ns["vault"].close()
    ns["Base"].metadata.drop_all(ns["engine"])


def _key_row(ns: Namespace) -> None:
    """The plain-boto3 block: ``kms`` is a boto3 client and ``row`` the patients' key row."""
    import boto3

    ns["Base"].metadata.create_all(ns["engine"])  # the patients' key, under AwsKms now
    key_table = ns["vault"].table
    with ns["engine"].connect() as conn:
        ns["row"] = conn.execute(
            select(key_table).where(key_table.c.scope == "patients", key_table.c.purpose == "data")
        ).one()
    ns["kms"] = boto3.client("kms")


def _session(ns: Namespace) -> None:
    ns["session"] = Session(ns["engine"])


def _users(ns: Namespace) -> None:
    """The users the queries of the query block find."""
    ns["Base"].metadata.create_all(ns["engine"])
    with Session(ns["engine"]) as session:
        session.add(ns["User"](email="kim@example.com", name="Kim Min-ji"))
        session.commit()


@contextlib.contextmanager
def module_namespace(name: str) -> Iterator[Namespace]:
    """The globals of a module registered in ``sys.modules`` while the blocks run
    (declarative classes resolve their annotations through their module)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        yield module.__dict__
    finally:
        del sys.modules[name]


def _own_namespace(ns: Namespace, tmp_path: Path) -> None:
    class Base(DeclarativeBase):
        pass

    ns.update(
        KeyVault=KeyVault,
        Base=Base,
        engine=create_engine(f"sqlite:///{tmp_path / 'own.db'}"),
        provider=LocalKms(os.urandom(32)),
    )


#: Run before a block (by first line).
PREPARE: dict[str, Callable[[Namespace], None]] = {
    'vault = KeyVault(engine, AwsKms("alias/demo_cmk"))': _use_aws_vault,
    "kms.decrypt(CiphertextBlob=row.wrapped_key, KeyId=row.master_key_id,": _key_row,
    "from sqlalchemy import update": _session,
}
#: Run before the first statement of a block that starts with the text.
BEFORE_STATEMENT: dict[str, Callable[[Namespace], None]] = {
    'session.scalars(select(User).where(User.email == "kim@example.com")).one()': _users,
}
#: Blocks that run in a namespace of their own (``KeyVault``, a fresh ``Base``, ``engine``
#: and ``provider``): the key table block declares another key table than the shared
#: ``Base``'s, and would put a second vault on the shared engine.
OWN_NAMESPACE = {"from sqlalchemy_kms.vault import key_table": _own_namespace}
#: README text replaced by what the test can reach (function of the temporary folder).
SUBSTITUTE: dict[str, Callable[[Path], str]] = {
    '"postgresql+asyncpg://app@db/app"': lambda tmp: repr(f"sqlite+aiosqlite:///{tmp}/async.db"),
}
#: Checks after a block: what its last expression (``_``) or namespace must hold.
CHECK: dict[str, Callable[[Namespace], None]] = {
    "kms.decrypt(CiphertextBlob=row.wrapped_key, KeyId=row.master_key_id,": lambda ns: (
        None if len(ns["_"]["Plaintext"]) == 32 else pytest.fail("the data key did not unwrap")
    ),
    "from sqlalchemy_kms.vault import key_table": lambda ns: (
        None
        if "vault.app_keys" in ns["Base"].metadata.tables
        else pytest.fail("key_table() did not declare vault.app_keys")
    ),
}


# -- running a block -------------------------------------------------------------------------------


def _raises(block: Block, statement: ast.stmt) -> type[BaseException] | None:
    """The error a statement's comment says it raises (``# raises NAME``)."""
    lines = block.code.splitlines()[statement.lineno - 1 : statement.end_lineno]
    found = re.search(r"#.*\braises (\w+)", "\n".join(lines))
    if found is None:
        return None
    error = getattr(sqlalchemy_kms.errors, found[1], None)
    assert isinstance(error, type), f"README line {block.line}: no error {found[1]}"
    return error


def _run_block(block: Block, ns: Namespace, tmp_path: Path) -> str:
    """Run one block statement by statement in ``ns``; return what it printed."""
    code = block.code
    for text, replacement in SUBSTITUTE.items():
        code = code.replace(text, replacement(tmp_path))
    tree = ast.parse(code, filename=f"README.md:{block.line}")
    output = io.StringIO()
    if any(isinstance(node, (ast.Await, ast.AsyncWith, ast.AsyncFor)) for node in ast.walk(tree)):
        # top-level await: one coroutine, in a copy of the namespace (the async engine and
        # vault of the block must not replace the shared ones), disposed afterwards
        compiled = compile(tree, block.name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        local = dict(ns)

        async def run() -> None:
            result = eval(compiled, local)
            if result is not None:
                await result
            local["vault"].close()
            await local["engine"].dispose()

        with contextlib.redirect_stdout(output):
            asyncio.run(run())
        return output.getvalue()
    pending = dict(BEFORE_STATEMENT)
    for number, statement in enumerate(tree.body):
        source = ast.get_source_segment(code, statement) or ""
        for prefix in list(pending):
            if source.startswith(prefix):
                pending.pop(prefix)(ns)
        last = number == len(tree.body) - 1 and isinstance(statement, ast.Expr)
        compiled = compile(
            ast.Expression(statement.value) if last else ast.Module([statement], []),  # type: ignore[attr-defined]
            f"README.md:{block.line + statement.lineno}",
            "eval" if last else "exec",
        )
        error = _raises(block, statement)
        with contextlib.redirect_stdout(output):
            if error is not None:
                with pytest.raises(error):
                    exec(compiled, ns)
            elif last:
                ns["_"] = eval(compiled, ns)
            else:
                exec(compiled, ns)
    return output.getvalue()


def _printed(block: Block) -> list[str]:
    """What ``print(...)  # X`` lines of a block say they print."""
    return re.findall(r"^\s*print\(.*\)\s+#\s*(.+?)\s*$", block.code, re.M)


@pytest.fixture
def aws(kms_endpoint: str, cmk: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS KMS for the README: the moto server, with the README's aliases."""
    client = kms_client(kms_endpoint)
    existing = {alias["AliasName"] for alias in client.list_aliases()["Aliases"]}
    for alias in ALIASES:
        if alias not in existing:
            client.create_alias(AliasName=alias, TargetKeyId=cmk["key_id"])
    if NEW_CMK not in existing:
        new = client.create_key(Description="the README's new-cmk")["KeyMetadata"]["KeyId"]
        client.create_alias(AliasName=NEW_CMK, TargetKeyId=new)
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms_endpoint)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_skip_lists_name_blocks_that_exist() -> None:
    names = {block.name for block in readme_blocks("python")}
    listed = [*SKIPPED, *PREPARE, *OWN_NAMESPACE, *CHECK]
    assert [name for name in listed if name not in names] == []
    assert len(names) - len(SKIPPED) >= 6


def test_python_blocks_run(aws: None, in_tmp: Path) -> None:
    text = README.read_text(encoding="utf-8")
    [key_command] = re.findall(r'`python -c "([^"`]+)"`', text)
    subprocess.run([sys.executable, "-c", key_command], check=True, cwd=in_tmp)
    assert (in_tmp / "master.key").exists()

    ran = 0
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(module_namespace("readme"))
        stack.callback(_close, ns)
        for block in readme_blocks("python"):
            if block.name in SKIPPED:
                continue
            where = f"README.md line {block.line} ({block.name!r})"
            target = ns
            if block.name in OWN_NAMESPACE:
                target = stack.enter_context(module_namespace("readme_own"))
                OWN_NAMESPACE[block.name](target, in_tmp)
            if block.name in PREPARE:
                PREPARE[block.name](target)
            try:
                printed = _run_block(block, target, in_tmp)
            except Exception as error:
                pytest.fail(f"{where}: {type(error).__name__}: {error}")
            for expected in _printed(block):
                assert expected in printed, f"{where}: printed {printed!r}, not {expected!r}"
            if block.name in CHECK:
                CHECK[block.name](target)
            if target is not ns:
                _close(target)
            ran += 1
    assert ran == len(readme_blocks("python")) - len(SKIPPED)


def _close(ns: Namespace) -> None:
    for name, method in (("session", "close"), ("vault", "close"), ("engine", "dispose")):
        if name in ns:
            getattr(ns[name], method)()


def test_skipped_blocks_name_what_exists() -> None:
    """What can be checked of the skipped blocks: their imports, their operations."""
    import sqlalchemy_kms.alembic  # noqa: F401  (registers the operations)

    for block in readme_blocks("python"):
        if block.name not in SKIPPED:
            continue
        for node in ast.walk(ast.parse(block.code)):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = __import__(node.module, fromlist=["_"])
                for alias in node.names:
                    assert hasattr(module, alias.name), (block.name, alias.name)
        for name in re.findall(r"\bop\.(\w+)\(", block.code):
            assert hasattr(Operations, name), (block.name, name)


# -- the command lines ------------------------------------------------------------------------


def _command_lines(block: Block) -> Iterator[list[str]]:
    """Each ``sqlalchemy-kms`` command of a bash block (``&&`` splits a line), as argv."""
    for line in block.code.splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word != "&&":
                command.append(word)
                continue
            if command and command[0] == "sqlalchemy-kms":
                yield command[1:]
            command = []


def _invoke(argv: list[str], env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(cli, argv, env=env)
    assert result.exit_code == 0, f"sqlalchemy-kms {shlex.join(argv)}: {result.output}"
    return result.output


def test_demo_command_lines(aws: None, in_tmp: Path) -> None:
    demos = [
        argv
        for block in readme_blocks("bash")
        for argv in _command_lines(block)
        if argv[0] == "demo"
    ]
    assert len(demos) >= 4
    for argv in demos:
        argv = [str(in_tmp / "demo") if word == "/tmp/demo" else word for word in argv]
        assert "KMS calls" in _invoke(argv)
    assert (in_tmp / "sqlalchemy-kms-demo").is_dir()


MODELS = """
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_kms import KMSEncrypted


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(KMSEncrypted(String(200)))
    email: Mapped[str] = mapped_column(KMSEncrypted(String(320), deterministic=True))
"""


def test_lifecycle_command_lines(aws: None, in_tmp: Path) -> None:
    """The README's walk-through, on SQLite: the application's database with a few
    patients, ``myapp.models:Base`` written for it. The grace period is 90 seconds;
    ``retire`` and ``destroy`` ("after the grace period") get ``--grace-period 0``."""
    [block] = [b for b in readme_blocks("bash") if b.name.startswith("export SQLALCHEMY_KMS_DB")]
    (in_tmp / "myapp").mkdir()
    (in_tmp / "myapp" / "__init__.py").write_text("")
    (in_tmp / "myapp" / "models.py").write_text(MODELS)
    database = f"sqlite:///{in_tmp / 'app.db'}"
    app_cmk = re.findall(r"^export SQLALCHEMY_KMS_KMS=aws-kms://(\S+)", block.code, re.M)[0]

    sys.path.insert(0, str(in_tmp))
    try:
        from myapp.models import Base, Patient  # type: ignore[import-not-found]

        engine = create_engine(database)
        vault = KeyVault(engine, AwsKms(app_cmk))
        vault.create_table()
        Base.metadata.create_all(engine)
        with Session(engine) as session:
            session.add_all(
                Patient(id=n, name=f"Patient {n}", email=f"p{n}@example.com") for n in range(5)
            )
            session.commit()
        vault.close()
        engine.dispose()

        env: dict[str, str] = {}
        ran: list[str] = []
        for line in block.code.splitlines():
            exported = re.match(r"export (\w+)=(\S+)", line)
            if exported:
                name, value = exported.groups()
                env[name] = database if name == "SQLALCHEMY_KMS_DB" else value
                continue
            for argv in _command_lines(Block("bash", block.line, line)):
                if argv[0] in ("retire", "destroy"):
                    argv = [*argv, "--grace-period", "0"]
                output = _invoke(argv, env)
                ran.append(argv[0])
                if argv[0] == "verify":
                    assert "OK: all 10 stored value(s)" in output
                if argv[0] == "destroy":
                    assert "patients: data key version 1 destroyed" in output
        assert ran == [
            "status",
            "rotate",
            "reencrypt",
            "retire",
            "export-keys",
            "destroy",
            "import-keys",
            "rewrap",
            "import-keys",
            "verify",
            "policy",
        ]
    finally:
        sys.path.remove(str(in_tmp))
        for name in [name for name in sys.modules if name.split(".")[0] == "myapp"]:
            del sys.modules[name]
