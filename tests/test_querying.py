"""Querying encrypted columns: what works returns exactly the plaintext twin's rows,
what cannot work raises when the expression is built."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, InvalidRequestError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column

from sqlalchemy_kms import AwsKms, KeyVault, KMSEncrypted
from sqlalchemy_kms.errors import SQLAlchemyKMSError, UnsupportedQueryError
from sqlalchemy_kms.types import SEARCH_SLOTS

EMAILS = [
    "kim@example.com",
    "lee@example.com",
    "kim@example.com",
    None,
    "park@example.com",
    "",
    "choi@example.com",
    "lee@example.com",
]
NAMES = ["Kim", "Lee", "Kim B", "Nobody", "Park", "Empty", None, "Lee B"]


def twin_tables(metadata: MetaData) -> tuple[Table, Table]:
    plain = Table(
        "contacts_plain",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("email", String(320)),
        Column("name", String(200)),
    )
    encrypted = Table(
        "contacts",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("email", KMSEncrypted(String(320), deterministic=True), index=True),
        Column("name", KMSEncrypted(String(200))),
    )
    return plain, encrypted


@pytest.fixture
def twins(engine: Engine, vault: KeyVault) -> tuple[Table, Table]:
    metadata = MetaData()
    plain, encrypted = twin_tables(metadata)
    metadata.create_all(engine)
    rows = [
        {"id": i, "email": e, "name": n} for i, (e, n) in enumerate(zip(EMAILS, NAMES, strict=True))
    ]
    with engine.begin() as conn:
        conn.execute(plain.insert(), rows)
        conn.execute(encrypted.insert(), rows)
    return plain, encrypted


CONDITIONS: dict[str, Callable[[Table], Any]] = {
    "eq": lambda t: t.c.email == "kim@example.com",
    "eq_empty_string": lambda t: t.c.email == "",
    "eq_no_match": lambda t: t.c.email == "nobody@example.com",
    "ne": lambda t: t.c.email != "kim@example.com",
    "negated_eq": lambda t: ~(t.c.email == "kim@example.com"),
    "negated_ne": lambda t: ~(t.c.email != "kim@example.com"),
    "in": lambda t: t.c.email.in_(["lee@example.com", "park@example.com", "x@y.z"]),
    "in_with_none": lambda t: t.c.email.in_(["lee@example.com", None]),
    "in_empty": lambda t: t.c.email.in_([]),
    "not_in": lambda t: t.c.email.not_in(["lee@example.com", "kim@example.com"]),
    "not_in_empty": lambda t: t.c.email.not_in([]),
    "is_none": lambda t: t.c.email.is_(None),
    "is_not_none": lambda t: t.c.email.is_not(None),
    "eq_none": lambda t: t.c.email == None,  # noqa: E711
    "ne_none": lambda t: t.c.email != None,  # noqa: E711
    "randomized_is_none": lambda t: t.c.name.is_(None),
    "randomized_is_not_none": lambda t: t.c.name.is_not(None),
    "combined": lambda t: (t.c.email == "lee@example.com") | t.c.name.is_(None),
    "negated_in": lambda t: ~t.c.email.in_(["lee@example.com", "kim@example.com"]),
    "negated_not_in": lambda t: ~t.c.email.not_in(["lee@example.com"]),
    "not_in_empty_and": lambda t: t.c.email.not_in([]) & t.c.name.is_(None),
    "negated_in_empty_or": lambda t: ~t.c.email.in_([]) | t.c.name.is_(None),
    "eq_literal": lambda t: t.c.email == literal("kim@example.com"),
    "in_literals": lambda t: t.c.email.in_([literal("lee@example.com"), "park@example.com"]),
}


def _ids(engine: Engine, table: Table, condition: Any) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.execute(select(table.c.id).where(condition).order_by(table.c.id)).scalars()
        )


@pytest.mark.parametrize("name", list(CONDITIONS))
def test_supported_operators_match_the_plaintext_twin(
    engine: Engine, twins: tuple[Table, Table], name: str
) -> None:
    plain, encrypted = twins
    want = _ids(engine, plain, CONDITIONS[name](plain))
    assert _ids(engine, encrypted, CONDITIONS[name](encrypted)) == want
    if name in ("eq", "in", "not_in", "is_none"):
        assert want  # the comparison is not vacuous


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(
        KMSEncrypted(String(320), deterministic=True, normalize=str.lower), unique=True
    )
    name: Mapped[str | None] = mapped_column(KMSEncrypted(String(200)))


@pytest.fixture
def users(engine: Engine, vault: KeyVault) -> Engine:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            [
                User(id=1, email="Kim@Example.com", name="Kim"),
                User(id=2, email="lee@example.com", name="Lee"),
                User(id=3, email="park@example.com", name=None),
            ]
        )
        session.commit()
    return engine


def test_orm_select_filter_by_update_and_delete(users: Engine) -> None:
    with Session(users) as session:
        assert session.scalars(select(User).where(User.email == "KIM@example.com")).one().id == 1
        assert session.scalars(select(User).filter_by(email="lee@example.com")).one().name == "Lee"
        found = session.scalars(
            select(User.id).where(User.email.in_(["park@example.com", "LEE@example.com"]))
        )
        assert sorted(found) == [2, 3]
        session.execute(update(User).where(User.email == "lee@example.com").values(name="Lee 2"))
        session.execute(delete(User).where(User.email.in_(["park@example.com"])))
        session.commit()
    with Session(users) as session:
        assert [
            (u.id, u.email, u.name) for u in session.scalars(select(User).order_by(User.id))
        ] == [(1, "kim@example.com", "Kim"), (2, "lee@example.com", "Lee 2")]


EVALUATED: dict[str, Callable[[], Any]] = {
    "eq": lambda: User.email == "lee@example.com",
    "ne": lambda: User.email != "kim@example.com",
    "negated_eq": lambda: ~(User.email == "kim@example.com"),
    "in": lambda: User.email.in_(["lee@example.com"]),
    "not_in": lambda: User.email.not_in(["kim@example.com", "park@example.com"]),
    "negated_in": lambda: ~User.email.in_(["kim@example.com", "park@example.com"]),
}


@pytest.mark.parametrize("name", list(EVALUATED))
def test_synchronize_session_evaluate_refuses_encrypted_criteria(users: Engine, name: str) -> None:
    with Session(users) as session:
        lee = session.get(User, 2)
        assert lee is not None and lee.name == "Lee"
        with pytest.raises(InvalidRequestError, match="evaluate"):
            session.execute(
                update(User).where(EVALUATED[name]()).values(name="changed"),
                execution_options={"synchronize_session": "evaluate"},
            )
        session.rollback()
    with Session(users) as session:  # nothing was written
        assert session.scalars(select(User.name).order_by(User.id)).all() == ["Kim", "Lee", None]


@pytest.mark.parametrize("name", list(EVALUATED))
def test_synchronize_session_default_updates_the_loaded_objects(users: Engine, name: str) -> None:
    with Session(users) as session:
        lee = session.get(User, 2)
        assert lee is not None and lee.name == "Lee"
        session.execute(update(User).where(EVALUATED[name]()).values(name="changed"))
        assert lee.name == "changed"  # the object in the session follows the database


def test_core_update_and_delete_where(engine: Engine, twins: tuple[Table, Table]) -> None:
    plain, encrypted = twins
    for table in (plain, encrypted):
        with engine.begin() as conn:
            updated = conn.execute(
                update(table).where(table.c.email == "kim@example.com").values(name="updated")
            ).rowcount
            deleted = conn.execute(delete(table).where(table.c.email.in_(["lee@example.com"])))
            assert (updated, deleted.rowcount) == (2, 2)
    with engine.connect() as conn:
        assert (
            conn.execute(select(encrypted.c.id, encrypted.c.name).order_by("id")).all()
            == conn.execute(select(plain.c.id, plain.c.name).order_by("id")).all()
        )


def test_unique_deterministic_column_refuses_duplicates(users: Engine) -> None:
    with Session(users) as session:
        session.add(User(id=4, email="KIM@example.com", name="copy"))
        with pytest.raises(IntegrityError):
            session.commit()


def test_duplicate_in_the_middle_of_a_data_key_rotation_is_refused(
    users: Engine, vault: KeyVault
) -> None:
    assert vault.rotate_key("users") == 2  # old rows stay on data key 1
    with Session(users) as session:
        session.add(User(id=4, email="new@example.com", name="on key 2"))
        session.commit()
        session.add(User(id=5, email="lee@example.com", name="duplicate of a key-1 row"))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        assert session.scalars(select(User.name).where(User.email == "lee@example.com")).all() == [
            "Lee"
        ]
    with users.connect() as conn:
        versions = {
            bytes(v)[2:6]
            for v in conn.execute(text("SELECT name FROM users")).scalars()
            if v is not None
        }
    assert len(versions) == 2  # rows really are spread over two data key versions


@pytest.mark.parametrize("search_versions", [2, 3])
def test_equality_across_search_key_versions(
    users: Engine, vault: KeyVault, search_versions: int
) -> None:
    for n in range(2, search_versions + 1):
        assert vault.rotate_key("users", search=True) == n
        with Session(users) as session:
            session.add(User(id=10 + n, email=f"v{n}@example.com", name=f"on search key {n}"))
            session.commit()
    with users.connect() as conn:
        headers = {bytes(v)[:6] for v in conn.execute(text("SELECT email FROM users")).scalars()}
    assert len(headers) == search_versions
    with Session(users) as session:
        every = ["kim@example.com"] + [f"v{n}@example.com" for n in range(2, search_versions + 1)]
        found = session.scalars(select(User.id).where(User.email.in_(every))).all()
        assert sorted(found) == [1] + [10 + n for n in range(2, search_versions + 1)]
        for n in range(2, search_versions + 1):
            assert (
                session.scalars(select(User.id).where(User.email == f"v{n}@example.com")).one()
                == 10 + n
            )
        assert sorted(session.scalars(select(User.id).where(User.email != "kim@example.com"))) == [
            2,
            3,
        ] + [10 + n for n in range(2, search_versions + 1)]


def test_too_many_search_key_versions_fail_loudly(users: Engine, vault: KeyVault) -> None:
    for _ in range(SEARCH_SLOTS):
        vault.rotate_key("users", search=True)
    with Session(users) as session, pytest.raises(UnsupportedQueryError, match="retire"):
        session.scalars(select(User).where(User.email == "kim@example.com")).all()


def test_one_cached_statement_stays_right_across_a_rotation(users: Engine, vault: KeyVault) -> None:
    statement = select(User.id).where(User.email.in_(["kim@example.com", "late@example.com"]))
    with users.connect() as conn:
        assert sorted(conn.execute(statement).scalars()) == [1]
    vault.rotate_key("users", search=True)
    vault.rotate_key("users")
    with Session(users) as session:
        session.add(User(id=9, email="late@example.com", name="after rotation"))
        session.commit()
    with users.connect() as conn:
        result = conn.execute(statement)
        assert sorted(result.scalars()) == [1, 9]
        assert result.context.cache_hit.name == "CACHE_HIT"  # the same compiled form
    for _ in range(3):  # rebuilt statements hit the same compiled form
        with users.connect() as conn:
            rebuilt = select(User.id).where(User.email.in_(["kim@example.com", "late@example.com"]))
            result = conn.execute(rebuilt)
            assert sorted(result.scalars()) == [1, 9]
            assert result.context.cache_hit.name == "CACHE_HIT"


ROTATE_IN_ANOTHER_PROCESS = textwrap.dedent("""
    import os, sys
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session
    sys.path.insert(0, os.environ["PROJECT_DIR"])
    from sqlalchemy_kms import AwsKms, KeyVault
    from tests.test_querying import User
    engine = create_engine(os.environ["DB_URL"])
    vault = KeyVault(engine, AwsKms(os.environ["CMK"], endpoint_url=os.environ["KMS_ENDPOINT"],
                                    region_name="us-east-1"))
    print(vault.rotate_key("users", search=True))
    with Session(engine) as session:
        session.add(User(id=50, email="other@example.com", name="written elsewhere"))
        session.commit()
""")


@pytest.mark.aws_kms
@pytest.mark.parametrize("how", ["refresh-interval", "miss"])
def test_search_key_rotated_in_another_process_is_picked_up(
    users: Engine, db_url: str, kms: AwsKms, kms_endpoint: str, cmk: dict[str, str], how: str
) -> None:
    vault = KeyVault(
        users, kms, refresh_interval=0.5 if how == "refresh-interval" else 60, replace=True
    )
    with Session(users) as session:  # this process knows search key 1 only
        assert session.scalars(select(User.id).where(User.email == "kim@example.com")).all() == [1]
    env = dict(
        os.environ,
        DB_URL=db_url,
        CMK=cmk["alias"],
        KMS_ENDPOINT=kms_endpoint,
        PROJECT_DIR=str(Path(__file__).parent.parent),
    )
    out = subprocess.run(
        [sys.executable, "-c", ROTATE_IN_ANOTHER_PROCESS],
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.strip() == "2"
    if how == "refresh-interval":
        time.sleep(0.6)
    else:  # reading a value under the new version teaches the vault about it
        with Session(users) as session:
            assert len(session.scalars(select(User)).all()) == 4
    with Session(users) as session:
        assert session.scalars(
            select(User.name).where(User.email == "other@example.com")
        ).all() == ["written elsewhere"]
    vault.close()


def test_index_and_unique_are_created(engine: Engine, twins: tuple[Table, Table]) -> None:
    from sqlalchemy import inspect

    indexes = inspect(engine).get_indexes("contacts")
    assert any(ix["column_names"] == ["email"] for ix in indexes)
    metadata = MetaData()
    table = Table(
        "unique_emails",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("email", KMSEncrypted(String(320), deterministic=True), unique=True),
    )
    Index("ix_unique_emails_email_2", table.c.email)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert().values(email="a@b.c"))
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(table.insert().values(email="a@b.c"))


REFUSED: dict[str, Callable[[Table], Any]] = {
    "like": lambda t: t.c.name.like("%kim%"),
    "ilike": lambda t: t.c.name.ilike("%kim%"),
    "contains": lambda t: t.c.name.contains("kim"),
    "startswith": lambda t: t.c.name.startswith("k"),
    "endswith": lambda t: t.c.name.endswith("m"),
    "lt": lambda t: t.c.name < "m",
    "gt": lambda t: t.c.name > "m",
    "le": lambda t: t.c.name <= "m",
    "ge": lambda t: t.c.name >= "m",
    "between": lambda t: t.c.name.between("a", "m"),
    "match": lambda t: t.c.name.match("kim"),
    "regexp_match": lambda t: t.c.name.regexp_match("k.*"),
    "add": lambda t: t.c.name + "x",
    "radd": lambda t: "x" + t.c.name,
    "concat": lambda t: t.c.name.concat("x"),
    "asc": lambda t: t.c.name.asc(),
    "desc": lambda t: t.c.name.desc(),
    "eq_randomized": lambda t: t.c.name == "Kim",
    "ne_randomized": lambda t: t.c.name != "Kim",
    "in_randomized": lambda t: t.c.name.in_(["Kim"]),
    "collate": lambda t: t.c.name.collate("C"),
    "is_distinct_from": lambda t: t.c.name.is_distinct_from("x"),
    "det_like": lambda t: t.c.email.like("%kim%"),
    "det_lt": lambda t: t.c.email < "m",
    "det_between": lambda t: t.c.email.between("a", "m"),
    "det_startswith": lambda t: t.c.email.startswith("kim"),
    "det_asc": lambda t: t.c.email.asc(),
    "det_in_subquery": lambda t: t.c.email.in_(select(t.c.email)),
    "det_in_string": lambda t: t.c.email.in_("kim@example.com"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_operators_raise_when_built(name: str) -> None:
    _, encrypted = twin_tables(MetaData())
    with pytest.raises(UnsupportedQueryError) as info:
        REFUSED[name](encrypted)
    error = info.value
    assert isinstance(error, SQLAlchemyKMSError)
    assert error.table == "contacts" and error.column in ("name", "email")
    assert error.operator and error.operator in str(error)
    assert "contacts." in str(error)
    assert "deterministic" in str(error).lower()


def test_comparing_two_encrypted_columns_is_refused_in_sql(
    engine: Engine, twins: tuple[Table, Table]
) -> None:
    _, encrypted = twins
    other = aliased(encrypted)
    joined = select(encrypted.c.id).join(other, other.c.email == encrypted.c.name)
    with pytest.raises(UnsupportedQueryError, match="another column"), engine.connect() as conn:
        conn.execute(joined)
    with pytest.raises(UnsupportedQueryError), engine.connect() as conn:
        conn.execute(select(encrypted.c.id).where(encrypted.c.email == encrypted.c.name))
    assert bool(encrypted.c.email == encrypted.c.email)  # Python truth tests still work


def test_is_none_and_distinct_on_a_deterministic_column(
    engine: Engine, twins: tuple[Table, Table]
) -> None:
    plain, encrypted = twins
    with engine.connect() as conn:

        def count(table: Table) -> int:
            return int(conn.execute(select(func.count(table.c.email.distinct()))).scalar_one())

        assert count(encrypted) == count(plain) == 5
