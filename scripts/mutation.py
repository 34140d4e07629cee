#!/usr/bin/env python3
"""Mutation testing of one module at a time: which small changes do the tests miss?

Each *mutant* is the module with one small change: a comparison flipped
(``<`` to ``<=``, ``==`` to ``!=``, ``in`` to ``not in``, ...), ``and``
swapped with ``or``, a ``not`` removed, a number changed by one, ``True``
swapped with ``False``, ``+`` swapped with ``-``, a ``raise`` replaced by
``pass``, a returned value replaced by ``None`` or a string or bytes constant
changed. Module-level constants are mutated like any other code. Docstrings,
type annotations and f-strings (messages) are left alone.

For every mutant the given tests run against a copy of the repository in a
temporary directory (the working tree is never written to), SQLite only, with
``-x`` and a per-mutant timeout. A mutant is *killed* when the tests fail or
time out, and *survives* when they pass: a survivor is behaviour that no test
checks. Mutants that cannot change behaviour are listed, with a reason each,
in ``scripts/equivalent_mutants.txt`` and left out of the score.

Usage::

    python scripts/mutation.py sqlalchemy_kms/_format.py \\
        --tests tests/test_primitives_format.py tests/test_format.py
    python scripts/mutation.py --all          # the four primitive modules
    python scripts/mutation.py sqlalchemy_kms/cache.py --list

Speed: two worker processes (``--jobs``) each import the test dependencies
once and fork a fresh child per mutant, so a mutant costs its tests' run
time, not an interpreter start.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENTS = Path(__file__).resolve().parent / "equivalent_mutants.txt"

#: The primitive modules and the tests that pin them (``--all``). The
#: focused tests come first: with ``-x`` most mutants die in them quickly.
PRESETS: dict[str, list[str]] = {
    "sqlalchemy_kms/_format.py": [
        "tests/test_primitives_format.py",
        "tests/test_format.py",
    ],
    "sqlalchemy_kms/_cipher.py": [
        "tests/test_primitives_cipher.py",
        "tests/test_format.py",
    ],
    "sqlalchemy_kms/cache.py": [
        "tests/test_primitives_cache.py",
        "tests/test_cache.py",
    ],
    "sqlalchemy_kms/_codecs.py": [
        "tests/test_primitives_codecs.py",
        "tests/test_codecs.py",
    ],
}

#: Imported once per worker so that each forked test run starts warm. None of
#: them may import the package under test (checked).
WARM_IMPORTS = (
    "pytest",
    "_pytest.python",
    "hypothesis",
    "sqlalchemy",
    "sqlalchemy.orm",
    "sqlalchemy.ext.asyncio",
    "cryptography.hazmat.primitives.ciphers.aead",
    "cryptography.hazmat.primitives.kdf.hkdf",
    "boto3",
    "botocore.session",
    "click",
    "alembic",
)

PACKAGE = "sqlalchemy_kms"
IGNORED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".hypothesis",
    ".*_cache",
    "build",
    "dist",
)

# -- mutants ---------------------------------------------------------------------------

COMPARE_SWAPS: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
BINOP_SWAPS: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.Pow: ast.Mult,
}
#: Fields that hold annotations: not evaluated at run time under
#: ``from __future__ import annotations``, so not mutated.
ANNOTATION_FIELDS = {"annotation", "returns"}


@dataclass(frozen=True)
class Mutant:
    """One changed copy of a module: where the change is, what it is, the new source."""

    module: str
    line: int
    col: int
    change: str
    source: str = field(repr=False, compare=False)

    @property
    def key(self) -> tuple[str, int, int, str]:
        return (self.module, self.line, self.col, self.change)

    def describe(self) -> str:
        """The line an equivalents file uses for this mutant (without the reason)."""
        return f"{self.module}:{self.line}:{self.col} | {self.change}"


def _short(code: str, limit: int = 60) -> str:
    code = " ".join(code.split())
    return code if len(code) <= limit else code[: limit - 3] + "..."


class _Source:
    """Source text with (line, UTF-8 column) positions turned into string offsets."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._lines = text.splitlines(keepends=True)
        self._starts = [0]
        for line in self._lines:
            self._starts.append(self._starts[-1] + len(line))

    def offset(self, line: int, col: int) -> int:
        encoded = self._lines[line - 1].encode("utf-8")
        return self._starts[line - 1] + len(encoded[:col].decode("utf-8"))

    def replace(self, node: ast.AST, text: str) -> str:
        start = self.offset(node.lineno, node.col_offset)  # type: ignore[attr-defined]
        end = self.offset(node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]
        return self.text[:start] + text + self.text[end:]

    def line(self, number: int) -> str:
        return self._lines[number - 1].strip()


def _is_docstring(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Every node that may be mutated: no docstrings, annotations or f-strings."""
    yield node
    for name, value in ast.iter_fields(node):
        if name in ANNOTATION_FIELDS:
            continue
        children = value if isinstance(value, list) else [value]
        for child in children:
            if not isinstance(child, ast.AST) or _is_docstring(child):
                continue
            if isinstance(child, ast.JoinedStr):
                continue
            yield from _walk(child)


def _constant_changes(value: object) -> list[str | bytes | bool | int | float]:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, (int, float)):
        return [value + 1, value - 1]
    if isinstance(value, str):
        return [f"XX{value}XX"]
    if isinstance(value, bytes):
        return [b"XX" + value + b"XX"]
    return []


def _expression_mutants(node: ast.AST) -> Iterator[tuple[ast.AST, str]]:
    """``(replacement, description)`` pairs for one expression node."""
    if isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
        for index, op in enumerate(node.ops):
            swap = COMPARE_SWAPS.get(type(op))
            if swap is None:
                continue
            new = copy.deepcopy(node)
            new.ops[index] = swap()
            pair = ast.Compare(left=operands[index], ops=[op], comparators=[operands[index + 1]])
            new_pair = ast.Compare(
                left=operands[index], ops=[swap()], comparators=[operands[index + 1]]
            )
            yield new, f"{_short(ast.unparse(pair))!r} -> {_short(ast.unparse(new_pair))!r}"
    elif isinstance(node, ast.BoolOp):
        new_op: ast.boolop = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        new_bool = ast.BoolOp(op=new_op, values=node.values)
        yield new_bool, f"{_short(ast.unparse(node))!r} -> {_short(ast.unparse(new_bool))!r}"
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        operand = node.operand
        yield operand, f"{_short(ast.unparse(node))!r} -> {_short(ast.unparse(operand))!r}"
    elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
        new_binop = ast.BinOp(left=node.left, op=BINOP_SWAPS[type(node.op)](), right=node.right)
        yield new_binop, f"{_short(ast.unparse(node))!r} -> {_short(ast.unparse(new_binop))!r}"
    elif isinstance(node, ast.Constant):
        for changed in _constant_changes(node.value):
            yield ast.Constant(value=changed), f"{node.value!r} -> {changed!r}"


def _statement_mutants(node: ast.AST) -> Iterator[tuple[str, str]]:
    """``(replacement text, description)`` pairs for one statement node."""
    if isinstance(node, ast.Raise):
        yield "pass", f"{_short(ast.unparse(node))!r} -> 'pass'"
    elif isinstance(node, ast.Return) and node.value is not None:
        is_none = isinstance(node.value, ast.Constant) and node.value.value is None
        if not is_none:
            yield "return None", f"{_short(ast.unparse(node))!r} -> 'return None'"


def mutants_of(module: str, text: str) -> list[Mutant]:
    """Every single-change mutant of a module's source that still compiles."""
    source = _Source(text)
    found: list[Mutant] = []
    for node in _walk(ast.parse(text)):
        if isinstance(node, ast.stmt):
            edits = list(_statement_mutants(node))
        elif isinstance(node, ast.expr):
            edits = [(f"({ast.unparse(new)})", change) for new, change in _expression_mutants(node)]
        else:
            continue
        for replacement, change in edits:
            mutated = source.replace(node, replacement)
            try:
                compile(mutated, module, "exec")
            except SyntaxError:
                continue
            found.append(Mutant(module, node.lineno, node.col_offset, change, mutated))
    found.sort(key=lambda m: (m.line, m.col, m.change))
    return found


# -- equivalents -----------------------------------------------------------------------


@dataclass
class Equivalents:
    """Known equivalent mutants: ``module:line:col | change | reason`` per line."""

    reasons: dict[tuple[str, int, int, str], str]

    @classmethod
    def load(cls, path: Path) -> Equivalents:
        reasons: dict[tuple[str, int, int, str], str] = {}
        if not path.exists():
            return cls(reasons)
        for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = [part.strip() for part in line.split(" | ")]
            if len(parts) != 3 or not parts[2]:
                raise SystemExit(f"{path}:{number}: expected 'module:line:col | change | reason'")
            module, line_no, col = parts[0].rsplit(":", 2)
            reasons[(module, int(line_no), int(col), parts[1])] = parts[2]
        return cls(reasons)

    def stale(self, module: str, mutants: Sequence[Mutant]) -> list[tuple[str, int, int, str]]:
        """Entries of ``module`` that name no current mutant (the code moved or changed)."""
        keys = {m.key for m in mutants}
        return [key for key in self.reasons if key[0] == module and key not in keys]


# -- running ---------------------------------------------------------------------------

_worker_root: Path | None = None


def _copy_repository(root: Path, rev: str | None) -> None:
    """The working tree at ``root``; with ``rev``, the package as committed there."""
    shutil.copytree(ROOT, root, ignore=IGNORED)
    if rev is not None:
        shutil.rmtree(root / PACKAGE)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", rev, PACKAGE],
            check=True,
            capture_output=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(root, filter="data")


def _init_worker(base: str, rev: str | None) -> None:
    """Give this worker its own copy of the repository and warm imports."""
    global _worker_root
    root = Path(base) / f"worker-{os.getpid()}"
    _copy_repository(root, rev)
    _worker_root = root
    # stale bytecode must never stand in for a freshly written mutant
    sys.dont_write_bytecode = True
    os.environ["SQLALCHEMY_KMS_TEST_DATABASES"] = "sqlite"
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    for name in WARM_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    if any(name == PACKAGE or name.startswith(PACKAGE + ".") for name in sys.modules):
        raise RuntimeError(f"a warm import loaded {PACKAGE}; it must be imported per mutant")


def _child(root: Path, module: str, tests: Sequence[str]) -> int:
    """In the forked child: import the (mutated) module from the copy, then run pytest."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    log = os.open(root / "mutant.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.chdir(root)
    sys.path.insert(0, str(root))
    name = module.removesuffix(".py").replace("/", ".")
    try:
        loaded = importlib.import_module(name)
    except Exception:
        traceback.print_exc()
        return 100  # the mutant breaks the import: killed
    if not str(loaded.__file__).startswith(str(root)):
        return 101  # the copy was not the module imported: a fault of this script
    import pytest

    # warm imports include pytest plugins (hypothesis), which pytest would like to
    # import itself to rewrite their asserts
    quiet = ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
    return int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *quiet, *tests]))


def run_one(
    module: str, source: str, tests: Sequence[str], timeout: float
) -> tuple[str, float, str]:
    """Run ``tests`` with ``source`` as ``module``: ``(outcome, seconds, output)``.

    Outcomes: ``passed``, ``failed``, ``timeout``, or ``broken`` (the copy of
    the module was not the one imported). ``output`` is pytest's, for a failure.
    """
    assert _worker_root is not None
    target = _worker_root / module
    original = target.read_text(encoding="utf-8")
    target.write_text(source, encoding="utf-8")
    started = time.monotonic()
    pid = -1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                code = _child(_worker_root, module, tests)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = started + timeout
        timed_out = False
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.01)
        # the child is not reaped yet, so its group id cannot have been reused
        _kill_group(pid)
        _, status = os.waitpid(pid, 0)
        pid = -1
    finally:
        if pid > 0:  # interrupted while waiting: end the child's group, reap it
            _kill_group(pid)
            os.waitpid(pid, 0)
        target.write_text(original, encoding="utf-8")
    seconds = time.monotonic() - started
    if timed_out:
        return "timeout", seconds, ""
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return "passed", seconds, ""
    output = (_worker_root / "mutant.log").read_text(encoding="utf-8", errors="replace")
    return ("broken" if code == 101 else "failed"), seconds, output


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@dataclass
class Score:
    module: str
    total: int = 0
    equivalent: int = 0
    killed: int = 0
    timeouts: int = 0
    survivors: list[Mutant] = field(default_factory=list)
    survived_equivalents: int = 0

    @property
    def counted(self) -> int:
        return self.total - self.equivalent

    @property
    def percent(self) -> float:
        return 100.0 * self.killed / self.counted if self.counted else 100.0

    def summary(self) -> str:
        return (
            f"{self.module}: {self.killed}/{self.counted} killed ({self.percent:.1f} %), "
            f"{len(self.survivors)} survived, {self.timeouts} by timeout; "
            f"{self.equivalent} equivalent excluded ({self.total} mutants)"
        )


def mutate_module(
    pool: ProcessPoolExecutor,
    module: str,
    tests: Sequence[str],
    equivalents: Equivalents,
    *,
    lines: tuple[int, int] | None,
    timeout: float | None,
    rev: str | None,
) -> Score:
    text = _module_text(module, rev)
    source = _Source(text)
    mutants = mutants_of(module, text)
    for key in equivalents.stale(module, mutants):
        where = f"{key[0]}:{key[1]}:{key[2]} | {key[3]}"
        print(f"  warning: an equivalents entry names no mutant: {where}")
    if lines is not None:
        mutants = [m for m in mutants if lines[0] <= m.line <= lines[1]]

    outcome, seconds, output = pool.submit(run_one, module, text, tests, 600.0).result()
    if outcome != "passed":
        print(output[-5000:])
        raise SystemExit(f"{module}: the tests do not pass on the unchanged module ({outcome})")
    limit = timeout if timeout is not None else max(10.0, 5 * seconds + 5)
    print(f"{module}: {len(mutants)} mutants; unchanged run {seconds:.1f} s, timeout {limit:.0f} s")

    score = Score(module, total=len(mutants))
    futures = {pool.submit(run_one, module, m.source, tests, limit): m for m in mutants}
    for done, future in enumerate(as_completed(futures), 1):
        mutant = futures[future]
        result, _, _ = future.result()
        if result == "broken":
            raise SystemExit("the mutated copy was not the module imported; nothing is measured")
        is_equivalent = mutant.key in equivalents.reasons
        if is_equivalent:
            score.equivalent += 1
            if result == "passed":
                score.survived_equivalents += 1
            else:
                print(f"  note: listed as equivalent but killed: {mutant.describe()}")
        elif result == "passed":
            score.survivors.append(mutant)
        else:
            score.killed += 1
            score.timeouts += result == "timeout"
        if done % 25 == 0:
            print(f"  {done}/{len(mutants)}", flush=True)
    score.survivors.sort(key=lambda m: (m.line, m.col))
    for mutant in score.survivors:
        print(f"  survived  {mutant.describe()}")
        print(f"            {source.line(mutant.line)}")
    return score


def _module_text(module: str, rev: str | None) -> str:
    if rev is None:
        return (ROOT / module).read_text(encoding="utf-8")
    return subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{module}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _parse_lines(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    return int(first), int(last or first)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="module files, relative to the repository")
    parser.add_argument("--tests", nargs="+", help="test files to run against each mutant")
    parser.add_argument("--all", action="store_true", help="the primitive modules and their tests")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--timeout", type=float, help="seconds per mutant (default from a run)")
    parser.add_argument("--lines", type=_parse_lines, help="only mutants on lines A-B")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument(
        "--rev",
        help="take the package from this commit (tests and the rest from the working tree)",
    )
    parser.add_argument("--equivalents", type=Path, default=EQUIVALENTS)
    parser.add_argument(
        "--fail-under", type=float, default=0.0, help="exit 1 below this killed percentage"
    )
    args = parser.parse_args(argv)

    if args.all:
        plan = dict(PRESETS)
    elif args.modules:
        plan = {m: args.tests or PRESETS.get(m, []) for m in args.modules}
    else:
        parser.error("name modules, or use --all")
    for module, tests in plan.items():
        if not tests:
            parser.error(f"no tests for {module}: use --tests")
        for path in (module, *tests):
            if not (ROOT / path).is_file():
                parser.error(f"no such file: {path}")

    if args.list:
        for module in plan:
            for mutant in mutants_of(module, _module_text(module, args.rev)):
                print(mutant.describe())
        return 0

    equivalents = Equivalents.load(args.equivalents)
    scores: list[Score] = []
    started = time.monotonic()
    # Ctrl-C or a TERM ends the run cleanly: the running mutants' children are
    # killed, pending mutants cancelled and the temporary copies removed
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="mutation-") as base:
        pool = ProcessPoolExecutor(
            max_workers=args.jobs,
            mp_context=get_context("fork"),
            initializer=_init_worker,
            initargs=(base, args.rev),
        )
        try:
            for module, tests in plan.items():
                scores.append(
                    mutate_module(
                        pool,
                        module,
                        tests,
                        equivalents,
                        lines=args.lines,
                        timeout=args.timeout,
                        rev=args.rev,
                    )
                )
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    print()
    for score in scores:
        print(score.summary())
    print(f"{time.monotonic() - started:.0f} s")
    return 1 if any(score.percent < args.fail_under for score in scores) else 0


if __name__ == "__main__":
    sys.exit(main())
