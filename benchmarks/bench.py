"""Benchmark of sqlalchemy-kms against plaintext, a minimal AES-GCM column and sqlalchemy-utils.

Run from a checkout with the package installed::

    python benchmarks/bench.py                      # SQLite file in a temporary folder
    python benchmarks/bench.py --rows 5000 --repeats 3
    python benchmarks/bench.py --db postgresql+psycopg://postgres@127.0.0.1:5432/test
    python benchmarks/bench.py --check              # exit 1 when a target fails
    python benchmarks/bench.py --only lookup,reencrypt

Everything is measured in one process and one run, so every ratio compares
numbers taken side by side on the same machine:

* each timed region is timed with the process CPU clock (``time.process_time``)
  and the wall clock, with the garbage collector collected before and disabled
  inside;
* the variants are interleaved round by round (round 1 runs every variant
  once, round 2 runs every variant again, ...), each round starting at a
  different variant, after one untimed warm-up round;
* a comparison is the median over rounds of the per-round CPU ratio; CPU and
  wall-clock medians are printed beside it.

The "floor" is :class:`FloorEncrypted` below: a bare ``TypeDecorator`` that
does AES-GCM with a prepared ``AESGCM`` object, a fixed six-byte header and
base64 text, and nothing else. No column cipher can cost less, so it is the
yardstick of KMSEncrypted's own overhead. :func:`floor_reencrypt` is the
same for re-encryption: the job's keyset walk and batched UPDATE around a
bare AES-GCM decrypt and encrypt per value.

The KMS is AWS KMS served by a ``moto`` server started on a free loopback
port (``--kms local`` uses ``LocalKms`` instead); its calls are counted on
the boto3 client. ``benchmarks/README.md`` explains every line of the report.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import platform
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import cryptography
import sqlalchemy
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import (
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import types as sqltypes
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column

from sqlalchemy_kms import AwsKms, KeyProvider, KeyVault, KMSEncrypted, LocalKms
from sqlalchemy_kms.vault import key_table

try:  # optional: the comparison with sqlalchemy-utils is skipped without it
    from sqlalchemy_utils import StringEncryptedType  # type: ignore[import-untyped]
    from sqlalchemy_utils.types.encrypted.encrypted_type import (  # type: ignore[import-untyped]
        AesGcmEngine,
    )
except ImportError:  # pragma: no cover - depends on the environment
    StringEncryptedType = None
    AesGcmEngine = None

DEFAULT_ROWS = 20_000
DEFAULT_REPEATS = 11
LOOKUPS = 1_000
PER_VALUE_LOOPS = 20_000
MEMORY_ROWS = 100_000
#: The benchmarks of a run, in the order they run (``--only`` picks some).
BENCHMARKS = ("orm", "bulk_insert", "lookup", "per_value", "reencrypt")
BATCH_SIZE = 1_000
WARMUP_ROWS = 500
SHORT_VALUE = "kim.minji@example.com"
KMS_REGION = "us-east-1"
MOTO_MAIN = "from moto.server import main; main()"

# -- targets -------------------------------------------------------------------

FLOOR_MAX = 1.15  # ORM insert, ORM select, bulk insert: KMSEncrypted / floor
LOOKUP_MAX = 1.20  # deterministic equality lookup / plaintext lookup
PER_VALUE_MAX = 2.5  # per-value encrypt+decrypt / bare AESGCM
REENCRYPT_MAX = 1.25  # vault.reencrypt / floor re-encryption
MEMORY_GROWTH_MAX = 1.2  # peak memory of re-encryption, large run / small run


# -- the floor -----------------------------------------------------------------

FLOOR_HEADER = bytes.fromhex("010100000001")  # as long as the library's header
FLOOR_NONCE = 12
FLOOR_SALT = bytes(8)  # stored values of the floor re-encryption: as long as the library's


class FloorEncrypted(sqltypes.TypeDecorator[str]):
    """The least a column cipher can cost: AES-GCM, a fixed header, base64 text.

    One ``AESGCM`` object, prepared once, for every value; the header is the
    associated data. No key lookup, no codec, no checks.
    """

    impl = sqltypes.String
    cache_ok = True

    def __init__(self, aead: AESGCM, length: int = 255) -> None:
        self.aead = aead
        # base64 of header + nonce + up to 4 UTF-8 bytes per character + tag
        super().__init__(4 * ((len(FLOOR_HEADER) + FLOOR_NONCE + 4 * length + 16 + 2) // 3))

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        nonce = os.urandom(FLOOR_NONCE)
        sealed = self.aead.encrypt(nonce, value.encode(), FLOOR_HEADER)
        return base64.b64encode(FLOOR_HEADER + nonce + sealed).decode("ascii")

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        raw = base64.b64decode(value)
        start = len(FLOOR_HEADER)
        nonce_end = start + FLOOR_NONCE
        return self.aead.decrypt(raw[start:nonce_end], raw[nonce_end:], raw[:start]).decode()


# -- measuring -----------------------------------------------------------------


@dataclass
class Sample:
    """One timed region: process CPU seconds and wall-clock seconds."""

    cpu: float
    wall: float


def measure(action: Callable[[], object]) -> Sample:
    """Time ``action()`` with the collector collected before and disabled inside."""
    gc.collect()
    gc.disable()
    try:
        wall_start = time.perf_counter()
        cpu_start = time.process_time()
        action()
        cpu = time.process_time() - cpu_start
        wall = time.perf_counter() - wall_start
    finally:
        gc.enable()
    return Sample(cpu, wall)


def rotated(items: Sequence[Any], by: int) -> list[Any]:
    """``items`` starting at position ``by`` (mod its length): each round starts elsewhere."""
    shift = by % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def _nothing() -> None:
    return None


def _unchanged(value: Any) -> Any:
    return value


@dataclass
class Task:
    """One variant of one benchmark: untimed ``setup``, timed ``run``.

    ``encrypted`` and ``decrypted`` count the values that one ``run`` sends
    through KMSEncrypted, for the KMS-calls-per-value line.
    """

    key: str
    run: Callable[[], object]
    setup: Callable[[], object] = _nothing
    encrypted: int = 0
    decrypted: int = 0


@dataclass
class Tally:
    """Values that went through KMSEncrypted in the whole run."""

    encrypted: int = 0
    decrypted: int = 0


# -- KMS -----------------------------------------------------------------------


class KmsCallCounter:
    """Counts the KMS API calls made through one boto3 client, per encryption context."""

    def __init__(self, client: Any) -> None:
        self.calls: Counter[str] = Counter()
        self.per_key: Counter[tuple[str, str]] = Counter()
        client.meta.events.register("before-call.kms", self._count)

    def _count(self, model: Any, params: Any = None, **kwargs: Any) -> None:
        self.calls[model.name] += 1
        context = "?"
        with suppress(KeyError, TypeError, ValueError, AttributeError):
            body = json.loads(params["body"])
            context = json.dumps(body.get("EncryptionContext"), sort_keys=True)
        self.per_key[(model.name, context)] += 1

    def most_for_one_key(self, operation: str) -> int:
        """The most calls of ``operation`` made for any one encryption context."""
        return max((n for (op, _), n in self.per_key.items() if op == operation), default=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def moto_kms() -> Iterator[tuple[AwsKms, KmsCallCounter]]:
    """A moto KMS server on a free loopback port and an ``AwsKms`` on it; stopped by PID."""
    import boto3

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", MOTO_MAIN, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)
        client = boto3.client(
            "kms",
            endpoint_url=url,
            region_name=KMS_REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        arn = client.create_key(Description="sqlalchemy-kms benchmark")["KeyMetadata"]["Arn"]
        counter = KmsCallCounter(client)  # counts from here: the library's calls only
        yield AwsKms(arn, client=client), counter
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextmanager
def kms_provider(kind: str) -> Iterator[tuple[KeyProvider, KmsCallCounter | None]]:
    """``AwsKms`` on moto (``aws``) or ``LocalKms`` (``local``), with its call counter."""
    if kind == "aws":
        with moto_kms() as (provider, counter):
            yield provider, counter
    else:
        yield LocalKms(os.urandom(32)), None


# -- models --------------------------------------------------------------------


@dataclass
class Models:
    """The ORM classes and Core tables of one run, all named ``<prefix>_...``."""

    metadata: MetaData
    orm: dict[str, Any]  # variant -> mapped class with id, name, email
    lookup: dict[str, Any]  # "plaintext" / "KMSEncrypted" -> mapped class with indexed email
    rotation: Table  # id + one KMSEncrypted column, re-encrypted every round
    floor_rotation: Table  # id + one binary column of bare AES-GCM values, likewise
    memory: dict[int, Table] = field(default_factory=dict)  # rows -> table, for peak memory


def build_models(prefix: str, aead: AESGCM, memory_sizes: Sequence[int]) -> Models:
    """Declare every table of the run in a fresh registry."""

    class Base(DeclarativeBase):
        pass

    key_table(Base.metadata, f"{prefix}_keys")  # the run's own key table, as the vault's

    def model(name: str, make_type: Callable[[bool], Any]) -> Any:
        """Mapped class ``name`` with columns ``name`` (``make_type(False)``) and
        ``email`` (``make_type(True)``)."""
        return type(
            name,
            (Base,),
            {
                "__tablename__": f"{prefix}_{name.lower()}",
                "id": mapped_column(Integer, primary_key=True),
                "name": mapped_column(make_type(False)),
                "email": mapped_column(make_type(True)),
            },
        )

    orm: dict[str, Any] = {
        "plaintext": model("Plain", lambda _: String(255)),
        "floor": model("Floor", lambda _: FloorEncrypted(aead)),
        "KMSEncrypted": model("Kms", lambda _: KMSEncrypted(String(255))),
        "KMSEncrypted det.": model(
            "KmsDet", lambda email: KMSEncrypted(String(255), deterministic=email)
        ),
    }
    if StringEncryptedType is not None:
        orm["sqlalchemy-utils"] = model(
            "Utils", lambda _: StringEncryptedType(String(255), "benchmark secret", AesGcmEngine)
        )

    def lookup_model(name: str, column_type: Any) -> Any:
        return type(
            name,
            (Base,),
            {
                "__tablename__": f"{prefix}_{name.lower()}",
                "id": mapped_column(Integer, primary_key=True),
                "email": mapped_column(column_type, index=True),
            },
        )

    lookup = {
        "plaintext": lookup_model("LookupPlain", String(255)),
        "KMSEncrypted": lookup_model("LookupKms", KMSEncrypted(String(255), deterministic=True)),
    }

    def secret_table(name: str) -> Table:
        return Table(
            f"{prefix}_{name}",
            Base.metadata,
            Column("id", Integer, primary_key=True),
            Column("secret", KMSEncrypted(String(255))),
        )

    return Models(
        metadata=Base.metadata,
        orm=orm,
        lookup=lookup,
        rotation=secret_table("rotation"),
        floor_rotation=Table(
            f"{prefix}_floor_rotation",
            Base.metadata,
            Column("id", Integer, primary_key=True),
            Column("secret", LargeBinary),
        ),
        memory={size: secret_table(f"memory_{size}") for size in memory_sizes},
    )


def encrypted_columns(table: Table) -> int:
    """How many columns of ``table`` are KMSEncrypted."""
    return sum(isinstance(column.type, KMSEncrypted) for column in table.columns)


def stored_view(table: Table) -> Table:
    """A rotation table with its encrypted column as plain bytes: what SQL sees."""
    return Table(
        table.name,
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("secret", LargeBinary),
    )


def make_rows(count: int) -> list[dict[str, Any]]:
    """Distinct, realistic short values."""
    return [
        {"name": f"Customer {i:07d} Kim", "email": f"user{i:07d}@example.com"} for i in range(count)
    ]


def clear(engine: Engine, table: Table) -> None:
    """Empty ``table`` (``TRUNCATE`` on PostgreSQL, which leaves no dead rows behind)."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            name = engine.dialect.identifier_preparer.format_table(table)
            conn.execute(text(f"TRUNCATE TABLE {name}"))
        else:
            conn.execute(delete(table))


def fill(engine: Engine, table: Table, count: int) -> None:
    """Insert ``count`` rows into a one-secret table through Core executemany (untimed)."""
    with engine.begin() as conn:
        for start in range(0, count, 10_000):
            stop = min(count, start + 10_000)
            conn.execute(insert(table), [{"secret": f"secret {i:07d}"} for i in range(start, stop)])


def plain_update(engine: Engine, table: Table) -> None:
    """The baseline of re-encryption: the same batches, read and written back unchanged.

    Keyset pagination over the primary key, ``BATCH_SIZE`` rows a batch, one
    executemany ``UPDATE ... WHERE id = ?`` and one commit per batch, on the
    stored bytes of the same column: the work of a re-encryption job but the
    cryptography.
    """
    view = stored_view(table)
    statement = (
        update(view).where(view.c.id == bindparam("row_id")).values(secret=bindparam("value"))
    )
    last = 0
    while True:
        with engine.begin() as conn:
            batch = conn.execute(
                select(view.c.id, view.c.secret)
                .where(view.c.id > last)
                .order_by(view.c.id)
                .limit(BATCH_SIZE)
            ).all()
            if not batch:
                return
            conn.execute(statement, [{"row_id": i, "value": v} for i, v in batch])
        last = batch[-1][0]


def floor_seal(aead: AESGCM, plaintext: bytes) -> bytes:
    """A stored value of the floor re-encryption: header, salt, nonce, AES-GCM."""
    nonce = os.urandom(FLOOR_NONCE)
    return FLOOR_HEADER + FLOOR_SALT + nonce + aead.encrypt(nonce, plaintext, FLOOR_HEADER)


def fill_floor(engine: Engine, table: Table, count: int, aead: AESGCM) -> None:
    """Insert ``count`` rows of :func:`floor_seal` values, like :func:`fill` (untimed)."""
    with engine.begin() as conn:
        for start in range(0, count, 10_000):
            stop = min(count, start + 10_000)
            conn.execute(
                insert(table),
                [
                    {"secret": floor_seal(aead, f"secret {i:07d}".encode())}
                    for i in range(start, stop)
                ],
            )


def floor_reencrypt(engine: Engine, table: Table, old: AESGCM, new: AESGCM) -> None:
    """The least a re-encryption can cost: the job's walk around bare AES-GCM.

    The same keyset walk as :func:`plain_update` (``BATCH_SIZE`` rows a
    batch, one executemany ``UPDATE ... WHERE id = ?`` and one commit per
    batch); each value is decrypted with the prepared ``AESGCM`` object
    ``old`` and encrypted with ``new``, and nothing else: no key lookup, no
    header or version check, no codec, no compare-and-set.
    """
    statement = (
        update(table).where(table.c.id == bindparam("row_id")).values(secret=bindparam("value"))
    )
    start = len(FLOOR_HEADER) + len(FLOOR_SALT)
    nonce_end = start + FLOOR_NONCE
    header = FLOOR_HEADER
    prefix = FLOOR_HEADER + FLOOR_SALT
    decrypt, encrypt, urandom = old.decrypt, new.encrypt, os.urandom
    last = 0
    while True:
        with engine.begin() as conn:
            batch = conn.execute(
                select(table.c.id, table.c.secret)
                .where(table.c.id > last)
                .order_by(table.c.id)
                .limit(BATCH_SIZE)
            ).all()
            if not batch:
                return
            params = []
            for row_id, stored in batch:
                plaintext = decrypt(stored[start:nonce_end], stored[nonce_end:], header)
                nonce = urandom(FLOOR_NONCE)
                params.append(
                    {"row_id": row_id, "value": prefix + nonce + encrypt(nonce, plaintext, header)}
                )
            conn.execute(statement, params)
        last = batch[-1][0]


# -- the benchmark -------------------------------------------------------------


class Benchmark:
    """The engine, vault, models, tasks and samples of one run."""

    def __init__(
        self,
        engine: Engine,
        vault: KeyVault,
        models: Models,
        rows: int,
        only: Sequence[str] = BENCHMARKS,
    ) -> None:
        self.engine = engine
        self.vault = vault
        self.models = models
        self.rows = rows
        self.only = set(only)
        self.samples: dict[str, list[Sample]] = {}
        self.tally = Tally()
        # the rotation job: vault.reencrypt(table, *, batch_size=1000, progress=None)
        self.reencrypt: Callable[..., Any] | None = getattr(vault, "reencrypt", None)
        self.reencrypt_problem = "" if self.reencrypt is not None else "not available"
        self.memory_peaks: dict[int, int] = {}
        # the floor re-encryption's two keys: each run moves every value to the other
        self.floor_keys = [AESGCM(AESGCM.generate_key(256)) for _ in range(2)]
        self.data = make_rows(rows)
        picks = random.Random(2026).sample(self.data, min(LOOKUPS, rows))
        self.lookup_values = [row["email"] for row in picks]

    # -- setup ---------------------------------------------------------------

    def prepare(self) -> None:
        """Create the tables (``create_all`` makes their keys) and fill the fixed ones."""
        self.vault.create_table()
        self.models.metadata.create_all(self.engine)
        for model in self.models.lookup.values():
            with Session(self.engine) as session:
                session.execute(insert(model), [{"email": row["email"]} for row in self.data])
                session.commit()
            self.tally.encrypted += self.rows * encrypted_columns(model.__table__)
        fill(self.engine, self.models.rotation, self.rows)
        self.tally.encrypted += self.rows
        fill_floor(self.engine, self.models.floor_rotation, self.rows, self.floor_keys[0])

    # -- tasks ---------------------------------------------------------------

    def orm_tasks(self, rows: int) -> list[Task]:
        """ORM insert (add_all + commit) then ORM select of all entities, per variant."""
        tasks = []
        for variant, model in self.models.orm.items():
            values = rows * encrypted_columns(model.__table__)
            objects: list[Any] = []

            def setup(model: Any = model, objects: list[Any] = objects) -> None:
                clear(self.engine, model.__table__)
                objects[:] = [model(**row) for row in self.data[:rows]]  # frees the last ones

            def run_insert(objects: list[Any] = objects) -> None:
                with Session(self.engine) as session:
                    session.add_all(objects)
                    session.commit()

            def run_select(model: Any = model, variant: str = variant) -> None:
                with Session(self.engine) as session:
                    loaded = session.scalars(select(model)).all()
                if len(loaded) != rows:
                    raise AssertionError(f"{variant}: read {len(loaded)} rows, not {rows}")

            tasks.append(Task(f"orm_insert/{variant}", run_insert, setup, encrypted=values))
            tasks.append(Task(f"orm_select/{variant}", run_select, decrypted=values))
        return tasks

    def bulk_tasks(self, rows: int) -> list[Task]:
        """``session.execute(insert(Model), dicts)`` + commit, per variant."""
        tasks = []
        for variant in ("plaintext", "floor", "KMSEncrypted"):
            model = self.models.orm[variant]

            def setup(model: Any = model) -> None:
                clear(self.engine, model.__table__)

            def run(model: Any = model) -> None:
                with Session(self.engine) as session:
                    session.execute(insert(model), self.data[:rows])
                    session.commit()

            values = rows * encrypted_columns(model.__table__)
            tasks.append(Task(f"bulk_insert/{variant}", run, setup, encrypted=values))
        return tasks

    def lookup_tasks(self, lookups: int) -> list[Task]:
        """``select(Model).where(Model.email == v)`` for ``lookups`` values, per variant."""
        tasks = []
        for variant, model in self.models.lookup.items():

            def run(model: Any = model) -> None:
                with Session(self.engine) as session:
                    for value in self.lookup_values[:lookups]:
                        session.scalars(select(model).where(model.email == value)).one()

            values = lookups * encrypted_columns(model.__table__)  # the term, then the row
            tasks.append(Task(f"lookup/{variant}", run, encrypted=values, decrypted=values))
        return tasks

    def per_value_tasks(self, loops: int) -> list[Task]:
        """Encrypt then decrypt one short value ``loops`` times, per implementation.

        A column type is called through the bind and result processors that
        SQLAlchemy compiles for the engine's dialect and calls once per value;
        the result processor gets what the driver would hand back (``bytes``
        for a binary column, where the bind processor may give a ``memoryview``).
        """
        dialect = self.engine.dialect
        data = SHORT_VALUE.encode()
        aead = AESGCM(AESGCM.generate_key(256))

        def bare() -> None:
            encrypt, decrypt, urandom = aead.encrypt, aead.decrypt, os.urandom
            for _ in range(loops):
                nonce = urandom(12)
                decrypt(nonce, encrypt(nonce, data, None), None)

        def column(column_type: Any) -> Callable[[], None]:
            impl = column_type.dialect_impl(dialect)
            bind = impl.bind_processor(dialect) or _unchanged
            result = impl.result_processor(dialect, None) or _unchanged
            as_stored = isinstance(bind(SHORT_VALUE), (bytearray, memoryview))
            if result(bytes(bind(SHORT_VALUE)) if as_stored else bind(SHORT_VALUE)) != SHORT_VALUE:
                raise AssertionError(f"{column_type!r} does not round-trip")

            # what the driver hands back: bytes of a binary column (the driver's own
            # copy from the database is not the column type's cost)
            stored = bytes(bind(SHORT_VALUE)) if as_stored else bind(SHORT_VALUE)

            def run() -> None:
                for _ in range(loops):
                    bind(SHORT_VALUE)
                for _ in range(loops):
                    result(stored)

            return run

        orm = self.models.orm
        kms = orm["KMSEncrypted"].__table__.c.name.type
        kms_det = orm["KMSEncrypted det."].__table__.c.email.type
        return [
            Task("per_value/bare AESGCM", bare),
            Task("per_value/floor", column(orm["floor"].__table__.c.name.type)),
            Task("per_value/KMSEncrypted", column(kms), encrypted=loops, decrypted=loops),
            Task("per_value/KMSEncrypted det.", column(kms_det), encrypted=loops, decrypted=loops),
        ]

    def reencrypt_tasks(self) -> list[Task]:
        """A plain batched UPDATE of the column, the floor re-encryption, and
        ``vault.reencrypt`` after a rotation."""
        table = self.models.rotation
        tasks = [
            Task("reencrypt/plain UPDATE", lambda: plain_update(self.engine, table)),
            Task("reencrypt/floor", self._floor_reencrypt),
        ]
        if self.reencrypt is not None:
            tasks.append(
                Task(
                    "reencrypt/KMSEncrypted",
                    lambda: self._reencrypt(table),
                    lambda: self.vault.rotate_key(table),
                    encrypted=self.rows,
                    decrypted=self.rows,
                )
            )
        return tasks

    def _reencrypt(self, table: Table) -> None:
        assert self.reencrypt is not None
        self.reencrypt(table, batch_size=BATCH_SIZE)

    def _floor_reencrypt(self) -> None:
        old, new = self.floor_keys
        floor_reencrypt(self.engine, self.models.floor_rotation, old, new)
        self.floor_keys.reverse()

    # -- rounds --------------------------------------------------------------

    def groups(self, warmup: bool) -> list[list[list[Task]]]:
        """Benchmarks, each a list of units run back to back (ORM: insert then select)."""
        rows = min(WARMUP_ROWS, self.rows) if warmup else self.rows
        loops = PER_VALUE_LOOPS // 10 if warmup else PER_VALUE_LOOPS
        groups: list[list[list[Task]]] = []
        if "orm" in self.only:
            orm = self.orm_tasks(rows)
            groups.append([orm[i : i + 2] for i in range(0, len(orm), 2)])
        if "bulk_insert" in self.only:
            groups.append([[task] for task in self.bulk_tasks(rows)])
        if "lookup" in self.only:
            lookups = LOOKUPS // 10 if warmup else LOOKUPS
            groups.append([[task] for task in self.lookup_tasks(lookups)])
        if "per_value" in self.only:
            groups.append([[task] for task in self.per_value_tasks(loops)])
        if "reencrypt" in self.only:
            groups.append([[task] for task in self.reencrypt_tasks()])
        return groups

    def run_round(self, number: int, *, warmup: bool = False) -> None:
        """Every variant once, each benchmark starting at a different variant each round."""
        for units in self.groups(warmup):
            for unit in rotated(units, number):
                for task in unit:
                    self._run(task, record=not warmup)

    def _run(self, task: Task, *, record: bool) -> None:
        task.setup()
        try:
            sample = measure(task.run)
        except Exception as error:
            if task.key != "reencrypt/KMSEncrypted":
                raise
            # the rotation job is new: report its failure instead of stopping the run
            self.reencrypt = None
            self.samples.pop(task.key, None)
            self.reencrypt_problem = f"failed: {type(error).__name__}: {error}"[:200]
            return
        self.tally.encrypted += task.encrypted
        self.tally.decrypted += task.decrypted
        if record:
            self.samples.setdefault(task.key, []).append(sample)
        if task.key == "reencrypt/KMSEncrypted":
            self._check_rotated(self.models.rotation)

    def _check_rotated(self, table: Table) -> None:
        """Every stored value must now carry the table's active data key version."""
        active = self.vault.active_key_version(table)
        view = stored_view(table)
        with self.engine.connect() as conn:
            stale = sum(
                1
                for (stored,) in conn.execute(select(view.c.secret))
                if int.from_bytes(bytes(stored)[2:6], "big") != active
            )
        if stale:
            raise AssertionError(f"{stale} rows of {table.name} are not under key version {active}")

    # -- after the rounds ----------------------------------------------------

    def measure_memory(self) -> None:
        """Peak traced memory of ``reencrypt`` on each memory table, small one first."""
        if self.reencrypt is None or "reencrypt" not in self.only:
            return
        for size, table in sorted(self.models.memory.items()):
            fill(self.engine, table, size)
            self.tally.encrypted += size
            self.vault.rotate_key(table)
            gc.collect()
            tracemalloc.start()
            try:
                self.reencrypt(table, batch_size=BATCH_SIZE)
                self.memory_peaks[size] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            self.tally.encrypted += size
            self.tally.decrypted += size
            self._check_rotated(table)

    def cold_read(self) -> None:
        """Forget every unwrapped key and read every encrypted table once, as a new
        process would: each key it needs must be unwrapped with one KMS ``Decrypt``."""
        self.vault.clear_cache()
        with self.engine.connect() as conn:
            for table in self.models.metadata.sorted_tables:
                columns = encrypted_columns(table)
                if columns:
                    self.tally.decrypted += columns * len(conn.execute(select(table)).all())

    def profile(self, key: str) -> None:
        """Run the benchmark ``key`` once under a profiler (pyinstrument, else cProfile)."""
        units = [unit for group in self.groups(False) for unit in group]
        unit = next((u for u in units if key in [task.key for task in u]), None)
        if unit is None:
            keys = ", ".join(task.key for u in units for task in u)
            raise SystemExit(f"no benchmark {key!r}; one of: {keys}")
        for task in unit:  # an ORM select needs its insert first
            task.setup()
            if task.key != key:
                task.run()
                continue
            try:
                from pyinstrument import Profiler
            except ImportError:
                import cProfile
                import pstats

                profiler = cProfile.Profile(time.process_time)
                profiler.runcall(task.run)
                pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
            else:
                with Profiler(interval=0.0002) as sampler:
                    task.run()
                sampler.print()
            return

    def keys_made(self) -> int:
        """Keys in the key table: one per table, purpose and key version."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(select(func.count()).select_from(self.vault.table)).scalar_one()
            )


# -- the report ----------------------------------------------------------------


@dataclass
class Line:
    """One printed line: a variant of a benchmark, compared with its baseline."""

    key: str
    label: str
    baseline: str
    per_value: int = 0  # > 0: print microseconds per value over this many values


@dataclass
class Target:
    """A target checked on the ratios of this run."""

    name: str
    value: float | None  # None: not measured in this run
    limit: float
    at_most: bool  # True: value <= limit passes; False: value >= limit passes
    detail: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        ok = self.value <= self.limit if self.at_most else self.value >= self.limit
        return "PASS" if ok else "FAIL"


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


class Report:
    """Medians, ratios and targets from a finished :class:`Benchmark`."""

    def __init__(
        self,
        bench: Benchmark,
        calls: Counter[str],
        counter: KmsCallCounter | None,
        warm_decrypts: int,
    ) -> None:
        self.bench = bench
        self.samples = bench.samples
        self.calls = calls
        self.counter = counter
        self.warm_decrypts = warm_decrypts
        self.keys = bench.keys_made()

    def ratio(self, key: str, baseline: str, *, wall: bool = False) -> float | None:
        """Median over rounds of ``key`` / ``baseline`` measured in the same round."""
        ours, theirs = self.samples.get(key), self.samples.get(baseline)
        if not ours or not theirs:
            return None
        if wall:
            return statistics.median(a.wall / b.wall for a, b in zip(ours, theirs, strict=True))
        return statistics.median(a.cpu / b.cpu for a, b in zip(ours, theirs, strict=True))

    def median(self, key: str, *, wall: bool = False) -> float | None:
        samples = self.samples.get(key)
        if not samples:
            return None
        return statistics.median(s.wall if wall else s.cpu for s in samples)

    # -- the table -----------------------------------------------------------

    def sections(self) -> list[tuple[str, list[Line]]]:
        rows = f"{self.bench.rows:,}"
        orm = list(self.bench.models.orm)
        bulk = ("plaintext", "floor", "KMSEncrypted")
        per_value = ("bare AESGCM", "floor", "KMSEncrypted", "KMSEncrypted det.")
        return [
            (
                f"ORM insert: {rows} rows x 2 columns, add_all + commit",
                [Line(f"orm_insert/{v}", v, "orm_insert/floor") for v in orm],
            ),
            (
                f"ORM select: {rows} entities",
                [Line(f"orm_select/{v}", v, "orm_select/floor") for v in orm],
            ),
            (
                f"bulk insert: {rows} rows, session.execute(insert(Model), rows)",
                [Line(f"bulk_insert/{v}", v, "bulk_insert/floor") for v in bulk],
            ),
            (
                f"equality lookup: {LOOKUPS:,} x select(Model).where(Model.email == v), "
                f"indexed, {rows} rows",
                [
                    Line("lookup/plaintext", "plaintext", "lookup/plaintext"),
                    Line("lookup/KMSEncrypted", "KMSEncrypted det.", "lookup/plaintext"),
                ],
            ),
            (
                f"per value: encrypt + decrypt {SHORT_VALUE!r}",
                [
                    Line(f"per_value/{v}", v, "per_value/bare AESGCM", PER_VALUE_LOOPS)
                    for v in per_value
                ],
            ),
            (
                f"re-encryption: {rows} rows, batches of {BATCH_SIZE:,}",
                [
                    Line("reencrypt/plain UPDATE", "plain UPDATE", "reencrypt/floor"),
                    Line("reencrypt/floor", "floor", "reencrypt/floor"),
                    Line("reencrypt/KMSEncrypted", "vault.reencrypt", "reencrypt/floor"),
                ],
            ),
        ]

    def print_table(self) -> None:
        header = (
            f"  {'variant':<20} {'CPU median':>12} {'wall median':>12} "
            f"{'CPU ratio':>10} {'wall ratio':>10}"
        )
        for title, lines in self.sections():
            if not any(self.samples.get(line.key) for line in lines):
                continue  # not run (--only)
            baseline = next((ln.label for ln in lines if ln.key == lines[0].baseline), "")
            print(f"\n{title}; ratios to {baseline}")
            print(header)
            for line in lines:
                print("  " + self._format(line))
        self.print_memory()
        self.print_kms()
        self.print_utils()

    def _format(self, line: Line) -> str:
        cpu, wall = self.median(line.key), self.median(line.key, wall=True)
        if cpu is None or wall is None:
            why = "sqlalchemy-utils is not installed" if "utils" in line.label else ""
            if line.key.startswith("reencrypt/"):
                why = self.bench.reencrypt_problem
            return f"{line.label:<20} n/a ({why})"
        if line.per_value:
            cpu_text = f"{cpu / line.per_value * 1e6:.2f} us"
            wall_text = f"{wall / line.per_value * 1e6:.2f} us"
        else:
            cpu_text, wall_text = f"{cpu:.3f} s", f"{wall:.3f} s"
        ratio = _times(self.ratio(line.key, line.baseline))
        wall_ratio = _times(self.ratio(line.key, line.baseline, wall=True))
        extra = f"  {self.bench.rows / cpu:,.0f} rows/CPU-s" if "reencrypt/" in line.key else ""
        return (
            f"{line.label:<20} {cpu_text:>12} {wall_text:>12} {ratio:>10} {wall_ratio:>10}{extra}"
        )

    def print_utils(self) -> None:
        """How much faster than sqlalchemy-utils the floor and KMSEncrypted are (no target:
        the floor bounds what any cipher can reach)."""
        lines = []
        for benchmark, title in (("orm_select", "ORM select"), ("orm_insert", "ORM insert")):
            floor = self.ratio(f"{benchmark}/sqlalchemy-utils", f"{benchmark}/floor")
            ours = self.ratio(f"{benchmark}/sqlalchemy-utils", f"{benchmark}/KMSEncrypted")
            if floor is not None and ours is not None:
                lines.append(
                    f"  {title:<12} floor {floor:5.2f}x faster, KMSEncrypted {ours:5.2f}x faster"
                )
        if lines:
            print("\nsqlalchemy-utils / floor and / KMSEncrypted (CPU; information, no target)")
            print("\n".join(lines))

    def print_memory(self) -> None:
        if not self.bench.memory_peaks and "reencrypt" not in self.bench.only:
            return
        print("\nre-encryption peak memory (tracemalloc), once each")
        peaks = self.bench.memory_peaks
        for size in sorted(self.bench.models.memory):
            if size in peaks:
                print(f"  {size:>9,} rows  {peaks[size] / 2**20:8.2f} MiB")
            else:
                print(f"  {size:>9,} rows  n/a ({self.bench.reencrypt_problem})")

    def print_kms(self) -> None:
        tally = self.bench.tally
        kind = "AwsKms on moto, counted on the boto3 client" if self.counter else "LocalKms"
        print(f"\nKMS calls for the whole run ({kind})")
        print(f"  keys made (table x purpose x version)  {self.keys:>11,}")
        print(f"  GenerateDataKey                        {self.calls['GenerateDataKey']:>11,}")
        print(
            f"  Decrypt                                {self.calls['Decrypt']:>11,}"
            f"  ({self.warm_decrypts} before the cold read after clear_cache())"
        )
        print(f"  values encrypted by KMSEncrypted       {tally.encrypted:>11,}")
        print(f"  values decrypted by KMSEncrypted       {tally.decrypted:>11,}")

    # -- targets -------------------------------------------------------------

    def targets(self) -> list[Target]:
        def ratio(key: str, baseline: str) -> float | None:
            return self.ratio(key, baseline)

        targets = [
            Target(
                "ORM insert: KMSEncrypted / floor",
                ratio("orm_insert/KMSEncrypted", "orm_insert/floor"),
                FLOOR_MAX,
                at_most=True,
            ),
            Target(
                "ORM select: KMSEncrypted / floor",
                ratio("orm_select/KMSEncrypted", "orm_select/floor"),
                FLOOR_MAX,
                at_most=True,
            ),
            Target(
                "bulk insert: KMSEncrypted / floor",
                ratio("bulk_insert/KMSEncrypted", "bulk_insert/floor"),
                FLOOR_MAX,
                at_most=True,
            ),
            Target(
                "equality lookup: deterministic / plaintext",
                ratio("lookup/KMSEncrypted", "lookup/plaintext"),
                LOOKUP_MAX,
                at_most=True,
            ),
            Target(
                "per value encrypt+decrypt: KMSEncrypted / bare AESGCM",
                ratio("per_value/KMSEncrypted", "per_value/bare AESGCM"),
                PER_VALUE_MAX,
                at_most=True,
            ),
            *self.kms_targets(),
            Target(
                "re-encryption: vault.reencrypt / floor re-encryption",
                ratio("reencrypt/KMSEncrypted", "reencrypt/floor"),
                REENCRYPT_MAX,
                at_most=True,
                detail=self.bench.reencrypt_problem,
            ),
            self.memory_target(),
        ]
        return targets

    def kms_targets(self) -> list[Target]:
        """GenerateDataKey once per key made; Decrypt at most once per key."""
        generated, unwrapped = self.calls["GenerateDataKey"], self.calls["Decrypt"]
        keys = self.keys
        if self.counter is not None:  # per encryption context: exact
            most_generated = float(self.counter.most_for_one_key("GenerateDataKey"))
            most_unwrapped = float(self.counter.most_for_one_key("Decrypt"))
            if generated != keys:
                most_generated = max(most_generated, generated / keys if keys else 0.0)
            how = "most calls for one key"
        else:  # LocalKms counts totals only
            most_generated = generated / keys if keys else 0.0
            most_unwrapped = unwrapped / keys if keys else 0.0
            how = "calls per key"
        return [
            Target(
                f"KMS GenerateDataKey, {how}",
                most_generated if keys else None,
                1.0,
                at_most=True,
                detail=f"{generated} calls, {keys} keys",
            ),
            Target(
                f"KMS Decrypt, {how}",
                most_unwrapped if keys else None,
                1.0,
                at_most=True,
                detail=f"{unwrapped} calls, {keys} keys",
            ),
        ]

    def memory_target(self) -> Target:
        peaks = self.bench.memory_peaks
        small, large = sorted(self.bench.models.memory)
        name = f"re-encryption peak memory: {large:,} rows / {small:,} rows"
        if small not in peaks or large not in peaks or not peaks[small]:
            return Target(name, None, MEMORY_GROWTH_MAX, True, self.bench.reencrypt_problem)
        return Target(name, peaks[large] / peaks[small], MEMORY_GROWTH_MAX, at_most=True)


def print_targets(targets: list[Target]) -> None:
    print("\ntargets (this run; ratios are medians of per-round CPU ratios)")
    for target in targets:
        sign = "<=" if target.at_most else ">="
        value = "n/a" if target.value is None else f"{target.value:.3f}"
        detail = f"  ({target.detail})" if target.detail else ""
        print(
            f"  {target.verdict:<4}  {target.name:<58} {value:>6}  "
            f"target {sign} {target.limit}{detail}"
        )


# -- main ----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows per benchmark")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed rounds")
    parser.add_argument("--db", help="database URL (default: a SQLite file in a temporary folder)")
    parser.add_argument(
        "--kms",
        choices=("aws", "local"),
        default="aws",
        help="aws: AwsKms on a moto server started here (default); local: LocalKms",
    )
    parser.add_argument(
        "--memory-rows",
        type=int,
        default=MEMORY_ROWS,
        help="rows of the large re-encryption memory run; the small one has a tenth",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a target fails")
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help=f"run only these benchmarks, comma-separated: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--profile",
        metavar="BENCHMARK",
        help="profile one benchmark once instead of the run, e.g. orm_select/KMSEncrypted",
    )
    args = parser.parse_args(argv)
    if args.rows < 10 or args.repeats < 1 or args.memory_rows < 100:
        parser.error("--rows must be at least 10, --memory-rows 100, --repeats 1")
    args.only = [name.strip() for name in args.only.split(",")] if args.only else BENCHMARKS
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown:
        parser.error(
            f"unknown benchmarks {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    prefix = f"bench_{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="sqlalchemy-kms-bench-") as folder:
        engine = create_engine(args.db or f"sqlite:///{os.path.join(folder, 'bench.db')}")
        with kms_provider(args.kms) as (provider, counter):
            vault = KeyVault(engine, provider, table_name=f"{prefix}_keys")
            sizes = (args.memory_rows // 10, args.memory_rows)
            models = build_models(prefix, AESGCM(AESGCM.generate_key(256)), sizes)
            bench = Benchmark(engine, vault, models, args.rows, args.only)
            print(
                f"sqlalchemy-kms benchmark: {engine.dialect.name}, {args.kms} KMS, "
                f"{args.rows:,} rows, {args.repeats} rounds + 1 warm-up; "
                f"Python {platform.python_version()}, SQLAlchemy {sqlalchemy.__version__}, "
                f"cryptography {cryptography.__version__}, {os.cpu_count()} CPUs",
                flush=True,
            )
            try:
                bench.prepare()
                bench.run_round(0, warmup=True)
                if args.profile:
                    bench.profile(args.profile)
                    return 0
                for number in range(args.repeats):
                    bench.run_round(number)
                    elapsed = time.perf_counter() - started
                    print(f"  round {number + 1}/{args.repeats} done ({elapsed:.0f} s)", flush=True)
                bench.measure_memory()
                calls = counter.calls if counter is not None else provider.calls
                warm_decrypts = calls["Decrypt"]
                bench.cold_read()
                report = Report(bench, Counter(calls), counter, warm_decrypts)
                report.print_table()
                targets = report.targets()
                print_targets(targets)
            finally:
                models.metadata.drop_all(engine)
                vault.metadata.drop_all(engine)
                vault.close()
                engine.dispose()
    print(f"\ntotal run time {time.perf_counter() - started:.1f} s")
    failed = [target.name for target in targets if target.verdict == "FAIL"]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
